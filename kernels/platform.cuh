// The one portability header every kernel includes.
//
// Compiled by NVRTC, it is plain CUDA: the kernels use the real built-ins. Compiled by g++
// (the "emulate" backend), it brings in emu/, which runs the same source on the CPU: blocks
// of threads as fibers, __syncthreads, shared memory, warp shuffles and the tensor-core
// wrappers of mma.cuh. Kernels never test which of the two they are built for; only this
// header, numeric.cuh and mma.cuh do.
#pragma once

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define CUATTN_EMULATED 0
#else
#define CUATTN_EMULATED 1
#include "emu/cuda.h"
#endif

namespace cuattn {

// NVRTC has no <cstdint>; these are the widths the kernels rely on.
using int64 = long long;
using uint32 = unsigned int;
using uint16 = unsigned short;
static_assert(sizeof(int64) == 8 && sizeof(uint32) == 4 && sizeof(uint16) == 2, "type widths");

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

}  // namespace cuattn

// Bytes of dynamic shared memory this launch was given (kernels check their layout fits).
#if CUATTN_EMULATED
#define CUATTN_DYNAMIC_SHARED_SIZE() (::cuemu::dynamic_shared_size())
#else
__device__ __forceinline__ unsigned cuattn_dynamic_shared_size() {
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}
#define CUATTN_DYNAMIC_SHARED_SIZE() (cuattn_dynamic_shared_size())
#endif

// Dynamic shared memory, 16-byte aligned (cp.async and ldmatrix move 16-byte rows).
#if CUATTN_EMULATED
#define CUATTN_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::cuemu::dynamic_shared())
#else
#define CUATTN_DYNAMIC_SHARED(type, name) \
    extern __shared__ __align__(16) unsigned char cuattn_dynamic_shared_bytes[]; \
    type* name = reinterpret_cast<type*>(cuattn_dynamic_shared_bytes)
#endif
