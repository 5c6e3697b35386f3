"""A KV cache that manages its own buffers, for one attention layer.

Plain mode preallocates ``capacity`` positions per sequence; each ``attend`` appends the
step's keys and values in place and attends over everything cached so far. Rolling mode
(sliding-window models, StreamingLLM) keeps only ``sink_tokens + window`` slots: the first
``sink_tokens`` positions stay, position p >= sink_tokens lives in slot
``sink_tokens + (p - sink_tokens) % window``, so memory does not grow with the sequence while
masks keep using true positions. Steps of one token and prompts into an empty cache attend
in place; a chunk of several tokens into a cache that holds some (chunked prefill, several
accepted tokens at once) attends over a copy of the window per sequence, since the chunk's
own tokens would otherwise overwrite keys its earlier queries still see. Stored tokens
overwrite evicted ones, so a rolling cache cannot take back rejected draft tokens; the
queries of a rolling step are its new tokens (or the last of them).
"""

from __future__ import annotations

import numpy as np

from . import backends, interop
from .api import attention, attention_with_kvcache
from .dlpack import BFLOAT16
from .spec import FLOAT_DTYPES, MaskOptions, _check_int, check_cache_step


def _dtype_named(name: str, dtype) -> np.dtype:
    """A NumPy dtype from a NumPy, PyTorch or JAX dtype, or its name."""
    spelled = str(dtype).removeprefix("torch.")
    if spelled == "bfloat16":
        return BFLOAT16
    for candidate in (dtype, spelled):
        try:
            return np.dtype(candidate)
        except TypeError:
            pass
    raise TypeError(f"{name}: must be float16, bfloat16 or float32, got {dtype!r}")


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
        dtype = _dtype_named("dtype", dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: must be float16, bfloat16 or float32, got {dtype}")
        shape = (batch, capacity, num_heads_kv, head_dim)
        self._template = template  # where temporaries go: the cache's framework and device
        self._dtype = dtype
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
            return
        index = np.asarray(sequences)
        if index.size == 0:
            return
        if index.dtype.kind not in "iub":
            raise TypeError(
                f"sequences: expected sequence indices or a bool mask, got {index.dtype} values"
            )
        try:
            self.lengths[index] = 0
        except IndexError as error:
            raise ValueError(
                f"sequences: {error} (the cache holds {len(self.lengths)} sequences)"
            ) from None

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
        num_heads_kv, head_dim), with seqlen_q <= seqlen_new + tokens already cached, and in
        rolling mode seqlen_q <= seqlen_new (the queries are the last new tokens).
        """
        for name, array in (("k_new", k_new), ("v_new", v_new)):
            if array is None:
                raise TypeError(f"{name}: expected this step's array, got None")
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
        else:
            # attention_with_kvcache checks a plain step before it writes; the rolling paths
            # write by themselves, so they check first.
            self._check_step(q, k_new, v_new, options)
            if new_tokens == 1:
                result = self._rolling_step(q, k_new, v_new, options)
            elif not self.lengths.any():
                result = self._rolling_prefill(q, k_new, v_new, options)
            else:
                result = self._rolling_chunk(q, k_new, v_new, options)
        self.lengths += new_tokens
        return result

    def _check_step(self, q, k_new, v_new, options: dict) -> None:
        """A rolling step checked in full before anything is written: what
        attention_with_kvcache checks of q, the caches, the new tokens and the options, and
        that the queries are new tokens (the window of an older position may be gone)."""
        call = interop.import_arrays(
            {
                "q": q,
                "k_cache": self.k,
                "v_cache": self.v,
                "k_new": k_new,
                "v_new": v_new,
                "sinks": options["sinks"],
            },
            optional=("sinks",),
        )
        mask = MaskOptions(
            True,
            (self.window - 1, 0),
            options["scale"],
            options["softcap"],
            self.sink_tokens,
            options["return_lse"],
        )
        check_cache_step(call.raw, mask)
        queries, new_tokens = call.raw["q"].shape[1], call.raw["k_new"].shape[1]
        if queries > new_tokens:
            raise ValueError(
                f"q: a rolling cache attends for its new tokens only: at most {new_tokens} "
                f"queries (seqlen_new), got {queries}"
            )

    def _rolling_step(self, q, k_new, v_new, options):
        # The new token overwrites the oldest window token, which it no longer sees; every
        # slot then holds a visible token, so attention needs no mask at all (the softmax
        # does not care in which order keys are stored).
        self._copy(self.k, self.v, k_new, v_new, self._slot(self.lengths), options["backend"])
        filled = np.minimum(self.lengths + 1, self.capacity).astype(np.int32)
        return attention_with_kvcache(q, self.k, self.v, cache_seqlens=filled, **options)

    def _rolling_prefill(self, q, k_new, v_new, options):
        n, window = self.sink_tokens, self.window
        result = attention(
            q, k_new, v_new, causal=True, window=(window - 1, 0), sink_tokens=n, **options
        )
        self._store(self.k, self.v, k_new, v_new, 0, options["backend"])
        return result

    def _rolling_chunk(self, q, k_new, v_new, options):
        """Several tokens into a rolling cache that already holds some (chunked prefill,
        several accepted tokens at once). Stored first, the chunk would overwrite window
        tokens its own earlier queries still see; so the sequences attend over a copy of what
        they keep, in position order, followed by the chunk, and the chunk is stored
        afterwards. With the sinks in front, a gap in positions between them and the window
        changes nothing: sinks are always visible, and within the window the mask only looks
        at distances. Consecutive sequences of one length (all of them, unless some were
        reset) share one copy and one attention call."""
        n, window = self.sink_tokens, self.window
        backend = options["backend"]
        new_tokens = k_new.shape[1]
        results = []
        for first, last, length in _runs_of_equal(self.lengths.tolist()):
            group = slice(first, last)
            runs = self._slots_in_position_order(length)
            kept = sum(end - begin for begin, end in runs)
            shape = (last - first, kept + new_tokens, *self.k.shape[2:])
            keys = interop.empty(self._template, shape, self._dtype).array()
            values = interop.empty(self._template, shape, self._dtype).array()
            offset = 0
            for begin, end in runs:
                self._copy(
                    keys,
                    values,
                    self.k[group, begin:end],
                    self.v[group, begin:end],
                    offset,
                    backend,
                )
                offset += end - begin
            self._copy(keys, values, k_new[group], v_new[group], offset, backend)
            results.append(
                attention(
                    q[group],
                    keys,
                    values,
                    causal=True,
                    window=(window - 1, 0),
                    sink_tokens=n,
                    **options,
                )
            )
            self._store(self.k[group], self.v[group], k_new[group], v_new[group], length, backend)
        return _concatenate(results, q, options["return_lse"])

    def _slot(self, position):
        """Where a position lives (an int or an array of them): a sink token in its own slot,
        any later one at sink_tokens + (position - sink_tokens) % window."""
        n = self.sink_tokens
        return np.where(position < n, position, n + (position - n) % self.window)

    def _slots_in_position_order(self, length: int) -> list[tuple[int, int]]:
        """Slot runs [begin, end) holding a sequence's kept tokens, oldest first: the sinks,
        then the window from its oldest slot to the buffer's end and on from after the sinks."""
        n, window = self.sink_tokens, self.window
        if length <= n + window:
            return [(0, length)] if length else []  # nothing overwritten yet: slot = position
        oldest = int(self._slot(length - window))
        runs = [(0, n), (oldest, n + window), (n, oldest)]
        return [(begin, end) for begin, end in runs if end > begin]

    def _store(self, k, v, k_new, v_new, first: int, backend: str) -> None:
        """Store tokens at positions [first, first + seqlen_new) of every sequence of (k, v)
        in their slots (_slot): of those past the sinks only the last `window` survive."""
        n, window = self.sink_tokens, self.window
        total = k_new.shape[1]
        sinks_end = min(max(n - first, 0), total)  # chunk indices [0, sinks_end) are sinks
        if sinks_end:
            self._copy(k, v, k_new[:, :sinks_end], v_new[:, :sinks_end], first, backend)
        start = max(sinks_end, total - window)  # the older ones would be overwritten anyway
        if start >= total:
            return
        slot = int(self._slot(first + start))
        head = min(total - start, n + window - slot)  # up to the buffer's end, then wrap
        self._copy(
            k, v, k_new[:, start : start + head], v_new[:, start : start + head], slot, backend
        )
        if start + head < total:
            self._copy(k, v, k_new[:, start + head :], v_new[:, start + head :], n, backend)

    @staticmethod
    def _copy(k, v, k_new, v_new, slots, backend: str) -> None:
        """k[b, slots[b] : slots[b] + seqlen_new] = k_new[b] for every sequence b, and v
        likewise, through the backend (slots: an int for all, or one per sequence)."""
        call = interop.import_arrays(
            {"k_cache": k, "v_cache": v, "k_new": k_new, "v_new": v_new},
            writable=("k_cache", "v_cache"),
        )
        raw = call.raw
        slots = np.broadcast_to(np.asarray(slots, np.int64), raw["k_cache"].shape[:1])
        engine = backends.select(backend, call.device)
        engine.append_kv(
            raw["k_cache"], raw["v_cache"], raw["k_new"], raw["v_new"], slots, call.stream
        )


def _runs_of_equal(values: list[int]):
    """(first, end, value) for each run of consecutive equal values."""
    first = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[first]:
            yield first, i, values[first]
            first = i


def _concatenate(results, q, return_lse: bool):
    """attention()'s results for consecutive groups of sequences as one batch, in q's
    framework: (out, lse) pairs with return_lse, else outputs."""
    call = interop.import_arrays({"q": q})
    parts = [r if return_lse else (r,) for r in results]
    joined = []
    for j, dtype in enumerate((call.raw["q"].dtype, np.float32)[: len(parts[0])]):
        shape = (call.raw["q"].shape[0], *parts[0][j].shape[1:])
        whole = interop.empty(call, shape, dtype).array()
        first = 0
        for part in parts:
            whole[first : first + part[j].shape[0]] = part[j]
            first += part[j].shape[0]
        joined.append(whole)
    return tuple(joined) if return_lse else joined[0]


def _zeros(template: interop.CallArrays, shape, dtype):
    result = interop.empty(template, shape, dtype)
    array = result.array()
    array[...] = 0
    return array
