// Merging attention states: two attentions of the same queries over disjoint key sets
// combine exactly through their log-sum-exps,
//   lse = log(exp(lse_a) + exp(lse_b)),   o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse),
// which is how split-KV decoding joins its pieces and what merge_attention_states offers
// users (cache pieces on several devices, prefix caching).
#include "numeric.cuh"
#include "params.cuh"

namespace cuattn {

struct MergeParams {
    const void* out_a;       // (batch, seqlen, heads, head_dim)
    const float* lse_a;      // (batch, heads, seqlen)
    const void* out_b;
    const float* lse_b;
    void* out;               // may be out_a or out_b: each element is read before it is written
    float* lse;              // or null
    int64 out_a_batch_stride, out_a_row_stride, out_a_head_stride;
    int64 out_b_batch_stride, out_b_row_stride, out_b_head_stride;
    int64 out_batch_stride, out_row_stride, out_head_stride;
    int64 lse_a_batch_stride, lse_a_head_stride, lse_a_row_stride;
    int64 lse_b_batch_stride, lse_b_head_stride, lse_b_row_stride;
    int64 lse_batch_stride, lse_head_stride, lse_row_stride;
    int64 batch, seqlen, heads, head_dim;
};

// The weights of two states in their merge, and the merged lse. Two empty states (both
// -inf) merge into an empty one: weights 0, lse -inf, never NaN.
struct MergeWeights {
    float a, b, lse;

    __device__ __forceinline__ static MergeWeights of(float lse_a, float lse_b) {
        const float top = fmaxf(lse_a, lse_b);
        if (top == negative_infinity()) return MergeWeights{0.0f, 0.0f, negative_infinity()};
        const float ea = __expf(lse_a - top), eb = __expf(lse_b - top);
        const float total = ea + eb;
        return MergeWeights{ea / total, eb / total, top + __logf(total)};
    }
};

// One warp per (batch, row, head); lanes stride over the head dim.
template <class Element>
__global__ void __launch_bounds__(128) merge_states(const MergeParams p) {
    using Traits = ElementTraits<Element>;
    const unsigned index = blockIdx.x * 4 + threadIdx.x / 32;
    if (index >= p.batch * p.seqlen * p.heads) return;
    const unsigned heads = unsigned(p.heads), seqlen = unsigned(p.seqlen);
    const int64 head = index % heads, row = index / heads % seqlen, b = index / heads / seqlen;
    const MergeWeights w = MergeWeights::of(p.lse_a[b * p.lse_a_batch_stride + head * p.lse_a_head_stride +
                                                    row * p.lse_a_row_stride],
                                            p.lse_b[b * p.lse_b_batch_stride + head * p.lse_b_head_stride +
                                                    row * p.lse_b_row_stride]);
    const Element* a = static_cast<const Element*>(p.out_a) + b * p.out_a_batch_stride + row * p.out_a_row_stride +
                       head * p.out_a_head_stride;
    const Element* bb = static_cast<const Element*>(p.out_b) + b * p.out_b_batch_stride +
                        row * p.out_b_row_stride + head * p.out_b_head_stride;
    Element* o = static_cast<Element*>(p.out) + b * p.out_batch_stride + row * p.out_row_stride +
                 head * p.out_head_stride;
    for (int64 d = threadIdx.x % 32; d < p.head_dim; d += 32) {
        o[d] = Traits::from_float(w.a * Traits::to_float(a[d]) + w.b * Traits::to_float(bb[d]));
    }
    if (p.lse != nullptr && threadIdx.x % 32 == 0) {
        p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + row * p.lse_row_stride] = w.lse;
    }
}

// combine_splits' block (cuattn/kernels.py's CombineKernel): kCombineGroups groups of 4
// head-dim columns (a slice of kCombineColumns columns) times kCombineRows rows of threads.
// The rows are shared out among (output row, head) pairs, combine_lanes(splits) rows each,
// and the lanes of a pair share out its splits. Eight groups side by side read a split's
// slice as 128 contiguous bytes.
constexpr int kCombineGroups = 8;
constexpr int kCombineRows = 32;
constexpr int kCombineThreads = kCombineGroups * kCombineRows;
constexpr int kCombineColumns = 4 * kCombineGroups;
constexpr int kCombineBatch = 8;  // splits a lane loads before it adds any of them

