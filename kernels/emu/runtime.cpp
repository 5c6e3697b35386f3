// The emulated execution model: blocks on OS threads, CUDA threads on fibers.
#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace cuemu {
namespace {

struct PendingCopy {
    void* destination;
    int bytes;
    unsigned char data[16];
};

struct Thread {
    ThreadState state{};
    FiberContext context;
    bool finished = false;
    const char* waiting_for = nullptr;  // what it waits at, for fault reports
    Site waiting_site{nullptr, 0};
    bool at_barrier = false;       // waiting at __syncthreads ...
    unsigned barrier_generation = 0;  // ... for the release of this generation of it
    std::vector<PendingCopy> open_copies;             // cp.async issued, not yet committed
    std::deque<std::vector<PendingCopy>> copy_groups;  // committed, oldest first
};

struct Warp {
    unsigned arrived = 0;
    unsigned generation = 0;
    unsigned size = 0;  // threads of the block in this warp
    const char* what = nullptr;
    Site site{nullptr, 0};
    std::size_t bytes = 0;
    // Two buffers, alternating by generation: a lane may enter the next collective while
    // slower lanes still read the deposits of this one.
    alignas(16) unsigned char slots[2][32 * kCollectiveStride];
};

struct Launch;

struct Block {
    Launch* launch = nullptr;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<unsigned> order;     // schedule: the thread that runs after order[i] is order[i+1]
    std::vector<unsigned> position;  // inverse of order
    unsigned live = 0;
    unsigned barrier_arrived = 0;
    unsigned barrier_generation = 0;
    Site barrier_site{nullptr, 0};
    // Turns that waiting threads took since a wait last ended or a thread finished: more
    // than two rounds of them, and nothing can ever move again.
    unsigned idle_turns = 0;
    unsigned turns_since_clock = 0;  // the clock is read once every few thousand turns
    unsigned char* shared = nullptr;
    unsigned shared_bytes = 0;
    FiberContext host;  // the OS thread's own context, returned to when the block ends
};

struct Launch {
    void (*invoke)(const void*);
    const void* context;
    dim3 grid, block;
    unsigned shared_bytes;
    LaunchOptions options;
    std::chrono::steady_clock::time_point deadline;
    std::atomic<unsigned long long> next_block{0};
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;
};

thread_local Block* current_block = nullptr;
thread_local Thread* current_thread = nullptr;

// Functions that switch away from a fiber for good (abandon_block, finish_thread, fault)
// must not look noreturn to the compiler: AddressSanitizer instruments calls to noreturn
// functions with a stack check that fails on fiber stacks. So none is declared
// [[noreturn]], and after the final switch they end in switched_away_for_good(), which
// the compiler cannot prove never returns.
void abandon_block();

volatile bool resumed_after_final_switch = true;

__attribute__((noinline)) void switched_away_for_good() {
    if (resumed_after_final_switch) std::abort();
}

void record_error(Launch* launch, const std::string& message) {
    std::lock_guard<std::mutex> lock(launch->error_mutex);
    if (launch->error.empty()) launch->error = message;
    launch->failed.store(true);
}

std::string where(Site site) {
    return std::string(site.file ? site.file : "?") + ":" + std::to_string(site.line);
}

std::string block_name(const Block& block) {
    const uint3 b = block.threads[0].state.block_idx;
    return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")";
}

// Where every live thread of the block is waiting, grouped, for a fault report.
std::string waiting_report(const Block& block) {
    std::string report;
    unsigned shown = 0;
    for (const Thread& t : block.threads) {
        if (t.finished || t.waiting_for == nullptr) continue;
        if (shown++ == 8) {
            report += "\n  ...";
            break;
        }
        report += "\n  thread " + std::to_string(t.state.linear) + " waits at " + t.waiting_for + " (" +
                  where(t.waiting_site) + ")";
    }
    return report;
}

void switch_to(Thread* self, Thread* next) {
    current_thread = next;
    switch_fiber(&self->context, &next->context);
    current_thread = self;
    if (current_block->launch->failed.load(std::memory_order_relaxed)) abandon_block();
}

Thread* next_live(const Block& block, const Thread* self) {
    const unsigned n = static_cast<unsigned>(block.threads.size());
    unsigned at = block.position[self->state.linear];
    for (unsigned step = 1; step <= n; ++step) {
        Thread* candidate = const_cast<Thread*>(&block.threads[block.order[(at + step) % n]]);
        if (!candidate->finished) return candidate;
    }
    return nullptr;
}

// Under kWarpAtATime: the next lane of self's warp that can run before the barrier in
// progress (if any) releases, that is one neither waiting at that barrier nor exited; null
// when there is none, and the turn passes on in block order.
Thread* next_lane(const Block& block, const Thread* self) {
    const unsigned first = self->state.warp * 32, size = block.warps[self->state.warp].size;
    for (unsigned step = 1; step < size; ++step) {
        Thread* candidate = const_cast<Thread*>(&block.threads[first + (self->state.lane + step) % size]);
        const bool held = candidate->at_barrier && candidate->barrier_generation == block.barrier_generation;
        if (!candidate->finished && !held) return candidate;
    }
    return nullptr;
}

void progress(Block& block) { block.idle_turns = 0; }

// Gives other threads turns until ready() holds; each turn taken while waiting counts
// towards the deadlock verdict until something, anywhere in the block, moves.
template <class Ready>
void wait_until(const char* what, Site site, Ready ready) {
    Block& block = *current_block;
    Thread* self = current_thread;
    self->waiting_for = what;
    self->waiting_site = site;
    while (!ready()) {
        if (++block.idle_turns > 2 * block.live + 2) {
            fault(site, "deadlock in %s: no thread can proceed%s", block_name(block).c_str(),
                  waiting_report(block).c_str());
        }
        if (++block.turns_since_clock == 4096) {
            block.turns_since_clock = 0;
            if (std::chrono::steady_clock::now() > block.launch->deadline) {
                fault(site, "time limit of %.0f s exceeded in %s%s", block.launch->options.time_limit_seconds,
                      block_name(block).c_str(), waiting_report(block).c_str());
            }
        }
        Thread* next = block.launch->options.schedule == kWarpAtATime ? next_lane(block, self) : nullptr;
        if (next == nullptr) next = next_live(block, self);
        if (next != self) switch_to(self, next);
    }
    self->waiting_for = nullptr;
}

void release_barrier(Block& block) {
    block.barrier_arrived = 0;
    ++block.barrier_generation;
    progress(block);
}

void finish_thread() {
    Block& block = *current_block;
    Thread* self = current_thread;
    self->finished = true;
    --block.live;
    progress(block);
    Warp& warp = block.warps[self->state.warp];
    if (warp.arrived > 0) {
        fault(warp.site, "lane %u of warp %u exited while its warp waits at %s", self->state.lane,
              self->state.warp, warp.what);
    }
    // A barrier counts live threads: one that exits no longer holds the others back.
    if (block.barrier_arrived > 0 && block.barrier_arrived == block.live) release_barrier(block);
    Thread* next = next_live(block, self);
    current_thread = next;
    switch_fiber(&self->context, next ? &next->context : &block.host, true);
    switched_away_for_good();
}

void thread_entry(void* argument) {
    on_fiber_start();
    (void)argument;
    Block& block = *current_block;
    if (!block.launch->failed.load()) block.launch->invoke(block.launch->context);
    finish_thread();
}

void abandon_block() {
    Block& block = *current_block;
    Thread* self = current_thread;
    current_thread = nullptr;
    switch_fiber(&self->context, &block.host, true);
    switched_away_for_good();
}

void run_block(Block& block, std::vector<FiberStack>& stacks, unsigned long long index) {
    Launch& launch = *block.launch;
    const dim3 grid = launch.grid, shape = launch.block;
    const uint3 block_idx{static_cast<unsigned>(index % grid.x),
                          static_cast<unsigned>(index / grid.x % grid.y),
                          static_cast<unsigned>(index / (static_cast<unsigned long long>(grid.x) * grid.y))};
    const unsigned count = shape.x * shape.y * shape.z;
    block.threads.assign(count, Thread{});
    block.warps.assign((count + 31) / 32, Warp{});
    for (unsigned i = 0; i < count; ++i) {
        Thread& t = block.threads[i];
        t.state = ThreadState{{i % shape.x, i / shape.x % shape.y, i / (shape.x * shape.y)},
                              block_idx, shape, grid, i, i % 32, i / 32};
        ++block.warps[i / 32].size;
        prepare_fiber(&t.context, stacks[i], thread_entry, &t);
    }
    block.order.resize(count);
    for (unsigned i = 0; i < count; ++i) block.order[i] = i;
    if (launch.options.schedule == kReverse) {
        std::reverse(block.order.begin(), block.order.end());
    } else if (launch.options.schedule == kShuffled) {
        std::mt19937 random(launch.options.seed ^ static_cast<unsigned>(index * 2654435761u));
        std::shuffle(block.order.begin(), block.order.end(), random);
    }
    block.position.resize(count);
    for (unsigned i = 0; i < count; ++i) block.position[block.order[i]] = i;
    block.live = count;
    block.barrier_arrived = 0;
    block.idle_turns = 0;
    // Shared memory starts as all-ones bytes (NaN in every float width): a kernel that
    // reads what it never wrote sees poison, as the hardware promises nothing either.
    block.shared_bytes = launch.shared_bytes;
    block.shared = static_cast<unsigned char*>(std::aligned_alloc(16, (launch.shared_bytes + 15) / 16 * 16 + 16));
    std::memset(block.shared, 0xff, launch.shared_bytes);

    current_block = &block;
    Thread* first = &block.threads[block.order[0]];
    current_thread = first;
    switch_fiber(&block.host, &first->context);
    current_block = nullptr;
    std::free(block.shared);
    block.shared = nullptr;
}

void worker(Launch* launch) {
    const dim3 shape = launch->block;
    const unsigned count = shape.x * shape.y * shape.z;
    std::vector<FiberStack> stacks(count);
    for (auto& stack : stacks) stack = allocate_stack(launch->options.stack_bytes);
    const unsigned long long blocks =
        static_cast<unsigned long long>(launch->grid.x) * launch->grid.y * launch->grid.z;
    Block block;
    block.launch = launch;
    for (;;) {
        const unsigned long long index = launch->next_block.fetch_add(1);
        if (index >= blocks || launch->failed.load()) break;
        run_block(block, stacks, index);
    }
    for (auto& stack : stacks) free_stack(stack);
}

}  // namespace

