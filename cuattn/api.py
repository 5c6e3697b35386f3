"""The public functions: import the arrays, validate once, pick a backend, hand back the
caller's kind of array. The math is SEMANTICS.md's; docs/semantics.md says it for users."""

from __future__ import annotations

import numpy as np

from . import backends, interop
from .dlpack import RawArray, from_numpy
from .spec import (
    AttentionSpec,
    MaskOptions,
    Sequences,
    attention_spec,
    batched_sequences,
    check_merge,
    kvcache_sequences,
    kvcache_spec,
    unread_kvcache_sequences,
    varlen_sequences,
    varlen_spec,
)

_LSE_DTYPE = np.dtype(np.float32)


def _run(
    call: interop.CallArrays,
    spec: AttentionSpec,
    backend: str,
    q: RawArray,
    k: RawArray,
    v: RawArray,
    out_shape: tuple[int, ...],
    lse_shape: tuple[int, ...],
    sequences: Sequences,
    engine=None,
):
    """Allocate the results, run the backend's forward pass, return the caller's arrays."""
    engine = engine or backends.select(backend, call.device)
    out = interop.empty(call, out_shape, spec.dtype)
    lse = interop.empty(call, lse_shape, _LSE_DTYPE) if spec.return_lse else None
    if out.raw.size:
        engine.forward(
            spec,
            _as_4d(q),
            _as_4d(k),
            _as_4d(v),
            _as_4d(out.raw),
            _as_3d_lse(lse.raw) if lse else None,
            call.raw.get("sinks"),
            sequences,
            call.stream,
            # Scratch memory from the caller's framework, like the results: PyTorch keeps
            # what a captured CUDA graph allocated for that graph.
            allocate=lambda count: interop.empty(call, (count,), np.float32).raw,
        )
    return (out.array(), lse.array()) if lse is not None else out.array()


def _as_4d(raw: RawArray) -> RawArray:
    """Packed (tokens, heads, head_dim) arrays as one batch entry of (1, tokens, ...)."""
    if raw.ndim == 4:
        return raw
    return RawArray(
        raw.ptr, (1, *raw.shape), (0, *raw.strides), raw.dtype, raw.device, raw.readonly, raw.owner
    )