// Lanes per (row, head): the fewest, in powers of 2 up to kCombineRows, that take all the
// splits in one batch each. Few splits (many rows) then put many pairs in a block instead
// of leaving most of its threads idle. CombineKernel.lanes computes the same for the grid.
__host__ __device__ __forceinline__ int combine_lanes(int splits) {
    int lanes = 1;
    while (lanes < kCombineRows && lanes * kCombineBatch < splits) lanes *= 2;
    return lanes;
}

// Some splits of one row merged, over 4 columns: the largest lse among them, the sum of
// exp(lse - top) over them, and their outputs weighted the same way. Merging is
// associative, so the splits can be added in any grouping: one pass over them, no pass to
// find the largest lse first. A split that saw no key (lse -inf) adds nothing, whatever
// its output holds, so a row that no split saw stays zeros with lse -inf (the contract's
// empty row). A NaN lse makes the whole state NaN (fmaxf drops it from `top`; its weight
// brings it back), a NaN output the columns it is in.
struct alignas(16) SplitState {
    float4 sum;
    float top, total;

    __device__ __forceinline__ static SplitState empty() {
        return SplitState{{0.0f, 0.0f, 0.0f, 0.0f}, negative_infinity(), 0.0f};
    }

    __device__ __forceinline__ void add(float lse, const float4& out) {
        const bool saw_keys = lse != negative_infinity();  // a select: 0 x NaN would be NaN
        merge(SplitState{saw_keys ? out : float4{0.0f, 0.0f, 0.0f, 0.0f}, lse, 1.0f});
    }

    __device__ __forceinline__ void merge(const SplitState& other) {
        const float merged_top = fmaxf(top, other.top);
        // Weights against 0 when both states are empty: exp(-inf - 0) = 0, where -inf - -inf
        // would be NaN. One select, no branch.
        const float reference = merged_top == negative_infinity() ? 0.0f : merged_top;
        const float mine = __expf(top - reference), theirs = __expf(other.top - reference);
        sum.x = sum.x * mine + other.sum.x * theirs;
        sum.y = sum.y * mine + other.sum.y * theirs;
        sum.z = sum.z * mine + other.sum.z * theirs;
        sum.w = sum.w * mine + other.sum.w * theirs;
        total = total * mine + other.total * theirs;
        top = merged_top;
    }

    __device__ __forceinline__ SplitState shuffled_xor(int lane_mask) const {
        return SplitState{{__shfl_xor_sync(kFullWarp, sum.x, lane_mask), __shfl_xor_sync(kFullWarp, sum.y, lane_mask),
                           __shfl_xor_sync(kFullWarp, sum.z, lane_mask), __shfl_xor_sync(kFullWarp, sum.w, lane_mask)},
                          __shfl_xor_sync(kFullWarp, top, lane_mask), __shfl_xor_sync(kFullWarp, total, lane_mask)};
    }
};

