"""What one attention call computes, validated once.

Every check of SEMANTICS.md's "Errors" lives here, runs on the imported arrays before any
backend is chosen, and raises an exception that names the argument, what it got and what
it needs. A backend receives an :class:`AttentionSpec` and may trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .dlpack import BFLOAT16, RawArray

FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32))
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 8, 256, 8


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes, dtype and mask of one call.

    ``window_left`` / ``window_right`` are -1 when unbounded; ``causal`` is already folded
    into ``window_right = 0``. For varlen calls ``seqlen_q`` / ``seqlen_k`` are the
    maxima the caller declared; for KV-cache calls ``seqlen_k`` is the cache capacity.
    """

    batch: int
    seqlen_q: int
    seqlen_k: int
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    dtype: np.dtype
    scale: float
    softcap: float
    window_left: int
    window_right: int
    sink_tokens: int
    has_sinks: bool
    return_lse: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1: multi-head; num_heads_q: multi-query)."""
        return self.num_heads_q // self.num_heads_kv

    @property
    def causal(self) -> bool:
        return self.window_right == 0


@dataclass(frozen=True)
class MaskOptions:
    """The keyword options shared by every entry point, as the user gave them."""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    scale: float | None = None
    softcap: float = 0.0
    sink_tokens: int = 0
    return_lse: bool = False


def _shape_text(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _check_ndim(name: str, raw: RawArray, ndim: int, layout: str) -> None:
    if raw.ndim != ndim:
        raise ValueError(
            f"{name}: expected {ndim} dimensions {layout}, got shape {_shape_text(raw.shape)}"
        )


def _check_float(name: str, raw: RawArray) -> None:
    if raw.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float16, bfloat16 or float32, got {raw.dtype}")


def _check_last_dim_contiguous(name: str, raw: RawArray) -> None:
    # An empty array has no layout to speak of (NumPy gives it zero strides).
    if raw.size and raw.shape[-1] > 1 and raw.strides[-1] != 1:
        raise ValueError(
            f"{name}: the last dimension (head_dim) must be contiguous, got strides "
            f"{_shape_text(raw.strides)} in elements; other dimensions may have any stride"
        )


def _check_head_dim(name: str, head_dim: int) -> None:
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(
            f"{name}: head_dim must be a multiple of {HEAD_DIM_MULTIPLE} from {MIN_HEAD_DIM} "
            f"to {MAX_HEAD_DIM}, got {head_dim}"
        )


def _check_same(name: str, what: str, got, want, other: str) -> None:
    if got != want:
        raise ValueError(f"{name}: {what} must equal {other}'s {want}, got {got}")


def _check_heads(num_heads_q: int, num_heads_kv: int) -> None:
    if num_heads_kv < 1 or num_heads_q % num_heads_kv != 0:
        raise ValueError(
            f"k: num_heads_kv must divide q's num_heads {num_heads_q} "
            f"(grouped-query attention), got {num_heads_kv}"
        )


def _check_qkv(q: RawArray, k: RawArray, v: RawArray, kv_names=("k", "v")) -> None:
    """Shared checks of q against a (k, v) pair whose last two axes are (heads, head_dim)."""
    k_name, v_name = kv_names
    for name, raw in (("q", q), (k_name, k), (v_name, v)):
        _check_float(name, raw)
        _check_last_dim_contiguous(name, raw)
    for name, raw in ((k_name, k), (v_name, v)):
        if raw.dtype != q.dtype:
            raise TypeError(f"{name}: dtype must match q's {q.dtype}, got {raw.dtype}")
    if v.shape != k.shape:
        raise ValueError(
            f"{v_name}: shape must equal {k_name}'s {_shape_text(k.shape)}, "
            f"got {_shape_text(v.shape)}"
        )
    _check_head_dim("q", q.shape[-1])
    _check_same(k_name, "head_dim", k.shape[-1], q.shape[-1], "q")
    if q.ndim == 4:
        _check_same(k_name, "batch", k.shape[0], q.shape[0], "q")
    _check_heads(q.shape[-2], k.shape[-2])


# A GPU grid has at most this many blocks along y (heads) and z (sequences); the limit holds
# on every backend so that a call never depends on where it runs.
MAX_HEADS_OR_SEQUENCES = 65535


def _check_grid(batch: int, num_heads_q: int) -> None:
    if num_heads_q > MAX_HEADS_OR_SEQUENCES:
        raise ValueError(f"q: at most {MAX_HEADS_OR_SEQUENCES} heads, got {num_heads_q}")
    if batch > MAX_HEADS_OR_SEQUENCES:
        raise ValueError(f"q: at most {MAX_HEADS_OR_SEQUENCES} sequences per call, got {batch}")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


_MAX_REACH = 2**40  # tokens: more than any sequence in memory holds


_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Scores in base 2, as the kernels take them: scale and softcap are multiplied by this.
LOG2E = 1.0 / math.log(2.0)


def _check_float32_range(scale: float, softcap: float) -> None:
    """The kernels take scale and softcap in float32, log2(e) folded in, and with softcap
    scale / softcap: a finite float64 past float32's range would make every score inf or NaN."""
    limit = _FLOAT32_MAX / LOG2E
    if abs(scale) > limit:
        raise ValueError(f"scale: must be within +-{limit:.4g} (float32, in base 2), got {scale!r}")
    if softcap > limit:
        raise ValueError(
            f"softcap: must be at most {limit:.4g} (float32, in base 2), got {softcap!r}"
        )
    if softcap > 0 and abs(scale) / softcap > _FLOAT32_MAX:
        raise ValueError(
            f"softcap: scale / softcap must be within float32's range, got {scale!r} / {softcap!r}"
        )


