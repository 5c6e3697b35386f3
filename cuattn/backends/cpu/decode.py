"""Attention for a few query rows per sequence over many keys (decoding), in numba.

flash.py gives each (query tile, group of query heads) its own pass over the keys. With a
query row or a few per head, that pass is a walk down one KV head's rows of K and V, which
lie heads x head_dim elements apart: memory read that way comes in at about half the rate
of a walk in address order (bench/NOTES.md, "CPU decoding"). Here one pass over a
sequence's keys serves all its query heads. Each tile of keys is read for every KV head at
once, in address order, into one float32 tile per KV head, and each group of query heads
attends to its KV head's tile with flash.py's attend_key_block.

The threads share the work by (sequence, part of its keys): with fewer sequences than
threads, a sequence's key tiles are split into parts (flash-decoding). Each part leaves its
rows' running state (maximum, sum, unnormalized output); a second pass merges the parts'
states as the online softmax merges tiles, and writes the rows.

Rows of a sequence's state are grouped by KV head, then position-major as in flash.py: row
``(g * q_len + p) * group + h`` is query position ``p`` of query head ``g * group + h``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .bits import widen_row
from .blas import address, gemm_arguments
from .caching import compile_cached
from .flash import (
    SEQ_BATCH,
    SEQ_K_LEN,
    SEQ_K_START,
    SEQ_Q_LEN,
    SEQ_Q_START,
    SOURCES,
    attend_key_block,
    finish_rows,
    load_rows,
    query_multiplier,
)
from .intrinsics import FAST_MATH, contiguous_row, maximum
from .mask import key_runs, key_tile, key_tile_counts, rows_to_visit


@numba.njit(fastmath=FAST_MATH)
def _load_key_tile(src, batch, first_key, keys, code, tile_bits):
    """Rows ``first_key .. first_key + keys`` of ``src[batch]`` for every head, read in
    address order: ``tile_bits[head, key]`` is the float32 row of ``key`` for ``head``, as
    bits."""
    head_dim = src.shape[3]
    for key in range(keys):
        for head in range(src.shape[2]):
            # Rows of head_dim are contiguous (spec.py checks it).
            row = contiguous_row(src[batch, first_key + key, head])
            widen_row(row, code, tile_bits[head, key], head_dim)


@numba.njit(fastmath=FAST_MATH)
def _attend_part(
    q,
    k,
    v,
    seq,
    part,
    parts,
    code,
    scale,
    softcap,
    window_left,
    window_right,
    sink_tokens,
    block_k,
    scratch,
    acc,
    row_max,
    row_sum,
):
    """The running state of every row of the sequence described by ``seq`` (its row of the
    sequence table) over part ``part`` of ``parts`` of the key tiles it sees, from row 0 of
    ``acc``, ``row_max`` and ``row_sum``; ``scratch`` is _lane_scratch's."""
    q_tile, q_bits, k_tile, k_bits, v_tile, v_bits, scores_flat, gemm_scratch = scratch
    batch, q_start, q_len = seq[SEQ_BATCH], seq[SEQ_Q_START], seq[SEQ_Q_LEN]
    kv_heads = k.shape[2]
    group = q.shape[2] // kv_heads
    group_rows = q_len * group
    multiplier = query_multiplier(scale, softcap)
    for kv_head in range(kv_heads):
        first_row = kv_head * group_rows
        load_rows(
            q,
            batch,
            q_start,
            kv_head * group,
            q_len,
            group,
            code,
            multiplier,
            q_tile[first_row:],
            q_bits[first_row:],
        )
    rows = group_rows * kv_heads
    acc[:rows] = 0.0
    row_max[:rows] = -np.inf
    row_sum[:rows] = 0.0

    # Bottom-right alignment, as in flash.py: the first query row stands at this key position.
    first_position = seq[SEQ_K_LEN] - q_len
    sink_end, main_begin, main_end = key_runs(
        first_position,
        first_position + q_len - 1,
        seq[SEQ_K_LEN],
        window_left,
        window_right,
        sink_tokens,
    )
    sink_tiles, tiles = key_tile_counts(sink_end, main_begin, main_end, block_k)
    for tile in range(part * tiles // parts, (part + 1) * tiles // parts):
        key_begin, keys = key_tile(tile, sink_tiles, sink_end, main_begin, main_end, block_k)
        masked, seeing_begin, seeing_end = rows_to_visit(
            key_begin, keys, first_position, q_len, window_left, window_right, sink_tokens
        )
        if seeing_begin == seeing_end:
            continue
        first_key = seq[SEQ_K_START] + key_begin
        _load_key_tile(k, batch, first_key, keys, code, k_bits)
        _load_key_tile(v, batch, first_key, keys, code, v_bits)
        head_dim = q_tile.shape[1]
        for kv_head in range(kv_heads):
            row_begin = kv_head * group_rows + seeing_begin * group
            attend_key_block(
                q_tile[row_begin:],
                address(k_tile[kv_head]),
                head_dim,
                address(v_tile[kv_head]),
                head_dim,
                scores_flat,
                acc[row_begin:],
                row_max[row_begin:],
                row_sum[row_begin:],
                (seeing_end - seeing_begin) * group,
                group,
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


@numba.njit(fastmath=FAST_MATH)
def _merge_parts(part_acc, part_max, part_sum, first_row, rows, acc, row_max, row_sum):
    """The running state of rows ``first_row .. first_row + rows`` over all parts, from the
    state of each part, into ``acc``, ``row_max`` and ``row_sum`` (from their row 0)."""
    head_dim = acc.shape[1]
    for r in range(rows):
        top = np.float32(-np.inf)
        for part in range(part_max.shape[0]):
            top = maximum(top, part_max[part, first_row + r])
        row_max[r] = top
        row_sum[r] = 0.0
        acc[r] = 0.0
        if top == -np.inf:
            continue  # no part saw a key: finish_rows gives the row its empty result
        for part in range(part_max.shape[0]):
            # A part that saw no key (-inf) weighs 0; a NaN maximum makes the top NaN.
            weight = np.exp2(part_max[part, first_row + r] - top)
            row_sum[r] += part_sum[part, first_row + r] * weight
            for d in range(head_dim):
                acc[r, d] += part_acc[part, first_row + r, d] * weight


@numba.njit(fastmath=FAST_MATH)
def _lane_scratch(rows, kv_heads, group_rows, block_k, head_dim):
    """One thread's tiles for _attend_part: the query rows of a sequence, a K and a V tile
    of every KV head, the scores of one group's rows, and sgemm's arguments."""
    q_tile = np.empty((rows, head_dim), np.float32)
    k_tile = np.empty((kv_heads, block_k, head_dim), np.float32)
    v_tile = np.empty((kv_heads, block_k, head_dim), np.float32)
    return (
        q_tile,
        q_tile.view(np.uint32),
        k_tile,
        k_tile.view(np.uint32),
        v_tile,
        v_tile.view(np.uint32),
        np.empty(group_rows * block_k, np.float32),
        gemm_arguments(),
    )


@numba.njit(fastmath=FAST_MATH)
def _finish_sequence(
    out, lse, sinks, has_sinks, seq, kv_head, group, code, acc, row_max, row_sum, row_out
):
    """Write the rows of query heads ``kv_head * group ..`` of the sequence ``seq`` from
    their running state, which starts at row 0 of ``acc``, ``row_max`` and ``row_sum``."""
    finish_rows(
        out,
        lse,
        sinks,
        has_sinks,
        seq[SEQ_BATCH],
        seq[SEQ_Q_START],
        kv_head * group,
        group,
        seq[SEQ_Q_LEN] * group,
        code,
        acc,
        row_max,
        row_sum,
        row_out,
        row_out.view(np.uint32),
    )


def _decode_forward(
    q,
    k,
    v,
    out,
    lse,
    sinks,
    has_sinks,
    seqs,
    code,
    scale,
    softcap,
    window_left,
    window_right,
    sink_tokens,
    block_k,
    parts,
    lanes,
    part_acc,
    part_max,
    part_sum,
):
    """Attention for every sequence of ``seqs`` (flash.py's descriptors), ``lanes`` threads,
    each sequence's key tiles split into ``parts`` parts.

    With one part, a thread writes a sequence's rows from its own state. With more,
    ``part_acc`` (num_seqs, parts, rows, head_dim), ``part_max`` and ``part_sum`` (num_seqs,
    parts, rows) are float32 room for the parts' states, ``rows`` = the longest query x
    heads_q; with one they are not used.
    """
    num_seqs = seqs.shape[0]
    head_dim = q.shape[3]
    kv_heads = k.shape[2]
    group = q.shape[2] // kv_heads
    longest = 1
    for seq in range(num_seqs):
        longest = max(longest, seqs[seq, SEQ_Q_LEN])
    rows = longest * q.shape[2]
    whole = parts == 1
    for lane in prange(lanes):
        scratch = _lane_scratch(rows, kv_heads, longest * group, block_k, head_dim)
        # A sequence's state, for a thread that does all of its keys.
        acc = np.empty((rows if whole else 0, head_dim), np.float32)
        row_max = np.empty(acc.shape[0], np.float32)
        row_sum = np.empty(acc.shape[0], np.float32)
        row_out = np.empty(head_dim, np.float32)
        for work in range(lane, num_seqs * parts, lanes):
            seq = work // parts
            part = work - seq * parts
            if whole:
                state = (acc, row_max, row_sum)
            else:
                state = (part_acc[seq, part], part_max[seq, part], part_sum[seq, part])
            _attend_part(
                q,
                k,
                v,
                seqs[seq],
                part,
                parts,
                code,
                scale,
                softcap,
                window_left,
                window_right,
                sink_tokens,
                block_k,
                scratch,
                *state,
            )
            if whole:
                group_rows = seqs[seq, SEQ_Q_LEN] * group
                for kv_head in range(kv_heads):
                    first_row = kv_head * group_rows
                    _finish_sequence(
                        out,
                        lse,
                        sinks,
                        has_sinks,
                        seqs[seq],
                        kv_head,
                        group,
                        code,
                        acc[first_row:],
                        row_max[first_row:],
                        row_sum[first_row:],
                        row_out,
                    )
    if whole:
        return
    # Merged and written by (sequence, KV head): the rows of one group of query heads.
    for lane in prange(lanes):
        acc = np.empty((longest * group, head_dim), np.float32)
        row_max = np.empty(acc.shape[0], np.float32)
        row_sum = np.empty(acc.shape[0], np.float32)
        row_out = np.empty(head_dim, np.float32)
        for work in range(lane, num_seqs * kv_heads, lanes):
            seq = work // kv_heads
            kv_head = work - seq * kv_heads
            group_rows = seqs[seq, SEQ_Q_LEN] * group
            _merge_parts(
                part_acc[seq],
                part_max[seq],
                part_sum[seq],
                kv_head * group_rows,
                group_rows,
                acc,
                row_max,
                row_sum,
            )
            _finish_sequence(
                out,
                lse,
                sinks,
                has_sinks,
                seqs[seq],
                kv_head,
                group,
                code,
                acc,
                row_max,
                row_sum,
                row_out,
            )


_compiled: dict[np.dtype, object] = {}


def decode_forward(word_dtype: np.dtype):
    """The kernel for arrays of ``word_dtype`` words, compiled (or loaded from numba's disk
    cache) on first use; typed as flash.attention_forward is, for the same reasons."""
    word_dtype = np.dtype(word_dtype)
    if word_dtype not in _compiled:
        inputs = numba.types.Array(numba.from_dtype(word_dtype), 4, "A", readonly=True)
        float32 = numba.types.float32
        int64 = numba.types.int64
        signature = numba.types.void(
            inputs,
            inputs,
            inputs,
            numba.types.Array(numba.from_dtype(word_dtype), 4, "A"),
            numba.types.Array(float32, 3, "A"),
            numba.types.Array(float32, 1, "A"),
            numba.types.boolean,
            numba.types.Array(int64, 2, "A"),
            int64,
            numba.types.float64,
            numba.types.float64,
            int64,
            int64,
            int64,
            int64,
            int64,
            int64,
            numba.types.Array(float32, 4, "C"),
            numba.types.Array(float32, 3, "C"),
            numba.types.Array(float32, 3, "C"),
        )
        _compiled[word_dtype] = compile_cached(_decode_forward, signature, SOURCES, parallel=True)
    return _compiled[word_dtype]
