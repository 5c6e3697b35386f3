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

// Threads per block of combine_splits (cuattn/kernels.py's CombineKernel.threads).
constexpr int kCombineThreads = 256;

// x reduced with `op` over the block; `scratch` holds a float per warp. Every thread gets
// the result.
template <int THREADS, class Op>
__device__ __forceinline__ float block_reduce(float x, float* scratch, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(kFullWarp, x, offset));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    x = scratch[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) x = op(x, scratch[w]);
    __syncthreads();  // scratch may be reused
    return x;
}

// Split-KV's second step: each (output row, head) merges the num_splits states that the
// forward kernel left in the workspace (params.cuh: split_out, split_lse), and writes the
// result where an unsplit launch would have. One block per (row, head), so that a
// decoding step with few rows (batch 1: one row per head) still has many loads in flight:
// the threads share out the splits to find the largest lse and each split's weight, then
// take (split, 4 head-dim columns) pairs, one 16-byte load each, and add their partial
// sums up in shared memory.
//
// Dynamic shared memory: a weight per split and a float per warp (CombineKernel.shared_bytes
// sizes it for MAX_SPLITS), then a float4 per thread.
template <class Element>
__global__ void __launch_bounds__(kCombineThreads) combine_splits(const AttentionParams p) {
    using Traits = ElementTraits<Element>;
    constexpr int kThreads = kCombineThreads;
    constexpr int kWarps = kThreads / 32;
    const int64 index = blockIdx.x;  // (row, head): row * num_heads_q + head
    const int thread = int(threadIdx.x);
    const int splits = int(p.num_splits);
    const int64 slots = p.split_rows * p.num_heads_q;  // slot of (split s, row, head): s * slots + index
    const float* split_lse = p.split_lse + index;

    CUATTN_DYNAMIC_SHARED(float, shared);
    const int scalars = (splits + kWarps + 3) / 4 * 4;  // keeps `partial` 16-byte aligned
    if (CUATTN_DYNAMIC_SHARED_SIZE() < unsigned(4 * scalars + 16 * kThreads)) __trap();
    float* weight = shared;
    float* scratch = shared + splits;
    float4* partial = reinterpret_cast<float4*>(shared + scalars);

    float top = negative_infinity();
    for (int s = thread; s < splits; s += kThreads) top = fmaxf(top, split_lse[s * slots]);
    top = block_reduce<kThreads>(top, scratch, [](float a, float b) { return fmaxf(a, b); });
    // A split's weight is exp(lse - top): 0 for a split that saw no key (lse -inf), NaN for
    // a NaN state, so that NaN inputs give NaN rows split or not (fmaxf dropped the NaN from
    // `top`; it comes back here). With no key anywhere top is -inf itself, and exponentiating
    // against 0 keeps -inf - -inf from turning empty splits into NaN.
    const float reference = top == negative_infinity() ? 0.0f : top;
    float total = 0.0f;
    for (int s = thread; s < splits; s += kThreads) {
        weight[s] = __expf(split_lse[s * slots] - reference);
        total += weight[s];
    }
    total = block_reduce<kThreads>(total, scratch, [](float a, float b) { return a + b; });
    // No visible key in any split: zeros and lse -inf. (A NaN total is not empty.)
    const bool empty = total == 0.0f;

    // Thread = (split lane, column group): head dims are multiples of 8 (spec.py) and the
    // workspace is 16-byte aligned, so a group of 4 columns is one aligned float4.
    const int groups = int(p.head_dim / 4);
    const int split_lanes = kThreads / groups;
    const int group = thread % groups, split_lane = thread / groups;
    const float4* split_out = reinterpret_cast<const float4*>(p.split_out + index * p.head_dim) + group;
    const int64 split_stride = slots * p.head_dim / 4;  // in float4s
    float4 sum = {0.0f, 0.0f, 0.0f, 0.0f};
    const auto add = [&](float w, const float4& part) {
        sum.x += w * part.x;
        sum.y += w * part.y;
        sum.z += w * part.z;
        sum.w += w * part.w;
    };
    if (!empty && split_lane < split_lanes) {
        // Four splits at a time, their loads independent of each other; then the rest.
        int s = split_lane;
        for (; s + 3 * split_lanes < splits; s += 4 * split_lanes) {
            float4 part[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) part[i] = split_out[(s + i * split_lanes) * split_stride];
#pragma unroll
            for (int i = 0; i < 4; ++i) add(weight[s + i * split_lanes], part[i]);
        }
        for (; s < splits; s += split_lanes) add(weight[s], split_out[s * split_stride]);
    }
    partial[thread] = sum;
    __syncthreads();
    if (split_lane > 0) return;

    for (int lane = 1; lane < split_lanes; ++lane) add(1.0f, partial[lane * groups + group]);
    const unsigned heads = unsigned(p.num_heads_q);
    const int64 head = unsigned(index) % heads, row = unsigned(index) / heads;
    const int64 b = unsigned(row) / unsigned(p.seqlen_q), token = unsigned(row) % unsigned(p.seqlen_q);
    Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride + token * p.out_row_stride +
                   head * p.out_head_stride + 4 * group;
    const float inverse_total = empty ? 0.0f : 1.0f / total;
    out[0] = Traits::from_float(sum.x * inverse_total);
    out[1] = Traits::from_float(sum.y * inverse_total);
    out[2] = Traits::from_float(sum.z * inverse_total);
    out[3] = Traits::from_float(sum.w * inverse_total);
    if (p.lse != nullptr && thread == 0) {
        p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + token] =
            empty ? negative_infinity() : reference + __logf(total);
    }
}

}  // namespace cuattn