def _as_3d_lse(raw: RawArray) -> RawArray:
    """The packed lse (heads, tokens) as one batch entry of (1, heads, tokens)."""
    return _as_4d(raw) if raw.ndim == 2 else raw


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    softcap: float = 0.0,
    sink_tokens: int = 0,
    sinks=None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Scaled dot-product attention, computed tile by tile (FlashAttention).

    Args:
        q: (batch, seqlen_q, num_heads_q, head_dim), float16, bfloat16 or float32.
        k, v: (batch, seqlen_k, num_heads_kv, head_dim), q's dtype. num_heads_kv must divide
            num_heads_q: query head h reads KV head h // (num_heads_q // num_heads_kv).
        causal: each query sees keys up to its own position, positions aligned bottom-right
            (query i stands at key position i + seqlen_k - seqlen_q).
        window: (left, right) keys visible around each query's position; -1 is unbounded.
            A causal window of W tokens is ``window=(W - 1, 0)``.
        scale: score scale, 1 / sqrt(head_dim) by default.
        softcap: if > 0, scores become softcap * tanh(score / softcap) (Gemma 2).
        sink_tokens: the first n keys ignore the window's left bound (StreamingLLM).
        sinks: float32 (num_heads_q,) learned sink logits, one extra softmax term per head
            with a zero value (gpt-oss).
        return_lse: also return the float32 (batch, num_heads_q, seqlen_q) log-sum-exp of
            each row's scores (-inf for a row that sees nothing).
        backend: "auto" (the arrays' device decides), "cpu", "cuda" or "emulate".

    Returns:
        (batch, seqlen_q, num_heads_q, head_dim) in q's dtype, the same kind of array as q
        on q's device (and lse when asked).

    Example:
        >>> import numpy as np, cuattn
        >>> q = np.random.randn(1, 6, 2, 64).astype(np.float32)
        >>> out = cuattn.attention(q, q, q, causal=True, window=(2, 0))
        >>> out.shape
        (1, 6, 2, 64)
    """
    call = interop.import_arrays({"q": q, "k": k, "v": v, "sinks": sinks}, optional=("sinks",))
    options = MaskOptions(causal, window, scale, softcap, sink_tokens, return_lse)
    spec = attention_spec(call.raw, options)
    raw = call.raw
    return _run(
        call,
        spec,
        backend,
        raw["q"],
        raw["k"],
        raw["v"],
        raw["q"].shape,
        (spec.batch, spec.num_heads_q, spec.seqlen_q),
        batched_sequences(spec.batch, spec.seqlen_q, spec.seqlen_k),
    )


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    softcap: float = 0.0,
    sink_tokens: int = 0,
    sinks=None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over a packed batch of sequences of different lengths.

    Args:
        q: (total_q, num_heads_q, head_dim); k, v: (total_k, num_heads_kv, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums: sequence b is
            q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]],
            with its own bottom-right alignment. Nothing attends across sequences.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds).
        Other options as :func:`attention`.

    Returns:
        (total_q, num_heads_q, head_dim), and with ``return_lse`` a float32 (num_heads_q,
        total_q) lse, as flash-attn lays it out.
    """
    call = interop.import_arrays(
        {
            "q": q,
            "k": k,
            "v": v,
            "cu_seqlens_q": cu_seqlens_q,
            "cu_seqlens_k": cu_seqlens_k,
            "sinks": sinks,
        },
        optional=("sinks",),
    )
    cu_q = interop.host_copy(call, "cu_seqlens_q")
    cu_k = interop.host_copy(call, "cu_seqlens_k")
    options = MaskOptions(causal, window, scale, softcap, sink_tokens, return_lse)
    spec = varlen_spec(call.raw, cu_q, cu_k, max_seqlen_q, max_seqlen_k, options)
    raw = call.raw
    return _run(
        call,
        spec,
        backend,
        raw["q"],
        raw["k"],
        raw["v"],
        raw["q"].shape,
        (spec.num_heads_q, raw["q"].shape[0]),
        varlen_sequences(
            cu_q, cu_k, {name: raw[name] for name in ("cu_seqlens_q", "cu_seqlens_k")}
        ),
    )


def attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    k_new=None,
    v_new=None,
    cache_seqlens=None,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    softcap: float = 0.0,
    sink_tokens: int = 0,
    sinks=None,
    return_lse: bool = False,
    check_lengths: bool = True,
    backend: str = "auto",
):
    """Decode-time attention: append new keys and values to a cache in place, then attend.

    Args:
        q: (batch, seqlen_q, num_heads_q, head_dim).
        k_cache, v_cache: (batch, capacity, num_heads_kv, head_dim), written in place.
        k_new, v_new: optional (batch, seqlen_new, num_heads_kv, head_dim), written at
            positions [cache_seqlens[b], cache_seqlens[b] + seqlen_new) of sequence b.
        cache_seqlens: int32 (batch,) tokens already in each sequence's cache: an array of
            the caller's framework, or on the host (a NumPy array, a list, an int for all, None
            for a full cache). It is not changed by the call.
        check_lengths: whether device-resident ``cache_seqlens`` are read back to the host
            and checked (below). False skips that read, the call's one wait for the GPU:
            the call is then planned for the caches' capacity, whatever the lengths, and can
            be captured in a CUDA graph (docs/graphs.md). Lengths left unchecked that are
            negative or pass the capacity give unspecified results, but nothing outside the
            caches is read or written. Lengths held by the host are always checked.
        Other options as :func:`attention`; queries are aligned to the end of each
        sequence's keys, so a single decode query (seqlen_q = 1) stands at the newest one.

    A write that would pass the capacity raises ValueError before anything is written
    (unless ``check_lengths=False`` leaves device lengths unread). With device-resident
    ``cache_seqlens`` that check reads them back to the host once; host lengths avoid that
    wait.
    """
    # Lengths kept on the host (an int, a list, a NumPy array) need no device round trip,
    # whatever framework the tensors come from.
    host_lengths = cache_seqlens is None or isinstance(
        cache_seqlens, (int, np.integer, list, tuple, np.ndarray)
    )
    writable = ("k_cache", "v_cache") if k_new is not None else ()
    call = interop.import_arrays(
        {
            "q": q,
            "k_cache": k_cache,
            "v_cache": v_cache,
            "k_new": k_new,
            "v_new": v_new,
            "cache_seqlens": None if host_lengths else cache_seqlens,
            "sinks": sinks,
        },
        optional=("k_new", "v_new", "cache_seqlens", "sinks"),
        writable=writable,
    )
    raw = call.raw
    batch, capacity = raw["q"].shape[0], raw["k_cache"].shape[1]
    if host_lengths:
        if cache_seqlens is not None:  # None, a full cache, is the same at every replay
            _refuse_under_capture(
                call,
                "cache_seqlens: a CUDA graph would replay the lengths it was captured with; "
                "pass them as a device array, with check_lengths=False",
            )
        seqlens = _host_cache_seqlens(cache_seqlens, batch, capacity)
        raw["cache_seqlens"] = from_numpy(seqlens)
    elif check_lengths or raw["cache_seqlens"].device.kind == "cpu":  # the latter costs no wait
        _refuse_under_capture(
            call,
            "check_lengths: reading cache_seqlens back waits for the GPU, which a stream "
            "capturing a CUDA graph cannot do; pass check_lengths=False",
        )
        seqlens = interop.host_copy(call, "cache_seqlens")
    else:
        seqlens = None  # left on the device, unread
    options = MaskOptions(causal, window, scale, softcap, sink_tokens, return_lse)
    spec = kvcache_spec(raw, seqlens, options)
    engine = backends.select(backend, call.device)
    new_tokens = raw["k_new"].shape[1] if "k_new" in raw else 0
    if new_tokens and batch:
        engine.append_kv(
            raw["k_cache"],
            raw["v_cache"],
            raw["k_new"],
            raw["v_new"],
            raw["cache_seqlens"] if seqlens is None else seqlens,
            call.stream,
        )
    lengths = {"cache_seqlens": raw["cache_seqlens"]}
    if seqlens is None:
        # The same launch whatever the lengths: kernels sized for full caches read each
        # sequence's own.
        sequences = unread_kvcache_sequences(batch, capacity, spec.seqlen_q, new_tokens, lengths)
    else:
        sequences = kvcache_sequences(seqlens, spec.seqlen_q, new_tokens, lengths)
    return _run(
        call,
        spec,
        backend,
        raw["q"],
        raw["k_cache"],
        raw["v_cache"],
        raw["q"].shape,
        (spec.batch, spec.num_heads_q, spec.seqlen_q),
        sequences,
        engine,
    )