def _resolve_options(
    options: MaskOptions, head_dim: int, num_heads_q: int, sinks: RawArray | None
) -> dict:
    if not isinstance(options.causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(options.causal).__name__}")
    window = options.window
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window: expected a pair (left, right), got {window!r}")
    # A bound past every key of any tensor that fits in memory is no bound at all; it is
    # clamped to _MAX_REACH so that position arithmetic (64-bit in the kernels) cannot overflow.
    left = min(_check_int("window[0] (left)", window[0], -1), _MAX_REACH)
    right = min(_check_int("window[1] (right)", window[1], -1), _MAX_REACH)
    if options.causal:
        right = 0  # causal is the window whose right edge is the query's own position
    scale = 1.0 / math.sqrt(head_dim) if options.scale is None else options.scale
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float, np.floating))
        or not math.isfinite(scale)
    ):
        raise ValueError(f"scale: expected a finite float, got {options.scale!r}")
    softcap = options.softcap
    if not isinstance(softcap, (int, float, np.floating)) or not (
        math.isfinite(softcap) and softcap >= 0
    ):
        raise ValueError(f"softcap: expected a finite float >= 0 (0 disables it), got {softcap!r}")
    _check_float32_range(float(scale), float(softcap))
    sink_tokens = min(_check_int("sink_tokens", options.sink_tokens, 0), _MAX_REACH)
    if sinks is not None:
        if sinks.shape != (num_heads_q,):
            raise ValueError(
                f"sinks: expected shape ({num_heads_q},), one logit per query head, "
                f"got {_shape_text(sinks.shape)}"
            )
        if sinks.dtype != np.float32:
            raise TypeError(f"sinks: dtype must be float32, got {sinks.dtype}")
    return dict(
        scale=float(scale),
        softcap=float(softcap),
        window_left=left,
        window_right=right,
        sink_tokens=sink_tokens,
        has_sinks=sinks is not None,
        return_lse=bool(options.return_lse),
    )


def attention_spec(raw: dict[str, RawArray], options: MaskOptions) -> AttentionSpec:
    """Validate ``attention(q, k, v, ...)``: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D)."""
    q, k, v = raw["q"], raw["k"], raw["v"]
    layout = "(batch, seqlen, num_heads, head_dim)"
    for name, array in (("q", q), ("k", k), ("v", v)):
        _check_ndim(name, array, 4, layout)
    _check_qkv(q, k, v)
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    _check_grid(batch, num_heads_q)
    return AttentionSpec(
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=k.shape[1],
        num_heads_q=num_heads_q,
        num_heads_kv=k.shape[2],
        head_dim=head_dim,
        dtype=q.dtype,
        **_resolve_options(options, head_dim, num_heads_q, raw.get("sinks")),
    )


