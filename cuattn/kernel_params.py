"""kernels/params.cuh's AttentionParams, built byte for byte from Python.

The same bytes go to ``cupy.RawKernel`` (a structured NumPy scalar is passed by value)
and to the emulated kernels (through ctypes or the sanitizer server).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np

from .dlpack import RawArray
from .spec import LOG2E, AttentionSpec, Sequences

# Field order and C types of struct AttentionParams, in params.cuh's order.
_POINTERS = (
    "q", "k", "v", "out", "lse", "sinks", "cu_seqlens_q", "cu_seqlens_k", "cache_seqlens",
    "split_out", "split_lse",
)  # fmt: skip
_INT64S = (
    "q_batch_stride", "q_row_stride", "q_head_stride",
    "k_batch_stride", "k_row_stride", "k_head_stride",
    "v_batch_stride", "v_row_stride", "v_head_stride",
    "out_batch_stride", "out_row_stride", "out_head_stride",
    "lse_batch_stride", "lse_head_stride",
    "batch", "seqlen_q", "seqlen_k", "num_heads_q", "num_heads_kv", "head_dim",
    "new_tokens", "window_left", "window_right", "sink_tokens", "vector_loads",
    "num_splits", "split_rows",
)  # fmt: skip
_FLOATS = ("score_scale", "softcap_log2")
FIELDS = (
    [(name, np.uint64) for name in _POINTERS]
    + [(name, np.int64) for name in _INT64S]
    + [(name, np.float32) for name in _FLOATS]
)
POINTER_FIELDS = _POINTERS


def _layout(fields) -> np.dtype:
    """The C layout of ``fields``: each at the next multiple of its size, the whole padded
    to the largest alignment."""
    offsets, offset, largest = [], 0, 1
    for _, ctype in fields:
        size = np.dtype(ctype).itemsize
        offset = -(-offset // size) * size
        offsets.append(offset)
        offset += size
        largest = max(largest, size)
    return np.dtype(
        {
            "names": [name for name, _ in fields],
            "formats": [ctype for _, ctype in fields],
            "offsets": offsets,
            "itemsize": -(-offset // largest) * largest,
        }
    )


PARAMS_DTYPE = _layout(FIELDS)


def _packer(layout: np.dtype) -> struct.Struct:
    """``layout`` spelled for the struct module, padding included: values pack into its
    bytes in one step, about 2 us, where a NumPy record built from a tuple takes about 8
    (CPU-measured), on every call."""
    codes = {np.dtype(np.uint64): "Q", np.dtype(np.int64): "q", np.dtype(np.float32): "f"}
    spelling, end = "<", 0
    for name in layout.names:
        field, offset = layout.fields[name][:2]
        spelling += "x" * (offset - end) + codes[field]
        end = offset + field.itemsize
    return struct.Struct(spelling + "x" * (layout.itemsize - end))


_PARAMS_PACKER = _packer(PARAMS_DTYPE)


_FLOAT32 = struct.Struct("<f")


def _float32(value: float) -> float:
    """``value`` rounded to float32 as NumPy rounds it: past float32's range it becomes inf
    (which the kernels then see), where struct alone raises."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


@dataclass(frozen=True)
class SplitWorkspace:
    """Split-KV's float32 workspace (kernels/params.cuh): ``num_splits`` slots of
    ``split_rows`` output rows, their outputs at device address ``out``, their lse at
    ``lse``."""

    num_splits: int
    split_rows: int
    out: int
    lse: int


def _aligned_16(raw: RawArray) -> bool:
    """Whether every row of every head starts on a 16-byte boundary."""
    # Each stride (in bytes) is a multiple of 16 exactly when their gcd is.
    return raw.ptr % 16 == 0 and math.gcd(*raw.strides[:-1]) * raw.dtype.itemsize % 16 == 0


