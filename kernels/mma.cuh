// The tensor-core layer: the only place kernels reach inline PTX.
//
//   mma_m16n8k16   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   ldmatrix_x4    ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
//   cp_async_16    cp.async.cg.shared.global (16 bytes, zero-filled when out of range)
//
// Each has an emulated branch built from the fragment layouts of the PTX ISA ("Matrix
// Fragments for mma.m16n8k16 with floating point type"): the warp's 32 lanes deposit their
// registers, and every lane computes the registers it would receive. Fragment layout, with
// group = lane / 4 and quad = lane % 4, 16-bit values numbered in register order:
//   A (16x16, row-major):  value i at row group + 8 * ((i / 2) % 2), column 2 * quad + i % 2 + 8 * (i / 4)
//   B (16x8, "col"):       value i at row 2 * quad + i % 2 + 8 * (i / 2),  column group
//   C, D (16x8 float):     value i at row group + 8 * (i / 2),              column 2 * quad + i % 2
#pragma once

#include "numeric.cuh"

#if CUATTN_EMULATED
#define CUATTN_CALLER_SITE , ::cuemu::Site site = {__builtin_FILE(), __builtin_LINE()}
#else
#define CUATTN_CALLER_SITE
#endif

namespace cuattn {

#if !CUATTN_EMULATED
// The intrinsic, not inline PTX: the compiler then knows the pointer is in shared memory,
// does the tile arithmetic on 32-bit shared addresses and folds constant offsets into the
// ldmatrix (through an inline cvta it added up 64-bit generic addresses for every one).
__device__ __forceinline__ uint32 shared_address(const void* pointer) {
    return uint32(__cvta_generic_to_shared(pointer));
}
#endif

// d += a * b for one 16x8x16 tile; a, b are packed pairs of `Element`.
template <class Element>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32 (&a)[4], const uint32 (&b)[2]
                                             CUATTN_CALLER_SITE) {
#if CUATTN_EMULATED
    // Each lane deposits its operands already widened to float, so that the products below
    // are plain float loads.
    using Traits = ElementTraits<Element>;
    struct Operands {
        float a[8];
        float b[4];
    } mine;
    for (int i = 0; i < 8; ++i) mine.a[i] = i % 2 ? Traits::high_to_float(a[i / 2]) : Traits::low_to_float(a[i / 2]);
    for (int i = 0; i < 4; ++i) mine.b[i] = i % 2 ? Traits::high_to_float(b[i / 2]) : Traits::low_to_float(b[i / 2]);
    const auto all = cuemu::warp_all(mine, kFullWarp, "mma.sync.m16n8k16", site);
    const unsigned lane = cuemu::this_thread().lane;
    for (int i = 0; i < 4; ++i) {
        const int row = int(lane / 4) + 8 * (i / 2);
        const int column = 2 * int(lane % 4) + i % 2;
        float sum = d[i];
        for (int k = 0; k < 16; ++k) {
            // Invert the layouts above: which lane holds A[row][k] and B[k][column], and where.
            const int a_value = k % 2 + 2 * (row / 8) + 4 * (k / 8);
            const int b_value = k % 2 + 2 * (k / 8);
            const float x = all.template value<float>(unsigned((row % 8) * 4 + (k % 8) / 2), unsigned(a_value));
            const float y = all.template value<float>(unsigned(column * 4 + (k % 8) / 2), unsigned(8 + b_value));
            sum += x * y;  // the product of two 16-bit floats is exact in float32
        }
        d[i] = sum;
    }
#else
    if constexpr (ElementTraits<Element>::is_bfloat16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

// Four 8x8 matrices of 16-bit values from shared memory. Lanes 8j..8j+7 give the addresses
// of the 8 rows (16 bytes each) of matrix j; register j receives, in lane l, row l / 4 and
// columns 2 (l % 4), 2 (l % 4) + 1 of matrix j, or with `transpose` column l / 4 and rows
// 2 (l % 4), 2 (l % 4) + 1.
template <bool transpose>
__device__ __forceinline__ void ldmatrix_x4(uint32 (&r)[4], const void* row_address CUATTN_CALLER_SITE) {
#if CUATTN_EMULATED
    const auto* shared = static_cast<const unsigned char*>(cuemu::dynamic_shared());
    const auto* mine = static_cast<const unsigned char*>(row_address);
    if (mine < shared || mine + 16 > shared + cuemu::dynamic_shared_size() ||
        reinterpret_cast<unsigned long>(mine) % 16 != 0) {
        cuemu::fault(site, "ldmatrix: row address %p is not a 16-byte aligned row of dynamic shared memory",
                     row_address);
    }
    const auto rows = cuemu::warp_all(row_address, kFullWarp, transpose ? "ldmatrix.x4.trans" : "ldmatrix.x4",
                                      site);
    const unsigned lane = cuemu::this_thread().lane;
    for (int j = 0; j < 4; ++j) {
        uint16 low, high;
        if (transpose) {
            const unsigned column = lane / 4, row = 2 * (lane % 4);
            std::memcpy(&low, static_cast<const unsigned char*>(rows[unsigned(8 * j) + row]) + 2 * column, 2);
            std::memcpy(&high, static_cast<const unsigned char*>(rows[unsigned(8 * j) + row + 1]) + 2 * column, 2);
        } else {
            const unsigned row = lane / 4, column = 2 * (lane % 4);
            const auto* p = static_cast<const unsigned char*>(rows[unsigned(8 * j) + row]) + 2 * column;
            std::memcpy(&low, p, 2);
            std::memcpy(&high, p + 2, 2);
        }
        r[j] = uint32(low) | (uint32(high) << 16);
    }
#else
    if constexpr (transpose) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(shared_address(row_address)));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(shared_address(row_address)));
    }
#endif
}

// An asynchronous 16-byte copy from global to shared memory; `valid == false` writes zeros
// and reads nothing (the source may then be any address).
__device__ __forceinline__ void cp_async_16(void* shared_destination, const void* global_source,
                                            bool valid CUATTN_CALLER_SITE) {
#if CUATTN_EMULATED
    cuemu::cp_async(shared_destination, global_source, 16, valid ? 16 : 0, site);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(shared_address(shared_destination)), "l"(global_source), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if CUATTN_EMULATED
    cuemu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;");
#endif
}

// Waits until at most `pending` of this thread's committed copy groups are in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#if CUATTN_EMULATED
    cuemu::cp_async_wait(pending);
#else
    asm volatile("cp.async.wait_group %0;" : : "n"(pending));
#endif
}

}  // namespace cuattn
