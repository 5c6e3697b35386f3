// Tiles in shared memory, and their loads from global memory.
//
// A tile holds ROWS rows of COLS elements (COLS: the head dim padded to the kernel's size).
// Each row is followed by 16 bytes of padding: rows then start on different bank groups,
// so the 8 row addresses of an ldmatrix (and the 16-byte stores of cp.async) never collide
// on a bank. This costs 1/(COLS/8) of the tile and no index arithmetic.
#pragma once

#include "mma.cuh"

namespace cuattn {

template <class Element, int ROWS, int COLS>
struct SharedTile {
    static constexpr int kChunk = 16 / int(sizeof(Element));  // elements per 16 bytes
    static constexpr int kStride = COLS + kChunk;
    static constexpr int kBytes = ROWS * kStride * int(sizeof(Element));
    static_assert(COLS % kChunk == 0, "rows are copied 16 bytes at a time");

    Element* data;

    __device__ __forceinline__ Element* row(int r) const { return data + r * kStride; }
};

// A tile of consecutive rows from `first` on: row r of the tile is row first + r of a
// matrix with this row stride. Rows are evenly spaced, so a thread that copies every k-th
// row steps its source pointer by a constant (load_tile).
struct StridedRows {
    static constexpr bool kEvenlySpaced = true;
    int64 first, stride;
    __device__ __forceinline__ int64 operator()(int r) const { return (first + r) * stride; }
};

// Grouped-query packing: the `group` query heads that share a KV head are stacked as rows,
// so that one block serves them all from one read of K and V. Row r of the tile is packed
// row first + r: token (first + r) / group, head (first + r) % group of the group.
struct PackedRows {
    static constexpr bool kEvenlySpaced = false;
    int64 token_stride, head_stride, first;
    int group;
    __device__ __forceinline__ int64 token(int r) const { return unsigned(first + r) / unsigned(group); }
    __device__ __forceinline__ int head(int r) const { return int(unsigned(first + r) % unsigned(group)); }
    __device__ __forceinline__ int64 operator()(int r) const {
        return token(r) * token_stride + head(r) * head_stride;
    }
};

// One thread's share of an evenly spaced tile load: rows first, first + ROW_STEP, ... of one
// 16-byte column, the source advancing by source_step a row. With TESTED, rows from
// valid_rows on and a column past the head dim are filled with zeros (copied from nowhere,
// `fallback` standing in as the address). A template rather than a generic lambda: NVRTC
// 13.0 takes a generic lambda in device code for a host function and refuses it.
template <bool TESTED, int ROWS, int ROW_STEP, int STRIDE, class Element>
__device__ __forceinline__ void copy_chunk_column(Element* destination, const Element* source, int64 source_step,
                                                  const Element* fallback, int first, int valid_rows,
                                                  bool column_valid) {
#pragma unroll
    for (int i = 0; i < (ROWS + ROW_STEP - 1) / ROW_STEP; ++i) {
        const int r = first + i * ROW_STEP;
        if (ROWS % ROW_STEP != 0 && r >= ROWS) break;
        const bool valid = !TESTED || (column_valid && r < valid_rows);
        cp_async_16(destination + i * ROW_STEP * STRIDE, valid ? source : fallback, valid);
        source += source_step;
    }
}

// Starts copying rows [0, valid_rows) x columns [0, head_dim) of a global matrix, row r at
// global + rows(r), into `tile`; the rest of the tile becomes zero, so that padded rows and
// columns contribute nothing to a product. With `vector_loads` the copies are asynchronous
// (cp.async, retired by cp_async_wait); otherwise, for operands not on 16-byte boundaries,
// they are plain element copies done on the spot.
template <int THREADS, class Element, int ROWS, int COLS, class Rows>
__device__ __forceinline__ void load_tile(SharedTile<Element, ROWS, COLS> tile, const Element* global, Rows rows,
                                          int valid_rows, int head_dim, bool vector_loads) {
    using Tile = SharedTile<Element, ROWS, COLS>;
    constexpr int kChunksPerRow = COLS / Tile::kChunk;
    constexpr int kChunks = ROWS * kChunksPerRow;
    if (vector_loads) {
        if constexpr (Rows::kEvenlySpaced) {
            // Key tiles come through here once per tile, so the copies are unrolled: each
            // thread copies one column of chunks, every kRowStep-th row, and its source and
            // destination advance by constants. (As a run-time loop, the index arithmetic of
            // each 16-byte copy cost more than the copy: bench/NOTES.md, item 9.) Threads past
            // the last whole row of chunks idle: 8 of 128 at head dim 96.
            constexpr int kRowStep = THREADS / kChunksPerRow;
            static_assert(kRowStep > 0, "a row of chunks per pass at least");
            if (int(threadIdx.x) >= kRowStep * kChunksPerRow) return;
            const int first = int(threadIdx.x) / kChunksPerRow;
            const int c = (int(threadIdx.x) % kChunksPerRow) * Tile::kChunk;
            const bool column_valid = c < head_dim;  // head_dim is a multiple of 8
            Element* destination = tile.row(first) + c;
            const Element* source = global + rows(first) + c;
            const int64 source_step = rows(kRowStep) - rows(0);
            // Nearly every tile is whole, with no padded columns: its copies need no test of
            // the row or the column (a compare and two selects each). So the copy loop is
            // compiled twice, with the tests and without; the block takes one or the other.
            if (valid_rows >= ROWS && head_dim == COLS) {
                copy_chunk_column<false, ROWS, kRowStep, Tile::kStride>(destination, source, source_step, global,
                                                                        first, valid_rows, column_valid);
            } else {
                copy_chunk_column<true, ROWS, kRowStep, Tile::kStride>(destination, source, source_step, global,
                                                                       first, valid_rows, column_valid);
            }
        } else {  // packed query rows: once per block
            for (int chunk = int(threadIdx.x); chunk < kChunks; chunk += THREADS) {
                const int r = chunk / kChunksPerRow;
                const int c = (chunk % kChunksPerRow) * Tile::kChunk;
                const bool valid = r < valid_rows && c < head_dim;
                cp_async_16(tile.row(r) + c, valid ? global + rows(r) + c : global, valid);
            }
        }
        return;
    }
    for (int chunk = int(threadIdx.x); chunk < kChunks; chunk += THREADS) {
        const int r = chunk / kChunksPerRow;
        const int c = (chunk % kChunksPerRow) * Tile::kChunk;
        const bool valid = r < valid_rows && c < head_dim;
        Element* destination = tile.row(r) + c;
#pragma unroll
        for (int i = 0; i < Tile::kChunk; ++i) destination[i] = valid ? global[rows(r) + c + i] : Element{};
    }
}

}  // namespace cuattn