def _check_cu_seqlens(
    name: str,
    raw: RawArray,
    values: np.ndarray,
    total: int,
    total_name: str,
    max_seqlen: int,
    max_name: str,
) -> None:
    if raw.ndim != 1 or raw.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (batch + 1,), got {_shape_text(raw.shape)}")
    if raw.dtype != np.int32:
        raise TypeError(f"{name}: dtype must be int32, got {raw.dtype}")
    if values[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {int(values[0])}")
    steps = np.diff(values.astype(np.int64))
    if np.any(steps < 0):
        at = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name}: must be non-decreasing prefix sums, got {int(values[at])} then "
            f"{int(values[at + 1])} at index {at}"
        )
    if values[-1] > total:
        raise ValueError(
            f"{name}: last entry {int(values[-1])} exceeds {total_name}'s length {total}"
        )
    if steps.size and steps.max() > max_seqlen:
        raise ValueError(
            f"{max_name}: a sequence has length {int(steps.max())}, "
            f"more than {max_name}={max_seqlen}"
        )


def varlen_spec(
    raw: dict[str, RawArray],
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    max_seqlen_q: int,
    max_seqlen_k: int,
    options: MaskOptions,
) -> AttentionSpec:
    """Validate packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D).

    ``cu_seqlens_*`` are the host copies of the prefix sums (the device ones, if any, are
    in ``raw``).
    """
    q, k, v = raw["q"], raw["k"], raw["v"]
    layout = "(total_tokens, num_heads, head_dim)"
    for name, array in (("q", q), ("k", k), ("v", v)):
        _check_ndim(name, array, 3, layout)
    _check_qkv(q, k, v)
    max_seqlen_q = _check_int("max_seqlen_q", max_seqlen_q, 0)
    max_seqlen_k = _check_int("max_seqlen_k", max_seqlen_k, 0)
    _check_cu_seqlens(
        "cu_seqlens_q",
        raw["cu_seqlens_q"],
        cu_seqlens_q,
        q.shape[0],
        "q",
        max_seqlen_q,
        "max_seqlen_q",
    )
    _check_cu_seqlens(
        "cu_seqlens_k",
        raw["cu_seqlens_k"],
        cu_seqlens_k,
        k.shape[0],
        "k",
        max_seqlen_k,
        "max_seqlen_k",
    )
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_k: must have the same length as cu_seqlens_q ({cu_seqlens_q.shape[0]}), "
            f"got {cu_seqlens_k.shape[0]}"
        )
    _, num_heads_q, head_dim = q.shape
    _check_grid(cu_seqlens_q.shape[0] - 1, num_heads_q)
    return AttentionSpec(
        batch=cu_seqlens_q.shape[0] - 1,
        seqlen_q=max_seqlen_q,
        seqlen_k=max_seqlen_k,
        num_heads_q=num_heads_q,
        num_heads_kv=k.shape[1],
        head_dim=head_dim,
        dtype=q.dtype,
        **_resolve_options(options, head_dim, num_heads_q, raw.get("sinks")),
    )


def check_cache_step(raw: dict[str, RawArray], options: MaskOptions) -> dict:
    """The checks of a KV-cache call that do not depend on the lengths: q (B, Sq, Hq, D)
    against the caches (B, S_cache, Hkv, D), the optional k_new / v_new (B, S_new, Hkv, D),
    and the options, resolved. A rolling KVCache, whose writes wrap around, runs them
    before it writes anything."""
    q, k_cache, v_cache = raw["q"], raw["k_cache"], raw["v_cache"]
    layout = "(batch, seqlen, num_heads, head_dim)"
    for name, array in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_ndim(name, array, 4, layout)
    _check_qkv(q, k_cache, v_cache, kv_names=("k_cache", "v_cache"))
    batch, _, num_heads_q, head_dim = q.shape
    k_new, v_new = raw.get("k_new"), raw.get("v_new")
    if (k_new is None) != (v_new is None):
        missing = "v_new" if v_new is None else "k_new"
        raise ValueError(f"{missing}: k_new and v_new come together, got only one of them")
    if k_new is not None:
        for name, array in (("k_new", k_new), ("v_new", v_new)):
            _check_ndim(name, array, 4, layout)
            _check_float(name, array)
            _check_last_dim_contiguous(name, array)
            if array.dtype != q.dtype:
                raise TypeError(f"{name}: dtype must match q's {q.dtype}, got {array.dtype}")
            if (array.shape[0], array.shape[2], array.shape[3]) != (
                batch,
                k_cache.shape[2],
                head_dim,
            ):
                raise ValueError(
                    f"{name}: expected shape ({batch}, seqlen_new, {k_cache.shape[2]}, {head_dim}) "
                    f"to match q and k_cache, got {_shape_text(array.shape)}"
                )
        if v_new.shape != k_new.shape:
            raise ValueError(
                f"v_new: shape must equal k_new's {_shape_text(k_new.shape)}, "
                f"got {_shape_text(v_new.shape)}"
            )
    _check_grid(batch, num_heads_q)
    return _resolve_options(options, head_dim, num_heads_q, raw.get("sinks"))


