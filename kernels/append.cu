// Appending new keys and values to a KV cache in place (attention_with_kvcache's k_new and
// v_new): sequence b's new token t goes to row cache_seqlens[b] + t of its cache. One launch
// covers every sequence, token, head and both caches; copied sequence by sequence from the
// host, the same work took two launches per sequence.
#include "numeric.cuh"  // the element types
#include "params.cuh"

namespace cuattn {

struct AppendParams {
    void* k_cache;             // (batch, capacity, heads, head_dim) in any strides
    void* v_cache;
    const void* k_new;         // (batch, new_tokens, heads, head_dim)
    const void* v_new;
    const int* cache_seqlens;  // (batch,) tokens already cached, or null: every sequence holds `filled`
    int64 k_cache_batch_stride, k_cache_row_stride, k_cache_head_stride;
    int64 v_cache_batch_stride, v_cache_row_stride, v_cache_head_stride;
    int64 k_new_batch_stride, k_new_row_stride, k_new_head_stride;
    int64 v_new_batch_stride, v_new_row_stride, v_new_head_stride;
    int64 batch, new_tokens, heads, head_dim, capacity, filled;
};

constexpr int kAppendThreads = 128;

// One block per (sequence, new token) and per cache (blockIdx.y: 0 for K, 1 for V); its
// threads copy the token's heads x head_dim elements. attention_with_kvcache refuses an
// append past the capacity before launching; KVCache's rolling copies are placed by their
// own rule. The kernel checks every row against the capacity anyway, so that whatever
// lengths it is handed, it writes nothing outside the cache.
template <class Element>
__global__ void __launch_bounds__(kAppendThreads) append_kv(const AppendParams p) {
    const unsigned new_tokens = unsigned(p.new_tokens);
    const int64 b = blockIdx.x / new_tokens, token = blockIdx.x % new_tokens;
    if (b >= p.batch) return;
    const int64 row = (p.cache_seqlens != nullptr ? p.cache_seqlens[b] : p.filled) + token;
    if (row < 0 || row >= p.capacity) return;
    const bool values = blockIdx.y != 0;
    Element* to = values ? static_cast<Element*>(p.v_cache) + b * p.v_cache_batch_stride + row * p.v_cache_row_stride
                         : static_cast<Element*>(p.k_cache) + b * p.k_cache_batch_stride + row * p.k_cache_row_stride;
    const Element* from =
        values ? static_cast<const Element*>(p.v_new) + b * p.v_new_batch_stride + token * p.v_new_row_stride
               : static_cast<const Element*>(p.k_new) + b * p.k_new_batch_stride + token * p.k_new_row_stride;
    const int64 to_head_stride = values ? p.v_cache_head_stride : p.k_cache_head_stride;
    const int64 from_head_stride = values ? p.v_new_head_stride : p.k_new_head_stride;
    const unsigned head_dim = unsigned(p.head_dim);
    for (unsigned i = threadIdx.x; i < unsigned(p.heads) * head_dim; i += kAppendThreads) {
        const unsigned head = i / head_dim, d = i % head_dim;
        to[head * to_head_stride + d] = from[head * from_head_stride + d];
    }
}

}  // namespace cuattn
