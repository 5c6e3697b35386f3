"""The forward kernel's key loop as the GPU would run it, read from the compiled code: no
GPU needed. Each instantiation is compiled with NVRTC and disassembled with nvdisasm (the
``nvidia-cuda-nvdisasm`` wheel); the key loop is the longest backward branch of the SASS,
and its instructions are counted by opcode.

The loop counted is the one a full, unmasked tile of 16-byte aligned operands runs, the
tile nearly every prefill and decode step runs, when no row's maximum moves (as after a
row's first tiles): the sources are compiled with those run-time conditions fixed
(``vector_loads``, the mask's cut-tile test, the softmax's rescale test), so that the
branches not taken drop out and the body is straight code. The loop a tile that the mask
cuts runs (a causal block's last tiles) is counted too, in the kernel's masked twin, the
same way but with the masked path taken. Registers and spills are those of the real kernel.
Instructions per mma is a count, not a time: it says how much the kernel asks of the issue
slots besides its tensor-core work.

    python -m cuattn bench key_loop [--arch sm_90] [--kernels DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from cuattn.kernels import Tile

from .report import publish, table

# (head dim, tile); None is the table's tile (cuattn/kernels.py), "decode" its decoding tile;
# the others are bench/tiles.py's candidates.
CASES = (
    (64, None),
    (64, Tile(64, 32, 4, 2)),
    (64, Tile(128, 32, 4)),
    (64, Tile(128, 64, 4)),
    (64, Tile(128, 32, 4, 2)),
    (64, Tile(128, 64, 4, 2)),
    (128, None),
    (128, Tile(128, 64, 8, 2)),
    (128, Tile(128, 32, 4)),
    (128, Tile(128, 64, 4)),
    (128, Tile(128, 32, 4, 2)),
    (128, Tile(128, 64, 4, 2)),
    (128, "decode"),
    (128, Tile(32, 64, 2, 2)),
    (128, Tile(32, 64, 2, 3)),
)

# The run-time conditions fixed for the count, as (file, pattern, replacement): operands on
# 16-byte boundaries (cp.async copies), no tile cut by the mask or the sequence's end (so every
# copy is of a whole tile), no row whose maximum moves (softmax.cuh: the output is rescaled
# only then, expected to be rare after a row's first tiles; the warp's vote on it drops out
# with the branch, one instruction), and a positive score scale (a negative one is applied
# before the softmax, as in cut tiles, fwd.cu). Each pattern must be found.
_FULL_TILE_EDITS = (
    ("fwd.cu", "p.vector_loads != 0", "true"),
    ("fwd.cu", "params.vector_loads != 0", "true"),
    ("fwd.cu", "keys < BLOCK_N ||", "false ||"),
    ("fwd.cu", "if (SOFTCAP || cut || scale < 0.0f)", "if (SOFTCAP || cut)"),
    (
        "fwd.cu",
        "if (softmax.move_maxima(scores, scale, rescale))",
        "if (softmax.move_maxima(scores, scale, rescale) && false)",
    ),
    ("tile.cuh", "if (valid_rows >= ROWS && head_dim == COLS)", "if (true)"),
)


def nvdisasm() -> str:
    """The nvdisasm executable: on PATH, or from the nvidia-cuda-nvdisasm wheel."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for root in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(root).glob("cu*/bin/nvdisasm")):
            return str(candidate)
    raise FileNotFoundError(
        "nvdisasm: neither on PATH nor installed (pip install nvidia-cuda-nvdisasm)"
    )


# For a tile the mask cuts (a causal block's last tiles), the same but for the cut: every
# tile takes the masked path (fwd.cu's per-row visible ranges and a select per score) after
# whole, aligned copies.
_CUT_TILE_EDITS = tuple(
    (name, pattern, "true ||" if pattern == "keys < BLOCK_N ||" else replacement)
    for name, pattern, replacement in _FULL_TILE_EDITS
)


def full_tile_sources(kernels: Path, into: Path, cut: bool = False) -> Path:
    """A copy of ``kernels`` in which every key tile is full and aligned (see above), and
    with ``cut`` every tile takes the masked path."""
    copy = into / ("kernels-cut" if cut else "kernels")
    shutil.copytree(kernels, copy)
    for name, pattern, replacement in _CUT_TILE_EDITS if cut else _FULL_TILE_EDITS:
        source = (copy / name).read_text()
        if pattern not in source:
            raise ValueError(f"{name} no longer contains {pattern!r}: update bench/key_loop.py")
        (copy / name).write_text(source.replace(pattern, replacement))
    return copy


def loop_opcodes(sass: str) -> tuple[collections.Counter, int]:
    """Opcodes (without modifiers or predicates) of the longest loop of one kernel's SASS,
    and how many loops it holds: with none, the count is what one pass runs; an inner loop
    is counted once, however often it runs."""
    labels, instructions = {}, []
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif instruction := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            instructions.append(instruction.group(1).strip())
    loops = [
        (labels[target.group(1)], end)
        for end, text in enumerate(instructions)
        if (target := re.search(r"BRA `\((\.L_x_\d+)\)", text))
        and labels.get(target.group(1), end) < end
    ]
    if not loops:
        raise ValueError("no loop in this kernel's SASS")
    begin, end = max(loops, key=lambda loop: loop[1] - loop[0])
    inner = sum(1 for b, e in loops if begin <= b and e < end)
    opcodes = collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        for text in instructions[begin : end + 1]
    )
    return opcodes, inner


