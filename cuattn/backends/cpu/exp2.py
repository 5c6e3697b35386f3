"""A vectorizable 2**x for the probability tile.

libm's expf is a call LLVM will not vectorize: it made the exponentials slower than
the matrix products. Here x is split into an integer n and a fraction f in [-1/2, 1/2];
2**f is a degree-6 polynomial and 2**n is built in the exponent bits. The
coefficients are a relative-error minimax fit of 2**f on [-1/2, 1/2] (weighted least
squares iterated towards equal ripple); in float32 the result is within 1.2e-7 of 2**x,
one ulp, which tests/test_cpu_kernels.py checks over the whole range used.
"""

from __future__ import annotations

import numba
import numpy as np

from .intrinsics import FAST_MATH, float_from_bits

# Below 2**-125 a probability is indistinguishable from zero next to the row maximum (1):
# it is flushed to 0, which also keeps n inside float32's normal exponents.
_UNDERFLOW = np.float32(-125.0)

_C0 = np.float32(1.0)
_C1 = np.float32(6.93147206e-01)
_C2 = np.float32(2.40226469e-01)
_C3 = np.float32(5.55032878e-02)
_C4 = np.float32(9.61848897e-03)
_C5 = np.float32(1.33999312e-03)
_C6 = np.float32(1.53458099e-04)


@numba.njit(inline="always", fastmath=FAST_MATH)
def exp2_in_place(values, shift, count):
    """``values[i] = 2 ** (values[i] - shift)`` for ``values[i] <= shift``, and their sum.

    -inf gives 0; NaN stays NaN (in a value or in ``shift``), so that it reaches the output
    as it would in exact arithmetic. One pass: the sum is taken as the values are written.
    """
    total = np.float32(0.0)
    for i in range(count):
        x = values[i] - shift
        x = _UNDERFLOW if x < _UNDERFLOW else x  # also turns -inf into the bound; NaN passes
        n = np.floor(x + np.float32(0.5))
        f = x - n
        poly = _C6
        poly = poly * f + _C5
        poly = poly * f + _C4
        poly = poly * f + _C3
        poly = poly * f + _C2
        poly = poly * f + _C1
        poly = poly * f + _C0
        # 2**n built in its exponent field. x > -125 gives n >= -125 and poly >= 2**-0.5,
        # a normal product, so the multiplication is exact. A NaN x gives a NaN poly: n is
        # replaced by 0 there, as converting NaN to an integer is undefined in LLVM.
        n = n if n == n else np.float32(0.0)
        value = poly * float_from_bits((np.int32(n) + np.int32(127)) << 23)
        value = np.float32(0.0) if x <= _UNDERFLOW else value
        values[i] = value
        total += value
    return total
