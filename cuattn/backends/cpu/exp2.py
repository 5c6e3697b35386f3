"""A vectorizable 2**x for the probability tile.

libm's expf is a call LLVM will not vectorize: it made the exponentials slower than
the matrix products. Here x is split into an integer n and a fraction f in [-1/2, 1/2];
2**f is a degree-6 polynomial and 2**n goes straight into the exponent bits. The
coefficients are a relative-error minimax fit of 2**f on [-1/2, 1/2] (weighted least
squares iterated towards equal ripple); in float32 the result is within 1.2e-7 of 2**x,
one ulp, which tests/test_cpu_kernels.py checks over the whole range used.
"""

from __future__ import annotations

import numba
import numpy as np

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


@numba.njit(inline="always", fastmath={"contract", "arcp", "nsz"})
def exp2_shifted(values, shift, out, out_bits, exponents, count):
    """``out[i] = 2 ** (values[i] - shift)`` for ``values[i] <= shift``; -inf gives 0.

    ``out_bits`` is ``out`` viewed as int32; ``exponents`` is int32 scratch.
    """
    for i in range(count):
        x = values[i] - shift
        x = x if x > _UNDERFLOW else _UNDERFLOW  # also turns -inf into the underflow bound
        n = np.floor(x + np.float32(0.5))
        f = x - n
        poly = _C6
        poly = poly * f + _C5
        poly = poly * f + _C4
        poly = poly * f + _C3
        poly = poly * f + _C2
        poly = poly * f + _C1
        poly = poly * f + _C0
        underflow = x <= _UNDERFLOW
        out[i] = np.float32(0.0) if underflow else poly
        exponents[i] = 0 if underflow else np.int32(n) << 23
    for i in range(count):
        out_bits[i] += exponents[i]
