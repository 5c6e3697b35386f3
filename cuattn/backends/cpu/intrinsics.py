"""Operations numba has no spelling for, as single LLVM instructions.

The first two exist so that the loops of the softmax vectorize:

- ``maximum``: numba's ``max`` and a hand-written ``a if a > b else b`` are compare-and-select,
  which LLVM turns into a vector reduction only under the no-NaN fast-math flag. That flag
  would let it drop NaN, where a NaN score must reach the output. ``llvm.maximum`` is the
  NaN-propagating maximum, whose reductions LLVM vectorizes without it.
- ``float_from_bits``: the float32 whose bits are an integer's low 32, for building 2**n in
  the exponent field within the loop that uses it (numba reinterprets whole arrays only).

``float32_pointer`` makes an address a typed pointer, for ``numba.carray`` to view as an
array the memory that the kernels hold as an address (blas.py).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_FLOAT = ir.FloatType()

# The fast-math flags the CPU kernels compile with: those that let reductions vectorize while
# -inf and NaN keep their meaning (no "ninf" or "nnan").
FAST_MATH = {"contract", "arcp", "nsz", "reassoc"}


@intrinsic
def maximum(typingctx, a, b):
    """The larger of two float32, NaN if either is NaN (IEEE 754-2019 maximum)."""
    if a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, signature, args):
        declared = builder.module.declare_intrinsic(
            "llvm.maximum", [_FLOAT], ir.FunctionType(_FLOAT, [_FLOAT, _FLOAT])
        )
        return builder.call(declared, args)

    return types.float32(types.float32, types.float32), codegen


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        if value.type.width != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, _FLOAT)

    return types.float32(bits), codegen


@intrinsic
def float32_pointer(typingctx, address):
    """The integer ``address`` as a pointer to float32."""
    if not isinstance(address, types.Integer):
        return None
    pointer = types.CPointer(types.float32)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address), codegen
