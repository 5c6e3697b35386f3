"""float16 / bfloat16 <-> float32 conversions on raw bits, for numba.

numba has no float16 on the CPU and no bfloat16 anywhere, so the CPU backend sees every
array as unsigned words (float32 as uint32, float16 and bfloat16 as uint16) and converts
here, with integer operations that vectorize. Rounding is to nearest even, bit for bit as
NumPy, ml_dtypes and CUDA's ``__float2half_rn`` / ``__float2bfloat16_rn`` do it.
"""

from __future__ import annotations

import numba
import numpy as np

# Dtype codes passed to the kernels.
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

_F32_INF = 0x7F800000
# Multiplying the float16 exponent/mantissa bits, shifted into float32 position, by
# 2**112 re-biases the exponent (127 - 15 = 112) for normals and subnormals alike.
_REBIAS = np.float32(2.0**112)


@numba.njit(inline="always")
def widen_row(words, code, scratch_bits, scratch_values, count):
    """Decode ``count`` stored words into float32 ``scratch_values``.

    ``scratch_bits`` is ``scratch_values`` viewed as uint32 (the caller owns both views).
    """
    if code == FLOAT32:
        for i in range(count):
            scratch_bits[i] = words[i]
    elif code == BFLOAT16:
        # bfloat16 is the upper half of a float32.
        for i in range(count):
            scratch_bits[i] = np.uint32(words[i]) << 16
    else:
        for i in range(count):
            scratch_bits[i] = (np.uint32(words[i]) & 0x7FFF) << 13
        for i in range(count):
            scratch_values[i] *= _REBIAS
        for i in range(count):
            word = np.uint32(words[i])
            sign = (word & 0x8000) << 16
            # Infinity and NaN: the rebias left them finite; restore an all-ones exponent.
            special = _F32_INF if (word & 0x7C00) == 0x7C00 else 0
            scratch_bits[i] |= sign | special


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
