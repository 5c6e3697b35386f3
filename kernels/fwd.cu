// Forward attention: one block computes BLOCK_M query rows of one head, streaming the keys
// and values tile by tile (FlashAttention-2). Nothing of size seqlen_q x seqlen_k is ever
// written: scores live in registers, each tile's probabilities go straight into P @ V.
//
// Two kernels share the mask, the online softmax and the tile loads:
//   flash_forward       float16 / bfloat16 on tensor cores (mma.sync m16n8k16, ldmatrix,
//                       cp.async), float32 accumulation;
//   flash_forward_simt  float32 on the CUDA cores, every product in float32.
// The instantiations that exist are listed in cuattn/kernels.py, with their tile sizes.
#include "mask.cuh"
#include "softmax.cuh"
#include "tile.cuh"

namespace cuattn {

// A score as the softmax sees it: `dot` scaled into base 2, soft-capped if asked (Gemma 2:
// softcap * tanh(s / softcap), in natural units, before any mask). Only tiles the mask cuts,
// soft-capped ones and every tile of a negative scale are scaled here; the softmax scales
// the others in its exponent.
template <bool SOFTCAP>
__device__ __forceinline__ float base2_score(float dot, const AttentionParams& p) {
    const float s = dot * p.score_scale;
    return SOFTCAP ? p.softcap_log2 * tanhf(s) : s;
}

// Shared memory holds the Q tile, then KV_STAGES pairs of a K and a V tile.
template <class Element, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int WARPS, int KV_STAGES>
struct ForwardLayout {
    static constexpr int kThreads = WARPS * kWarpSize;
    static constexpr int kRowsPerWarp = BLOCK_M / WARPS;
    static constexpr int kRowTiles = kRowsPerWarp / 16;  // m16 tiles per warp
    static constexpr int kRows = 2 * kRowTiles;           // query rows per lane
    static constexpr int kKeyColumns = BLOCK_N / 4;       // score columns per lane
    static constexpr int kDimColumns = HEAD_DIM / 4;      // output columns per lane
    // Head-dim steps of Q K^T unrolled into one basic block. Where the output accumulators
    // and the scores already take 192 of a lane's 255 registers, one step at a time: fully
    // unrolled, ptxas issues later steps' ldmatrix ahead of the first mma and runs out of
    // registers for them (bench/NOTES.md items 22, 23).
    static constexpr int kScoreUnroll = kRows * (kDimColumns + kKeyColumns) >= 192 ? 1 : HEAD_DIM / 16;
    using QTile = SharedTile<Element, BLOCK_M, HEAD_DIM>;
    using KVTile = SharedTile<Element, BLOCK_N, HEAD_DIM>;
    static constexpr int kSharedBytes = QTile::kBytes + 2 * KV_STAGES * KVTile::kBytes;
    static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles of rows");
    static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps over keys and head dims");
    static_assert(KV_STAGES >= 1, "a K and a V tile at least");

