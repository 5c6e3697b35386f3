"""bench/key_loop.py reads the forward kernel's key loop out of the SASS. The loop finder
is checked on a listing written here; the kernels themselves (NVRTC and nvdisasm, no GPU)
must keep a key loop that is straight code with the tile's mma count and its barriers, and
must not drift back to the instruction counts they had before their loads and addresses were
rewritten (bench/NOTES.md, item 9), before the rescale of the output became conditional
(item 12), before whole tiles were copied without per-copy tests (item 13), before the
score scale moved into the softmax's exponent (item 15), or, on tiles a mask cuts, before
the mask became a select per score (item 17)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench import key_loop
from cuattn import nvrtc
from cuattn.kernels import ForwardKernel, kernel_dir

LISTING = """
	.section	.text._Z1fv,"ax",@progbits
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
.L_x_1:
        /*0020*/              @!P0 IADD3 R1, R1, 0x1, RZ ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/                   BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
	.section	.text._Z1gv,"ax",@progbits
        /*0000*/                   EXIT ;
"""


def test_the_longest_loop_is_found_and_counted():
    functions = key_loop.functions(LISTING)
    assert set(functions) == {"_Z1fv", "_Z1gv"}
    opcodes, inner = key_loop.loop_opcodes(functions["_Z1fv"])
    assert opcodes == {"HMMA": 2, "IADD3": 1, "BRA": 2}
    assert inner == 1
    with pytest.raises(ValueError, match="no loop"):
        key_loop.loop_opcodes(functions["_Z1gv"])


# (head dim, the most instructions per mma its table tile may take, with one K/V stage or
# two). The loops ran about 23 and 8.5 (counting each load loop once) before item 9 of
# bench/NOTES.md, 9.4 and 4.7 after it, 8.5 and 4.2 after item 12 (the output rescaled only
# when a row's maximum moves), 7.4 and 3.8 after item 13 (whole tiles copied without
# tests), and 7.0 and 3.6 since item 15 (the score scale applied in the exponent's
# multiply-add), with one stage or two. On a tile a causal mask cuts, 18.4 and 9.4 before item
# 17 (a branch per score), 10.7 and 5.2 after it (a select per score).
BOUNDS = ((64, 7.2), (128, 3.7))
CUT_BOUNDS = ((64, 11.5), (128, 5.6))


def test_the_key_loop_is_straight_code_within_its_instruction_budget(tmp_path):
    try:
        nvrtc.library()
        key_loop.nvdisasm()
    except (nvrtc.NvrtcError, FileNotFoundError) as error:
        pytest.skip(str(error))
    # Each table tile, and the same tile with a ring of two K/V stages.
    table = [ForwardKernel("bfloat16", head_dim, False, False) for head_dim, _ in BOUNDS]
    kernels = table + [replace(k, tile_override=k.tile._replace(kv_stages=2)) for k in table]
    full_tiles = key_loop.full_tile_sources(kernel_dir(), tmp_path)
    cut_tiles = key_loop.full_tile_sources(kernel_dir(), tmp_path, cut=True)
    measured = key_loop.measure(kernels, "sm_90", kernel_dir(), full_tiles, cut_tiles)
    bounds = zip(BOUNDS + BOUNDS, CUT_BOUNDS + CUT_BOUNDS, strict=True)
    for kernel, ((_, bound), (_, cut_bound)), figures in zip(
        kernels, bounds, measured, strict=True
    ):
        block_m, block_n, warps, kv_stages = kernel.tile
        row_tiles = block_m // warps // 16
        # Q K^T: row tiles x (block_n / 8) x (D / 16); P V: row tiles x (D / 8) x (block_n / 16).
        assert figures["mma"] == 2 * row_tiles * block_n * kernel.head_dim // 128, kernel.name
        assert figures["inner_loops"] == 0, f"{kernel.name}: the key loop holds a loop"
        assert not {"LDL", "STL"} & set(figures["opcodes"]), (
            f"{kernel.name}: spills in the key loop"
        )
        assert figures["per_mma"] <= bound, (
            f"{kernel.name}: {figures['per_mma']} instructions per mma"
        )
        assert figures["cut_per_mma"] <= cut_bound, (
            f"{kernel.name}: {figures['cut_per_mma']} instructions per mma on a cut tile"
        )
        # One stage: before Q K^T, after it, before P V, after it. A ring: before Q K^T only.
        assert figures["barriers"] == (4 if kv_stages == 1 else 1), kernel.name
