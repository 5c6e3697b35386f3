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