    static constexpr int kKVElements = KVTile::kBytes / int(sizeof(Element));
    __device__ __forceinline__ static QTile q_tile(Element* shared) { return QTile{shared}; }
    __device__ __forceinline__ static KVTile k_tile(Element* shared, int stage) {
        return KVTile{shared + QTile::kBytes / int(sizeof(Element)) + 2 * stage * kKVElements};
    }
    __device__ __forceinline__ static KVTile v_tile(Element* shared, int stage) {
        return KVTile{k_tile(shared, stage).data + kKVElements};
    }
};

// Row and column of a lane's accumulator values in the mma C layout, as (row, column)
// pairs of this lane's "row view": value (r, c) is query row warp_row + (r / 2) * 16 +
// lane / 4 + 8 (r % 2), and column (c / 2) * 8 + 2 (lane % 4) + c % 2.
__device__ __forceinline__ int lane_row(int warp_row, int r) {
    return warp_row + (r / 2) * 16 + int(threadIdx.x % 32) / 4 + 8 * (r % 2);
}
__device__ __forceinline__ int lane_column(int c) { return (c / 2) * 8 + 2 * (int(threadIdx.x) % 4) + c % 2; }

// acc[r..r+1][c..c+3] += A(16 rows) x B(two 8-column tiles), in the row view.
template <class Element, int ROWS, int COLS>
__device__ __forceinline__ void mma_into(float (&acc)[ROWS][COLS], int row_tile, int column_pair,
                                         const uint32 (&a)[4], const uint32 (&b)[4]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = 2 * row_tile, c = 4 * column_pair + 2 * half;
        float d[4] = {acc[r][c], acc[r][c + 1], acc[r + 1][c], acc[r + 1][c + 1]};
        const uint32 b_pair[2] = {b[2 * half], b[2 * half + 1]};
        mma_m16n8k16<Element>(d, a, b_pair);
        acc[r][c] = d[0];
        acc[r][c + 1] = d[1];
        acc[r + 1][c] = d[2];
        acc[r + 1][c + 1] = d[3];
    }
}

// The part of the problem one block owns: a run of query rows of one sequence, of one
// query head (or, packed, of all the query heads of one KV head), over one split of the
// sequence's key tiles.
struct BlockWork {
    SequenceInfo seq;
    int64 split;
    int64 first_row;  // the tile's first row: a token, or with packing a (token, head) pair
    int rows;         // valid rows in the tile
    int group;        // query heads stacked per token (1 without packing)
    int first_head;   // the query head of row 0's group
    int kv_head;
    KeyTiles tiles;
    int64 tile_begin, tile_end;  // this split's share of `tiles`

    __device__ __forceinline__ int64 token(int r) const { return unsigned(first_row + r) / unsigned(group); }
    __device__ __forceinline__ int head(int r) const {
        return first_head + int(unsigned(first_row + r) % unsigned(group));
    }
    // Offsets of tile rows in a (token, head) strided tensor, from its (token 0, first_head).
    __device__ __forceinline__ PackedRows rows_in(int64 token_stride, int64 head_stride) const {
        return PackedRows{token_stride, head_stride, first_row, group};
    }

    // Fills in this block's work; false when the block has none (the grid covers the longest
    // sequence).
    __device__ __forceinline__ bool plan(const AttentionParams& p, bool pack_gqa, int block_m, int block_n) {
        const int64 splits = p.num_splits;
        split = blockIdx.z % unsigned(splits);
        seq = SequenceInfo::of(p, blockIdx.z / unsigned(splits));
        const int heads_per_kv = int(p.num_heads_q / p.num_heads_kv);
        group = pack_gqa ? heads_per_kv : 1;
        kv_head = pack_gqa ? int(blockIdx.y) : int(blockIdx.y) / heads_per_kv;
        first_head = pack_gqa ? int(blockIdx.y) * heads_per_kv : int(blockIdx.y);
        const int64 total_rows = seq.q_len * group;
        // Row blocks run last first. Under a causal mask the last rows see the most keys, and
        // blocks start, in practice, in the order of their index (x fastest): so the longest
        // start first and the short ones fill the last wave, instead of a few long blocks
        // running on after every other multiprocessor has finished.
        first_row = int64(gridDim.x - 1 - blockIdx.x) * block_m;
        if (first_row >= total_rows) return false;
        rows = int(total_rows - first_row < block_m ? total_rows - first_row : block_m);
        tiles = Mask(p, seq).tiles(token(0), token(rows - 1), block_n);
        const int64 per_split = unsigned(tiles.count + splits - 1) / unsigned(splits);
        tile_begin = split * per_split < tiles.count ? split * per_split : tiles.count;
        tile_end = tile_begin + per_split < tiles.count ? tile_begin + per_split : tiles.count;
        return true;
    }