const ThreadState& this_thread() { return current_thread->state; }

void* dynamic_shared() { return current_block->shared; }
unsigned dynamic_shared_size() { return current_block->shared_bytes; }

void fault(Site site, const char* format, ...) {
    char message[4096];
    va_list arguments;
    va_start(arguments, format);
    std::vsnprintf(message, sizeof message, format, arguments);
    va_end(arguments);
    Block* block = current_block;
    if (block == nullptr) {
        std::fprintf(stderr, "cuemu fault outside a kernel at %s: %s\n", where(site).c_str(), message);
        std::abort();
    }
    std::string text = where(site) + ": ";
    if (current_thread != nullptr) {
        const ThreadState& s = current_thread->state;
        text += "thread (" + std::to_string(s.thread_idx.x) + "," + std::to_string(s.thread_idx.y) + "," +
                std::to_string(s.thread_idx.z) + ") of " + block_name(*block) + ": ";
    }
    record_error(block->launch, text + message);
    abandon_block();
}

void syncthreads(Site site) {
    Block& block = *current_block;
    if (block.barrier_arrived == 0) {
        block.barrier_site = site;
    } else if (block.barrier_site.line != site.line || std::strcmp(block.barrier_site.file, site.file) != 0) {
        fault(site, "divergent __syncthreads: other threads wait at the one at %s",
              where(block.barrier_site).c_str());
    }
    const unsigned generation = block.barrier_generation;
    if (++block.barrier_arrived == block.live) {
        release_barrier(block);
        return;
    }
    Thread* self = current_thread;
    self->at_barrier = true;
    self->barrier_generation = generation;
    wait_until("__syncthreads", site, [&] { return block.barrier_generation != generation; });
    self->at_barrier = false;
}

