"""Work on host memory that the CPU-side backends share."""

from __future__ import annotations

import numpy as np

from ..dlpack import RawArray


def append_kv(
    k_cache: RawArray,
    v_cache: RawArray,
    k_new: RawArray,
    v_new: RawArray,
    cache_seqlens: np.ndarray,
) -> None:
    """Write k_new / v_new at each sequence's length (bounds were checked by the spec)."""
    new_tokens = k_new.shape[1]
    for cache, new in ((k_cache.numpy(), k_new.numpy()), (v_cache.numpy(), v_new.numpy())):
        for b, length in enumerate(cache_seqlens):
            cache[b, length : length + new_tokens] = new[b]


def merge(
    out_a: RawArray, lse_a: RawArray, out_b: RawArray, lse_b: RawArray, out: RawArray, lse: RawArray
) -> None:
    """merge_attention_states on host memory: outputs 4-D, lse 3-D (batch, heads, seqlen)."""
    la, lb = lse_a.numpy(), lse_b.numpy()
    top = np.maximum(la, lb)
    empty = top == -np.inf
    safe_top = np.where(empty, 0.0, top)
    ea, eb = np.exp(la - safe_top), np.exp(lb - safe_top)
    total = ea + eb
    # A row empty on both sides: weights 0 (total is 0 there), lse -inf.
    weight_a = np.divide(ea, total, out=np.zeros_like(ea), where=total > 0)
    weight_b = np.divide(eb, total, out=np.zeros_like(eb), where=total > 0)
    lse.numpy()[...] = np.where(empty, -np.inf, safe_top + np.log(np.where(empty, 1.0, total)))
    # (batch, heads, seqlen) weights against (batch, seqlen, heads, dim) outputs
    wa = weight_a.transpose(0, 2, 1)[..., None]
    wb = weight_b.transpose(0, 2, 1)[..., None]
    merged = wa * out_a.numpy().astype(np.float32) + wb * out_b.numpy().astype(np.float32)
    out.numpy()[...] = merged.astype(out.dtype)
