"""The numba CPU backend: the product on machines without a GPU, and the reference the
CUDA kernels are tested against."""

from __future__ import annotations

import functools
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
from .decode import decode_forward
from .flash import SEQ_K_LEN, SEQ_Q_LEN, attention_forward

# The tallest query tile, in rows (bench/NOTES.md, "The CPU backend").
MAX_TILE_ROWS = 512
# Sequences of at most this many query rows take decode.py's kernel, not flash.py's: it was
# 1.2-3.7x as fast up to 24 rows, 1.07-1.24x at 32, even or slower from 48 (bench/NOTES.md,
# "CPU decoding").
DECODE_QUERY_ROWS = 32
# decode.py's K and V tiles of all KV heads together stay within this (half a 1 MiB L2).
DECODE_TILE_BYTES = 512 * 1024


# A call of fewer multiply-adds than this (in Q K^T, whatever the mask) runs on the calling
# thread alone. On an idle machine one thread is as fast as all of them there (0.99x at 2**15,
# two threads 1.22x faster at 2**17); while another process keeps a core busy, a parallel
# region waits until each of its threads is scheduled, and a 16-key decoding call averaged
# 345-431 us instead of 91-100 (bench/NOTES.md, "The CPU backend", item 5).
SERIAL_MULTIPLY_ADDS = 1 << 16


def kernel_threads(spec: AttentionSpec, table: np.ndarray) -> int:
    """The numba threads a call runs on: all of them, or one for a call too small to share."""
    multiply_adds = int(table[:, SEQ_Q_LEN] @ table[:, SEQ_K_LEN]) * spec.num_heads_q
    if multiply_adds * spec.head_dim < SERIAL_MULTIPLY_ADDS:
        return 1
    return numba.get_num_threads()


@functools.cache
def _blas_libraries() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries, found once."""
    return ThreadpoolController().select(user_api="blas").lib_controllers


class _KernelThreads:
    """Runs a kernel on ``lanes`` numba threads with every BLAS library at one thread, then
    puts back the caller's counts.

    Each numba thread calls BLAS on tiles; a multi-threaded BLAS under them would
    oversubscribe the cores (measured: 2x slower at 4096 tokens on 2 cores). threadpoolctl's
    own ``limit()`` surveys every loaded library on each call; here a call only reads and
    sets the counts of the libraries found at the first, 8-10 us less per call, a tenth of a
    small decoding call (item 5 again).
    """

    def __init__(self, lanes: int):
        self.lanes = lanes

    def __enter__(self):
        self._numba_threads = numba.get_num_threads()
        numba.set_num_threads(self.lanes)
        self._blas_threads = [
            (library, count) for library in _blas_libraries() if (count := library.num_threads) != 1
        ]
        for library, _ in self._blas_threads:
            library.set_num_threads(1)
        return self

    def __exit__(self, *exc_info):
        for library, count in self._blas_threads:
            library.set_num_threads(count)
        numba.set_num_threads(self._numba_threads)


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
    for block_q in (MAX_TILE_ROWS, 256, 128, 64):
        work = int((-(-query_lengths // block_q)).sum()) * heads
        if work >= 4 * threads:
            break
    return min(block_q, longest), block_k


def heads_per_tile(group: int, block_q: int, query_tiles: int, heads: int, threads: int) -> int:
    """How many query heads of a KV head share each query tile (a divisor of ``group``).

    The heads of a tile read each K and V tile once for all of them. With long queries
    that changes nothing (a tile of one head is already full, and a tile of G heads covers
    G times fewer query rows, so K and V are read as often), but a short query (a chunk of a
    prompt, too long for decode.py) leaves most of a tile of one head empty, and each head
    reads the keys again. So heads are packed while the tile stays within MAX_TILE_ROWS rows
    and every thread still gets a (query tile, head group) to work on.
    """
    packed = 1
    for candidate in range(2, group + 1):
        if (
            group % candidate == 0
            and block_q * candidate <= MAX_TILE_ROWS
            and query_tiles * (heads // candidate) >= threads
        ):
            packed = candidate
    return packed


def decode_plan(
    kv_heads: int, head_dim: int, longest_keys: int, sequences: int, threads: int
) -> tuple[int, int]:
    """(block_k, parts) for decode.py: keys per tile, and parts per sequence's keys.

    A tile holds K and V of every KV head, so it is as long as keeps them within
    DECODE_TILE_BYTES as float32 (16 to 256 keys). A sequence's keys are split when there
    are fewer than two sequences per thread, into parts enough for two per thread.
    """
    block_k = 256
    while block_k > 16 and 2 * kv_heads * block_k * head_dim * 4 > DECODE_TILE_BYTES:
        block_k //= 2
    if sequences >= 2 * threads or sequences == 0:
        return block_k, 1
    tiles = max(1, -(-longest_keys // block_k))
    return block_k, min(tiles, -(-2 * threads // sequences))


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
        threads = kernel_threads(spec, table)
        lse_array = (
            lse.numpy()
            if lse is not None
            else np.empty((q.shape[0], spec.num_heads_q, q.shape[1]), np.float32)
        )
        sink_array = sinks.numpy() if sinks is not None else np.zeros(1, np.float32)
        if sequences.max_query_len <= DECODE_QUERY_ROWS:
            self._decode(spec, q, k, v, out, lse_array, sinks, sink_array, sequences, threads)
            return
        block_q, block_k = tile_sizes(spec.head_dim, table[:, 2], spec.num_heads_q, threads)
        tiles = -(-table[:, 2] // block_q)
        packed_heads = heads_per_tile(
            spec.group_size, block_q, int(tiles.sum()), spec.num_heads_q, threads
        )
        tile_offsets = np.concatenate(([0], np.cumsum(tiles))).astype(np.int64)
        words = word_dtype(spec.dtype)
        with _KernelThreads(threads):
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
                packed_heads,
                block_k,
                threads,
            )

    @staticmethod
    def _decode(spec, q, k, v, out, lse_array, sinks, sink_array, sequences, threads) -> None:
        """forward() for sequences of at most DECODE_QUERY_ROWS query rows (decode.py)."""
        table = sequences.table
        longest_keys = int(table[:, SEQ_K_LEN].max(initial=0))
        block_k, parts = decode_plan(
            spec.num_heads_kv, spec.head_dim, longest_keys, len(table), threads
        )
        # Room for each part's running state (unnormalized output, row maximum, row sum),
        # needed only when parts merge: one part writes its rows itself.
        stored = 0 if parts == 1 else len(table)
        rows = max(sequences.max_query_len, 1) * spec.num_heads_q
        part_acc = np.empty((stored, parts, rows, spec.head_dim), np.float32)
        part_max = np.empty((stored, parts, rows), np.float32)
        part_sum = np.empty((stored, parts, rows), np.float32)
        words = word_dtype(spec.dtype)
        with _KernelThreads(threads):
            decode_forward(words)(
                _words(q),
                _words(k),
                _words(v),
                _words(out),
                lse_array,
                sink_array,
                sinks is not None,
                table,
                dtype_code(spec.dtype),
                spec.scale,
                spec.softcap,
                spec.window_left,
                spec.window_right,
                spec.sink_tokens,
                block_k,
                parts,
                threads,
                part_acc,
                part_max,
                part_sum,
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
