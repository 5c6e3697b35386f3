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
    // Thread 0, 1, 2, ..., but a thread that waits hands the turn first to the lanes of its
    // own warp that have yet to reach the barrier, so that each warp runs on to its next
    // __syncthreads before the next warp moves: the order in which a copy that overwrites what
    // later warps still read shows (with copies landing at issue).
    kWarpAtATime = 3,
};

// When a cp.async copy writes shared memory. Each order exposes one kind of race: a copy
// that lands only at its wait shows a read made before the copy was waited for; a copy that
// lands at once shows one that overwrites data other warps have yet to read.
enum CopyLanding : int {
    kAtWait = 0,   // when the thread's cp.async.wait_group retires the copy's group
    kAtIssue = 1,  // as soon as the thread issues it
};

struct LaunchOptions {
    int schedule;
    unsigned seed;
    int workers;                // OS threads running blocks concurrently (0: one per core)
    double time_limit_seconds;  // a launch running longer fails with where each thread was
    std::size_t stack_bytes;    // per emulated thread
    int copy_landing;           // a CopyLanding
};

// Runs invoke(context) as every thread of every block of a grid. Returns 0, or nonzero
// with a description of the fault in `error`.
int launch(void (*invoke)(const void*), const void* context, dim3 grid, dim3 block,
           unsigned dynamic_shared_bytes, const LaunchOptions& options, char* error,
           std::size_t error_size);

}  // namespace cuemu
