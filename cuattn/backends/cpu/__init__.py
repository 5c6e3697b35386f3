"""The numba CPU backend: the product on machines without a GPU, and the reference the
CUDA kernels are tested against."""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

# The BLAS that numba's np.dot calls: loaded now so that threadpoolctl can find it.
import scipy.linalg.cython_blas  # noqa: F401
from threadpoolctl import ThreadpoolController

from ...dlpack import RawArray
from ...spec import AttentionSpec, Sequences
from .. import host
from .bits import dtype_code, word_dtype
from .flash import attention_forward

_blas = None


def _single_threaded_blas():
    # Each numba thread calls BLAS on tiles; a multi-threaded BLAS under them would
    # oversubscribe the cores (measured: 2x slower at 4096 tokens on 2 cores).
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def tile_sizes(
    head_dim: int, query_lengths: np.ndarray, heads: int, threads: int
) -> tuple[int, int]:
    """(block_q, block_k) for float32 tiles.

    Query tiles as tall as keep every thread busy: each K and V tile then serves more query
    rows per sgemm. 512 rows ran faster than 256 at head dims 64, 128 and 256 on 2 cores with
    1 MiB of L2 each (bench/NOTES.md, "The CPU backend"), though at 128 and 256 the tiles no
    longer fit in L2 together. Shorter ones are taken only when 512 would leave fewer than 4
    (query tile, head) work items per thread.
    """
    block_k = 256 if head_dim <= 128 else 128
    longest = max(int(query_lengths.max(initial=0)), 1)
    for block_q in (512, 256, 128, 64):
        work = int((-(-query_lengths // block_q)).sum()) * heads
        if work >= 4 * threads:
            break
    return min(block_q, longest), block_k


def _words(raw: RawArray) -> np.ndarray:
    """The kernels' view of a float array: unsigned words of the same width, 4-D."""
    array = raw.numpy()
    return array.view(word_dtype(array.dtype))


class CpuBackend:
    name = "cpu"

    @staticmethod
    def unavailable_reason() -> str | None:
        return None

    @staticmethod
    def describe() -> str:
        return (
            f"numba {numba.__version__}, {numba.get_num_threads()} threads "
            f"({numba.config.THREADING_LAYER} threading layer)"
        )

    def forward(
        self,
        spec: AttentionSpec,
        q: RawArray,
        k: RawArray,
        v: RawArray,
        out: RawArray,
        lse: RawArray | None,
        sinks: RawArray | None,
        sequences: Sequences,
        stream: int | None = None,
        allocate: Callable[[int], RawArray] | None = None,  # needs no scratch memory
    ) -> None:
        """Write attention of q over (k, v) into ``out`` (and ``lse`` if given).

        All arrays are 4-D (batch, seqlen, heads, head_dim); ``lse`` is (batch, heads, seqlen).
        """
        table = sequences.table
        block_q, block_k = tile_sizes(
            spec.head_dim, table[:, 2], spec.num_heads_q, numba.get_num_threads()
        )
        tiles = -(-table[:, 2] // block_q)
        tile_offsets = np.concatenate(([0], np.cumsum(tiles))).astype(np.int64)
        lse_array = (
            lse.numpy()
            if lse is not None
            else np.empty((q.shape[0], spec.num_heads_q, q.shape[1]), np.float32)
        )
        sink_array = sinks.numpy() if sinks is not None else np.zeros(1, np.float32)
        words = word_dtype(spec.dtype)
        with _single_threaded_blas():
            attention_forward(words)(
                _words(q),
                _words(k),
                _words(v),
                _words(out),
                lse_array,
                sink_array,
                sinks is not None,
                table,
                tile_offsets,
                dtype_code(spec.dtype),
                spec.scale,
                spec.softcap,
                spec.window_left,
                spec.window_right,
                spec.sink_tokens,
                block_q,
                block_k,
                numba.get_num_threads(),
            )

    def merge(self, out_a, lse_a, out_b, lse_b, out, lse, stream=None) -> None:
        host.merge(out_a, lse_a, out_b, lse_b, out, lse)

    def append_kv(
        self,
        k_cache: RawArray,
        v_cache: RawArray,
        k_new: RawArray,
        v_new: RawArray,
        cache_seqlens: np.ndarray,
        stream: int | None = None,
    ) -> None:
        host.append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
