"""The emulator itself: each primitive against the PTX ISA's description, per lane; the
faults it must report; and bugs planted in a copy of the forward kernel that it must catch.

Fragment layouts below are written out again from the PTX ISA ("Matrix Fragments for
mma.m16n8k16 with floating point type", "ldmatrix"), independently of kernels/mma.cuh, so
that a misreading there would show here. The same tests run on a GPU (marked ``gpu``),
holding the real instructions to the same expectations.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import cuattn
from cuattn import backends, nvrtc
from cuattn.backends import emulate
from cuattn.backends.emulate import EmulationFault, LibraryKernel
from cuattn.dlpack import from_numpy
from cuattn.kernels import Tile, kernel_dir, plan_forward

from .helpers import BFLOAT16, assert_close, qkv
from .oracle import attention_oracle

WRAPPERS = str(Path(__file__).resolve().parent / "kernels" / "wrappers.cu")
TEST_PARAMS = np.dtype(
    [
        ("input", np.uint64),
        ("output", np.uint64),
        ("extra", np.uint64),
        ("count", np.int64),
        ("mode", np.int64),
    ]
)
KERNELS = tuple(
    LibraryKernel(name, f"cuattn_test::{expression}", "cuattn_test::TestParams")
    for name, expression in (
        ("mma_f16", "mma_lanes<cuattn::half>"),
        ("mma_bf16", "mma_lanes<cuattn::bfloat16>"),
        ("ldmatrix", "ldmatrix_lanes<false>"),
        ("ldmatrix_trans", "ldmatrix_lanes<true>"),
        ("cp_async", "cp_async_threads"),
        ("shuffle", "shuffle_lanes"),
        ("faulty", "faulty"),
    )
)


def run(name, input, output, extra=None, *, count=0, mode=0, threads=32, shared=0, where="emulate"):
    """Launch test kernel ``name`` as one block of ``threads``, emulated or on the GPU;
    ``output`` is filled in and returned."""
    arrays = {"input": input, "output": output, "extra": extra}
    params = np.zeros(1, TEST_PARAMS)
    params[0]["count"], params[0]["mode"] = count, mode
    if where == "gpu":
        cupy = pytest.importorskip("cupy")
        on_device = {key: cupy.asarray(array) for key, array in arrays.items() if array is not None}
        for key, array in on_device.items():
            params[0][key] = array.data.ptr
        _gpu_functions()[name]((1,), (threads,), (params,), shared_mem=shared)
        output[...] = on_device["output"].get()
        return output
    raw = {key: from_numpy(array) for key, array in arrays.items() if array is not None}
    for key, array in raw.items():
        params[0][key] = array.ptr
    backends.get("emulate").run_kernel(
        (WRAPPERS,), KERNELS, name, params, (1, 1, 1), (threads, 1, 1), shared, raw, {"output"}
    )
    return output


@functools.cache
def _gpu_functions():
    """The test kernels compiled by NVRTC for this GPU, loaded through CuPy."""
    import cupy

    arch = f"sm_{cupy.cuda.Device().compute_capability}"
    program = nvrtc.compile_program(WRAPPERS, [k.expression for k in KERNELS], arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(program.binary)
    module = cupy.RawModule(path=handle.name)
    return {k.name: module.get_function(program.lowered_names[k.expression]) for k in KERNELS}


@pytest.fixture(params=["emulate", pytest.param("gpu", marks=pytest.mark.gpu)])
def where(request):
    """Where the per-lane tests run: the emulator, and the real instructions on a GPU."""
    return request.param


# --- the PTX ISA's layouts, written out ------------------------------------------------------


def a_position(lane, i):
    """Row and column of value i (0-7) of the A fragment held by ``lane``."""
    group, quad = lane >> 2, lane % 4
    row = group if (i < 2 or 4 <= i < 6) else group + 8
    col = quad * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_position(lane, i):
    group, quad = lane >> 2, lane % 4
    return quad * 2 + (i & 1) + (8 if i >= 2 else 0), group


def c_position(lane, i):
    group, quad = lane >> 2, lane % 4
    return group + (8 if i >= 2 else 0), quad * 2 + (i & 1)


def pack(values: np.ndarray) -> np.ndarray:
    """Pairs of 16-bit values as 32-bit registers, the first in the low half."""
    bits = values.view(np.uint16).astype(np.uint32)
    return bits[..., 0::2] | (bits[..., 1::2] << 16)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16], ids=["float16", "bfloat16"])
def test_mma_matches_a_numpy_matmul_per_lane(rng, where, dtype):
    a = rng.standard_normal((16, 16)).astype(dtype)
    b = rng.standard_normal((16, 8)).astype(dtype)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    a_values = np.array([[a[a_position(lane, i)] for i in range(8)] for lane in range(32)], dtype)
    b_values = np.array([[b[b_position(lane, i)] for i in range(4)] for lane in range(32)], dtype)
    registers = np.concatenate([pack(a_values), pack(b_values)], axis=1)
    c_lanes = np.array(
        [[c[c_position(lane, i)] for i in range(4)] for lane in range(32)], np.float32
    )
    d_lanes = np.full((32, 4), np.nan, np.float32)
    run("mma_f16" if dtype == np.float16 else "mma_bf16", registers, d_lanes, c_lanes, where=where)
    expected = a.astype(np.float64) @ b.astype(np.float64) + c
    for lane in range(32):
        for i in range(4):
            assert d_lanes[lane, i] == pytest.approx(
                expected[c_position(lane, i)], rel=1e-5, abs=1e-5
            )


@pytest.mark.parametrize("transpose", [False, True], ids=["plain", "trans"])
def test_ldmatrix_gives_each_lane_its_pairs(rng, where, transpose):
    rows = rng.integers(0, 2**16, (32, 8), dtype=np.uint64).astype(np.uint16)
    order = rng.permutation(32).astype(np.int32)  # lane l points at row order[l]
    out = np.zeros((32, 4), np.uint32)
    run(
        "ldmatrix_trans" if transpose else "ldmatrix", rows, out, order, shared=32 * 32, where=where
    )
    for lane in range(32):
        for j in range(4):
            matrix = rows[order[8 * j : 8 * j + 8]]  # matrix j: rows given by lanes 8j..8j+7
            if transpose:
                low, high = matrix[2 * (lane % 4), lane // 4], matrix[2 * (lane % 4) + 1, lane // 4]
            else:
                low, high = matrix[lane // 4, 2 * (lane % 4)], matrix[lane // 4, 2 * (lane % 4) + 1]
            assert out[lane, j] == int(low) | (int(high) << 16), (lane, j)


def test_cp_async_copies_and_zero_fills_across_a_barrier(rng, where):
    threads = 64
    data = rng.integers(1, 255, (threads, 16), dtype=np.uint8)
    valid = (rng.random(threads) < 0.7).astype(np.int32)
    out = np.zeros_like(data)
    run(
        "cp_async",
        data,
        out,
        valid,
        count=threads,
        threads=threads,
        shared=16 * threads,
        where=where,
    )
    expected = np.where(valid[:, None] != 0, data, 0)
    np.testing.assert_array_equal(out, np.roll(expected, -1, axis=0))


@pytest.mark.parametrize(
    "mode, count",
    [(0, 1), (0, 2), (0, 16), (1, 5), (2, 3)],
    ids=["xor-1", "xor-2", "xor-16", "broadcast-5", "down-3"],
)
def test_shuffles(rng, where, mode, count):
    x = rng.standard_normal(32).astype(np.float32)
    out = run("shuffle", x, np.zeros(32, np.float32), count=count, mode=mode, where=where)
    lanes = np.arange(32)
    source = {
        0: lanes ^ count,
        1: np.full(32, count),
        2: np.where(lanes + count < 32, lanes + count, lanes),
    }
    np.testing.assert_array_equal(out, x[source[mode]])


@pytest.mark.parametrize("lane", [None, 0, 17, 31])
def test_any_sync(rng, where, lane):
    x = rng.uniform(-1.0, 1.0, 32).astype(np.float32)
    if lane is not None:
        x[lane] = 5.0  # the one lane above the threshold of 2
    out = run("shuffle", x, np.full(32, np.nan, np.float32), count=2, mode=3, where=where)
    np.testing.assert_array_equal(out, np.full(32, 0.0 if lane is None else 1.0, np.float32))


# --- faults --------------------------------------------------------------------------------


FAULTS = {
    "divergent-barrier": (
        0,
        64,
        r"wrappers\.cu:\d+: .*divergent __syncthreads: other threads wait at",
    ),
    "partial-mask": (1, 32, r"wrappers\.cu:\d+: .*__shfl_xor_sync with mask 0x0000ffff"),
    "deadlock": (
        2,
        128,
        r"deadlock in block \(0,0,0\): no thread can proceed\n  thread 0 waits at",
    ),
    "misaligned-cp-async": (
        4,
        32,
        r"wrappers\.cu:\d+: .*cp\.async of 16 bytes needs 16-byte aligned",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_name_the_kernel_line(fault):
    mode, threads, pattern = FAULTS[fault]
    data = np.zeros(threads * 16 + 64, np.uint8)
    with pytest.raises(EmulationFault, match=pattern):
        run(
            "faulty",
            data,
            np.zeros(threads, np.float32),
            mode=mode,
            threads=threads,
            shared=16 * threads,
        )


def test_a_run_past_the_time_limit_is_stopped(emulate_options):
    emulate_options(time_limit=1.0)
    with pytest.raises(EmulationFault, match=r"time limit of 1 s exceeded in block \(0,0,0\)"):
        run(
            "faulty",
            np.zeros(8, np.float32),
            np.zeros(64, np.float32),
            count=10**12,
            mode=3,
            threads=64,
        )


def test_sanitizer_reports_a_read_past_an_array(emulate_options):
    emulate_options(sanitize=True)
    with pytest.raises(EmulationFault, match=r"heap-buffer-overflow"):
        run("faulty", np.ones(32, np.float32), np.zeros(32, np.float32), mode=5)


# --- planted bugs ----------------------------------------------------------------------------

# The ring's barrier and the copy it guards (fwd.cu), for a planted bug below.
_RING_COPY = (
    "            __syncthreads();\n"
    "            const int64 ahead = t + KV_STAGES - 1;\n"
    "            const int ahead_stage = stage == 0 ? KV_STAGES - 1 : stage - 1;\n"
    "            if (ahead < work.tile_end) {\n"
    "                key_values.load_keys(Layout::k_tile(shared, ahead_stage), ahead);\n"
    "                key_values.load_values(Layout::v_tile(shared, ahead_stage), ahead);\n"
    "            }\n"
    "            cp_async_commit();\n"
)

PLANTED = {
    # One row past the end of the query tile: the last block reads a row past q.
    "query-tile-bound-off-by-one": (
        "tile.cuh",
        "const bool valid = r < valid_rows && c < head_dim;\n                cp_async_16(",
        "const bool valid = r <= valid_rows && c < head_dim;\n                cp_async_16(",
    ),
    # One row past the end of every key tile: the last tile of K and V reads past the array.
    "tile-bound-off-by-one": (
        "tile.cuh",
        "(column_valid && r < valid_rows);",
        "(column_valid && r <= valid_rows);",
    ),
    # Partial key tiles copied as whole ones: the last tile of K and V reads past the array.
    "whole-tile-test": (
        "tile.cuh",
        "if (valid_rows >= ROWS && head_dim == COLS)",
        "if (valid_rows > 0 && head_dim == COLS)",
    ),
    # The ragged last key tile forgotten: keys at the end of a sequence never seen.
    "tile-count-off-by-one": (
        "mask.cuh",
        "unsigned(end - begin + tile_keys - 1) / unsigned(tile_keys);",
        "unsigned(end - begin) / unsigned(tile_keys);",
    ),
    # Warps read K before the other warps' copies have landed.
    "removed-syncthreads": (
        "fwd.cu",
        "cp_async_wait<1>();  // Q and K[t] have landed; V[t] may still be in flight\n"
        "            __syncthreads();",
        "cp_async_wait<1>();  // Q and K[t] have landed; V[t] may still be in flight",
    ),
    # With a ring of K/V stages: a tile read before the other warps' copies of it have landed.
    "ring-removed-syncthreads": (
        "fwd.cu",
        "whose stage the copy of tile t + KV_STAGES - 1 now takes.\n            __syncthreads();",
        "whose stage the copy of tile t + KV_STAGES - 1 now takes.",
    ),
    # With a ring: the wait lets the current tile's own copies stay in flight.
    "ring-wait-one-group-short": (
        "fwd.cu",
        "cp_async_wait<KV_STAGES - 2>();",
        "cp_async_wait<KV_STAGES - 1>();",
    ),
    # K[t + 1] copied before every warp is done with K[t]: overwrites keys still to be read.
    "copy-before-barrier": (
        "fwd.cu",
        "__syncthreads();  // every warp is done with K[t]: it may be overwritten\n"
        "            if (t + 1 < work.tile_end) key_values.load_keys(k_tile, t + 1);",
        "if (t + 1 < work.tile_end) key_values.load_keys(k_tile, t + 1);\n"
        "            __syncthreads();",
    ),
    # With a ring: the copy into tile t - 1's stage issued before every warp is done with it.
    "ring-copy-before-barrier": (
        "fwd.cu",
        _RING_COPY,
        _RING_COPY.replace("            __syncthreads();\n", "") + "            __syncthreads();\n",
    ),
}
# The tile each planted bug runs with: the table's, or one with a ring of two K/V stages.
PLANTED_TILES = {
    "ring-removed-syncthreads": Tile(64, 32, 4, 2),
    "ring-wait-one-group-short": Tile(64, 32, 4, 2),
    "ring-copy-before-barrier": Tile(64, 32, 4, 2),
}
# A copy that overwrites what other warps have yet to read shows when copies land as they are
# issued and each warp runs on to its barrier before the next one moves (the "warps" schedule);
# these bugs run so, in place of the parametrized schedule. The rest run with copies landing
# at their wait.
OVERWRITE_ORDER = dict(schedule="warps", copies="at-issue")
PLANTED_OPTIONS = {
    "copy-before-barrier": OVERWRITE_ORDER,
    "ring-copy-before-barrier": OVERWRITE_ORDER,
}


# Each bug must be caught under both deterministic thread orders; a shuffled order may by
# chance run a racy kernel benignly, so it is not asked to.
@pytest.mark.parametrize("bug", sorted(PLANTED))
@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_planted_bugs_are_caught(tmp_path, rng, monkeypatch, emulate_options, bug, schedule):
    file, correct, planted = PLANTED[bug]
    copy = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), copy)
    source = (copy / file).read_text()
    assert source.count(correct) == 1, "the planted bug no longer matches the kernel source"
    (copy / file).write_text(source.replace(correct, planted))
    emulate_options(
        kernel_dir=copy, **(dict(schedule=schedule, seed=7) | PLANTED_OPTIONS.get(bug, {}))
    )
    if bug in PLANTED_TILES:
        tile = PLANTED_TILES[bug]
        monkeypatch.setattr(emulate, "plan_forward", functools.partial(plan_forward, tile=tile))
    q, k, v = qkv(rng, 1, 150, 150, 4, 2, 64, np.float16)
    for causal in (True, False):  # each run must catch it, causal and not
        with pytest.raises((AssertionError, EmulationFault)):
            out = cuattn.attention(q, k, v, causal=causal, backend="emulate")
            assert_close(out, attention_oracle(q, k, v, causal=causal)[0], np.float16)


@pytest.mark.parametrize(
    "schedule, copies", [("reverse", "at-wait"), ("shuffled", "at-wait"), ("warps", "at-issue")]
)
def test_the_real_kernel_passes_under_every_schedule(rng, emulate_options, schedule, copies):
    emulate_options(schedule=schedule, seed=11, copies=copies)
    for dtype in (np.float16, np.float32):
        q, k, v = qkv(rng, 1, 150, 150, 4, 2, 64, dtype)
        out = cuattn.attention(q, k, v, causal=True, backend="emulate")
        assert_close(out, attention_oracle(q, k, v, causal=True)[0], dtype)
