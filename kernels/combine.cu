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

// Split-KV's second step: each (output row, head) merges the num_splits states that the
// forward kernel left in the workspace (params.cuh: split_out, split_lse), and writes the
// result where an unsplit launch would have. One warp per (row, head): the lanes share out
// the splits to find the largest lse and the total weight (warp reductions, no chain of
// dependent loads over the splits), then each lane sums its head-dim columns over the
// splits, every split's load independent of the one before.
template <class Element>
__global__ void __launch_bounds__(128) combine_splits(const AttentionParams p) {
    using Traits = ElementTraits<Element>;
    const unsigned index = blockIdx.x * 4 + threadIdx.x / 32;
    if (index >= p.split_rows * p.num_heads_q) return;
    const int lane = int(threadIdx.x % 32);
    const int splits = int(p.num_splits);
    const unsigned heads = unsigned(p.num_heads_q);
    const int64 head = index % heads, row = index / heads;
    const int64 slots = p.split_rows * p.num_heads_q;  // slot of (split s, row, head): s * slots + index
    const float* split_lse = p.split_lse + index;
    const float* split_out = p.split_out + int64(index) * p.head_dim;

    float top = negative_infinity();
    for (int s = lane; s < splits; s += 32) top = fmaxf(top, split_lse[s * slots]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(kFullWarp, top, offset));
    float total = 0.0f;
    if (top != negative_infinity()) {
        for (int s = lane; s < splits; s += 32) total += __expf(split_lse[s * slots] - top);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(kFullWarp, total, offset);

    const int64 b = unsigned(row) / unsigned(p.seqlen_q), token = unsigned(row) % unsigned(p.seqlen_q);
    Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride + token * p.out_row_stride +
                   head * p.out_head_stride;
    const float inverse_total = total > 0.0f ? 1.0f / total : 0.0f;  // no visible key anywhere: 0
    for (int64 d = lane; d < p.head_dim; d += 32) {
        float value = 0.0f;
        if (total > 0.0f) {
#pragma unroll 8
            for (int s = 0; s < splits; ++s) {
                value += __expf(split_lse[s * slots] - top) * split_out[s * slots * p.head_dim + d];
            }
        }
        out[d] = Traits::from_float(value * inverse_total);
    }
    if (p.lse != nullptr && lane == 0) {
        p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + token] =
            total > 0.0f ? top + __logf(total) : negative_infinity();
    }
}

}  // namespace cuattn