const unsigned char* warp_all(const void* mine, std::size_t bytes, unsigned mask, const char* what,
                              Site site) {
    Block& block = *current_block;
    Thread* self = current_thread;
    Warp& warp = block.warps[self->state.warp];
    if (mask != 0xffffffffu) {
        fault(site, "%s with mask 0x%08x: the emulator runs whole-warp collectives only", what, mask);
    }
    if (warp.size != 32) {
        fault(site, "%s needs 32 lanes, but warp %u of this block has %u threads", what, self->state.warp,
              warp.size);
    }
    if (warp.arrived == 0) {
        warp.what = what;
        warp.site = site;
        warp.bytes = bytes;
    } else if (warp.what != what || warp.site.line != site.line || std::strcmp(warp.site.file, site.file) != 0) {
        fault(site, "warp divergence: lane %u reached %s while other lanes wait at %s (%s)",
              self->state.lane, what, warp.what, where(warp.site).c_str());
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        const Thread& other = block.threads[self->state.warp * 32 + lane];
        if (other.finished) fault(site, "%s: lane %u of this warp has exited", what, lane);
    }
    const unsigned generation = warp.generation;
    unsigned char* slots = warp.slots[generation & 1];
    if (bytes) std::memcpy(slots + self->state.lane * kCollectiveStride, mine, bytes);
    if (++warp.arrived == 32) {
        warp.arrived = 0;
        ++warp.generation;
        progress(block);
    } else {
        wait_until(what, site, [&] { return warp.generation != generation; });
    }
    return slots;
}

