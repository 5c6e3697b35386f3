"""SEMANTICS.md's masks on tiles: which keys a run of query rows sees, in which tiles, and
which rows and columns of a tile they hide (kernels/mask.cuh is the CUDA counterpart).

Positions are in key coordinates: query row i of a sequence stands at key position
i + seqlen_k - seqlen_q (bottom-right alignment). Bounds of -1 are unbounded.
"""

from __future__ import annotations

import numba


@numba.njit(inline="always")
def hidden_columns(key_begin, keys, position, window_left, window_right, sink_tokens):
    """SEMANTICS.md's mask on one row of a key tile, as column ranges: a query at
    ``position`` does not see columns [sink_end, begin) and [end, keys) of the tile of
    ``keys`` keys from ``key_begin`` (-1 = unbounded). Columns left of ``sink_end`` are sink
    tokens, which ignore the left bound; those right of ``end`` break the right one."""
    end = keys
    if window_right >= 0:
        end = min(keys, max(0, position + window_right + 1 - key_begin))
    begin = 0
    if window_left >= 0:
        begin = min(end, max(0, position - window_left - key_begin))
    sink_end = min(begin, max(0, sink_tokens - key_begin))
    return sink_end, begin, end


@numba.njit(inline="always")
def _sees_a_key(key_begin, keys, position, window_left, window_right, sink_tokens):
    sink_end, begin, end = hidden_columns(
        key_begin, keys, position, window_left, window_right, sink_tokens
    )
    return sink_end > 0 or begin < end


@numba.njit(inline="always")
def rows_seeing(key_begin, keys, first_position, rows, window_left, window_right, sink_tokens):
    """The rows [row_begin, row_end) of a query tile from ``first_position`` that see a key
    of a key tile. The rest see none of its keys, so skipping them changes nothing: under a
    causal mask, the diagonal's rows above the tile's first key. Along the rows, both ends
    of the window move right and the sink tokens stay seen once seen, so the rows that see
    a key are one run."""
    row_begin = 0
    while row_begin < rows and not _sees_a_key(
        key_begin, keys, first_position + row_begin, window_left, window_right, sink_tokens
    ):
        row_begin += 1
    row_end = rows
    while row_end > row_begin and not _sees_a_key(
        key_begin, keys, first_position + row_end - 1, window_left, window_right, sink_tokens
    ):
        row_end -= 1
    return row_begin, row_end


@numba.njit(inline="always")
def tile_fully_visible(
    key_begin, key_end, first_position, last_position, window_left, window_right, sink_tokens
):
    """Whether every key of [key_begin, key_end) is visible from every row of a tile."""
    if window_right >= 0 and key_end - 1 > first_position + window_right:
        return False
    if window_left >= 0 and key_begin < last_position - window_left and key_end > sink_tokens:
        return False
    return True


@numba.njit(inline="always")
def key_runs(first_position, last_position, k_len, window_left, window_right, sink_tokens):
    """The keys that query positions first_position..last_position see between them, as two
    runs of keys: the sink tokens left of the window, [0, sink_end), and the window,
    [main_begin, main_end) (every key when there is no window)."""
    main_end = k_len if window_right < 0 else min(k_len, max(0, last_position + window_right + 1))
    main_begin = 0 if window_left < 0 else min(max(0, first_position - window_left), main_end)
    sink_end = min(sink_tokens, main_begin)
    return sink_end, main_begin, main_end


@numba.njit(inline="always")
def key_tile_counts(sink_end, main_begin, main_end, block_k):
    """(tiles of the sink run, tiles of both runs) for tiles of ``block_k`` keys."""
    sink_tiles = (sink_end + block_k - 1) // block_k
    return sink_tiles, sink_tiles + (main_end - main_begin + block_k - 1) // block_k


@numba.njit(inline="always")
def key_tile(tile, sink_tiles, sink_end, main_begin, main_end, block_k):
    """(first key, number of keys) of tile ``tile`` of the runs (key_tile_counts)."""
    if tile < sink_tiles:
        key_begin = tile * block_k
        return key_begin, min(block_k, sink_end - key_begin)
    key_begin = main_begin + (tile - sink_tiles) * block_k
    return key_begin, min(block_k, main_end - key_begin)


@numba.njit(inline="always")
def rows_to_visit(key_begin, keys, first_position, rows, window_left, window_right, sink_tokens):
    """For the tile of ``keys`` keys from ``key_begin`` and the query rows at positions
    first_position..first_position + rows - 1: whether the mask cuts the tile (its scores
    must be masked element by element), and the rows [row_begin, row_end) to visit."""
    masked = not tile_fully_visible(
        key_begin,
        key_begin + keys,
        first_position,
        first_position + rows - 1,
        window_left,
        window_right,
        sink_tokens,
    )
    if not masked:
        return False, 0, rows
    row_begin, row_end = rows_seeing(
        key_begin, keys, first_position, rows, window_left, window_right, sink_tokens
    )
    return True, row_begin, row_end
