"""Registers and spills of every variant of the tile sweep's prefill candidates, as ptxas
reports them for one architecture: compiled with NVRTC, not run, no GPU needed.

The tile table may only hold a tile whose every instantiation (dtype, mask, softcap, grouped-
query packing) compiles without spills for every architecture it serves
(tests/test_kernel_build.py); `bench tiles` times one variant of each candidate. This report
says which of the others a sweep's winner would still spill in, before it goes into the table.

    python -m cuattn bench resources [--arch sm_90] [--jobs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from .report import publish, table
from .tiles import PREFILL_TILES


def candidate_variants(head_dim: int, tile) -> list:
    """The prefill instantiations of ``tile`` (None: the table's) at ``head_dim``, float16
    and bfloat16: every mask, softcap and packing flag (decoding keeps its own tile)."""
    from cuattn.kernels import ForwardKernel

    return [
        variant
        for dtype in ("float16", "bfloat16")
        for variant in ForwardKernel(dtype, head_dim, False, False, False, tile).variants()
        if not variant.decode
    ]


def measure(arch: str, kernels: list) -> list[dict]:
    """ptxas's registers, spill bytes and stack frame per kernel (the table allows neither
    spills nor a stack frame), all compiled in one NVRTC program."""
    from cuattn import nvrtc

    report = nvrtc.compile_program("fwd.cu", [k.expression for k in kernels], arch).resources()
    figures = []
    for kernel in kernels:
        used = report[kernel.expression]
        figures.append(
            dict(
                registers=used.registers,
                spilled=used.spill_store_bytes + used.spill_load_bytes,
                stack=used.stack_bytes,
            )
        )
    return figures


def _measure_candidate(job) -> list[dict]:
    arch, head_dim, tile = job
    kernels = candidate_variants(head_dim, tile)
    rows = []
    for kernel, figures in zip(kernels, measure(arch, kernels), strict=True):
        flags = [
            name
            for on, name in (
                (kernel.windowed, "windowed"),
                (kernel.softcap, "softcap"),
                (kernel.pack_gqa, "packed"),
            )
            if on
        ]
        rows.append(
            dict(
                head_dim=head_dim,
                tile=str(kernel.tile) + (" (table)" if tile is None else ""),
                dtype=kernel.dtype,
                flags=" ".join(flags) or "-",
                **figures,
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="cuattn bench resources", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", default="sm_90", help="e.g. sm_80, sm_90 (default)")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: CPUs)")
    parser.add_argument("--out", help="directory for the results (default bench/results)")
    args = parser.parse_args(argv)
    jobs = [
        (args.arch, head_dim, tile) for head_dim, tiles in PREFILL_TILES.items() for tile in tiles
    ]
    context = multiprocessing.get_context("spawn")  # as cuattn.backends.cuda.precompile
    with ProcessPoolExecutor(args.jobs or os.cpu_count(), mp_context=context) as pool:
        rows = [row for rows in pool.map(_measure_candidate, jobs) for row in rows]
    from cuattn import nvrtc

    compiler = ".".join(map(str, nvrtc.version()))  # spills differ between NVRTC releases
    spilling = [row for row in rows if row["spilled"] or row["stack"]]
    print(f"{len(spilling)} of {len(rows)} instantiations spill for {args.arch}")
    text = table(
        rows,
        [
            ("head_dim", "D"),
            ("tile", "block_m x block_n x warps, K/V stages"),
            ("dtype", "dtype"),
            ("flags", "variant"),
            ("registers", "registers"),
            ("spilled", "spill bytes"),
            ("stack", "stack bytes"),
        ],
    )
    publish(
        "resources",
        "Forward kernel candidates: registers and spills of every prefill variant, compiled "
        f"by NVRTC {compiler} but not run",
        text,
        dict(arch=args.arch, nvrtc=compiler, rows=rows),
        args.out,
        args.arch,
        None,
        False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