void cp_async(void* destination, const void* source, int copy_bytes, int source_bytes, Site site) {
    const auto shared = reinterpret_cast<std::uintptr_t>(current_block->shared);
    const auto to = reinterpret_cast<std::uintptr_t>(destination);
    if (to < shared || to + copy_bytes > shared + current_block->shared_bytes) {
        fault(site, "cp.async destination %p is outside this block's %u bytes of dynamic shared memory",
              destination, current_block->shared_bytes);
    }
    if (to % copy_bytes != 0 || (source_bytes > 0 && reinterpret_cast<std::uintptr_t>(source) % copy_bytes != 0)) {
        fault(site, "cp.async of %d bytes needs %d-byte aligned addresses, got shared %p and global %p",
              copy_bytes, copy_bytes, destination, source);
    }
    PendingCopy copy{destination, copy_bytes, {}};
    if (source_bytes > 0) std::memcpy(copy.data, source, source_bytes);  // the rest stays zero
    if (current_block->launch->options.copy_landing == kAtIssue) {
        std::memcpy(destination, copy.data, copy_bytes);
        return;
    }
    current_thread->open_copies.push_back(copy);
}

void cp_async_commit() {
    Thread* self = current_thread;
    self->copy_groups.push_back(std::move(self->open_copies));
    self->open_copies.clear();
}

void cp_async_wait(int groups_left_pending) {
    Thread* self = current_thread;
    while (self->copy_groups.size() > static_cast<std::size_t>(groups_left_pending)) {
        for (const PendingCopy& copy : self->copy_groups.front()) {
            std::memcpy(copy.destination, copy.data, copy.bytes);
        }
        self->copy_groups.pop_front();
    }
}

int launch(void (*invoke)(const void*), const void* context, dim3 grid, dim3 block, unsigned dynamic_shared_bytes,
           const LaunchOptions& options, char* error, std::size_t error_size) {
    const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) {
        std::snprintf(error, error_size, "invalid block of %u threads", threads);
        return 1;
    }
    if (blocks == 0) return 0;
    Launch state;
    state.invoke = invoke;
    state.context = context;
    state.grid = grid;
    state.block = block;
    state.shared_bytes = dynamic_shared_bytes;
    state.options = options;
    if (state.options.stack_bytes == 0) state.options.stack_bytes = 256 * 1024;
    state.deadline = std::chrono::steady_clock::now() +
                     std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(options.time_limit_seconds));
    unsigned workers = options.workers > 0 ? static_cast<unsigned>(options.workers)
                                           : std::max(1u, std::thread::hardware_concurrency());
    workers = static_cast<unsigned>(std::min<unsigned long long>(workers, blocks));
    // Threads are checked against the time limit whenever they wait; a thread that never
    // waits (a spin loop) is caught by this watchdog instead, which can only end the process.
    std::mutex watchdog_mutex;
    std::condition_variable watchdog_wakeup;
    bool finished = false;
    std::thread watchdog([&] {
        std::unique_lock<std::mutex> lock(watchdog_mutex);
        const auto grace = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(10.0 + 0.5 * options.time_limit_seconds));
        if (!watchdog_wakeup.wait_until(lock, state.deadline + grace, [&] { return finished; })) {
            std::fprintf(stderr, "cuemu: a kernel ran %.0f s past its time limit without reaching a "
                         "synchronization point; ending the process\n",
                         std::chrono::duration<double>(grace).count());
            std::abort();
        }
    });
    std::vector<std::thread> pool;
    for (unsigned i = 1; i < workers; ++i) pool.emplace_back(worker, &state);
    worker(&state);
    for (auto& t : pool) t.join();
    {
        std::lock_guard<std::mutex> lock(watchdog_mutex);
        finished = true;
    }
    watchdog_wakeup.notify_one();
    watchdog.join();
    if (state.failed.load()) {
        std::snprintf(error, error_size, "%s", state.error.c_str());
        return 1;
    }
    return 0;
}

}  // namespace cuemu