def kvcache_spec(
    raw: dict[str, RawArray], cache_seqlens: np.ndarray | None, options: MaskOptions
) -> AttentionSpec:
    """Validate a KV-cache call: check_cache_step's checks, then ``cache_seqlens`` (the
    host copy, (B,), or None where the values are not read: their shape and dtype are
    still checked).

    Overflow (a sequence whose new tokens would pass the cache's end) is caught here, where
    the lengths are read, before anything is written.
    """
    resolved = check_cache_step(raw, options)
    q, k_cache = raw["q"], raw["k_cache"]
    batch, _, num_heads_q, head_dim = q.shape
    capacity = k_cache.shape[1]
    new_len = raw["k_new"].shape[1] if raw.get("k_new") is not None else 0
    seqlens_raw = raw["cache_seqlens"]
    if seqlens_raw.shape != (batch,):
        raise ValueError(
            f"cache_seqlens: expected shape ({batch},), one length per sequence, "
            f"got {_shape_text(seqlens_raw.shape)}"
        )
    if seqlens_raw.dtype != np.int32:
        raise TypeError(f"cache_seqlens: dtype must be int32, got {seqlens_raw.dtype}")
    if batch > 1 and seqlens_raw.strides != (1,):  # kernels read length b at element b
        raise ValueError(
            f"cache_seqlens: must be contiguous, got a stride of {seqlens_raw.strides[0]} elements"
        )
    # Unread lengths (None) are clamped to the cache by the kernels that read them (params.cuh).
    if cache_seqlens is not None and batch:
        if cache_seqlens.min() < 0:
            raise ValueError(f"cache_seqlens: lengths must be >= 0, got {int(cache_seqlens.min())}")
        # In Python integers: int32 lengths near 2**31 would wrap past the check.
        if int(cache_seqlens.max()) + new_len > capacity:
            worst = int(np.argmax(cache_seqlens))
            raise ValueError(
                f"cache_seqlens: sequence {worst} holds {int(cache_seqlens[worst])} tokens and "
                f"{new_len} new ones would pass the cache's capacity of {capacity} "
                "(k_cache.shape[1]); nothing was written"
            )
    return AttentionSpec(
        batch=batch,
        seqlen_q=q.shape[1],
        seqlen_k=capacity,
        num_heads_q=num_heads_q,
        num_heads_kv=k_cache.shape[2],
        head_dim=head_dim,
        dtype=q.dtype,
        **resolved,
    )


@dataclass(frozen=True)
class Sequences:
    """Which queries attend to which keys: one row per sequence.

    ``table`` is int64 (num_seqs, 5): batch entry, first query row, query count, first key
    row, key count (columns named in backends/cpu/flash.py). Padded batches, packed
    (varlen) batches and KV caches are all this table over 4-D (batch, seqlen, heads,
    head_dim) arrays; a packed batch is one batch entry. ``kind`` tells a GPU backend
    which lengths kernels read on the device: "batched", "varlen" or "kvcache", with
    ``lengths`` holding those arrays (cu_seqlens_q and cu_seqlens_k, or cache_seqlens).
    """

    kind: str
    table: np.ndarray
    new_tokens: int = 0
    lengths: dict = field(default_factory=dict)

    @property
    def max_query_len(self) -> int:
        return int(self.table[:, 2].max()) if len(self.table) else 0


