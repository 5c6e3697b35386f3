// Launching an emulated kernel: the host side of emu/.
#pragma once

#include <cstddef>

#include "cuda.h"

namespace cuemu {

// In which order a block's threads take turns between synchronization points. A missing
// __syncthreads usually changes the result under one order or another; the tests run
// kernels under each.
enum Schedule : int {
    kForward = 0,   // thread 0, 1, 2, ...
    kReverse = 1,   // the last thread first
    kShuffled = 2,  // a fixed random permutation per block, from `seed`
};

struct LaunchOptions {
    int schedule;
    unsigned seed;
    int workers;                // OS threads running blocks concurrently (0: one per core)
    double time_limit_seconds;  // a launch running longer fails with where each thread was
    std::size_t stack_bytes;    // per emulated thread
};

// Runs invoke(context) as every thread of every block of a grid. Returns 0, or nonzero
// with a description of the fault in `error`.
int launch(void (*invoke)(const void*), const void* context, dim3 grid, dim3 block,
           unsigned dynamic_shared_bytes, const LaunchOptions& options, char* error,
           std::size_t error_size);

}  // namespace cuemu
