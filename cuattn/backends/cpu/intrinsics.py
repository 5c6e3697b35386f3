"""Operations numba has no spelling for, as single LLVM instructions.

The first two exist so that the loops of the softmax vectorize:

- ``maximum``: numba's ``max`` and a hand-written ``a if a > b else b`` are compare-and-select,
  which LLVM turns into a vector reduction only under the no-NaN fast-math flag. That flag
  would let it drop NaN, where a NaN score must reach the output. ``llvm.maximum`` is the
  NaN-propagating maximum, whose reductions LLVM vectorizes without it.
- ``float_from_bits``: the float32 whose bits are an integer's low 32, for building 2**n in
  the exponent field within the loop that uses it (numba reinterprets whole arrays only).

``bits_of_float`` is the inverse of ``float_from_bits``. ``float_from_half_bits`` widens a
float16, given as its bits, in one instruction where the CPU has one (x86's F16C, every
AArch64): ``HALF_CONVERSION_INSTRUCTION`` says whether the CPU numba compiles for has it
(the host, unless numba is told otherwise). Elsewhere LLVM would emit a call to a runtime
routine that numba does not link, so bits.py widens by integer operations there.

``contiguous_row`` retypes a row whose elements are adjacent as a C-contiguous array: numba
types the kernels' inputs with any layout (their strides are the caller's), and a loop over a
row of any layout loads its elements one at a time, where over a contiguous one it loads
vectors.

``float32_pointer`` makes an address a typed pointer, for ``numba.carray`` to view as an
array the memory that the kernels hold as an address (blas.py).
"""

from __future__ import annotations

import llvmlite.binding
import numba
from llvmlite import ir
from numba import types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

_FLOAT = ir.FloatType()

# The fast-math flags the CPU kernels compile with: those that let reductions vectorize while
# -inf and NaN keep their meaning (no "ninf" or "nnan").
FAST_MATH = {"contract", "arcp", "nsz", "reassoc"}


def _compiles_for_half_conversion() -> bool:
    """Whether the CPU numba compiles for has a float16 conversion instruction: the features
    numba targets, which are NUMBA_CPU_FEATURES when set (none under NUMBA_CPU_NAME=generic,
    for caches shared between machines), else the host's."""
    if llvmlite.binding.get_process_triple().startswith(("aarch64", "arm64")):
        return True  # in the base architecture
    features = numba.config.CPU_FEATURES
    if features is None:
        features = llvmlite.binding.get_host_cpu_features().flatten()
    return "+f16c" in features.split(",")


HALF_CONVERSION_INSTRUCTION = _compiles_for_half_conversion()


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
def bits_of_float(typingctx, value):
    """The bit pattern of the float32 ``value``, as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def float_from_half_bits(typingctx, bits):
    """The float32 equal to the float16 whose bit pattern is the low 16 bits of ``bits``
    (NaN stays NaN, quieted). Only where HALF_CONVERSION_INSTRUCTION."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 16:
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        if value.type.width != 16:
            value = builder.trunc(value, ir.IntType(16))
        return builder.fpext(builder.bitcast(value, ir.HalfType()), _FLOAT)

    return types.float32(bits), codegen


@intrinsic
def contiguous_row(typingctx, row):
    """``row``, a 1-D array of any layout whose stride the caller knows to be one element,
    typed C-contiguous (the same array: only the type changes)."""
    if not isinstance(row, types.Array) or row.ndim != 1:
        return None
    contiguous = row.copy(layout="C")

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, contiguous, args[0])

    return contiguous(row), codegen


@intrinsic
def float32_pointer(typingctx, address):
    """The integer ``address`` as a pointer to float32."""
    if not isinstance(address, types.Integer):
        return None
    pointer = types.CPointer(types.float32)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address), codegen