def _refuse_under_capture(call: interop.CallArrays, message: str) -> None:
    if interop.capturing(call):
        raise ValueError(message)


def _host_cache_seqlens(cache_seqlens, batch: int, capacity: int) -> np.ndarray:
    """cache_seqlens given on the host (None for full caches, one int for all, a list or a
    NumPy array) as the int32 (batch,) array the backends read."""
    if cache_seqlens is None:
        return np.full(batch, capacity, np.int32)
    if isinstance(cache_seqlens, np.ndarray) and cache_seqlens.ndim:
        # Its dtype is checked with the rest; a strided view is made whole, as the kernels
        # read length b at element b.
        return np.ascontiguousarray(cache_seqlens)
    values = np.asarray(cache_seqlens)
    if values.size == 0:  # [] is float64 to NumPy; its shape is checked with the rest
        values = values.astype(np.int32)
    if values.dtype.kind not in "iu":  # not bool, float or object: no silent rounding
        raise TypeError(
            f"cache_seqlens: expected integer lengths, got {values.dtype} ({cache_seqlens!r:.80})"
        )
    # Checked before the cast, which would wrap them into lengths that look valid.
    if values.size and int(values.min()) < 0:
        raise ValueError(f"cache_seqlens: lengths must be >= 0, got {int(values.min())}")
    if values.size and int(values.max()) > np.iinfo(np.int32).max:
        raise ValueError(f"cache_seqlens: lengths must fit in int32, got {int(values.max())}")
    if values.ndim == 0:
        return np.full(batch, values, np.int32)
    return values.astype(np.int32)


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, backend: str = "auto"):
    """Combine two attentions of the same queries over disjoint sets of keys.

    With ``(out_a, lse_a) = attention(q, k_a, v_a, return_lse=True)`` and the same over
    (k_b, v_b), the result is exactly attention over the union of the keys: the two outputs
    weighted by ``exp(lse_x - lse)``, with ``lse = logaddexp(lse_a, lse_b)``. It serves
    attention over a cache split across devices or pieces (and is how split-KV decoding
    joins its parts). A row empty on both sides (lse -inf) stays 0 with lse -inf.

    Args:
        out_a, out_b: (batch, seqlen, heads, head_dim), or packed (total, heads, head_dim).
        lse_a, lse_b: float32 (batch, heads, seqlen), or (heads, total).

    Returns:
        (out, lse) of the same shapes, ``out`` in out_a's dtype.

    Example:
        >>> import numpy as np, cuattn
        >>> q, k, v = (np.random.randn(1, 4, 2, 64).astype(np.float32) for _ in range(3))
        >>> a = cuattn.attention(q, k[:, :2], v[:, :2], return_lse=True)
        >>> b = cuattn.attention(q, k[:, 2:], v[:, 2:], return_lse=True)
        >>> out, lse = cuattn.merge_attention_states(*a, *b)
        >>> bool(np.allclose(out, cuattn.attention(q, k, v), atol=1e-6))
        True
    """
    call = interop.import_arrays({"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b})
    check_merge(call.raw)
    raw = call.raw
    engine = backends.select(backend, call.device)
    out = interop.empty(call, raw["out_a"].shape, raw["out_a"].dtype)
    lse = interop.empty(call, raw["lse_a"].shape, _LSE_DTYPE)
    if out.raw.size:
        engine.merge(
            _as_4d(raw["out_a"]),
            _as_3d_lse(raw["lse_a"]),
            _as_4d(raw["out_b"]),
            _as_3d_lse(raw["lse_b"]),
            _as_4d(out.raw),
            _as_3d_lse(lse.raw),
            call.stream,
        )
    return out.array(), lse.array()
