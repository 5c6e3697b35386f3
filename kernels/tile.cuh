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

// Starts copying rows [0, valid_rows) x columns [0, head_dim) of a row-major global matrix
// (rows `row_stride` elements apart) into `tile`; the rest of the tile becomes zero, so
// that padded rows and columns contribute nothing to a product. With `vector_loads` the
// copies are asynchronous (cp.async, retired by cp_async_wait); otherwise, for operands
// not on 16-byte boundaries, they are plain element copies done on the spot.
template <int THREADS, class Element, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(SharedTile<Element, ROWS, COLS> tile, const Element* global,
                                          int64 row_stride, int valid_rows, int head_dim, bool vector_loads) {
    using Tile = SharedTile<Element, ROWS, COLS>;
    constexpr int kChunksPerRow = COLS / Tile::kChunk;
    for (int chunk = int(threadIdx.x); chunk < ROWS * kChunksPerRow; chunk += THREADS) {
        const int r = chunk / kChunksPerRow;
        const int c = (chunk % kChunksPerRow) * Tile::kChunk;
        const bool valid = r < valid_rows && c < head_dim;  // head_dim is a multiple of 8
        const Element* source = global + r * row_stride + c;
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
