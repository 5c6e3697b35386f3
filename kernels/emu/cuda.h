// The CUDA vocabulary on the CPU: what a kernel of kernels/ may use, emulated.
//
// Execution model (runtime.cpp): a launch runs its blocks on a few OS threads; inside a
// block every CUDA thread is a fiber, and the fibers really do stop at __syncthreads and
// at warp collectives (shuffles, ldmatrix, mma) until every thread they wait for arrives.
// Shared memory is per block; dynamic shared memory is an exactly sized heap buffer, so
// AddressSanitizer sees an overflow of it. Faults (a barrier not every live thread
// reaches, a warp collective with a partial mask or a diverged lane, a misaligned cp.async,
// a deadlock, a run past the time limit) stop the launch with the kernel's file and line.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>

#include "fiber.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One copy per OS thread, and an OS thread runs one block at a time: per-block storage.
#define __shared__ static thread_local

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };

namespace cuemu {

struct Site {
    const char* file;
    int line;
};

// What a CUDA thread knows about itself.
struct ThreadState {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    unsigned linear;  // thread_idx flattened, x fastest
    unsigned lane;
    unsigned warp;
};

const ThreadState& this_thread();

void syncthreads(Site site);

// Deposits `bytes` of this lane's data and waits for all 32 lanes of the warp to reach the
// same collective; returns the lanes' deposits, lane i's at base + i * kCollectiveStride.
constexpr std::size_t kCollectiveStride = 64;
const unsigned char* warp_all(const void* mine, std::size_t bytes, unsigned mask, const char* what,
                              Site site);

template <class T>
struct WarpValues {
    const unsigned char* base;
    T operator[](unsigned lane) const {
        T value;
        std::memcpy(&value, base + lane * kCollectiveStride, sizeof(T));
        return value;
    }
    // The index-th U of a lane's deposit (viewed as an array of U), without copying the rest.
    template <class U>
    U value(unsigned lane, unsigned index) const {
        U value;
        std::memcpy(&value, base + lane * kCollectiveStride + sizeof(U) * index, sizeof(U));
        return value;
    }
};

template <class T>
WarpValues<T> warp_all(const T& mine, unsigned mask, const char* what, Site site) {
    static_assert(sizeof(T) <= kCollectiveStride, "collective payload too large");
    return WarpValues<T>{warp_all(&mine, sizeof(T), mask, what, site)};
}

void* dynamic_shared();
unsigned dynamic_shared_size();

// cp.async: the global read happens now (so the sanitizer checks it now), the shared
// write when a wait retires its group, so that a missing wait reads stale shared memory; or,
// launched with copies landing at issue (runtime.h), at once.
void cp_async(void* shared_destination, const void* global_source, int copy_bytes, int source_bytes,
              Site site);
void cp_async_commit();
void cp_async_wait(int groups_left_pending);

// Reports a fault and ends the launch; never returns (see runtime.cpp on why it is not [[noreturn]]).
void fault(Site site, const char* format, ...) __attribute__((format(printf, 2, 3)));

template <class T>
T shfl_xor(Site site, unsigned mask, T value, int lane_mask, int width = 32) {
    const unsigned lane = this_thread().lane;
    auto all = warp_all(value, mask, "__shfl_xor_sync", site);
    const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
    return source / width == lane / width ? all[source] : value;
}

template <class T>
T shfl(Site site, unsigned mask, T value, int source_lane, int width = 32) {
    const unsigned lane = this_thread().lane;
    auto all = warp_all(value, mask, "__shfl_sync", site);
    return all[lane / width * width + static_cast<unsigned>(source_lane) % width];
}

template <class T>
T shfl_down(Site site, unsigned mask, T value, unsigned delta, int width = 32) {
    const unsigned lane = this_thread().lane;
    auto all = warp_all(value, mask, "__shfl_down_sync", site);
    return lane % width + delta < static_cast<unsigned>(width) ? all[lane + delta] : value;
}

inline int any_sync(Site site, unsigned mask, int predicate) {
    auto all = warp_all(predicate != 0, mask, "__any_sync", site);
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (all[lane]) return 1;
    }
    return 0;
}

inline void syncwarp(Site site, unsigned mask = 0xffffffffu) {
    warp_all(nullptr, 0, mask, "__syncwarp", site);
}

}  // namespace cuemu

#define CUEMU_SITE (::cuemu::Site{__FILE__, __LINE__})
#define threadIdx (::cuemu::this_thread().thread_idx)
#define blockIdx (::cuemu::this_thread().block_idx)
#define blockDim (::cuemu::this_thread().block_dim)
#define gridDim (::cuemu::this_thread().grid_dim)
#define warpSize 32
#define __syncthreads() ::cuemu::syncthreads(CUEMU_SITE)
#define __syncwarp(...) ::cuemu::syncwarp(CUEMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuemu::shfl_xor(CUEMU_SITE, __VA_ARGS__)
#define __shfl_sync(...) ::cuemu::shfl(CUEMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuemu::shfl_down(CUEMU_SITE, __VA_ARGS__)
#define __any_sync(...) ::cuemu::any_sync(CUEMU_SITE, __VA_ARGS__)
#define __trap() ::cuemu::fault(CUEMU_SITE, "__trap() called")

// Math intrinsics. The fast-math forms (__expf, __fdividef...) are computed exactly here:
// tests hold kernels to tolerances that also admit the GPU's approximations.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
template <class T> inline T __ldg(const T* p) { return *p; }

// Atomics, across the OS threads that run blocks concurrently.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
    float old, desired;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        desired = old + v;
    } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicCAS(int* p, int expected, int desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
