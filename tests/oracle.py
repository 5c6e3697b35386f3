"""The float64 truth every backend is held to: softmax(Q K^T) V with the mask written out.

Deliberately plain: whole score matrices, explicit loops over the mask rules of
SEMANTICS.md, nothing shared with the code under test. Same arguments as the public API.
"""

from __future__ import annotations

import math

import numpy as np


def _float64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def visibility(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    sink_tokens: int = 0,
) -> np.ndarray:
    """Boolean (seqlen_q, seqlen_k): which keys each query row may see."""
    left, right = window
    if causal:
        right = 0
    position = np.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    key = np.arange(seqlen_k)[None, :]
    visible = np.ones((seqlen_q, seqlen_k), bool)
    if right >= 0:
        visible &= key <= position + right
    if left >= 0:
        visible &= (key >= position - left) | (key < sink_tokens)
    return visible


def attention_oracle(
    q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0, sink_tokens=0, sinks=None
):
    """q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) -> (out (B, Sq, Hq, D), lse (B, Hq, Sq))."""
    q, k, v = _float64(q), _float64(k), _float64(v)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    visible = visibility(seqlen_q, seqlen_k, causal=causal, window=window, sink_tokens=sink_tokens)
    out = np.zeros((batch, seqlen_q, heads_q, head_dim))
    lse = np.full((batch, heads_q, seqlen_q), -np.inf)
    for b in range(batch):
        for h in range(heads_q):
            kv = h // group
            scores = scale * (q[b, :, h, :] @ k[b, :, kv, :].T)
            if softcap > 0:
                scores = softcap * np.tanh(scores / softcap)
            scores = np.where(visible, scores, -np.inf)
            if sinks is not None:
                sink_column = np.full((seqlen_q, 1), float(np.asarray(sinks)[h]))
                scores = np.concatenate([scores, sink_column], axis=1)
            for i in range(seqlen_q):
                row = scores[i]
                if np.all(row == -np.inf):
                    continue  # no visible key, no sink: output 0, lse -inf
                top = row.max()
                weights = np.exp(row - top)
                total = weights.sum()
                lse[b, h, i] = top + math.log(total)
                out[b, i, h, :] = (weights[:seqlen_k] / total) @ v[b, :, kv, :]
    return out, lse


def varlen_oracle(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """Packed q (total_q, Hq, D), k and v (total_k, Hkv, D) -> (out, lse (Hq, total_q))."""
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    out = np.zeros(q.shape)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        rows = slice(cu_q[b], cu_q[b + 1])
        keys = slice(cu_k[b], cu_k[b + 1])
        o, s = attention_oracle(q[None, rows], k[None, keys], v[None, keys], **options)
        out[rows] = o[0]
        lse[:, rows] = s[0]
    return out, lse


def kvcache_oracle(q, k_cache, v_cache, k_new=None, v_new=None, cache_seqlens=None, **options):
    """The KV-cache call on copies: returns (out, lse, k_cache_after, v_cache_after)."""
    k_after, v_after = np.array(k_cache), np.array(v_cache)
    batch, capacity = k_cache.shape[:2]
    lengths = np.full(batch, capacity) if cache_seqlens is None else np.asarray(cache_seqlens)
    new = 0 if k_new is None else k_new.shape[1]
    out = np.zeros(q.shape)
    lse = np.full((batch, q.shape[2], q.shape[1]), -np.inf)
    for b in range(batch):
        start = int(lengths[b])
        if new:
            k_after[b, start : start + new] = k_new[b]
            v_after[b, start : start + new] = v_new[b]
        total = start + new
        o, s = attention_oracle(
            q[b : b + 1], k_after[b : b + 1, :total], v_after[b : b + 1, :total], **options
        )
        out[b] = o[0]
        lse[b] = s[0]
    return out, lse, k_after, v_after
