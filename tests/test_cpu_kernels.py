"""The numba building blocks on their own: bit conversions and exp2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

from cuattn.backends.cpu import MAX_TILE_ROWS, bits, heads_per_tile
from cuattn.backends.cpu.bits import BFLOAT16, FLOAT16, narrow_bits, widen_row
from cuattn.backends.cpu.blas import (
    FEW_ROWS,
    address,
    gemm_arguments,
    matmul_accumulate,
    matmul_transposed,
)
from cuattn.backends.cpu.exp2 import exp2_in_place
from cuattn.backends.cpu.intrinsics import FAST_MATH, HALF_CONVERSION_INSTRUCTION

from .helpers import BFLOAT16 as BF16_DTYPE

ROOT = Path(__file__).resolve().parent.parent


@numba.njit
def _widen(words, code):
    out = np.empty(words.size, np.float32)
    widen_row(words, code, out.view(np.uint32), words.size)
    return out


@numba.njit
def _narrow(values, code):
    bits = values.view(np.uint32)
    out = np.empty(values.size, np.uint16)
    for i in range(values.size):
        out[i] = narrow_bits(bits[i], code)
    return out


@pytest.mark.parametrize(
    "code, dtype", [(FLOAT16, np.float16), (BFLOAT16, BF16_DTYPE)], ids=["float16", "bfloat16"]
)
def test_widening_is_exact_for_every_16_bit_pattern(code, dtype):
    words = np.arange(2**16, dtype=np.uint16)
    expected = words.view(dtype).astype(np.float32)
    got = _widen(words, code)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


@pytest.mark.parametrize("way", ["by_integers", "by_instruction"])
def test_both_ways_of_widening_float16_are_exact(way):
    """widen_row takes one of them, by the CPU: the other is tested here too."""
    if way == "by_instruction" and not HALF_CONVERSION_INSTRUCTION:
        pytest.skip("this CPU has no float16 conversion instruction")
    widen = numba.njit(getattr(bits, f"_widen_half_{way}").py_func)
    words = np.arange(2**16, dtype=np.uint16)
    got = np.empty(words.size, np.uint32)
    widen(words, got, words.size)
    got = got.view(np.float32)
    expected = words.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


# float16 attention on the CPU backend against the oracle, in a process of its own.
_FLOAT16_CALL = textwrap.dedent("""
    import numpy as np
    import cuattn
    from cuattn.backends.cpu.intrinsics import HALF_CONVERSION_INSTRUCTION
    from tests.helpers import assert_close, qkv
    from tests.oracle import attention_oracle

    print("instruction" if HALF_CONVERSION_INSTRUCTION else "integers")
    q, k, v = qkv(np.random.default_rng(), 2, 1, 50, 4, 2, 64, np.float16)
    out = cuattn.attention(q, k, v, backend="cpu")
    assert_close(out, attention_oracle(q, k, v)[0], np.float16)
