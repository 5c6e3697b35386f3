// Merging attention states: two attentions of the same queries over disjoint key sets
// combine exactly through their log-sum-exps,
//   lse = log(exp(lse_a) + exp(lse_b)),   o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse),
// which is how split-KV decoding joins its pieces and what merge_attention_states offers
// users (cache pieces on several devices, prefix caching).
#include "numeric.cuh"

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
    const int64 index = int64(blockIdx.x) * 4 + threadIdx.x / 32;
    if (index >= p.batch * p.seqlen * p.heads) return;
    const int64 head = index % p.heads, row = index / p.heads % p.seqlen, b = index / (p.heads * p.seqlen);
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

}  // namespace cuattn