    template <class Element>
    __device__ __forceinline__ const Element* q(const AttentionParams& p) const {
        return static_cast<const Element*>(p.q) + seq.batch_index * p.q_batch_stride + seq.q_start * p.q_row_stride +
               first_head * p.q_head_stride;
    }
    template <class Element>
    __device__ __forceinline__ const Element* kv(const void* base, int64 batch_stride, int64 row_stride,
                                                 int64 head_stride) const {
        return static_cast<const Element*>(base) + seq.batch_index * batch_stride + seq.k_start * row_stride +
               kv_head * head_stride;
    }
};

// Where a finished row goes: into the output (normalized, in its element type) with its
// lse, or under split-KV into this split's float32 slot of the workspace.
template <class Element>
struct RowOutput {
    Element* out = nullptr;
    float* partial = nullptr;
    float* lse = nullptr;

    __device__ __forceinline__ RowOutput(const AttentionParams& p, const BlockWork& w, int r) {
        const int64 token = w.token(r);
        const int head = w.head(r);
        if (p.num_splits > 1) {
            const int64 row = w.seq.batch_index * p.seqlen_q + w.seq.q_start + token;
            const int64 slot = (w.split * p.split_rows + row) * p.num_heads_q + head;
            partial = p.split_out + slot * p.head_dim;
            lse = p.split_lse + slot;
        } else {
            out = static_cast<Element*>(p.out) + w.seq.batch_index * p.out_batch_stride +
                  (w.seq.q_start + token) * p.out_row_stride + head * p.out_head_stride;
            if (p.lse != nullptr) {
                lse = p.lse + w.seq.batch_index * p.lse_batch_stride + head * p.lse_head_stride + w.seq.q_start +
                      token;
            }
        }
    }

    __device__ __forceinline__ void store(int column, float value) const {
        if (partial != nullptr) {
            partial[column] = value;
        } else {
            out[column] = ElementTraits<Element>::from_float(value);
        }
    }
};

// K and V of a block's KV head, and the copy of one key tile of either to shared memory.
template <int THREADS, class Element>
struct KeyValueTiles {
    const Element* k;
    const Element* v;
    int64 k_stride, v_stride;
    const KeyTiles& tiles;
    int head_dim;
    bool vector_loads;

    __device__ __forceinline__ KeyValueTiles(const AttentionParams& p, const BlockWork& w)
        : k(w.kv<Element>(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride)),
          v(w.kv<Element>(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride)),
          k_stride(p.k_row_stride),
          v_stride(p.v_row_stride),
          tiles(w.tiles),
          head_dim(int(p.head_dim)),
          vector_loads(p.vector_loads != 0) {}

    template <class Tile>
    __device__ __forceinline__ void load_keys(Tile tile, int64 t) const { load(tile, k, k_stride, t); }
    template <class Tile>
    __device__ __forceinline__ void load_values(Tile tile, int64 t) const { load(tile, v, v_stride, t); }

  private:
    template <class Tile>
    __device__ __forceinline__ void load(Tile tile, const Element* base, int64 stride, int64 t) const {
        const int64 first = tiles.begin(t);
        load_tile<THREADS>(tile, base, StridedRows{first, stride}, int(tiles.end(t) - first), head_dim,
                           vector_loads);
    }
};

__device__ __forceinline__ float sink_log2(const AttentionParams& p, int head) {
    return p.sinks != nullptr ? p.sinks[head] * 1.4426950408889634f : negative_infinity();
}

// Both kernels declare a minimum of one block per multiprocessor: it lets ptxas use the
// registers they need. Left to aim at more blocks, it capped them at 80, 128 or 168
// registers and spilled.
//
// KV_STAGES is how the K and V tiles are copied. One stage: K[t + 1] is copied while the
// block computes with V[t], and V[t] while it computes with K[t], four barriers a tile.
// More stages: a ring of KV_STAGES (K, V) pairs; tile t + KV_STAGES - 1 is copied while the
// block computes tile t, one barrier a tile, so a copy has KV_STAGES - 1 whole tiles of
// compute to land in rather than half of one, at the cost of the shared memory.
template <class Element, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int WARPS, int KV_STAGES, bool WINDOWED,
          bool SOFTCAP, bool PACK_GQA>