// Split-KV's second step: each (output row, head) merges the num_splits states that the
// forward kernel left in the workspace (params.cuh: split_out, split_lse), and writes the
// result where an unsplit launch would have. A block takes kCombineRows / lanes pairs
// (combine_lanes) and a slice of kCombineColumns columns, so that a decoding step with
// few rows (batch 1: one row per head) still spreads over many multiprocessors and one
// with many rows does not launch blocks of idle threads. Each lane takes every lanes-th
// split of its pair, kCombineBatch of them a time, their loads issued before their adds;
// then the lanes merge their states (shuffles within a warp, then shared memory).
//
// Dynamic shared memory: a SplitState per (row of threads, column group). A minimum of
// one block per multiprocessor lets ptxas keep a batch's loads in registers (76) and issue
// all 16 before the first exponential (SASS of NVRTC 13.5 for sm_90; which loads it holds
// back has changed with small edits: bench/NOTES.md, item 21). Left to aim at more
// blocks, it gave 36 registers and waited on each load in turn.
template <class Element>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_splits(const AttentionParams p) {
    using Traits = ElementTraits<Element>;
    const int splits = int(p.num_splits);
    const int lanes = combine_lanes(splits);
    const unsigned slices = unsigned(p.head_dim + kCombineColumns - 1) / kCombineColumns;
    const int group = int(threadIdx.x) % kCombineGroups, thread_row = int(threadIdx.x) / kCombineGroups;
    const int lane = thread_row % lanes;
    // (row, head) pair: row * num_heads_q + head
    const int64 index = int64(blockIdx.x / slices) * (kCombineRows / lanes) + thread_row / lanes;
    const int64 slots = p.split_rows * p.num_heads_q;  // slot of (split s, pair): s * slots + index
    const int column = int(blockIdx.x % slices) * kCombineColumns + 4 * group;
    // A pair past the last (the last block's spare rows) or a group past the head dim
    // reads pair 0's column 0 instead, and its state goes nowhere: every load is then
    // unconditional, and ptxas can issue a batch's loads together (a branch around each
    // split them apart). Head dims are multiples of 8 (spec.py): a group's 4 columns are
    // all in or all out.
    const bool real = index < slots && column < p.head_dim;
    const float* split_lse = p.split_lse + (real ? index : 0);
    // The workspace is 16-byte aligned and head_dim a multiple of 4: each group's columns
    // are one aligned float4.
    const float4* split_out =
        reinterpret_cast<const float4*>(p.split_out + (real ? index * p.head_dim + column : 0));
    const int64 split_stride = slots * p.head_dim / 4;  // in float4s

    CUATTN_DYNAMIC_SHARED(SplitState, row_states);  // [kCombineRows][kCombineGroups]
    if (CUATTN_DYNAMIC_SHARED_SIZE() < unsigned(sizeof(SplitState) * kCombineThreads)) __trap();

    SplitState state = SplitState::empty();
    for (int first = lane; first < splits; first += kCombineBatch * lanes) {
        float lse[kCombineBatch];
        float4 out[kCombineBatch];
#pragma unroll
        for (int i = 0; i < kCombineBatch; ++i) {
            // Past the last split, the last one is read again and added as empty.
            const int wanted = first + i * lanes;
            const int64 split = wanted < splits ? wanted : splits - 1;
            out[i] = split_out[split * split_stride];
            lse[i] = split_lse[split * slots];
        }
#pragma unroll
        for (int i = 0; i < kCombineBatch; ++i) {
            const bool taken = first + i * lanes < splits;
            state.add(taken ? lse[i] : negative_infinity(), out[i]);
        }
    }

    // A warp holds 4 rows of threads, 8 and 16 warp lanes apart: those of one pair merge
    // there.
    for (int mask = kCombineGroups; mask < kCombineGroups * lanes && mask < 32; mask *= 2) {
        state.merge(state.shuffled_xor(mask));
    }
    if (lanes > 4) {  // a pair spans lanes / 4 warps: their states meet in shared memory
        if (thread_row % 4 == 0) row_states[threadIdx.x] = state;
        __syncthreads();
        if (lane == 0) {
            for (int r = 4; r < lanes; r += 4) state.merge(row_states[threadIdx.x + r * kCombineGroups]);
        }
    }
    if (lane != 0 || !real) return;

    // No visible key in any split: zeros and lse -inf. (A NaN total is not empty.)
    const bool empty = state.total == 0.0f;
    const unsigned heads = unsigned(p.num_heads_q);
    const int64 head = unsigned(index) % heads, row = unsigned(index) / heads;
    const int64 b = unsigned(row) / unsigned(p.seqlen_q), token = unsigned(row) % unsigned(p.seqlen_q);
    Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride + token * p.out_row_stride +
                   head * p.out_head_stride + column;
    const float inverse_total = empty ? 0.0f : 1.0f / state.total;
    out[0] = Traits::from_float(state.sum.x * inverse_total);
    out[1] = Traits::from_float(state.sum.y * inverse_total);
    out[2] = Traits::from_float(state.sum.z * inverse_total);
    out[3] = Traits::from_float(state.sum.w * inverse_total);
    if (p.lse != nullptr && column == 0) {
        p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + token] =
            empty ? negative_infinity() : state.top + __logf(state.total);
    }
}

}  // namespace cuattn
