// The element types: float16 and bfloat16 as 16-bit storage, converted to and from float32.
//
// The kernels define their own 16-bit types instead of including cuda_fp16.h/cuda_bf16.h so
// that NVRTC needs no CUDA headers at all (the pip NVRTC ships none). Conversions round to
// nearest even. On the GPU they are single cvt instructions; emulated, they are the same
// rounding written with integer operations, bit for bit including the canonical NaN (0x7fff)
// that PTX's cvt produces.
#pragma once

#include "platform.cuh"

namespace cuattn {

struct half {
    uint16 bits;
};

struct bfloat16 {
    uint16 bits;
};

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

// 2^x for the softmax: a single ex2.approx.ftz. exp2f is ex2.approx without .ftz, which
// ptxas wraps in a range test and two multiplies so that results under 2^-126 keep their
// subnormal precision. In the online softmax each row's largest term is exactly 1, so a
// term that small is far below float32's resolution of the sum it joins: flushing it to
// zero changes no result. The emulation flushes the same way.
__device__ __forceinline__ float exp2_ftz(float x) {
#if CUATTN_EMULATED
    const float y = std::exp2(x);
    return y < 1.17549435e-38f ? 0.0f : y;  // FLT_MIN
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

#if CUATTN_EMULATED

inline uint16 float_to_half_bits(float value) {
    const uint32 bits = __float_as_uint(value);
    const uint32 sign = (bits >> 16) & 0x8000u;
    const uint32 magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return 0x7fff;                   // NaN
    if (magnitude >= 0x477ff000u) return uint16(sign | 0x7c00u);   // rounds to infinity
    if (magnitude >= 0x38800000u) {                               // normal: rebias, round at bit 13
        return uint16(sign | ((magnitude - 0x38000000u + 0xfffu + ((magnitude >> 13) & 1u)) >> 13));
    }
    if (magnitude < 0x33000000u) return uint16(sign);  // below half the smallest subnormal
    const uint32 exponent = magnitude >> 23;
    const uint32 significand = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32 shift = 126u - exponent;  // to units of 2**-24
    uint32 kept = significand >> shift;
    const uint32 rest = significand & ((1u << shift) - 1u);
    const uint32 halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (kept & 1u))) ++kept;
    return uint16(sign | kept);
}

inline float half_bits_to_float(uint16 half_bits) {
    const uint32 sign = uint32(half_bits & 0x8000u) << 16;
    const uint32 exponent = (half_bits >> 10) & 0x1fu;
    const uint32 mantissa = half_bits & 0x3ffu;
    if (exponent == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0) return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    const float magnitude = float(mantissa) * (1.0f / 16777216.0f);  // subnormal: m * 2**-24
    return sign ? -magnitude : magnitude;
}

inline uint16 float_to_bfloat16_bits(float value) {
    const uint32 bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
    return uint16((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#else

__device__ __forceinline__ uint16 float_to_half_bits(float value) {
    uint16 bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    return bits;
}

__device__ __forceinline__ float half_bits_to_float(uint16 bits) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
    return value;
}

__device__ __forceinline__ uint16 float_to_bfloat16_bits(float value) {
    uint16 bits;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    return bits;
}

#endif

__device__ __forceinline__ float bfloat16_bits_to_float(uint16 bits) {
    return __uint_as_float(uint32(bits) << 16);  // exact: bfloat16 is a float32's upper half
}

// What a kernel needs to know about its element type.
template <class Element>
struct ElementTraits;

template <>
struct ElementTraits<half> {
    static constexpr bool is_bfloat16 = false;
    __device__ static __forceinline__ float to_float(half x) { return half_bits_to_float(x.bits); }
    __device__ static __forceinline__ half from_float(float x) { return half{float_to_half_bits(x)}; }
    __device__ static __forceinline__ float low_to_float(uint32 pair) { return half_bits_to_float(uint16(pair)); }
    __device__ static __forceinline__ float high_to_float(uint32 pair) { return half_bits_to_float(uint16(pair >> 16)); }
    // Two floats as one register of two 16-bit values, `low` in the low half (mma operand order).
    __device__ static __forceinline__ uint32 pack(float low, float high) {
#if CUATTN_EMULATED
        return uint32(float_to_half_bits(low)) | (uint32(float_to_half_bits(high)) << 16);
#else
        uint32 packed;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
        return packed;
#endif
    }
};

template <>
struct ElementTraits<bfloat16> {
    static constexpr bool is_bfloat16 = true;
    __device__ static __forceinline__ float to_float(bfloat16 x) { return bfloat16_bits_to_float(x.bits); }
    __device__ static __forceinline__ bfloat16 from_float(float x) { return bfloat16{float_to_bfloat16_bits(x)}; }
    __device__ static __forceinline__ float low_to_float(uint32 pair) { return bfloat16_bits_to_float(uint16(pair)); }
    __device__ static __forceinline__ float high_to_float(uint32 pair) {
        return bfloat16_bits_to_float(uint16(pair >> 16));
    }
    __device__ static __forceinline__ uint32 pack(float low, float high) {
#if CUATTN_EMULATED
        return uint32(float_to_bfloat16_bits(low)) | (uint32(float_to_bfloat16_bits(high)) << 16);
#else
        uint32 packed;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
        return packed;
#endif
    }
};

template <>
struct ElementTraits<float> {
    static constexpr bool is_bfloat16 = false;
    __device__ static __forceinline__ float to_float(float x) { return x; }
    __device__ static __forceinline__ float from_float(float x) { return x; }
};

}  // namespace cuattn