__global__ void __launch_bounds__(WARPS * 32, 1) flash_forward(const AttentionParams params) {
    using Layout = ForwardLayout<Element, HEAD_DIM, BLOCK_M, BLOCK_N, WARPS, KV_STAGES>;
    using Traits = ElementTraits<Element>;
    constexpr int kRows = Layout::kRows;
    BlockWork work;
    if (!work.plan(params, PACK_GQA, BLOCK_M, BLOCK_N)) return;
    const int head_dim = int(params.head_dim);
    const bool vector_loads = params.vector_loads != 0;

    CUATTN_DYNAMIC_SHARED(Element, shared);
    if (CUATTN_DYNAMIC_SHARED_SIZE() < unsigned(Layout::kSharedBytes)) __trap();
    const typename Layout::QTile q_tile = Layout::q_tile(shared);

    const KeyValueTiles<Layout::kThreads, Element> key_values(params, work);
    const Mask mask(params, work.seq);
    const KeyTiles& tiles = work.tiles;

    // Copy groups, in commit order, each committed even when empty, so that "all but the
    // newest n groups" always means the same tiles. One stage: Q, K[first], then per tile
    // V[t], K[t + 1]. More: tiles first .. first + KV_STAGES - 2 (Q with the first), then
    // per tile t the tile t + KV_STAGES - 1.
    load_tile<Layout::kThreads>(q_tile, work.q<Element>(params), work.rows_in(params.q_row_stride, params.q_head_stride),
                                work.rows, head_dim, vector_loads);
    if constexpr (KV_STAGES == 1) {
        cp_async_commit();
        if (work.tile_begin < work.tile_end) key_values.load_keys(Layout::k_tile(shared, 0), work.tile_begin);
        cp_async_commit();
    } else {
#pragma unroll
        for (int stage = 0; stage + 1 < KV_STAGES; ++stage) {
            if (work.tile_begin + stage < work.tile_end) {
                key_values.load_keys(Layout::k_tile(shared, stage), work.tile_begin + stage);
                key_values.load_values(Layout::v_tile(shared, stage), work.tile_begin + stage);
            }
            cp_async_commit();
        }
    }

    const int warp = int(threadIdx.x) / 32;
    const int lane = int(threadIdx.x) % 32;
    const int warp_row = warp * Layout::kRowsPerWarp;
    const int64 first_token = work.token(0), last_token = work.token(work.rows - 1);
    OnlineSoftmax<kRows> softmax;
    softmax.init();
    float out[kRows][Layout::kDimColumns];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < Layout::kDimColumns; ++c) out[r][c] = 0.0f;

    int stage = 0;  // where tile t is
    for (int64 t = work.tile_begin; t < work.tile_end; ++t) {
        const int64 key_begin = tiles.begin(t);
        const int keys = int(tiles.end(t) - key_begin);
        const typename Layout::KVTile k_tile = Layout::k_tile(shared, stage), v_tile = Layout::v_tile(shared, stage);
        if constexpr (KV_STAGES == 1) {
            key_values.load_values(v_tile, t);
            cp_async_commit();
            cp_async_wait<1>();  // Q and K[t] have landed; V[t] may still be in flight
            __syncthreads();
        } else {
            cp_async_wait<KV_STAGES - 2>();  // this thread's copies of tile t (and Q) have landed
            // Every thread's copies of tile t are visible, and every warp is done with tile
            // t - 1, whose stage the copy of tile t + KV_STAGES - 1 now takes.
            __syncthreads();
            const int64 ahead = t + KV_STAGES - 1;
            const int ahead_stage = stage == 0 ? KV_STAGES - 1 : stage - 1;
            if (ahead < work.tile_end) {
                key_values.load_keys(Layout::k_tile(shared, ahead_stage), ahead);
                key_values.load_values(Layout::v_tile(shared, ahead_stage), ahead);
            }
            cp_async_commit();
        }

        // S = Q K^T for this warp's rows: A from Q (ldmatrix), B from K rows (ldmatrix, K
        // row-major is exactly the "col" layout of K^T).
        float scores[kRows][Layout::kKeyColumns];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int c = 0; c < Layout::kKeyColumns; ++c) scores[r][c] = 0.0f;
        // Over the padded head dim too: the padding is zero in Q and K (load_tile), and a
        // loop bound known at compile time keeps the whole product one basic block, where
        // ptxas can issue the next ldmatrix while the mma before it runs (one head-dim step
        // a block where registers are short: kScoreUnroll). Each K fragment is
        // read from shared memory once for all the warp's m16 tiles: with two tiles a warp
        // reads half the K bytes per mma (the reason for 32 rows a warp).
