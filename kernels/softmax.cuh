// Online softmax: the running (max, sum) of a row, updated one tile of scores at a time.
//
// Scores are base 2 (log2(e) is folded into the score scale), so every exponential is a
// base-2 one (exp2_ftz, numeric.cuh). They may arrive unscaled, as the dot products with a
// `scale` still to apply: the exponent is then one multiply-add per score, dot * scale -
// reference, where scaling first costs a multiply more. Each row is spread over
// the 4 lanes of a quad (the mma accumulator layout, and the SIMT kernel's too): the
// maximum is reduced across the quad at every tile, because all four lanes must rescale by
// the same factor; the sum stays a per-lane partial until finish_row(), since rescaling
// commutes with adding the partials up. The maximum a row's probabilities are taken against
// need not be the running maximum itself, only no further below it than kRescaleSlack.
#pragma once

#include "numeric.cuh"

namespace cuattn {

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, 1));
    return fmaxf(x, __shfl_xor_sync(kFullWarp, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(kFullWarp, x, 1);
    return x + __shfl_xor_sync(kFullWarp, x, 2);
}

template <int ROWS>
struct OnlineSoftmax {
    // The reference maximum, base 2: at most kRescaleSlack below the row's running maximum;
    // -inf while the row has seen no visible key.
    float row_max[ROWS];
    float row_sum[ROWS];  // this lane's share of the denominator, relative to row_max

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            row_max[r] = negative_infinity();
            row_sum[r] = 0.0f;
        }
    }

    // A row's reference maximum moves only when a tile's maximum exceeds it by more than
    // this (base 2): the row's accumulated output, a multiply per value, is rescaled only
    // then. Probabilities against a reference up to this far below the true maximum reach
    // 2^8 = 256, well inside float32 and the 16-bit types, and the result is the same, as
    // the sum shares the reference. A warp skips the rescale when none of its rows moved,
    // which we expect of most tiles after a row's first ones (not measured; FlashAttention-4
    // does the same on Blackwell).
    static constexpr float kRescaleSlack = 8.0f;

    // A tile's first step: moves the reference of each row whose tile maximum (masked
    // scores -inf) passes it by more than the slack, and rescales the row's sum to match.
    // The tile's scores are `scale` times `scores`: 1 if they come scaled, and never below
    // 0, or the largest score would be the smallest entry's. Returns whether any row of the
    // warp moved; if so, each row's accumulated output must be multiplied by rescale[r] (1
    // for rows that did not move). The result is the same in every lane of the warp, so the
    // caller's multiply is a branch the warp takes or skips as one, before the scores'
    // exponentials (fewer values live across it).
    template <int COLS>
    __device__ __forceinline__ bool move_maxima(const float (&scores)[ROWS][COLS], float scale,
                                                float (&rescale)[ROWS]) {
        bool moved = false;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float largest = scores[r][0];
#pragma unroll
            for (int c = 1; c < COLS; ++c) largest = fmaxf(largest, scores[r][c]);
            const float tile_max = quad_max(largest * scale);
            rescale[r] = 1.0f;
            // -inf + slack is -inf: a row's first visible key always moves it, and the
            // factor exp2(-inf) = 0 clears what it accumulated before (nothing).
            if (tile_max > row_max[r] + kRescaleSlack) {
                rescale[r] = exp2_ftz(row_max[r] - tile_max);
                row_max[r] = tile_max;
                moved = true;
            }
            row_sum[r] *= rescale[r];
        }
        return __any_sync(kFullWarp, moved);
    }

    // The second step: turns the scores (`scale` times `scores`, as in move_maxima) into
    // probabilities against each row's reference, in place, and adds them to the row's sum.
    template <int COLS>
    __device__ __forceinline__ void exponentiate(float (&scores)[ROWS][COLS], float scale) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            // While a row has seen only masked keys its maximum is -inf; exponentiating
            // against 0 instead gives it zero probabilities, where -inf - -inf would be NaN.
            const float reference = row_max[r] == negative_infinity() ? 0.0f : row_max[r];
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                scores[r][c] = exp2_ftz(fmaf(scores[r][c], scale, -reference));
                row_sum[r] += scores[r][c];
            }
        }
    }

    // Closes row r: `output_scale` is what its accumulated output is multiplied by, `lse`
    // the natural log of its denominator. A learned sink (`sink_log2`, -inf if none) is one
    // more logit whose value row is zero: it only enlarges the denominator. A row that saw
    // nothing, without a sink, gets scale 0 and lse -inf. All 4 lanes of the row's quad
    // must call it together (the partial sums are added across the quad).
    __device__ __forceinline__ void finish_row(int r, float sink_log2, float& output_scale, float& lse) const {
        constexpr float kLn2 = 0.6931471805599453f;
        const float total = quad_sum(row_sum[r]);
        const float final_max = fmaxf(row_max[r], sink_log2);
        if (final_max == negative_infinity()) {
            // No visible key and no sink: the sum is 0 (output 0, lse -inf). Or fmaxf passed
            // over a NaN: every score of the row was NaN (the sum is NaN, and so is the lse, as
            // the output already is), or the sink is, which makes the denominator NaN and with
            // it the lse and the output (kept 0 by the scale 0 otherwise).
            const bool nan_sink = sink_log2 != sink_log2;
            output_scale = nan_sink ? sink_log2 : 0.0f;
            lse = nan_sink ? sink_log2 : total == 0.0f ? negative_infinity() : total;
            return;
        }
        const float weight = exp2f(row_max[r] - final_max);
        const float denominator = total * weight + exp2f(sink_log2 - final_max);
        output_scale = weight / denominator;
        lse = (final_max + log2f(denominator)) * kLn2;
    }
};

}  // namespace cuattn
