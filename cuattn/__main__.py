"""Command line: ``python -m cuattn info | demo | compile | bench <name>``."""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import shutil
import sys
import time

import numpy as np

import cuattn

from . import backends, nvrtc
from .kernels import ForwardKernel


def _bench_package():
    """The benchmarks: installed as cuattn.bench, or bench/ at the top of a checkout."""
    try:
        return importlib.import_module("cuattn.bench")
    except ImportError:
        try:
            return importlib.import_module("bench")
        except ImportError as error:
            raise SystemExit(
                "the benchmarks are not installed here: run from a cuattn checkout "
                "(PYTHONPATH=.) or install the package"
            ) from error


def info(args) -> int:
    import numba

    print(
        f"cuattn {cuattn.__version__} (Python {platform.python_version()}, "
        f"NumPy {np.__version__}, numba {numba.__version__})"
    )
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        detail = backends.get(name).describe() if reason is None else f"unavailable: {reason}"
        print(f"  backend {name:8s} {detail}")
    nvcc = shutil.which("nvcc")
    print(f"  nvcc     {nvcc or 'not found'}")
    try:
        major, minor = nvrtc.version()
        print(f"  NVRTC    {major}.{minor}")
    except nvrtc.NvrtcError as error:
        print(f"  NVRTC    not found ({error})")
        return 0
    if args.compile:
        _compile_report(args.compile)
    return 0


def _compile_report(arch: str) -> None:
    """What a first call pays to compile, and each kernel's registers and spills."""
    print(f"compiling one forward kernel per dtype for {arch} (what a first call on the GPU pays):")
    for dtype in ("float16", "bfloat16", "float32"):
        kernel = ForwardKernel(dtype, 128, True, False)
        start = time.perf_counter()
        program = nvrtc.compile_program(kernel.source, [kernel.expression], arch)
        seconds = time.perf_counter() - start
        r = program.resources()[kernel.expression]
        spilled = r.spill_store_bytes + r.spill_load_bytes
        print(
            f"  {kernel.name:32s} {seconds:5.2f} s  {r.registers} registers, "
            f"{spilled} bytes spilled, {r.stack_bytes} bytes stack"
        )


def _float64_reference(q, k, v, rows: int) -> np.ndarray:
    """softmax(q k^T / sqrt(D)) v in float64 for the first ``rows`` queries, causal."""
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    seqlen = k64.shape[1]
    out = np.empty((q64.shape[0], rows, q64.shape[2], q64.shape[3]))
    for b in range(q64.shape[0]):
        for h in range(q64.shape[2]):
            scores = q64[b, :rows, h] @ k64[b, :, h].T / math.sqrt(q64.shape[-1])
            scores[np.arange(seqlen)[None, :] > np.arange(rows)[:, None]] = -np.inf
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[b, :, h] = (weights / weights.sum(axis=1, keepdims=True)) @ v64[b, :, h]
    return out


def demo(args) -> int:
    backend = "cuda" if backends.unavailable_reason("cuda") is None else "cpu"
    rng = np.random.default_rng()
    batch, seqlen, heads, head_dim = 2, args.seqlen, 8, 64
    dtype = np.float16 if backend == "cuda" else np.float32
    q, k, v = (
        rng.standard_normal((batch, seqlen, heads, head_dim), dtype=np.float32).astype(dtype)
        for _ in range(3)
    )
    if backend == "cuda":
        import cupy

        arrays = [cupy.asarray(x) for x in (q, k, v)]
        sync = cupy.cuda.get_current_stream().synchronize
    else:
        arrays, sync = [q, k, v], (lambda: None)
    print(
        f"backend {backend}: causal attention, B={batch} S={seqlen} H={heads} D={head_dim} "
        f"{np.dtype(dtype).name}"
    )
    start = time.perf_counter()
    out = cuattn.attention(*arrays, causal=True, backend=backend)
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = cuattn.attention(*arrays, causal=True, backend=backend)
    sync()
    again = time.perf_counter() - start
    out = out.get() if backend == "cuda" else out
    rows = min(seqlen, 256)
    error = float(
        np.max(np.abs(out[:, :rows].astype(np.float64) - _float64_reference(q, k, v, rows)))
    )
    print(
        f"  first call {first * 1e3:.1f} ms (includes compiling or loading kernels), "
        f"then {again * 1e3:.1f} ms"
    )
    print(f"  max |error| against a float64 reference over the first {rows} rows: {error:.2e}")
    tolerance = 2e-3 if dtype == np.float16 else 1e-5
    if not error <= tolerance:
        print(f"  FAILED: error above {tolerance}")
        return 1
    print("  OK")
    return 0


def compile_all(args) -> int:
    """Fill the kernel cache for ``args.arch`` ahead of time (an image build, a GPU job)."""
    from .backends import cuda

    start = time.perf_counter()
    compiled = cuda.precompile(args.arch, jobs=args.jobs)
    print(
        f"{len(compiled)} kernels for {args.arch} in the cache after "
        f"{time.perf_counter() - start:.1f} s (compiling took up to "
        f"{max(seconds for _, seconds in compiled):.1f} s for one)"
    )
    return 0


def bench(args) -> int:
    package = _bench_package()
    module = importlib.import_module(f"{package.__name__}.{args.name}")
    return module.main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="version, backends found, GPU and compilers")
    info_parser.add_argument(
        "--compile",
        metavar="ARCH",
        nargs="?",
        const="sm_90",
        help="also time compiling the forward kernels (default sm_90)",
    )
    demo_parser = commands.add_parser("demo", help="run attention on the best backend and check it")
    demo_parser.add_argument("--seqlen", type=int, default=1024)
    compile_parser = commands.add_parser(
        "compile", help="compile every kernel into the cache ahead of the first call"
    )
    compile_parser.add_argument("--arch", default="sm_90", help="e.g. sm_80, sm_90 (default)")
    compile_parser.add_argument("--jobs", type=int, default=None, help="processes (default: CPUs)")
    bench_parser = commands.add_parser("bench", help="run a benchmark (see bench/)")
    bench_parser.add_argument(
        "name",
        choices=[
            "cpu",
            "prefill",
            "decode",
            "decode_kernels",
            "memory",
            "tiles",
            "key_loop",
            "resources",
        ],
    )
    bench_parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    args = parser.parse_args(argv)
    handlers = {"info": info, "demo": demo, "compile": compile_all, "bench": bench}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