#pragma unroll(Layout::kScoreUnroll)
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
            uint32 a[Layout::kRowTiles][4];
#pragma unroll
            for (int mt = 0; mt < Layout::kRowTiles; ++mt) {
                ldmatrix_x4<false>(a[mt], q_tile.row(warp_row + mt * 16 + lane % 16) + ks * 16 + (lane / 16) * 8);
            }
#pragma unroll
            for (int np = 0; np < BLOCK_N / 16; ++np) {
                uint32 b[4];
                ldmatrix_x4<false>(b, k_tile.row(np * 16 + (lane / 16) * 8 + lane % 8) + ks * 16 +
                                          ((lane / 8) % 2) * 8);
#pragma unroll
                for (int mt = 0; mt < Layout::kRowTiles; ++mt) mma_into<Element>(scores, mt, np, a[mt], b);
            }
        }
        if constexpr (KV_STAGES == 1) {
            __syncthreads();  // every warp is done with K[t]: it may be overwritten
            if (t + 1 < work.tile_end) key_values.load_keys(k_tile, t + 1);
            cp_async_commit();
        }

        // One branch for the tile, taken by the whole block: tested per score, it split the
        // softmax into a basic block per score, which ptxas cannot schedule across.
        const bool cut = keys < BLOCK_N || (WINDOWED && !mask.sees_all(first_token, last_token, key_begin, key_begin + keys));
        // Whole tiles leave the scale to the softmax's exponent, unless it is negative (the
        // contract allows any finite scale; the softmax takes none below 0).
        float scale = params.score_scale;
        if (SOFTCAP || cut || scale < 0.0f) {
            scale = 1.0f;
#pragma unroll
            for (int r = 0; r < kRows; ++r)
#pragma unroll
                for (int c = 0; c < Layout::kKeyColumns; ++c) scores[r][c] = base2_score<SOFTCAP>(scores[r][c], params);
        }
        if (cut) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                // The token this row stands for (packed rows share tokens), found again in
                // each cut tile rather than held in registers across the loop. Without a
                // mask only the sequence's end cuts a tile.
                const RowKeys seen = WINDOWED ? mask.row_keys(work.token(lane_row(warp_row, r)), key_begin, keys)
                                              : RowKeys{0, keys, 0};
#pragma unroll
                for (int c = 0; c < Layout::kKeyColumns; ++c) {
                    scores[r][c] = seen.visible(lane_column(c)) ? scores[r][c] : negative_infinity();
                }
            }
        }
        float rescale[kRows];
        if (softmax.move_maxima(scores, scale, rescale)) {  // warp-uniform; expected rare after the first tiles
#pragma unroll
            for (int r = 0; r < kRows; ++r)
#pragma unroll
                for (int c = 0; c < Layout::kDimColumns; ++c) out[r][c] *= rescale[r];
        }
        softmax.exponentiate(scores, scale);

        if constexpr (KV_STAGES == 1) {
            cp_async_wait<1>();  // V[t] has landed; K[t + 1] may still be in flight
            __syncthreads();
        }

        // O += P V: P, this lane's probabilities, is already in the A layout (two adjacent
        // 8-key column tiles of the C layout form one k16 step); V rows are keys, so the B
        // operand comes from a transposing ldmatrix, read once for all the warp's m16 tiles.
