// Fibers: the execution contexts that emulated CUDA threads run on.
//
// A block's threads must really be suspended and resumed between barriers and warp
// collectives, so each one gets its own stack. Switching is a hand-written save of the
// callee-saved registers: measured on the development machine, 5.6 ns a switch against
// 317 ns for swapcontext (which makes a sigprocmask system call every time). An emulated
// tensor-core tile makes tens of thousands of switches, so this is the difference between
// seconds and minutes per test. Other architectures fall back to ucontext.
#pragma once

#include <cstddef>

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUEMU_ASAN 1
#endif
#endif
#ifndef CUEMU_ASAN
#define CUEMU_ASAN 0
#endif

#if !defined(__x86_64__) && !defined(__aarch64__)
#include <ucontext.h>
#endif

namespace cuemu {

struct FiberStack {
    void* bottom = nullptr;  // lowest usable address (a guard page lies below it)
    std::size_t size = 0;
};

struct FiberContext {
#if defined(__x86_64__) || defined(__aarch64__)
    void* stack_pointer = nullptr;
#else
    ucontext_t context;
    void (*entry)(void*) = nullptr;
    void* argument = nullptr;
#endif
    FiberStack stack;  // empty for the OS thread's own context
    // AddressSanitizer keeps a "fake stack" per context that must be handed back and
    // forth on every switch.
    void* asan_fake_stack = nullptr;
};

// Allocates a stack of at least `size` bytes with an inaccessible guard page below it, so
// that an overflow faults instead of silently corrupting a neighbour.
FiberStack allocate_stack(std::size_t size);
void free_stack(FiberStack stack);

// Prepares `context` to run entry(argument) on `stack` the first time it is switched to.
// `entry` must never return: a finished fiber switches away for good.
void prepare_fiber(FiberContext* context, FiberStack stack, void (*entry)(void*), void* argument);

// The first thing a fiber's entry function calls (completes the sanitizer's switch).
void on_fiber_start();

// Saves the current context into `from` and resumes `to`. `from_finished` tells the
// sanitizer that `from` will never run again.
void switch_fiber(FiberContext* from, FiberContext* to, bool from_finished = false);

}  // namespace cuemu
