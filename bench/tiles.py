"""Tile shapes and split targets of the forward kernel, timed on this GPU: the measurements
behind the tile table and the split target in cuattn/kernels.py.

Every candidate tile (block_m x block_n x warps, and K/V stages) is compiled ahead (in
parallel), checked once against PyTorch SDPA, then timed on prefill shapes (16k tokens,
bfloat16, D 64 and 128, causal and not) and on decode shapes (one query token over a 32k
cache, 32 query heads, GQA-8 and multi-head; multi-query over 128k) with several split
targets (blocks per multiprocessor). SDPA's own time is printed beside each case as the yardstick.

    python -m cuattn bench tiles [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys

from cuattn.kernels import Tile

from .report import publish, table, until_terminated
from .timing import attention_flops

# None: what cuattn/kernels.py chooses (its tile table, its split target). Two kinds of
# candidate. Tiles that give each warp 32 query rows, two m16 tiles sharing every K and V
# fragment read from shared memory, as FlashAttention-2 does (the table's give each warp 16;
# sweep 51487b8 timed 128x32x4 before the kernel's loops shared those fragments:
# bench/NOTES.md); at head dim 128 some of their variants spill, more for sm_80 than for sm_90
# (resources-sm_*-2026-11-27 in bench/results). And tiles with a ring of K/V stages
# ("s2": two), which copy a whole tile ahead with one barrier a tile instead of four.
PREFILL_TILES = {
    64: (
        None,
        Tile(64, 32, 4, 2),
        Tile(128, 32, 4),
        Tile(128, 64, 4),
        Tile(128, 32, 4, 2),
        Tile(128, 64, 4, 2),
    ),
    128: (
        None,
        Tile(128, 64, 8, 2),
        Tile(128, 32, 4),
        Tile(128, 64, 4),
        Tile(128, 32, 4, 2),
        Tile(128, 64, 4, 2),
    ),
}
# The decoding tile (32 rows over 2 warps) won the sweeps of 51487b8 and cabfe46; open are
# how many splits pay and whether copying ahead keeps more of the cache in flight.
DECODE_TILES = (None, Tile(32, 64, 2, 2), Tile(32, 64, 2, 3))
SPLIT_TARGETS = (None, 2, 8, 16)
TOKENS, MODEL_DIM = 16384, 2048
HEADS_Q, DECODE_DIM = 32, 128


def _prefill_cases(torch, quick):
    for head_dim in (64, 128):
        for seqlen in (4096,) if quick else (1024, 4096):
            for causal in (False, True):
                yield dict(
                    kind="prefill",
                    batch=TOKENS // seqlen,
                    seqlen=seqlen,
                    heads_q=MODEL_DIM // head_dim,
                    heads_kv=MODEL_DIM // head_dim,
                    head_dim=head_dim,
                    causal=causal,
                )


def _decode_cases(torch, quick):
    # Multi-query over one long cache: one block before splitting, the split cap decides.
    shapes = [(1, 8, 32768), (1, 32, 32768), (8, 8, 32768), (8, 32, 32768), (1, 1, 131072)]
    for batch, heads_kv, seqlen in shapes:
        yield dict(
            kind="decode",
            batch=batch,
            seqlen=seqlen,
            heads_q=HEADS_Q,
            heads_kv=heads_kv,
            head_dim=DECODE_DIM,
            causal=False,
        )


@contextlib.contextmanager
def tuned_plan(**tuning):
    """cuattn's CUDA backend plans with ``tuning`` (plan_forward's tile and
    blocks_per_multiprocessor) inside the block, and as its table says again after it."""
    from cuattn import kernels
    from cuattn.backends import cuda

    original = cuda.plan_forward
    cuda.plan_forward = functools.partial(kernels.plan_forward, **tuning)
    try:
        yield
    finally:
        cuda.plan_forward = original


# Rows of sweeps before 3c2ad1a name their kind and head dim only in the case's text.
def _case_kind(row: dict) -> str:
    return row.get("kind") or row["case"].split()[0]


def _case_head_dim(row: dict) -> int:
    return row.get("head_dim") or int(re.search(r"\bD=(\d+)", row["case"]).group(1))


def fastest_prefill_tiles(rows: list[dict]) -> dict[int, str]:
    """Per head dim, the tile that ran a sweep's prefill cases fastest: the highest geometric
    mean, over that head dim's cases, of its speed against the table's tile ("default", which
    is the answer where nothing beat it). ``rows`` as this benchmark writes them."""
    import math

    prefill = [row for row in rows if _case_kind(row) == "prefill"]
    default_us = {row["case"]: row["us"] for row in prefill if row["tile"] == "default"}
    speeds: dict[int, dict[str, list[float]]] = {}
    for row in prefill:
        if row["case"] not in default_us:
            continue
        by_tile = speeds.setdefault(_case_head_dim(row), {})
        by_tile.setdefault(row["tile"], []).append(default_us[row["case"]] / row["us"])
    fastest = {}
    for head_dim, by_tile in speeds.items():
        cases = max(len(ratios) for ratios in by_tile.values())
        complete = {tile: r for tile, r in by_tile.items() if len(r) == cases}
        fastest[head_dim] = max(
            complete, key=lambda tile: math.fsum(math.log(x) for x in complete[tile])
        )
    return fastest


def _inputs(torch, case):
    """Two input sets (rotated between runs); decode cases as (q, cache, cache, length)."""
    query_len = 1 if case["kind"] == "decode" else case["seqlen"]
    shape_q = (case["batch"], query_len, case["heads_q"], case["head_dim"])
    shape_kv = (case["batch"], case["seqlen"], case["heads_kv"], case["head_dim"])
    sets = []
    for _ in range(2):
        q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16)
        sets.append((q, k, v))
    return sets


def _cuattn(case):
    import cuattn

    if case["kind"] == "decode":
        return lambda q, k, v: cuattn.attention_with_kvcache(q, k, v, cache_seqlens=k.shape[1])
    return lambda q, k, v: cuattn.attention(q, k, v, causal=case["causal"])


def _sdpa(torch, case):
    def run(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=case["causal"],
            enable_gqa=case["heads_q"] != case["heads_kv"],
        ).transpose(1, 2)

    return run


def _kernel_for(case, tile):
    from cuattn.kernels import ForwardKernel

    packed = case["kind"] == "decode" and case["heads_q"] != case["heads_kv"]
    return ForwardKernel("bfloat16", case["head_dim"], case["causal"], False, packed, tile)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cuattn bench tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and runs")
    parser.add_argument("--out", help="directory for the results (default bench/results)")
    args = parser.parse_args(argv)
    import cupy
    import torch

    from cuattn.backends import cuda

    from .timing_cuda import device_description, time_cuda

    runs = 5 if args.quick else 15
    cases = [*_prefill_cases(torch, args.quick), *_decode_cases(torch, args.quick)]
    candidates = []
    for case in cases:
        tiles = PREFILL_TILES[case["head_dim"]] if case["kind"] == "prefill" else DECODE_TILES
        targets = (None,) if case["kind"] == "prefill" else SPLIT_TARGETS
        candidates += [(case, tile, target) for tile in tiles for target in targets]
    arch = f"sm_{cupy.cuda.Device().compute_capability}"
    unique = list({_kernel_for(c, t): None for c, t, _ in candidates if t is not None})
    cuda.precompile(arch, unique, jobs=os.cpu_count())
    rows = []
    with until_terminated() as cut:
        for case in cases:
            sets = _inputs(torch, case)
            sdpa = _sdpa(torch, case)
            reference = sdpa(*sets[0]).float()
            sdpa_time = time_cuda(lambda i, s=sets, f=sdpa: f(*s[i % 2]), runs=runs).median
            ours = _cuattn(case)
            for c, tile, target in candidates:
                if c is not case:
                    continue
                with tuned_plan(tile=tile, blocks_per_multiprocessor=target):
                    error = float(
                        (torch.from_dlpack(ours(*sets[0])).float() - reference).abs().max()
                    )
                    timing = time_cuda(lambda i, s=sets, f=ours: f(*s[i % 2]), runs=runs)
                if case["kind"] == "prefill":
                    flops = attention_flops(
                        case["batch"],
                        case["heads_q"],
                        case["seqlen"],
                        case["seqlen"],
                        case["head_dim"],
                        case["causal"],
                    )
                    rate = f"{flops / timing.median / 1e12:.0f} TFLOP/s"
                else:
                    moved = 2 * 2 * case["batch"] * case["seqlen"] * case["heads_kv"] * DECODE_DIM
                    rate = f"{moved / timing.median / 1e9:.0f} GB/s"
                rows.append(
                    dict(
                        kind=case["kind"],
                        head_dim=case["head_dim"],
                        case=f"{case['kind']} B={case['batch']} S={case['seqlen']} "
                        f"Hkv={case['heads_kv']} D={case['head_dim']}"
                        + (" causal" if case["causal"] else ""),
                        tile=str(tile) if tile else "default",
                        split_target=target or "default",
                        us=round(timing.median * 1e6, 1),
                        rate=rate,
                        vs_sdpa=round(sdpa_time / timing.median, 2),
                        max_abs_diff=f"{error:.1e}",
                        timing=timing.as_dict(),
                    )
                )
                print(
                    f"  {rows[-1]['case']} tile {rows[-1]['tile']} target {target}: "
                    f"{rows[-1]['us']} us, {rate}, {rows[-1]['vs_sdpa']}x SDPA, "
                    f"diff {error:.1e}",
                    flush=True,
                )
            del sets
            torch.cuda.empty_cache()
    name, driver = device_description()
    text = table(
        rows,
        [
            ("case", "case"),
            ("tile", "block_m x block_n x warps, K/V stages"),
            ("split_target", "blocks per SM"),
            ("us", "us"),
            ("rate", "rate"),
            ("vs_sdpa", "vs SDPA"),
            ("max_abs_diff", "max |diff| vs SDPA"),
        ],
    )
    title = "Forward kernel tiles" + cut.note
    publish("tiles", title, text, dict(rows=rows), args.out, name, driver, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