#pragma unroll
        for (int ks = 0; ks < BLOCK_N / 16; ++ks) {
            uint32 a[Layout::kRowTiles][4];
#pragma unroll
            for (int mt = 0; mt < Layout::kRowTiles; ++mt) {
                const int r = 2 * mt, c = 4 * ks;
                a[mt][0] = Traits::pack(scores[r][c], scores[r][c + 1]);
                a[mt][1] = Traits::pack(scores[r + 1][c], scores[r + 1][c + 1]);
                a[mt][2] = Traits::pack(scores[r][c + 2], scores[r][c + 3]);
                a[mt][3] = Traits::pack(scores[r + 1][c + 2], scores[r + 1][c + 3]);
            }
#pragma unroll
            for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {  // padded V columns are zero
                uint32 b[4];
                ldmatrix_x4<true>(b, v_tile.row(ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) + dp * 16 +
                                         (lane / 16) * 8);
#pragma unroll
                for (int mt = 0; mt < Layout::kRowTiles; ++mt) mma_into<Element>(out, mt, dp, a[mt], b);
            }
        }
        if constexpr (KV_STAGES == 1) __syncthreads();  // every warp is done with V[t]
        stage = stage + 1 == KV_STAGES ? 0 : stage + 1;
    }

    // A learned sink counts once, in the merged result: splits other than the first leave it out.
    const bool with_sink = work.split == 0;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int row = lane_row(warp_row, r);
        // finish_row reduces across the quad, so every lane takes part, valid row or not.
        const float sink = with_sink && row < work.rows ? sink_log2(params, work.head(row)) : negative_infinity();
        float output_scale, lse;
        softmax.finish_row(r, sink, output_scale, lse);
        if (row >= work.rows) continue;
        const RowOutput<Element> destination(params, work, row);
#pragma unroll
        for (int c = 0; c < Layout::kDimColumns; ++c) {
            const int column = lane_column(c);
            if (column < head_dim) destination.store(column, out[r][c] * output_scale);
        }
        if (destination.lse != nullptr && lane % 4 == 0) *destination.lse = lse;
    }
}

