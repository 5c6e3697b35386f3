"""Every kernel instantiation compiles with NVRTC for sm_80 and sm_90 with no register
spills, and the instantiation table covers every call the API accepts. No GPU needed."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cuattn import nvrtc
from cuattn.kernels import HEAD_DIMS, ForwardKernel, all_kernels, forward_kernel
from cuattn.spec import AttentionSpec

from .helpers import DTYPES

ARCHES = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def compiled():
    try:
        nvrtc.library()
    except nvrtc.NvrtcError as error:
        if os.environ.get("CUATTN_NVRTC"):  # a release asked for by name (.ci/run) must load
            raise
        pytest.skip(str(error))
    sources = sorted({k.source for k in all_kernels()})
    jobs = [(arch, source) for arch in ARCHES for source in sources]

    def compile_job(job):
        arch, source = job
        expressions = sorted({k.expression for k in all_kernels(arch) if k.source == source})
        return nvrtc.compile_program(source, expressions, arch).resources()

    # One NVRTC program per (architecture, source file), two compiling side by side.
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(compile_job, jobs))
    resources = {arch: {} for arch in ARCHES}
    for (arch, _), report in zip(jobs, reports, strict=True):
        resources[arch].update(report)
    return resources


@pytest.mark.parametrize("arch", ARCHES)
def test_every_instantiation_compiles_without_spills(compiled, arch):
    resources = compiled[arch]
    assert set(resources) == {k.expression for k in all_kernels(arch)}
    spilled = {
        expression: r
        for expression, r in resources.items()
        if r.spill_store_bytes or r.spill_load_bytes or r.stack_bytes
    }
    assert not spilled, f"{arch}: register spills or stack frames in {spilled}"
    assert max(r.registers for r in resources.values()) <= 255


@pytest.mark.parametrize("arch", [None, *ARCHES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_accepted_call_has_an_instantiation(dtype, arch):
    kernels = set(all_kernels(arch))
    for head_dim, left, right, softcap in itertools.product(
        range(8, 257, 8), (-1, 5), (-1, 0), (0.0, 1.0)
    ):
        spec = AttentionSpec(
            batch=1,
            seqlen_q=1,
            seqlen_k=1,
            num_heads_q=1,
            num_heads_kv=1,
            head_dim=head_dim,
            dtype=np.dtype(dtype),
            scale=1.0,
            softcap=softcap,
            window_left=left,
            window_right=right,
            sink_tokens=0,
            has_sinks=False,
            return_lse=False,
        )
        kernel = forward_kernel(spec, arch=arch)
        assert kernel in kernels and kernel.head_dim >= head_dim


@pytest.mark.parametrize("arch", [None, *ARCHES])
def test_instantiation_keys_are_unique(arch):
    names = [k.name for k in all_kernels(arch)]
    assert len(names) == len(set(names)) and all(name.isidentifier() for name in names)
    assert {k.head_dim for k in all_kernels() if isinstance(k, ForwardKernel)} == set(HEAD_DIMS)


def test_precompile_fills_the_disk_cache_in_parallel(monkeypatch, tmp_path):
    try:
        nvrtc.library()
    except nvrtc.NvrtcError as error:
        pytest.skip(str(error))
    from cuattn.backends import cuda

    monkeypatch.setenv("CUATTN_CACHE_DIR", str(tmp_path))  # the worker processes inherit it
    kernels = [k for k in all_kernels() if not isinstance(k, ForwardKernel)][:2]  # quick ones
    compiled = cuda.precompile("sm_80", kernels, jobs=2)
    assert [name for name, _ in compiled] == [k.name for k in kernels]
    assert len(list(tmp_path.rglob("*.cubin"))) == 2
    again = cuda.precompile("sm_80", kernels, jobs=2)
    assert all(seconds < 0.5 for _, seconds in again)  # read from the cache, not compiled


def test_the_float32_kernel_refuses_a_tile_override():
    # Its threads are 4 per query row: a (block_m, block_n, warps) tile would launch the
    # wrong block size and leave rows unwritten.
    with pytest.raises(ValueError, match="tile_override: the float32 kernel's tile is fixed"):
        ForwardKernel("float32", 64, False, False, tile_override=(64, 32, 4))
    assert ForwardKernel("bfloat16", 64, False, False, tile_override=(64, 32, 4)).threads == 128


def test_architecture_tiles_are_checked_and_differ_from_the_table():
    # An architecture the build test does not compile for would go unchecked for spills; a
    # tile equal to the table's would only compile the same kernel twice under two names.
    from cuattn.kernels import ARCH_TILES, prefill_tile

    assert set(ARCH_TILES) <= set(ARCHES)
    for tiles in ARCH_TILES.values():
        for head_dim, tile in tiles.items():
            assert head_dim in HEAD_DIMS and tile != prefill_tile(head_dim)


def test_cuattn_nvrtc_names_the_one_library_tried(monkeypatch):
    monkeypatch.setenv("CUATTN_NVRTC", "/nowhere/libnvrtc.so.13")
    assert nvrtc._candidates() == ["/nowhere/libnvrtc.so.13"]
