"""float16 / bfloat16 <-> float32 conversions on raw bits, for numba.

numba has no float16 on the CPU and no bfloat16 anywhere, so the CPU backend sees every
array as unsigned words (float32 as uint32, float16 and bfloat16 as uint16) and converts
here, with integer operations that vectorize (float16 with the CPU's conversion instruction
where it has one). Rounding is to nearest even, bit for bit as NumPy, ml_dtypes and CUDA's
``__float2half_rn`` / ``__float2bfloat16_rn`` do it.
"""

from __future__ import annotations

import numba
import numpy as np

from .intrinsics import (
    HALF_CONVERSION_INSTRUCTION,
    bits_of_float,
    float_from_bits,
    float_from_half_bits,
)

# Dtype codes passed to the kernels.
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

_F32_INF = 0x7F800000
# Multiplying the float16 exponent/mantissa bits, shifted into float32 position, by
# 2**112 re-biases the exponent (127 - 15 = 112) for normals and subnormals alike.
_REBIAS = np.float32(2.0**112)


@numba.njit(inline="always")
def _widen_half_by_integers(words, scratch_bits, count):
    """float16 words as float32 bits: exponent and mantissa moved to float32's place and
    rebiased by one exact multiply (subnormals included), then the sign."""
    for i in range(count):
        word = np.uint32(words[i])
        magnitude = float_from_bits((word & 0x7FFF) << 13) * _REBIAS
        sign = (word & 0x8000) << 16
        # Infinity and NaN: the rebias left them finite; restore an all-ones exponent.
        special = np.uint32(_F32_INF) if (word & 0x7C00) == 0x7C00 else np.uint32(0)
        scratch_bits[i] = bits_of_float(magnitude) | sign | special


@numba.njit(inline="always")
def _widen_half_by_instruction(words, scratch_bits, count):
    """float16 words as float32 bits, by the CPU's conversion instruction."""
    for i in range(count):
        scratch_bits[i] = bits_of_float(float_from_half_bits(words[i]))


# The instruction converts a vector of 8 at once: float16 decoding over a cache (B=4, 8192
# positions, 8 KV heads, D=128) took 24 ms with it and 33 ms by integers (bench/NOTES.md).
_widen_half = _widen_half_by_instruction if HALF_CONVERSION_INSTRUCTION else _widen_half_by_integers


@numba.njit(inline="always")
def widen_row(words, code, scratch_bits, count):
    """Decode ``count`` stored words into float32, written as bits to ``scratch_bits``."""
    if code == FLOAT32:
        for i in range(count):
            scratch_bits[i] = words[i]
    elif code == BFLOAT16:
        # bfloat16 is the upper half of a float32.
        for i in range(count):
            scratch_bits[i] = np.uint32(words[i]) << 16
    else:
        _widen_half(words, scratch_bits, count)


@numba.njit(inline="always")
def narrow_bits(bits, code):
    """Encode one float32, given as its uint32 bits, as a stored word (round to nearest even)."""
    if code == FLOAT32:
        return np.int64(bits)
    value = np.int64(bits)
    if code == BFLOAT16:
        if (value & 0x7FFFFFFF) > _F32_INF:
            return ((value >> 16) | 0x40) & 0xFFFF  # keep NaN a (quiet) NaN
        return ((value + 0x7FFF + ((value >> 16) & 1)) >> 16) & 0xFFFF
    sign = (value >> 16) & 0x8000
    magnitude = value & 0x7FFFFFFF
    if magnitude > _F32_INF:
        return sign | 0x7E00
    if magnitude >= 0x477FF000:  # 65520 and above round to infinity
        return sign | 0x7C00
    if magnitude >= 0x38800000:  # float16 normals: re-bias, then round at bit 13
        return sign | ((magnitude - 0x38000000 + 0xFFF + ((magnitude >> 13) & 1)) >> 13)
    if magnitude < 0x33000000:  # below half the smallest subnormal: zero
        return sign
    # Subnormal result: the 24-bit significand shifted to units of 2**-24, rounded to even.
    exponent = magnitude >> 23
    significand = (magnitude & 0x7FFFFF) | 0x800000
    shift = 126 - exponent
    kept = significand >> shift
    rest = significand & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rest > half or (rest == half and (kept & 1)):
        kept += 1
    return sign | kept


def word_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned type the kernels see for a float dtype."""
    return np.dtype(np.uint32) if dtype.itemsize == 4 else np.dtype(np.uint16)


def dtype_code(dtype: np.dtype) -> int:
    return {"float32": FLOAT32, "float16": FLOAT16, "bfloat16": BFLOAT16}[np.dtype(dtype).name]