// float32: each query row belongs to the 4 lanes of a quad, as in the mma layout, so the
// softmax is the same code. Lane q of a quad holds the scores of keys q, q + 4, ... of the
// tile and the output columns q, q + 4, ...; P @ V broadcasts each probability across the
// quad with a shuffle.
template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, bool WINDOWED, bool SOFTCAP>
__global__ void __launch_bounds__(BLOCK_M * 4, 1) flash_forward_simt(const AttentionParams params) {
    constexpr int kThreads = BLOCK_M * 4;  // a quad of lanes per query row
    static_assert(BLOCK_N % 4 == 0 && kThreads % 32 == 0, "whole quads, whole warps");
    constexpr int kKeysPerLane = BLOCK_N / 4, kDimsPerLane = HEAD_DIM / 4;
    using QTile = SharedTile<float, BLOCK_M, HEAD_DIM>;
    using KVTile = SharedTile<float, BLOCK_N, HEAD_DIM>;
    BlockWork work;
    if (!work.plan(params, false, BLOCK_M, BLOCK_N)) return;
    const int head_dim = int(params.head_dim);
    const bool vector_loads = params.vector_loads != 0;

    CUATTN_DYNAMIC_SHARED(float, shared);
    if (CUATTN_DYNAMIC_SHARED_SIZE() < unsigned(QTile::kBytes + 2 * KVTile::kBytes)) __trap();
    const QTile q_tile{shared};
    const KVTile k_tile{shared + QTile::kBytes / 4};
    const KVTile v_tile{k_tile.data + KVTile::kBytes / 4};

    const KeyValueTiles<kThreads, float> key_values(params, work);
    const Mask mask(params, work.seq);
    const KeyTiles& tiles = work.tiles;

    load_tile<kThreads>(q_tile, work.q<float>(params), work.rows_in(params.q_row_stride, params.q_head_stride),
                        work.rows, head_dim, vector_loads);
    cp_async_commit();
    if (work.tile_begin < work.tile_end) key_values.load_keys(k_tile, work.tile_begin);
    cp_async_commit();

    const int lane = int(threadIdx.x) % 32;
    const int row = int(threadIdx.x) / 4;
    const int quad = int(threadIdx.x) % 4;
    const int64 token = work.token(row);
    const int64 first_token = work.token(0), last_token = work.token(work.rows - 1);
    OnlineSoftmax<1> softmax;
    softmax.init();
    float out[1][kDimsPerLane];
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) out[0][j] = 0.0f;

    for (int64 t = work.tile_begin; t < work.tile_end; ++t) {
        const int64 key_begin = tiles.begin(t);
        const int keys = int(tiles.end(t) - key_begin);
        key_values.load_values(v_tile, t);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        float scores[1][kKeysPerLane];
#pragma unroll
        for (int j = 0; j < kKeysPerLane; ++j) scores[0][j] = 0.0f;
        const float* query = q_tile.row(row);
#pragma unroll 4
        for (int d = 0; d < head_dim; ++d) {
            const float x = query[d];
#pragma unroll
            for (int j = 0; j < kKeysPerLane; ++j) scores[0][j] += x * k_tile.row(quad + 4 * j)[d];
        }
        __syncthreads();
        if (t + 1 < work.tile_end) key_values.load_keys(k_tile, t + 1);
        cp_async_commit();

        const bool cut = keys < BLOCK_N || (WINDOWED && !mask.sees_all(first_token, last_token, key_begin, key_begin + keys));
        float scale = params.score_scale;  // as in flash_forward
        if (SOFTCAP || cut || scale < 0.0f) {
            scale = 1.0f;
#pragma unroll
            for (int j = 0; j < kKeysPerLane; ++j) scores[0][j] = base2_score<SOFTCAP>(scores[0][j], params);
        }
        if (cut) {
            const RowKeys seen = WINDOWED ? mask.row_keys(token, key_begin, keys) : RowKeys{0, keys, 0};
#pragma unroll
            for (int j = 0; j < kKeysPerLane; ++j) {
                scores[0][j] = seen.visible(quad + 4 * j) ? scores[0][j] : negative_infinity();
            }
        }
        float rescale[1];
        if (softmax.move_maxima(scores, scale, rescale)) {
#pragma unroll
            for (int j = 0; j < kDimsPerLane; ++j) out[0][j] *= rescale[0];
        }
        softmax.exponentiate(scores, scale);

        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kKeysPerLane; ++j) {
#pragma unroll
            for (int source = 0; source < 4; ++source) {
                const float p = __shfl_sync(kFullWarp, scores[0][j], (lane & ~3) | source);
                const float* value_row = v_tile.row(4 * j + source);
#pragma unroll
                for (int jd = 0; jd < kDimsPerLane; ++jd) out[0][jd] += p * value_row[quad + 4 * jd];
            }
        }
        __syncthreads();
    }

    const bool valid = row < work.rows;
    const float sink = work.split == 0 && valid ? sink_log2(params, work.head(row)) : negative_infinity();
    float output_scale, lse;
    softmax.finish_row(0, sink, output_scale, lse);
    if (!valid) return;
    const RowOutput<float> destination(params, work, row);
#pragma unroll
    for (int jd = 0; jd < kDimsPerLane; ++jd) {
        if (quad + 4 * jd < head_dim) destination.store(quad + 4 * jd, out[0][jd] * output_scale);
    }
    if (destination.lse != nullptr && quad == 0) *destination.lse = lse;
}

}  // namespace cuattn
