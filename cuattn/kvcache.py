"""A KV cache that manages its own buffers, for one attention layer.

Plain mode preallocates ``capacity`` positions per sequence; each ``attend`` appends the
step's keys and values in place and attends over everything cached so far. Rolling mode
(sliding-window models, StreamingLLM) keeps only ``sink_tokens + window`` slots: the first
``sink_tokens`` positions stay, position p >= sink_tokens lives in slot
``sink_tokens + (p - sink_tokens) % window``, so memory does not grow with the sequence while
masks keep using true positions.
"""

from __future__ import annotations

import numpy as np

from . import backends, interop
from .api import attention, attention_with_kvcache
from .dlpack import BFLOAT16
from .spec import FLOAT_DTYPES, _check_int


class KVCache:
    """Keys and values of ``batch`` sequences, on the device and in the framework of ``like``.

    Args:
        batch, num_heads_kv, head_dim: the cache's shape (batch, capacity, num_heads_kv, head_dim).
        capacity: positions per sequence (plain mode).
        dtype: "float16", "bfloat16" or "float32"; by default that of ``like`` (float16 without).
        like: an array of the framework and device to allocate on (NumPy when None).
        window, sink_tokens: rolling mode: keep the first ``sink_tokens`` tokens and the last
            ``window`` ones (the token itself included); ``capacity`` is then sink_tokens + window.

    Example:
        >>> import numpy as np, cuattn
        >>> cache = cuattn.KVCache(batch=1, num_heads_kv=2, head_dim=64, window=256, sink_tokens=4)
        >>> for step in range(1000):
        ...     k, v, q = (np.random.randn(1, 1, 2, 64).astype(np.float16) for _ in range(3))
        ...     out = cache.attend(q, k, v)
        >>> cache.k.shape, int(cache.lengths[0])
        ((1, 260, 2, 64), 1000)
    """

    def __init__(
        self,
        batch: int,
        num_heads_kv: int,
        head_dim: int,
        capacity: int | None = None,
        *,
        dtype=None,
        like=None,
        window: int | None = None,
        sink_tokens: int = 0,
    ):
        batch = _check_int("batch", batch, 0)
        num_heads_kv = _check_int("num_heads_kv", num_heads_kv, 1)
        head_dim = _check_int("head_dim", head_dim, 1)
        self.sink_tokens = _check_int("sink_tokens", sink_tokens, 0)
        if window is None:
            if capacity is None:
                raise ValueError(
                    "capacity: a plain cache needs a capacity (or give window= for a rolling one)"
                )
            capacity = _check_int("capacity", capacity, 1)
            self.window = None
        else:
            self.window = _check_int("window", window, 1)
            if capacity is not None and capacity != self.sink_tokens + self.window:
                raise ValueError(
                    f"capacity: a rolling cache holds sink_tokens + window = "
                    f"{self.sink_tokens + self.window} positions, got {capacity}"
                )
            capacity = self.sink_tokens + self.window
        template = interop.import_arrays(
            {"like": like if like is not None else np.zeros(1, np.float16)}
        )
        if template.framework == "jax":
            raise TypeError(
                "like: JAX arrays are immutable and a KV cache is written in place; "
                "allocate it with NumPy, CuPy or PyTorch"
            )
        if dtype is None:
            dtype = template.raw["like"].dtype
        dtype = BFLOAT16 if str(dtype) == "bfloat16" else np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: must be float16, bfloat16 or float32, got {dtype}")
        shape = (batch, capacity, num_heads_kv, head_dim)
        self.k = _zeros(template, shape, dtype)
        self.v = _zeros(template, shape, dtype)
        self.capacity = capacity
        self.lengths = np.zeros(batch, np.int64)  # tokens seen per sequence, true positions

    @property
    def rolling(self) -> bool:
        return self.window is not None

    def reset(self, sequences=None) -> None:
        """Forget the given sequences (all by default); their buffers are reused as they are."""
        if sequences is None:
            self.lengths[:] = 0
        else:
            self.lengths[np.asarray(sequences)] = 0

    def attend(
        self,
        q,
        k_new,
        v_new,
        *,
        scale: float | None = None,
        softcap: float = 0.0,
        sinks=None,
        return_lse: bool = False,
        backend: str = "auto",
    ):
        """Append this step's keys and values, then causal attention of ``q`` over each
        sequence's tokens (within the window in rolling mode, sink tokens included).

        q: (batch, seqlen_q, num_heads_q, head_dim); k_new, v_new: (batch, seqlen_new,
        num_heads_kv, head_dim), with seqlen_q <= seqlen_new + tokens already cached.
        """
        options = dict(
            scale=scale, softcap=softcap, sinks=sinks, return_lse=return_lse, backend=backend
        )
        new_tokens = k_new.shape[1]
        if not self.rolling:
            result = attention_with_kvcache(
                q,
                self.k,
                self.v,
                k_new,
                v_new,
                cache_seqlens=self.lengths.astype(np.int32),
                causal=True,
                **options,
            )
        elif new_tokens == 1:
            result = self._rolling_step(q, k_new, v_new, options)
        elif not self.lengths.any():
            result = self._rolling_prefill(q, k_new, v_new, options)
        else:
            raise NotImplementedError(
                "k_new: a rolling cache takes one token per step once it holds tokens (or a whole "
                f"prompt while empty); got {new_tokens} tokens for sequences already holding "
                f"{int(self.lengths.max())}"
            )
        self.lengths += new_tokens
        return result

    def _write(self, k_new, v_new, slots: np.ndarray, backend: str) -> None:
        """Write the new tokens of sequence b at slots [slots[b], slots[b] + seqlen_new)."""
        call = interop.import_arrays(
            {"k_cache": self.k, "v_cache": self.v, "k_new": k_new, "v_new": v_new},
            writable=("k_cache", "v_cache"),
        )
        raw = call.raw
        if raw["k_new"].shape != (self.k.shape[0], k_new.shape[1], *self.k.shape[2:]):
            raise ValueError(
                f"k_new: expected shape ({self.k.shape[0]}, seqlen_new, {self.k.shape[2]}, "
                f"{self.k.shape[3]}), got {tuple(raw['k_new'].shape)}"
            )
        engine = backends.select(backend, call.device)
        engine.append_kv(
            raw["k_cache"], raw["v_cache"], raw["k_new"], raw["v_new"], slots, call.stream
        )

    def _rolling_step(self, q, k_new, v_new, options):
        # The new token overwrites the oldest window token, which it no longer sees; every
        # slot then holds a visible token, so attention needs no mask at all (the softmax
        # does not care in which order keys are stored).
        n, window = self.sink_tokens, self.window
        slots = np.where(self.lengths < n + window, self.lengths, n + (self.lengths - n) % window)
        self._write(k_new, v_new, slots, options["backend"])
        filled = np.minimum(self.lengths + 1, n + window).astype(np.int32)
        return attention_with_kvcache(q, self.k, self.v, cache_seqlens=filled, **options)

    def _rolling_prefill(self, q, k_new, v_new, options):
        n, window = self.sink_tokens, self.window
        result = attention(
            q, k_new, v_new, causal=True, window=(window - 1, 0), sink_tokens=n, **options
        )
        total = k_new.shape[1]
        zero = np.zeros(len(self.lengths), np.int64)
        if total <= n + window:
            self._write(k_new, v_new, zero, options["backend"])
            return result
        self._write(k_new[:, :n], v_new[:, :n], zero, options["backend"])
        # The last `window` positions, each to its slot: one run up to the end of the
        # buffer, and the rest wrapped around to just after the sinks.
        first = total - window
        start_slot = n + (first - n) % window
        head = n + window - start_slot
        self._write(
            k_new[:, first : first + head],
            v_new[:, first : first + head],
            zero + start_slot,
            options["backend"],
        )
        if head < window:
            self._write(
                k_new[:, first + head :], v_new[:, first + head :], zero + n, options["backend"]
            )
        return result


def _zeros(template: interop.CallArrays, shape, dtype):
    result = interop.empty(template, shape, dtype)
    array = result.array()
    array[...] = 0
    return array
