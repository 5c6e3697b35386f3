// The argument every attention kernel takes, and where a block finds its sequence.
//
// cuattn/kernel_params.py builds this struct byte for byte (a NumPy structured dtype with
// the same fields in the same order); tests/test_kernel_params.py compiles this header and
// checks the two layouts agree. Add a field here and there together.
#pragma once

#include "platform.cuh"

namespace cuattn {

struct AttentionParams {
    const void* q;             // (batch, seqlen_q, num_heads_q, head_dim) in any strides
    const void* k;             // (batch, seqlen_k, num_heads_kv, head_dim)
    const void* v;
    void* out;                 // like q
    float* lse;                // (batch, num_heads_q, seqlen_q), or null when not wanted
    const float* sinks;        // (num_heads_q,) learned sink logits, or null
    const int* cu_seqlens_q;   // packed batches: (batch + 1,) prefix sums, else null
    const int* cu_seqlens_k;
    const int* cache_seqlens;  // KV cache: tokens already cached per sequence, else null
    // Split-KV: with num_splits > 1 each split of the keys writes its normalized float32
    // output and its lse here, row-major over (split, output row, head[, dim]) with
    // split_rows output rows per split (batch entries x seqlen_q); combine_splits merges them.
    float* split_out;
    float* split_lse;
    // Strides in elements. A packed batch is one batch entry, its sequences found by
    // cu_seqlens along the row axis.
    int64 q_batch_stride, q_row_stride, q_head_stride;
    int64 k_batch_stride, k_row_stride, k_head_stride;
    int64 v_batch_stride, v_row_stride, v_head_stride;
    int64 out_batch_stride, out_row_stride, out_head_stride;
    int64 lse_batch_stride, lse_head_stride;
    // seqlen_k: the keys of every sequence when no lengths are given (cu_seqlens_k and
    // cache_seqlens null); for a cache filled to one length, that length, not its capacity;
    // with cache_seqlens, the capacity.
    int64 batch, seqlen_q, seqlen_k, num_heads_q, num_heads_kv, head_dim;
    int64 new_tokens;  // KV cache: keys per sequence = cache_seqlens[b] + new_tokens
    int64 window_left, window_right, sink_tokens;  // -1: unbounded
    // 1 when q, k and v sit on 16-byte boundaries in every row and head (all strides too), so
    // that tiles can be copied 16 bytes at a time; otherwise element by element.
    int64 vector_loads;
    int64 num_splits, split_rows;
    // Scores are kept in base 2: s = dot * score_scale, where score_scale is
    // scale * log2(e), or with a softcap scale / softcap followed by s = softcap_log2 * tanh(s).
    float score_scale;
    float softcap_log2;
};

// Counts of rows, keys and (row, head) pairs per launch stay below 2**32, so kernels divide
// them in 32 bits: a 64-bit division is a software routine on the GPU, slow, and its call
// made ptxas spill registers.

// Where one batch entry's queries and keys lie, and how many there are.
struct SequenceInfo {
    int64 batch_index;  // for the batch strides (0 for packed batches)
    int64 q_start, q_len;
    int64 k_start, k_len;

    __device__ __forceinline__ static SequenceInfo of(const AttentionParams& p, int64 b) {
        SequenceInfo s;
        if (p.cu_seqlens_q != nullptr) {
            s.batch_index = 0;
            s.q_start = p.cu_seqlens_q[b];
            s.q_len = p.cu_seqlens_q[b + 1] - s.q_start;
            s.k_start = p.cu_seqlens_k[b];
            s.k_len = p.cu_seqlens_k[b + 1] - s.k_start;
        } else {
            s.batch_index = b;
            s.q_start = 0;
            s.q_len = p.seqlen_q;
            s.k_start = 0;
            s.k_len = p.seqlen_k;
            if (p.cache_seqlens != nullptr) {
                // Lengths read on the device may be unchecked (attention_with_kvcache's
                // check_lengths=False, a captured CUDA graph): clamped to the cache (seqlen_k
                // is its capacity then), so that no length makes a block read outside it.
                const int64 keys = p.cache_seqlens[b] + p.new_tokens;
                s.k_len = keys < 0 ? 0 : keys < p.seqlen_k ? keys : p.seqlen_k;
            }
        }
        return s;
    }
};

}  // namespace cuattn