def functions(sass: str) -> dict[str, str]:
    """nvdisasm's listing split by function: {mangled name: its SASS}."""
    parts = re.split(r"^\s*\.section\s+\.text\.([^,\s]+).*$", sass, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _key_loops(expressions: list[str], arch: str, root: Path) -> list:
    """(opcodes, inner loops) of each kernel's key loop, compiled from ``root``."""
    from cuattn import nvrtc

    program = nvrtc.compile_program("fwd.cu", expressions, arch, root=root)
    cubin = root / "kernels.cubin"
    cubin.write_bytes(program.binary)
    listing = subprocess.run(
        [nvdisasm(), "-c", str(cubin)], check=True, capture_output=True, text=True
    ).stdout
    by_name = functions(listing)
    return [loop_opcodes(by_name[program.lowered_names[e]]) for e in expressions]


def measure(
    kernels: list, arch: str, sources: Path, full_tiles: Path, cut_tiles: Path | None = None
) -> list[dict]:
    """Per kernel: registers and spills as compiled from ``sources``, and the opcodes of its
    key loop as compiled from ``full_tiles``; with ``cut_tiles``, also the instructions of
    the loop its masked twin (causal, windowed) runs on a tile the mask cuts. One NVRTC
    program each."""
    from cuattn import nvrtc

    expressions = [k.expression for k in kernels]
    resources = nvrtc.compile_program("fwd.cu", expressions, arch, root=sources).resources()
    loops = _key_loops(expressions, arch, full_tiles)
    if cut_tiles:
        masked = [replace(k, windowed=True).expression for k in kernels]
        cut = _key_loops(masked, arch, cut_tiles)
    else:
        cut = [None] * len(expressions)
    results = []
    for expression, (opcodes, inner_loops), cut_loop in zip(expressions, loops, cut, strict=True):
        total, mma = sum(opcodes.values()), opcodes["HMMA"]
        used = resources[expression]
        if cut_loop is not None:
            cut_total = sum(cut_loop[0].values())
            figures = dict(cut_instructions=cut_total, cut_per_mma=round(cut_total / mma, 2))
        else:
            figures = {}
        results.append(
            dict(
                registers=used.registers,
                spilled=used.spill_store_bytes + used.spill_load_bytes,
                instructions=total,
                mma=mma,
                per_mma=round(total / mma, 2) if mma else None,
                barriers=opcodes["BAR"],
                inner_loops=inner_loops,
                opcodes=dict(opcodes.most_common()),
                **figures,
            )
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="cuattn bench key_loop", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", default="sm_90", help="e.g. sm_80, sm_90 (default)")
    parser.add_argument(
        "--kernels", type=Path, help="CUDA sources to read (default: this checkout's)"
    )
    parser.add_argument("--out", help="directory for the results (default bench/results)")
    args = parser.parse_args(argv)
    from cuattn.kernels import ForwardKernel, kernel_dir

    kernels = (args.kernels or kernel_dir()).resolve()
    cases = [
        (head_dim, tile, ForwardKernel("bfloat16", head_dim, False, False, False, None, True))
        if tile == "decode"
        else (head_dim, tile, ForwardKernel("bfloat16", head_dim, False, False, False, tile))
        for head_dim, tile in CASES
    ]
    with tempfile.TemporaryDirectory() as scratch:
        full_tiles = full_tile_sources(kernels, Path(scratch))
        cut_tiles = full_tile_sources(kernels, Path(scratch), cut=True)
        measured = measure(
            [kernel for _, _, kernel in cases], args.arch, kernels, full_tiles, cut_tiles
        )
    rows = []
    for (head_dim, tile, kernel), figures in zip(cases, measured, strict=True):
        label = " (table)" if tile is None else " (decode)" if tile == "decode" else ""
        rows.append(dict(head_dim=head_dim, tile=str(kernel.tile) + label, **figures))
        rows[-1]["top"] = ", ".join(f"{op} {n}" for op, n in list(figures["opcodes"].items())[:8])
    text = table(
        rows,
        [
            ("head_dim", "D"),
            ("tile", "block_m x block_n x warps, K/V stages"),
            ("registers", "registers"),
            ("spilled", "spill bytes"),
            ("mma", "mma per warp"),
            ("instructions", "instructions per warp"),
            ("per_mma", "per mma"),
            ("cut_per_mma", "per mma, tile cut by a mask"),
            ("barriers", "barriers"),
            ("inner_loops", "inner loops"),
            ("top", "most frequent"),
        ],
    )
    from cuattn import nvrtc

    compiler = ".".join(map(str, nvrtc.version()))  # the machine code differs between releases
    sources = str(args.kernels) if args.kernels else "this checkout"
    title = (
        "Forward kernel key loop: bfloat16, one full tile (and one a mask cuts), "
        f"compiled by NVRTC {compiler} but not run"
    )
    if args.kernels:
        title += f", kernels from {args.kernels}"
    publish(
        "key-loop",
        title,
        text,
        dict(arch=args.arch, nvrtc=compiler, kernels=sources, rows=rows),
        args.out,
        args.arch,
        None,
        False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
