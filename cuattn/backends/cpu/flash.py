"""Tiled online-softmax attention on the CPU, in numba.

The FlashAttention algorithm, as the CUDA kernel runs it: a tile of query rows keeps a
running maximum ``m`` and running denominator ``l`` per row and a float32 accumulator;
each tile of keys gives scores by one matrix product, probabilities by one pass of
``exp2``, and adds ``P @ V`` after rescaling what was accumulated by ``2**(m_old - m_new)``.
Nothing of size seqlen_q x seqlen_k exists: extra memory is a few tiles per thread.

The query heads that share a KV head can share a tile too (grouped-query attention):
its rows are then (query position, head) pairs, position-major, and each K and V tile it
reads serves every head of it. A short query (a chunk of a prompt, longer than decode.py
takes) would otherwise leave most of a tile of one head empty and read the keys once per
query head instead of once per KV head.

Scores are kept in base 2 (``log2(e)`` is folded into the query scale), so every
exponential is an ``exp2``. Tiles that the mask hides entirely are never visited; tiles
that it cuts are masked element by element; all others are not masked at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np
from numba import prange

from .bits import FLOAT32, narrow_bits, widen_row
from .blas import address, gemm_arguments, matmul_accumulate, matmul_transposed
from .caching import compile_cached
from .exp2 import exp2_in_place
from .intrinsics import FAST_MATH, contiguous_row, maximum
from .mask import hidden_columns, key_runs, key_tile, key_tile_counts, rows_to_visit

LOG2E = np.float32(1.0 / math.log(2.0))
LN2 = np.float32(math.log(2.0))

# Sequence descriptor columns: which batch entry, where its queries and keys start in
# the seqlen axis, and how many there are. One layout serves padded batches, packed
# (varlen) batches and KV caches.
SEQ_BATCH, SEQ_Q_START, SEQ_Q_LEN, SEQ_K_START, SEQ_K_LEN = range(5)


@numba.njit(inline="always")
def query_multiplier(scale, softcap):
    """What query rows are multiplied by as they are loaded: the scale, and without softcap
    also log2(e), so that scores come out in base 2 at no cost (with softcap, the conversion
    comes after the tanh)."""
    return np.float32(scale) if softcap > 0.0 else np.float32(scale) * LOG2E


@numba.njit(fastmath=FAST_MATH)
def load_rows(src, batch, first_row, first_head, rows, heads, code, multiplier, dst, dst_bits):
    """Rows ``first_row .. first_row + rows`` of ``src[batch, :, first_head + h, :]`` for
    ``heads`` heads as float32, position-major: row ``r`` of head ``h`` goes to
    ``dst[r * heads + h]``."""
    head_dim = src.shape[3]
    for r in range(rows):
        for h in range(heads):
            at = r * heads + h
            # Rows of head_dim are contiguous (spec.py checks it).
            row = contiguous_row(src[batch, first_row + r, first_head + h])
            widen_row(row, code, dst_bits[at], head_dim)
            if multiplier != 1.0:
                for d in range(head_dim):
                    dst[at, d] *= multiplier


@numba.njit(fastmath=FAST_MATH)
def _float32_rows(src, batch, first_row, head, rows, code, tile, tile_bits):
    """Rows ``first_row .. first_row + rows`` of ``src[batch, :, head, :]`` for sgemm: their
    address and row stride in elements. float32 rows are read where they are, when BLAS
    can take their stride; others are decoded into ``tile`` first."""
    row_stride = src.strides[1]
    # BLAS needs a leading dimension of at least a row, in a 32-bit int.
    usable = row_stride % 4 == 0 and src.shape[3] <= row_stride // 4 < 2**31
    if code == FLOAT32 and usable:
        return address(src[batch, first_row, head]), row_stride // 4
    load_rows(src, batch, first_row, head, rows, 1, code, 1.0, tile, tile_bits)
    return address(tile), np.int64(tile.shape[1])


@numba.njit(fastmath=FAST_MATH)
def attend_key_block(
    q_tile,
    keys_at,
    keys_row_stride,
    values_at,
    values_row_stride,
    scores_flat,
    acc,
    row_max,
    row_sum,
    rows,
    heads,
    keys,
    key_begin,
    first_position,
    softcap,
    masked,
    window_left,
    window_right,
    sink_tokens,
    gemm_scratch,
):
    """Fold keys [key_begin, key_begin + keys) into the running state of ``rows`` rows,
    row ``r`` at query position ``first_position + r // heads``.

    K and V rows are float32 at ``keys_at`` and ``values_at`` (addresses), with the given
    row strides in elements.
    """
    head_dim = q_tile.shape[1]
    scores = scores_flat[: rows * keys].reshape((rows, keys))
    matmul_transposed(
        rows,
        keys,
        head_dim,
        address(q_tile),
        head_dim,
        keys_at,
        keys_row_stride,
        address(scores_flat),
        keys,
        gemm_scratch,
    )
    if softcap > 0.0:
        # softcap * tanh(s / softcap) in natural units, then into base 2.
        softcap_log2 = np.float32(softcap) * LOG2E
        for r in range(rows):
            for c in range(keys):
                scores[r, c] = softcap_log2 * np.tanh(scores[r, c] / softcap)
    if masked:
        for r in range(rows):
            sink_end, begin, end = hidden_columns(
                key_begin, keys, first_position + r // heads, window_left, window_right, sink_tokens
            )
            scores[r, sink_end:begin] = -np.inf
            scores[r, end:keys] = -np.inf
    for r in range(rows):
        row = scores_flat[r * keys : (r + 1) * keys]
        tile_max = np.float32(-np.inf)
        for c in range(keys):
            tile_max = maximum(tile_max, row[c])
        new_max = maximum(row_max[r], tile_max)
        # A row that has seen no visible key yet keeps max -inf; exponentiating against 0
        # instead avoids -inf - -inf = NaN and gives it all-zero probabilities.
        shift = new_max if new_max != -np.inf else np.float32(0.0)
        total = exp2_in_place(row, shift, keys)  # the scores become probabilities
        rescale = np.exp2(row_max[r] - shift)  # 0 while nothing was seen (m = -inf)
        row_sum[r] = row_sum[r] * rescale + total
        row_max[r] = new_max
        if rescale != 1.0:
            for d in range(head_dim):
                acc[r, d] *= rescale
    matmul_accumulate(
        rows,
        head_dim,
        keys,
        address(scores_flat),
        keys,
        values_at,
        values_row_stride,
        address(acc),
        head_dim,
        gemm_scratch,
    )


@numba.njit(fastmath=FAST_MATH)
def _attend_query_tile(
    q,
    k,
    v,
    out,
    lse,
    sinks,
    has_sinks,
    batch,
    first_head,
    heads,
    kv_head,
    q_begin,
    positions,
    k_start,
    k_len,
    offset,
    code,
    scale,
    softcap,
    window_left,
    window_right,
    sink_tokens,
    block_k,
    scratch,
):
    """Rows ``q_begin .. q_begin + positions`` of query heads ``first_head .. first_head +
    heads``, which all read KV head ``kv_head``: attention over the keys they see."""
    (
        q_tile,
        q_bits,
        k_tile,
        k_bits,
        v_tile,
        v_bits,
        scores_flat,
        acc,
        row_max,
        row_sum,
        row_out,
        row_out_bits,
        gemm_scratch,
    ) = scratch
    rows = positions * heads
    load_rows(
        q,
        batch,
        q_begin,
        first_head,
        positions,
        heads,
        code,
        query_multiplier(scale, softcap),
        q_tile,
        q_bits,
    )
    acc[:rows] = 0.0
    row_max[:rows] = -np.inf
    row_sum[:rows] = 0.0

    # Bottom-right alignment: query row i stands at key position i + offset (offset
    # already accounts for where the sequence starts in the seqlen axis).
    first_position = q_begin + offset
    sink_end, main_begin, main_end = key_runs(
        first_position,
        first_position + positions - 1,
        k_len,
        window_left,
        window_right,
        sink_tokens,
    )
    sink_tiles, tiles = key_tile_counts(sink_end, main_begin, main_end, block_k)
    for tile in range(tiles):
        key_begin, keys = key_tile(tile, sink_tiles, sink_end, main_begin, main_end, block_k)
        masked, seeing_begin, seeing_end = rows_to_visit(
            key_begin, keys, first_position, positions, window_left, window_right, sink_tokens
        )
        if seeing_begin == seeing_end:
            continue
        first_key = k_start + key_begin
        keys_at, keys_row_stride = _float32_rows(
            k, batch, first_key, kv_head, keys, code, k_tile, k_bits
        )
        values_at, values_row_stride = _float32_rows(
            v, batch, first_key, kv_head, keys, code, v_tile, v_bits
        )
        row_begin = seeing_begin * heads
        attend_key_block(
            q_tile[row_begin:],
            keys_at,
            keys_row_stride,
            values_at,
            values_row_stride,
            scores_flat,
            acc[row_begin:],
            row_max[row_begin:],
            row_sum[row_begin:],
            (seeing_end - seeing_begin) * heads,
            heads,
            keys,
            key_begin,
            first_position + seeing_begin,
            softcap,
            masked,
            window_left,
            window_right,
            sink_tokens,
            gemm_scratch,
        )
    finish_rows(
        out,
        lse,
        sinks,
        has_sinks,
        batch,
        q_begin,
        first_head,
        heads,
        rows,
        code,
        acc,
        row_max,
        row_sum,
        row_out,
        row_out_bits,
    )


@numba.njit(fastmath=FAST_MATH)
def finish_rows(
    out,
    lse,
    sinks,
    has_sinks,
    batch,
    q_begin,
    first_head,
    heads,
    rows,
    code,
    acc,
    row_max,
    row_sum,
    row_out,
    row_out_bits,
):
    """Write the outputs and lse of ``rows`` rows of running state, position-major over
    query heads ``first_head .. first_head + heads`` from query row ``q_begin``: the
    accumulated output over the denominator, the learned sink included."""
    head_dim = acc.shape[1]
    for r in range(rows):
        position = r // heads
        head = first_head + r - position * heads
        sink_log2 = sinks[head] * LOG2E if has_sinks else np.float32(-np.inf)
        # The learned sink is one more logit in the denominator, with a zero value.
        final_max = maximum(row_max[r], sink_log2)
        if final_max == -np.inf:
            denominator = np.float32(0.0)
            weight = np.float32(0.0)
        else:
            weight = np.exp2(row_max[r] - final_max)
            denominator = row_sum[r] * weight + np.exp2(sink_log2 - final_max)
        # A row that sees no key and has no sink gives 0, never 0/0 (a NaN stays NaN).
        inverse = weight / denominator if denominator != 0.0 else np.float32(0.0)
        for d in range(head_dim):
            row_out[d] = acc[r, d] * inverse
        row = out[batch, q_begin + position, head]
        for d in range(head_dim):
            row[d] = narrow_bits(row_out_bits[d], code)
        if denominator != 0.0:
            lse[batch, head, q_begin + position] = (final_max + np.log2(denominator)) * LN2
        else:
            lse[batch, head, q_begin + position] = -np.inf


def _attention_forward(
    q,
    k,
    v,
    out,
    lse,
    sinks,
    has_sinks,
    seqs,
    tile_offsets,
    code,
    scale,
    softcap,
    window_left,
    window_right,
    sink_tokens,
    block_q,
    heads_per_tile,
    block_k,
    lanes,
):
    """Attention over every (sequence, query tile, group of query heads), ``lanes`` threads.

    ``q``, ``k``, ``v``, ``out``: (batch, seqlen, heads, head_dim) arrays of stored words
    (see bits.py); ``lse``: float32 (batch, heads_q, seqlen_q); ``seqs``: int64
    (num_seqs, 5) descriptors; ``tile_offsets``: int64 (num_seqs + 1,) prefix sums of
    each sequence's query tiles of ``block_q`` rows; ``heads_per_tile``: how many query
    heads of one KV head a tile holds (a divisor of the group size), ``block_q`` rows each.
    """
    num_heads_q = q.shape[2]
    head_dim = q.shape[3]
    group = num_heads_q // k.shape[2]
    head_blocks = num_heads_q // heads_per_tile
    total_work = tile_offsets[-1] * head_blocks
    tile_rows = block_q * heads_per_tile
    # Work goes round-robin to the lanes rather than in contiguous chunks: with a causal
    # mask later query tiles cost more, and interleaving keeps the threads even.
    for lane in prange(lanes):
        q_tile = np.empty((tile_rows, head_dim), np.float32)
        k_tile = np.empty((block_k, head_dim), np.float32)
        v_tile = np.empty((block_k, head_dim), np.float32)
        scores = np.empty(tile_rows * block_k, np.float32)
        row_out = np.empty(head_dim, np.float32)
        scratch = (
            q_tile,
            q_tile.view(np.uint32),
            k_tile,
            k_tile.view(np.uint32),
            v_tile,
            v_tile.view(np.uint32),
            scores,
            np.empty((tile_rows, head_dim), np.float32),
            np.empty(tile_rows, np.float32),
            np.empty(tile_rows, np.float32),
            row_out,
            row_out.view(np.uint32),
            gemm_arguments(),
        )
        for work in range(lane, total_work, lanes):
            tile = work // head_blocks
            first_head = (work - tile * head_blocks) * heads_per_tile
            seq = np.searchsorted(tile_offsets, tile, side="right") - 1
            q_len = seqs[seq, SEQ_Q_LEN]
            k_len = seqs[seq, SEQ_K_LEN]
            q_begin = (tile - tile_offsets[seq]) * block_q
            _attend_query_tile(
                q,
                k,
                v,
                out,
                lse,
                sinks,
                has_sinks,
                seqs[seq, SEQ_BATCH],
                first_head,
                heads_per_tile,
                first_head // group,
                seqs[seq, SEQ_Q_START] + q_begin,
                min(block_q, q_len - q_begin),
                seqs[seq, SEQ_K_START],
                k_len,
                k_len - q_len - seqs[seq, SEQ_Q_START],
                code,
                scale,
                softcap,
                window_left,
                window_right,
                sink_tokens,
                block_k,
                scratch,
            )


_compiled: dict[np.dtype, object] = {}
# Everything the kernel is compiled from: its cache is stale when any of them changes.
SOURCES = sorted(Path(__file__).parent.glob("*.py"))


def attention_forward(word_dtype: np.dtype):
    """The kernel for arrays of ``word_dtype`` words, compiled (or loaded from numba's disk
    cache, see caching.py) on first use.

    The signature is explicit and every array is typed with any layout ('A'): contiguous
    and strided callers share one machine-code version instead of compiling one per
    combination of layouts.
    """
    word_dtype = np.dtype(word_dtype)
    if word_dtype not in _compiled:
        words = numba.types.Array(numba.from_dtype(word_dtype), 4, "A")
        # Inputs are typed read-only, which writable arrays convert to: a read-only view
        # (np.broadcast_to, a read-only memory map) matched no signature before.
        inputs = numba.types.Array(numba.from_dtype(word_dtype), 4, "A", readonly=True)
        float32 = numba.types.float32
        int64 = numba.types.int64
        signature = numba.types.void(
            inputs,
            inputs,
            inputs,
            words,
            numba.types.Array(float32, 3, "A"),
            numba.types.Array(float32, 1, "A"),
            numba.types.boolean,
            numba.types.Array(int64, 2, "A"),
            numba.types.Array(int64, 1, "A"),
            int64,
            numba.types.float64,
            numba.types.float64,
            int64,
            int64,
            int64,
            int64,
            int64,
            int64,
            int64,
        )
        _compiled[word_dtype] = compile_cached(
            _attention_forward, signature, SOURCES, parallel=True
        )
    return _compiled[word_dtype]