""")


def test_kernels_compile_for_a_cpu_without_float16_conversions(tmp_path):
    """numba compiles for the CPU it is told to (NUMBA_CPU_NAME=generic: no F16C, for caches
    that move between machines), not always for the host: had the kernels taken the float16
    instruction there, LLVM would call a routine numba does not link, and abort."""
    environment = dict(
        os.environ,
        NUMBA_CPU_NAME="generic",
        NUMBA_CACHE_DIR=str(tmp_path / "numba"),
        CUATTN_CACHE_DIR=str(tmp_path / "cuattn"),
    )
    done = subprocess.run(
        [sys.executable, "-c", _FLOAT16_CALL],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["integers"]


@pytest.mark.parametrize(
    "code, dtype", [(FLOAT16, np.float16), (BFLOAT16, BF16_DTYPE)], ids=["float16", "bfloat16"]
)
def test_narrowing_rounds_to_nearest_even_like_numpy(rng, code, dtype):
    anywhere = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    # Dense around float16's range: subnormals, the overflow edge, exact ties.
    near = rng.integers(0x32000000, 0x48000000, 2_000_000, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(2**16, dtype=np.uint32) << 13) | 0x1000
    bits = np.concatenate([anywhere, near, near | 0x80000000, ties, ties | 0x80000000])
    values = bits.view(np.float32)
    with np.errstate(all="ignore"):
        expected = values.astype(dtype).view(np.uint16)
    got = _narrow(values, code)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.isnan(got[nan].view(dtype).astype(np.float32)).all()


@numba.njit(fastmath=FAST_MATH)  # as the kernels compile it
def _exp2(values, shift):
    out = values.copy()
    total = exp2_in_place(out, shift, out.size)
    return out, total


def test_exp2_is_within_one_ulp_and_flushes_the_underflow(rng):
    values = np.concatenate([-rng.exponential(8.0, 1_000_000), -np.linspace(0, 124.999, 100_001)])
    values = values.astype(np.float32)
    values = values[values > -125]
    got, total = _exp2(values, np.float32(0.0))
    expected = np.exp2(values.astype(np.float64))
    relative = np.abs(got - expected) / expected
    assert relative.max() < 2.5e-7  # about 2 ulp of float32
    # The sum of a key tile's row, within float32's worst-case bound for n - 1 additions.
    row, row_total = _exp2(values[:256], np.float32(0.0))
    exact = row.astype(np.float64).sum()
    assert abs(row_total - exact) <= 255 * 2.0**-24 * exact
    below = np.array([-125.0, -126.5, -200.0, -np.inf], np.float32)
    got, total = _exp2(below, np.float32(0.0))
    np.testing.assert_array_equal(got, 0.0)
    assert total == 0.0


def test_exp2_lets_nan_through(rng):
    values = -rng.exponential(4.0, 64).astype(np.float32)
    values[[3, 40]] = np.nan
    got, total = _exp2(values, np.float32(0.0))
    assert np.isnan(got[[3, 40]]).all() and np.isfinite(np.delete(got, [3, 40])).all()
    assert np.isnan(total)
    got, total = _exp2(values[values == values], np.float32(np.nan))  # a NaN row maximum
    assert np.isnan(got).all() and np.isnan(total)


def test_exp2_shift_is_subtracted_first(rng):
    values = rng.uniform(-30, 10, 1000).astype(np.float32)
    got, _ = _exp2(values, np.float32(10.0))
    # The difference is taken in float32, as the kernel's scores are.
    difference = (values - np.float32(10.0)).astype(np.float64)
    np.testing.assert_allclose(got, np.exp2(difference), rtol=2.5e-7)


@pytest.mark.parametrize(
    "group, block_q, query_tiles, heads, threads, expected",
    [
        (4, 20, 4, 32, 2, 4),  # 20 query rows, 8 KV heads: a tile holds a whole group
        (1, 20, 4, 32, 2, 1),  # MHA: nothing to share
        (32, 20, 1, 32, 2, 16),  # MQA, one sequence: two tiles, one per thread
        (8, 20, 1, 8, 1, 8),  # one thread: one tile
        (32, 20, 1, 32, 1, 16),  # 640 rows would be too tall
        (6, 20, 3, 6, 2, 6),
        (6, 100, 3, 6, 2, 3),  # 600 rows would be too tall: the next divisor down
        (4, MAX_TILE_ROWS, 8, 32, 2, 1),  # prefill: tiles are full already
        (4, 128, 2, 8, 2, 4),
    ],
)
def test_query_heads_share_a_tile_when_their_rows_are_few(
    group, block_q, query_tiles, heads, threads, expected
):
    assert heads_per_tile(group, block_q, query_tiles, heads, threads) == expected


@numba.njit
def _products(a, b_rows, b, scores, accumulator):
    """matmul_transposed into ``scores`` and matmul_accumulate into ``accumulator``, on
    float32 arrays with contiguous rows and any row stride, as the kernel passes tiles."""
    arguments = gemm_arguments()
    rows_a, depth = a.shape
    matmul_transposed(
        rows_a,
        b_rows.shape[0],
        depth,
        address(a),
        a.strides[0] // 4,
        address(b_rows),
        b_rows.strides[0] // 4,
        address(scores),
        scores.strides[0] // 4,
        arguments,
    )
    matmul_accumulate(
        rows_a,
        b.shape[1],
        depth,
        address(a),
        a.strides[0] // 4,
        address(b),
        b.strides[0] // 4,
        address(accumulator),
        accumulator.strides[0] // 4,
        arguments,
    )


@pytest.mark.parametrize("rows_a", [1, 3, FEW_ROWS, FEW_ROWS + 1, 40])
def test_tile_products_by_loops_and_by_sgemm(rng, rows_a):
    """Both ways of multiplying tiles (loops for a few rows, sgemm for more) compute the
    products, read and write rows at their stride, and touch nothing past a row's end."""
    depth, keys, columns = 40, 37, 24

    def strided(rows, cols, pad):
        return rng.standard_normal((rows, cols + pad), dtype=np.float32)[:, :cols]

    a, b_rows, b = strided(rows_a, depth, 8), strided(keys, depth, 16), strided(depth, columns, 8)
    scores_storage = np.full((rows_a, keys + 5), np.nan, np.float32)
    accumulator_storage = rng.standard_normal((rows_a, columns + 3), dtype=np.float32)
    before = accumulator_storage.copy()
    _products(a, b_rows, b, scores_storage[:, :keys], accumulator_storage[:, :columns])

    a64, b_rows64, b64 = a.astype(np.float64), b_rows.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(scores_storage[:, :keys], a64 @ b_rows64.T, rtol=1e-5, atol=1e-5)
    assert np.isnan(scores_storage[:, keys:]).all()
    np.testing.assert_allclose(
        accumulator_storage[:, :columns], before[:, :columns] + a64 @ b64, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(accumulator_storage[:, columns:], before[:, columns:])
