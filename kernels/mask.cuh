// Which keys a query row sees (docs/semantics.md), and which key tiles a block visits.
//
// Causal attention is a window whose right edge is the query's own position (the host folds
// causal=True into window_right = 0), so there is one rule and one code path. A block never
// visits a tile the mask hides entirely, and masks element by element only the tiles the
// mask cuts: everything else runs unmasked.
#pragma once

#include "params.cuh"

namespace cuattn {

struct KeyTiles;

// The keys of one tile that one query row sees, as columns of the tile: column c is visible
// when c < end and (c >= begin or c < sinks_end). Found once a row in 64-bit positions, so
// that a column costs three 32-bit compares and a select, and no branch.
struct RowKeys {
    int begin, end, sinks_end;
    __device__ __forceinline__ bool visible(int column) const {
        // Bitwise, not short-circuit: each && or || would be a branch per score.
        return (column < end) & ((column >= begin) | (column < sinks_end));
    }
};

struct Mask {
    int64 offset;  // key position of query row 0: rows are aligned bottom-right
    int64 key_count;
    int64 window_left, window_right, sink_tokens;

    __device__ __forceinline__ Mask(const AttentionParams& p, const SequenceInfo& s)
        : offset(s.k_len - s.q_len),
          key_count(s.k_len),
          window_left(p.window_left),
          window_right(p.window_right),
          sink_tokens(p.sink_tokens) {}

    // The columns of the tile [key_begin, key_begin + keys) that `row` sees. Key j is visible
    // when j < key_count, j <= position + window_right (if set), and j >= position -
    // window_left (if set) or j < sink_tokens.
    __device__ __forceinline__ RowKeys row_keys(int64 row, int64 key_begin, int keys) const {
        const int64 position = row + offset;
        int64 end = key_count;
        if (window_right >= 0 && position + window_right + 1 < end) end = position + window_right + 1;
        const int64 begin = window_left >= 0 ? position - window_left : 0;
        // As columns, clamped to [0, keys]: a bound outside the tile holds for all of it or none.
        const auto column = [key_begin, keys](int64 key) {
            const int64 c = key - key_begin;
            return int(c < 0 ? 0 : c > keys ? keys : c);
        };
        return RowKeys{column(begin), column(end), column(sink_tokens)};
    }

    // Whether every row of [first_row, last_row] sees every key of [key_begin, key_end).
    __device__ __forceinline__ bool sees_all(int64 first_row, int64 last_row, int64 key_begin,
                                             int64 key_end) const {
        if (key_end > key_count) return false;
        if (window_right >= 0 && key_end - 1 > first_row + offset + window_right) return false;
        if (window_left >= 0 && key_begin < last_row + offset - window_left && key_end > sink_tokens) return false;
        return true;
    }

    __device__ __forceinline__ KeyTiles tiles(int64 first_row, int64 last_row, int tile_keys) const;
};

// The key tiles rows [first_row, last_row] need, in two runs: the sink tokens left of the
// window, then the window itself. Tiles start at `begin` of their run, not at multiples of
// the tile size, so that a window costs O(window) whatever its offset.
struct KeyTiles {
    int64 sink_end;     // run 1: [0, sink_end)
    int64 window_begin;  // run 2: [window_begin, window_end)
    int64 window_end;
    int64 sink_tiles;
    int64 count;
    int tile_keys;

    __device__ __forceinline__ int64 begin(int64 t) const {
        return t < sink_tiles ? t * tile_keys : window_begin + (t - sink_tiles) * tile_keys;
    }
    __device__ __forceinline__ int64 end(int64 t) const {
        const int64 b = begin(t) + tile_keys;
        const int64 run_end = t < sink_tiles ? sink_end : window_end;
        return b < run_end ? b : run_end;
    }
};

__device__ __forceinline__ KeyTiles Mask::tiles(int64 first_row, int64 last_row, int tile_keys) const {
    KeyTiles t;
    t.tile_keys = tile_keys;
    int64 end = key_count;
    if (window_right >= 0 && last_row + offset + window_right + 1 < end) end = last_row + offset + window_right + 1;
    if (end < 0) end = 0;
    int64 begin = 0;
    if (window_left >= 0 && first_row + offset - window_left > 0) begin = first_row + offset - window_left;
    if (begin > end) begin = end;
    t.window_begin = begin;
    t.window_end = end;
    t.sink_end = sink_tokens < begin ? sink_tokens : begin;
    // 32-bit divisions (see params.cuh): key counts per sequence stay below 2**32.
    t.sink_tiles = unsigned(t.sink_end + tile_keys - 1) / unsigned(tile_keys);
    t.count = t.sink_tiles + unsigned(end - begin + tile_keys - 1) / unsigned(tile_keys);
    return t;
}

}  // namespace cuattn
