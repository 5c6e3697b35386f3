// Fiber stacks and context switching (see fiber.h for why it is hand-written).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if CUEMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuemu {

FiberStack allocate_stack(std::size_t size) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    size = (size + page - 1) / page * page;
    void* region = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    if (region == MAP_FAILED) {
        std::perror("cuemu: mmap of a fiber stack");
        std::abort();
    }
    mprotect(region, page, PROT_NONE);  // the guard page
    return FiberStack{static_cast<char*>(region) + page, size};
}

void free_stack(FiberStack stack) {
    if (stack.bottom == nullptr) return;
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    munmap(static_cast<char*>(stack.bottom) - page, stack.size + page);
}

#if defined(__x86_64__) || defined(__aarch64__)

extern "C" void cuemu_switch_stack(void** save_stack_pointer, void* next_stack_pointer);
extern "C" void cuemu_fiber_start();

#if defined(__x86_64__)
// System V: rbx, rbp, r12-r15 are callee-saved; everything else the caller of
// cuemu_switch_stack has already given up. The new context's first "return" lands in
// cuemu_fiber_start, with the entry point and its argument in r12 and r13.
asm(R"(
    .text
    .globl cuemu_switch_stack
    .type cuemu_switch_stack, @function
cuemu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch_stack, .-cuemu_switch_stack

    .globl cuemu_fiber_start
    .type cuemu_fiber_start, @function
cuemu_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size cuemu_fiber_start, .-cuemu_fiber_start
)");
constexpr int kSavedRegisters = 6;  // r15 r14 r13 r12 rbx rbp, in pop order
constexpr int kEntrySlot = 3;        // r12
constexpr int kArgumentSlot = 2;     // r13
#else
// AAPCS64: x19-x28, the frame pointer x29, the link register x30 and d8-d15 are saved.
asm(R"(
    .text
    .globl cuemu_switch_stack
    .type cuemu_switch_stack, %function
cuemu_switch_stack:
    sub sp, sp, #160
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #160
    ret
    .size cuemu_switch_stack, .-cuemu_switch_stack

    .globl cuemu_fiber_start
    .type cuemu_fiber_start, %function
cuemu_fiber_start:
    mov x0, x20
    blr x19
    brk #0
    .size cuemu_fiber_start, .-cuemu_fiber_start
)");
constexpr int kSavedRegisters = 20;  // 160 bytes of 8-byte slots
constexpr int kEntrySlot = 0;        // x19
constexpr int kArgumentSlot = 1;     // x20
constexpr int kLinkSlot = 11;        // x30
#endif

// A fiber that ended by switching away for good left its frames, and their red zones, in
// the sanitizer's shadow of its stack: a new fiber on that stack starts from a clean one.
static void clear_stack_shadow(FiberStack stack) {
#if CUEMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stack.bottom, stack.size);
#else
    (void)stack;
#endif
}

void prepare_fiber(FiberContext* context, FiberStack stack, void (*entry)(void*), void* argument) {
    clear_stack_shadow(stack);
    context->stack = stack;
    auto top = reinterpret_cast<std::uintptr_t>(stack.bottom) + stack.size;
    top &= ~std::uintptr_t{15};
    void** slot = reinterpret_cast<void**>(top);
#if defined(__x86_64__)
    // `ret` pops this, leaving rsp at the 16-byte aligned top: the alignment the System V
    // ABI wants at the `call` in cuemu_fiber_start.
    *--slot = reinterpret_cast<void*>(&cuemu_fiber_start);
    slot -= kSavedRegisters;
    for (int i = 0; i < kSavedRegisters; ++i) slot[i] = nullptr;
    slot[kEntrySlot] = reinterpret_cast<void*>(entry);
    slot[kArgumentSlot] = argument;
#else
    slot -= kSavedRegisters;
    for (int i = 0; i < kSavedRegisters; ++i) slot[i] = nullptr;
    slot[kEntrySlot] = reinterpret_cast<void*>(entry);
    slot[kArgumentSlot] = argument;
    slot[kLinkSlot] = reinterpret_cast<void*>(&cuemu_fiber_start);
#endif
    context->stack_pointer = slot;
}

static void jump(FiberContext* from, FiberContext* to) {
    cuemu_switch_stack(&from->stack_pointer, to->stack_pointer);
}

#else  // ucontext fallback

namespace {
void start_trampoline(unsigned high, unsigned low) {
    // makecontext passes int arguments only: the context's address arrives in two halves.
    auto* context = reinterpret_cast<FiberContext*>((std::uintptr_t{high} << 32) | low);
    context->entry(context->argument);
}
}  // namespace

void prepare_fiber(FiberContext* context, FiberStack stack, void (*entry)(void*), void* argument) {
    clear_stack_shadow(stack);
    context->stack = stack;
    context->entry = entry;
    context->argument = argument;
    getcontext(&context->context);
    context->context.uc_stack.ss_sp = stack.bottom;
    context->context.uc_stack.ss_size = stack.size;
    context->context.uc_link = nullptr;
    const auto address = reinterpret_cast<std::uintptr_t>(context);
    makecontext(&context->context, reinterpret_cast<void (*)()>(start_trampoline), 2,
                static_cast<unsigned>(address >> 32), static_cast<unsigned>(address));
}

static void jump(FiberContext* from, FiberContext* to) { swapcontext(&from->context, &to->context); }

#endif

void switch_fiber(FiberContext* from, FiberContext* to, bool from_finished) {
#if CUEMU_ASAN
    __sanitizer_start_switch_fiber(from_finished ? nullptr : &from->asan_fake_stack, to->stack.bottom,
                                   to->stack.size);
#else
    (void)from_finished;
#endif
    jump(from, to);
#if CUEMU_ASAN
    __sanitizer_finish_switch_fiber(from->asan_fake_stack, nullptr, nullptr);
#endif
}

void on_fiber_start() {
#if CUEMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
}

}  // namespace cuemu