def attention_params(
    spec: AttentionSpec,
    q: RawArray,
    k: RawArray,
    v: RawArray,
    out: RawArray,
    lse: RawArray | None,
    sinks: RawArray | None,
    sequences: Sequences,
    split: SplitWorkspace | None = None,
) -> np.ndarray:
    """The kernel argument for one call. q, k, v, out are 4-D (batch, seqlen, heads, dim);
    lse is (batch, heads, seqlen); the kernel reads the lengths in ``sequences.lengths``
    (they must live where the kernel runs). ``split``: where split-KV's partial results go,
    when the keys are split."""
    # Filled as a dict and packed once: assigning the fields of a NumPy record one by one
    # costs about a microsecond each, and this runs on every call (every decoding step).
    p = dict.fromkeys(PARAMS_DTYPE.names, 0)
    for name, raw in (("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("sinks", sinks)):
        p[name] = raw.ptr if raw is not None else 0
    for name in ("cu_seqlens_q", "cu_seqlens_k", "cache_seqlens"):
        p[name] = sequences.lengths[name].ptr if name in sequences.lengths else 0
    for prefix, raw in (("q", q), ("k", k), ("v", v), ("out", out)):
        p[f"{prefix}_batch_stride"], p[f"{prefix}_row_stride"], p[f"{prefix}_head_stride"] = (
            raw.strides[:3]
        )
    if lse is not None:
        p["lse_batch_stride"], p["lse_head_stride"] = lse.strides[:2]
    p["batch"] = len(sequences.table)
    p["seqlen_q"] = q.shape[1]
    # Keys per sequence where the kernel reads no lengths: every sequence of a padded batch
    # has the same count, which for a cache filled to one length is less than its capacity.
    uniform = sequences.kind == "batched" and len(sequences.table)
    p["seqlen_k"] = int(sequences.table[0, 4]) if uniform else k.shape[1]
    p["num_heads_q"], p["num_heads_kv"] = spec.num_heads_q, spec.num_heads_kv
    p["head_dim"] = spec.head_dim
    p["new_tokens"] = sequences.new_tokens
    p["window_left"], p["window_right"] = spec.window_left, spec.window_right
    p["sink_tokens"] = spec.sink_tokens
    p["vector_loads"] = int(all(_aligned_16(raw) for raw in (q, k, v)))
    p["num_splits"], p["split_rows"] = 1, q.shape[0] * q.shape[1]
    if split is not None:
        p["num_splits"], p["split_rows"] = split.num_splits, split.split_rows
        p["split_out"], p["split_lse"] = split.out, split.lse
    if spec.softcap > 0:
        p["score_scale"] = spec.scale / spec.softcap
        p["softcap_log2"] = spec.softcap * LOG2E
    else:
        p["score_scale"] = spec.scale * LOG2E
    p["score_scale"], p["softcap_log2"] = map(_float32, (p["score_scale"], p["softcap_log2"]))
    return np.frombuffer(bytearray(_PARAMS_PACKER.pack(*p.values())), PARAMS_DTYPE)


def by_value(params: np.ndarray) -> np.ndarray:
    """A parameter struct as CuPy passes it to a kernel: the same bytes, as one unstructured
    value. CuPy takes a by-value argument's address from ``__array_interface__``, which for
    a record spells out every field: about 40 us for AttentionParams' 40 fields, against 1.6
    for this view (CPU-measured; the H200's profile of a decoding step had it on top)."""
    return params.view(_unstructured(params.dtype.itemsize))


@functools.cache
def _unstructured(itemsize: int) -> np.dtype:
    return np.dtype((np.void, itemsize))  # built once: a dtype costs about 2 us to make


# kernels/combine.cu's MergeParams.
MERGE_FIELDS = (
    [(name, np.uint64) for name in ("out_a", "lse_a", "out_b", "lse_b", "out", "lse")]
    + [
        (f"{array}_{axis}_stride", np.int64)
        for array in ("out_a", "out_b", "out")
        for axis in ("batch", "row", "head")
    ]
    + [
        (f"{array}_{axis}_stride", np.int64)
        for array in ("lse_a", "lse_b", "lse")
        for axis in ("batch", "head", "row")
    ]
    + [(name, np.int64) for name in ("batch", "seqlen", "heads", "head_dim")]
)
MERGE_DTYPE = _layout(MERGE_FIELDS)


def merge_params(
    out_a: RawArray,
    lse_a: RawArray,
    out_b: RawArray,
    lse_b: RawArray,
    out: RawArray,
    lse: RawArray | None,
) -> np.ndarray:
    """The merge kernel's argument: outputs 4-D (batch, seqlen, heads, dim), lse 3-D
    (batch, heads, seqlen)."""
    params = np.zeros(1, MERGE_DTYPE)
    p = params[0]
    for name, raw in (
        ("out_a", out_a),
        ("lse_a", lse_a),
        ("out_b", out_b),
        ("lse_b", lse_b),
        ("out", out),
        ("lse", lse),
    ):
        p[name] = raw.ptr if raw is not None else 0
    for name, raw in (("out_a", out_a), ("out_b", out_b), ("out", out)):
        for axis, stride in zip(("batch", "row", "head"), raw.strides[:3], strict=True):
            p[f"{name}_{axis}_stride"] = stride
    for name, raw in (("lse_a", lse_a), ("lse_b", lse_b), ("lse", lse)):
        if raw is not None:
            for axis, stride in zip(("batch", "head", "row"), raw.strides, strict=True):
                p[f"{name}_{axis}_stride"] = stride
    p["batch"], p["seqlen"], p["heads"], p["head_dim"] = out.shape
    return params


# kernels/append.cu's AppendParams.
_APPEND_ARRAYS = ("k_cache", "v_cache", "k_new", "v_new")
APPEND_FIELDS = (
    [(name, np.uint64) for name in (*_APPEND_ARRAYS, "cache_seqlens")]
    + [
        (f"{array}_{axis}_stride", np.int64)
        for array in _APPEND_ARRAYS
        for axis in ("batch", "row", "head")
    ]
    + [
        (name, np.int64)
        for name in ("batch", "new_tokens", "heads", "head_dim", "capacity", "filled")
    ]
)
APPEND_DTYPE = _layout(APPEND_FIELDS)


def append_params(
    k_cache: RawArray,
    v_cache: RawArray,
    k_new: RawArray,
    v_new: RawArray,
    cache_seqlens: RawArray | None,
    filled: int,
) -> np.ndarray:
    """The append kernel's argument: caches (batch, capacity, heads, dim), new tokens
    (batch, new_tokens, heads, dim); lengths on the device, or null when every sequence
    holds ``filled`` tokens."""
    params = np.zeros(1, APPEND_DTYPE)
    p = params[0]
    arrays = dict(zip(_APPEND_ARRAYS, (k_cache, v_cache, k_new, v_new), strict=True))
    for name, raw in arrays.items():
        p[name] = raw.ptr
        for axis, stride in zip(("batch", "row", "head"), raw.strides[:3], strict=True):
            p[f"{name}_{axis}_stride"] = stride
    p["cache_seqlens"] = cache_seqlens.ptr if cache_seqlens is not None else 0
    p["batch"], p["new_tokens"], p["heads"], p["head_dim"] = k_new.shape
    p["capacity"], p["filled"] = k_cache.shape[1], filled
    return params


def append_lengths(cache_seqlens: np.ndarray) -> tuple[np.ndarray | None, int]:
    """How the append kernel is told the cache lengths: ``(None, n)`` when every sequence
    holds n tokens (nothing to upload), else the int32 lengths to place where the kernel
    runs, with ``filled`` unused (0)."""
    filled = int(cache_seqlens[0])
    if (cache_seqlens == filled).all():
        return None, filled
    return np.ascontiguousarray(cache_seqlens, np.int32), 0
