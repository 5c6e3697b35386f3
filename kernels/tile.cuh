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

// Where row r of a tile starts in global memory, in elements from the tile's base.
struct RowStride {
    int64 stride;
    __device__ __forceinline__ int64 operator()(int r) const { return r * stride; }
};

// Grouped-query packing: the `group` query heads that share a KV head are stacked as rows,
// so that one block serves them all from one read of K and V. Row r of the tile is packed
// row first + r: token (first + r) / group, head (first + r) % group of the group.
struct PackedRows {
    int64 token_stride, head_stride, first;
    int group;
    __device__ __forceinline__ int64 token(int r) const { return unsigned(first + r) / unsigned(group); }
    __device__ __forceinline__ int head(int r) const { return int(unsigned(first + r) % unsigned(group)); }
    __device__ __forceinline__ int64 operator()(int r) const {
        return token(r) * token_stride + head(r) * head_stride;
    }
};

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
    for (int chunk = int(threadIdx.x); chunk < ROWS * kChunksPerRow; chunk += THREADS) {
        const int r = chunk / kChunksPerRow;
        const int c = (chunk % kChunksPerRow) * Tile::kChunk;
        const bool valid = r < valid_rows && c < head_dim;  // head_dim is a multiple of 8
        const Element* source = global + rows(r) + c;
        Element* destination = tile.row(r) + c;
        if (vector_loads) {
            cp_async_16(destination, valid ? source : global, valid);
        } else {
#pragma unroll
            for (int i = 0; i < Tile::kChunk; ++i) {
                if (valid) {
                    destination[i] = source[i];
                } else {
                    destination[i] = Element{};
                }
            }
        }
    }
}

}  // namespace cuattn
