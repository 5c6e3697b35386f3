"""float32 matrix products on row-major tiles with any row stride, callable from numba.

numba's ``np.dot`` takes contiguous arrays only, so tiles of K and V (rows of a strided
(batch, seqlen, heads, head_dim) array) had to be copied out first, once per query tile,
and each P V product went through a temporary before being added to the accumulator.
BLAS's sgemm takes a leading dimension and a beta: it reads the tiles where they are and
accumulates in place (bench/NOTES.md, "The CPU backend").

sgemm is SciPy's (``scipy.linalg.cython_blas``, the BLAS numba's own ``np.dot`` calls). Its
address is registered with LLVM under a name of ours and the kernels call it by that name,
so that numba's on-disk cache keeps code that is linked again in each process rather than
a pointer from the process that compiled it.

sgemm is column-major: a row-major (rows x cols) matrix with row stride ``ld`` is, to it,
the column-major (cols x rows) transpose with leading dimension ``ld``.

With a few rows of A (decoding: a query row per head), sgemm spends its time copying the K or
V tile into its packed layout, far more than on the arithmetic it then does on it (the copy
routines took most of the kernel's time under perf). Such products are plain loops here that
read each row of the tile once, where it lies, for all rows of A.
"""

from __future__ import annotations

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

from .intrinsics import FAST_MATH, float32_pointer

# Products with at most this many rows of A are loops rather than sgemm calls (see above).
FEW_ROWS = 8

_SYMBOL = "cuattn_scipy_sgemm"
llvmlite.binding.add_symbol(
    _SYMBOL, get_cython_function_address("scipy.linalg.cython_blas", "sgemm")
)


@intrinsic
def _sgemm(typingctx, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """sgemm with its 13 by-reference arguments given as int64 addresses."""
    arguments = (transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    if not all(isinstance(argument, types.Integer) for argument in arguments):
        return None

    def codegen(context, builder, signature, args):
        pointer = ir.IntType(8).as_pointer()
        declared = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer] * 13), _SYMBOL
        )
        builder.call(declared, [builder.inttoptr(value, pointer) for value in args])
        return context.get_dummy_value()

    return types.void(*arguments), codegen


@numba.njit(inline="always")
def address(array):
    """The address of an array's first element, as an int64 (numba's is unsigned: mixed
    with signed offsets it would become a float)."""
    return np.int64(array.ctypes.data)


@numba.njit
def gemm_arguments():
    """Scratch for sgemm's by-reference scalars, one per thread (see _call)."""
    return np.empty(16, np.int32)


@numba.njit(inline="always")
def _call(transpose_a, transpose_b, m, n, k, a, lda, b, ldb, beta, c, ldc, arguments):
    """C = op(A) op(B) + beta C, column-major; ``a``, ``b``, ``c`` are addresses.

    ``arguments`` (gemm_arguments) holds the scalars sgemm reads by reference: six ints,
    alpha and beta as float32 bits, and the two transpose flags as characters.
    """
    floats = arguments.view(np.float32)
    characters = arguments.view(np.uint8)
    arguments[0] = m
    arguments[1] = n
    arguments[2] = k
    arguments[3] = lda
    arguments[4] = ldb
    arguments[5] = ldc
    floats[6] = 1.0
    floats[7] = beta
    characters[32] = ord("T") if transpose_a else ord("N")
    characters[33] = ord("T") if transpose_b else ord("N")
    base = address(arguments)
    _sgemm(
        base + 32,
        base + 33,
        base,
        base + 4,
        base + 8,
        base + 24,
        a,
        base + 12,
        b,
        base + 16,
        base + 28,
        c,
        base + 20,
    )


@numba.njit(inline="always")
def _rows(at, rows, cols, ld):
    """The row-major (rows x cols) float32 matrix at address ``at`` with row stride ``ld``,
    as a 2-D array with rows of ``ld`` elements, of which only the first ``cols`` are its."""
    return numba.carray(float32_pointer(at), (rows, ld))[:, :cols]


@numba.njit(fastmath=FAST_MATH)
def _few_rows_transposed(rows_a, rows_b, depth, a, lda, b, ldb, out, ld_out):
    """matmul_transposed by dot products, B's rows in the outer loop."""
    a_rows = _rows(a, rows_a, depth, lda)
    b_rows = _rows(b, rows_b, depth, ldb)
    out_rows = _rows(out, rows_a, rows_b, ld_out)
    for j in range(rows_b):
        b_row = b_rows[j]
        for i in range(rows_a):
            a_row = a_rows[i]
            total = np.float32(0.0)
            for d in range(depth):
                total += a_row[d] * b_row[d]
            out_rows[i, j] = total


@numba.njit(fastmath=FAST_MATH)
def _few_rows_accumulate(rows_a, cols_b, depth, a, lda, b, ldb, out, ld_out):
    """matmul_accumulate by scaled row additions, B's rows in the outer loop."""
    a_rows = _rows(a, rows_a, depth, lda)
    b_rows = _rows(b, depth, cols_b, ldb)
    out_rows = _rows(out, rows_a, cols_b, ld_out)
    for d in range(depth):
        b_row = b_rows[d]
        for i in range(rows_a):
            weight = a_rows[i, d]
            out_row = out_rows[i]
            for j in range(cols_b):
                out_row[j] += weight * b_row[j]


@numba.njit(inline="always")
def matmul_transposed(rows_a, rows_b, depth, a, lda, b, ldb, out, ld_out, arguments):
    """out = A B^T: A is (rows_a x depth), B (rows_b x depth), out (rows_a x rows_b), all
    row-major float32 at the given addresses with the given row strides (in elements)."""
    if rows_a <= FEW_ROWS:
        _few_rows_transposed(rows_a, rows_b, depth, a, lda, b, ldb, out, ld_out)
        return
    # Column-major: out^T (rows_b x rows_a) = B (B^T stored, transposed) A^T (stored).
    _call(True, False, rows_b, rows_a, depth, b, ldb, a, lda, 0.0, out, ld_out, arguments)


@numba.njit(inline="always")
def matmul_accumulate(rows_a, cols_b, depth, a, lda, b, ldb, out, ld_out, arguments):
    """out += A B: A is (rows_a x depth), B (depth x cols_b), out (rows_a x cols_b), all
    row-major float32 at the given addresses with the given row strides (in elements)."""
    if rows_a <= FEW_ROWS:
        _few_rows_accumulate(rows_a, cols_b, depth, a, lda, b, ldb, out, ld_out)
        return
    # Column-major: out^T (cols_b x rows_a) += B^T (stored) A^T (stored).
    _call(False, False, cols_b, rows_a, depth, b, ldb, a, lda, 1.0, out, ld_out, arguments)