def batched_sequences(batch: int, seqlen_q: int, seqlen_k: int) -> Sequences:
    table = np.zeros((batch, 5), np.int64)
    table[:, 0] = np.arange(batch)
    table[:, 2] = seqlen_q
    table[:, 4] = seqlen_k
    return Sequences("batched", table)


def varlen_sequences(
    cu_seqlens_q: np.ndarray, cu_seqlens_k: np.ndarray, lengths: dict | None = None
) -> Sequences:
    cu_q = cu_seqlens_q.astype(np.int64)
    cu_k = cu_seqlens_k.astype(np.int64)
    table = np.zeros((len(cu_q) - 1, 5), np.int64)
    table[:, 1] = cu_q[:-1]
    table[:, 2] = np.diff(cu_q)
    table[:, 3] = cu_k[:-1]
    table[:, 4] = np.diff(cu_k)
    return Sequences("varlen", table, lengths=lengths or {})


def kvcache_sequences(
    cache_seqlens: np.ndarray, seqlen_q: int, new_tokens: int, lengths: dict | None = None
) -> Sequences:
    """Each sequence attends over its cached tokens plus the ``new_tokens`` appended.

    Caches all filled to the same length (the usual decoding batch, and any batch of one)
    are a padded batch of that many keys: the kernels then read no lengths from device
    memory, which saves each decoding step a host-to-device copy.
    """
    keys = cache_seqlens.astype(np.int64) + new_tokens
    if len(keys) and (keys == keys[0]).all():
        return batched_sequences(len(keys), seqlen_q, int(keys[0]))
    table = np.zeros((len(keys), 5), np.int64)
    table[:, 0] = np.arange(len(keys))
    table[:, 2] = seqlen_q
    table[:, 4] = keys
    return Sequences("kvcache", table, new_tokens, lengths or {})


def unread_kvcache_sequences(
    batch: int, capacity: int, seqlen_q: int, new_tokens: int, lengths: dict
) -> Sequences:
    """KV caches whose lengths the host does not read: planned as if every sequence filled
    its cache (the most keys it can have), each sequence's own count read by the kernels
    from ``lengths``. The launch then depends on no length, as a captured CUDA graph's must."""
    table = np.zeros((batch, 5), np.int64)
    table[:, 0] = np.arange(batch)
    table[:, 2] = seqlen_q
    table[:, 4] = capacity
    return Sequences("kvcache", table, new_tokens, lengths)


def check_merge(raw: dict[str, RawArray]) -> None:
    """Validate ``merge_attention_states``: outputs (B, S, H, D) with lse (B, H, S), or packed
    outputs (total, H, D) with lse (H, total); lse float32."""
    out_a, lse_a, out_b, lse_b = raw["out_a"], raw["lse_a"], raw["out_b"], raw["lse_b"]
    if out_a.ndim not in (3, 4):
        raise ValueError(
            f"out_a: expected (batch, seqlen, heads, head_dim) or (total, heads, head_dim), "
            f"got shape {_shape_text(out_a.shape)}"
        )
    for name, array in (("out_a", out_a), ("out_b", out_b)):
        _check_float(name, array)
        _check_last_dim_contiguous(name, array)
    if out_b.shape != out_a.shape:
        raise ValueError(
            f"out_b: shape must equal out_a's {_shape_text(out_a.shape)}, "
            f"got {_shape_text(out_b.shape)}"
        )
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"out_b: dtype must match out_a's {out_a.dtype}, got {out_b.dtype}")
    *leading, heads, _ = out_a.shape
    want = (heads, leading[0]) if out_a.ndim == 3 else (leading[0], heads, leading[1])
    for name, array in (("lse_a", lse_a), ("lse_b", lse_b)):
        if array.shape != want:
            raise ValueError(
                f"{name}: expected shape {_shape_text(want)} to match the outputs, "
                f"got {_shape_text(array.shape)}"
            )
        if array.dtype != np.float32:
            raise TypeError(f"{name}: dtype must be float32, got {array.dtype}")
