"""Prefill on the GPU: cuattn's forward kernel against PyTorch SDPA (each backend) and a
naive CuPy attention (matmul, mask, softmax, matmul as separate kernels), in one run.

16k tokens per batch (B * S = 16384), S from 512 to 16k, head dims 64 and 128 with
2048 / D heads, float16 and bfloat16, causal and not. FLOPs are 4 * B * H * S * S * D,
halved for causal (FlashAttention's convention). Issue 4's target: at least 1.0x the flash
backend of SDPA (FlashAttention-2) on every row.

With ``--tiles-from`` a tile sweep's results (``bench tiles``), cuattn is timed a second
time per head dim, as "cuattn <tile>", with the tile that ran that head dim's prefill cases
fastest in the sweep, where that is not the table's: one run then shows the table, the
candidate to replace it and the peers side by side. The unfused peers (SDPA math, naive
CuPy) are timed up to S=4096: beyond it they take most of the run and tell nothing new.

    python -m cuattn bench prefill [--quick] [--tiles-from SWEEP.json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .report import progress, publish, table, until_terminated
from .tiles import tuned_plan
from .timing import attention_flops

TOKENS = 16384
MODEL_DIM = 2048
UNFUSED = ("SDPA math", "naive CuPy")
UNFUSED_MAX_SEQLEN = 4096


def _sdpa(torch, backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return out.transpose(1, 2)

    return run


def _naive_cupy(q, k, v, causal):
    """What attention looked like before fused kernels: each step its own pass over HBM."""
    import cupy

    q, k, v = (cupy.from_dlpack(x.transpose(1, 2).contiguous()) for x in (q, k, v))
    scores = cupy.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        s = scores.shape[-1]
        scores = cupy.where(cupy.tril(cupy.ones((s, s), bool)), scores, -cupy.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = cupy.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return cupy.matmul(weights, v).transpose(0, 2, 1, 3)


def _cuattn_with_tile(tile):
    """cuattn.attention with the forward kernel's tile chosen by hand, for this call only."""
    import cuattn

    def run(q, k, v, causal):
        with tuned_plan(tile=tile):
            return cuattn.attention(q, k, v, causal=causal)

    return run


def peers(torch, candidate_tile=None):
    """The peers of one row, cuattn first (the others' speed-up is against it); with
    ``candidate_tile``, cuattn once more with that tile."""
    import cuattn

    found = {"cuattn": lambda q, k, v, causal: cuattn.attention(q, k, v, causal=causal)}
    if candidate_tile is not None:
        found[f"cuattn {candidate_tile}"] = _cuattn_with_tile(candidate_tile)
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        found[f"SDPA {name.split('_')[0].lower()}"] = _sdpa(torch, name)
    found["naive CuPy"] = _naive_cupy
    return found


def candidate_tiles(sweep_path, arch: str | None = None) -> dict:
    """Per head dim, the sweep's fastest prefill tile (a cuattn.kernels.Tile) where it is not
    the table's (as the sweep ran it, "default", or as the table stands now for ``arch``)."""
    from cuattn.kernels import Tile, prefill_tile

    from .tiles import fastest_prefill_tiles

    rows = json.loads(Path(sweep_path).read_text())["rows"]
    candidates = {}
    for head_dim, tile in fastest_prefill_tiles(rows).items():
        if tile == "default":
            continue
        tile = Tile.parse(tile)
        if tile != prefill_tile(head_dim, arch):
            candidates[head_dim] = tile
    return candidates


def _time_case(torch, case: dict, flops: float, found: dict, inputs, runs: int) -> list[dict]:
    """One row per peer of ``found`` that runs ``case``: its time, its rate and its largest
    difference from the first peer's output (cuattn's)."""
    from .timing_cuda import time_cuda

    causal = case["causal"]
    reference = None
    rows, times = [], {}
    for name, peer in found.items():
        try:
            out = peer(*inputs[0], causal)
            out = out if isinstance(out, torch.Tensor) else torch.from_dlpack(out)
            if reference is None:
                reference = out.float()
            error = float((out.float() - reference).abs().max())
            timing = time_cuda(lambda i, p=peer, x=inputs: p(*x[i % 2], causal), runs=runs)
        except Exception as failure:  # a peer without a kernel for this case, or OOM
            print(
                f"  {name} skipped at S={case['seqlen']} D={case['head_dim']}: "
                f"{type(failure).__name__}: {str(failure).splitlines()[0][:120]}"
            )
            torch.cuda.empty_cache()
            continue
        times[name] = timing.median
        rows.append(
            dict(
                **case,
                peer=name,
                ms=round(timing.median * 1e3, 3),
                tflops=round(flops / timing.median / 1e12, 1),
                max_abs_diff=f"{error:.1e}",
                timing=timing.as_dict(),
            )
        )
    for row in rows:
        row["cuattn_speedup"] = (
            round(times[row["peer"]] / times["cuattn"], 2) if "cuattn" in times else None
        )
    print(
        f"  {case['dtype']} D={case['head_dim']} S={case['seqlen']} causal={causal}: "
        + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items()),
        flush=True,
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="cuattn bench prefill", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and runs")
    parser.add_argument(
        "--tiles-from", help="a tile sweep's JSON: also time its fastest tile per head dim"
    )
    parser.add_argument("--out", help="directory for the results (default bench/results)")
    args = parser.parse_args(argv)
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    candidates = candidate_tiles(args.tiles_from, arch) if args.tiles_from else {}
    for head_dim, tile in candidates.items():
        print(f"  the sweep's fastest tile at D={head_dim}: {tile}")

    from .timing_cuda import device_description

    seqlens = (1024, 4096) if args.quick else (512, 1024, 2048, 4096, 8192, 16384)
    head_dims = (128,) if args.quick else (64, 128)
    dtypes = (torch.bfloat16,) if args.quick else (torch.float16, torch.bfloat16)
    runs = 5 if args.quick else 20
    rows = []
    with until_terminated() as cut:
        for dtype in dtypes:
            for head_dim in head_dims:
                heads = MODEL_DIM // head_dim
                for seqlen in progress(seqlens, f"{dtype} D={head_dim}"):
                    batch = TOKENS // seqlen
                    inputs = [
                        [
                            torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
                            for _ in range(3)
                        ]
                        for _ in range(2)
                    ]
                    for causal in (False, True):
                        case = dict(
                            dtype=str(dtype).split(".")[-1],
                            head_dim=head_dim,
                            seqlen=seqlen,
                            batch=batch,
                            causal=causal,
                        )
                        flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal)
                        found = peers(torch, candidates.get(head_dim))
                        if seqlen > UNFUSED_MAX_SEQLEN:
                            found = {n: p for n, p in found.items() if n not in UNFUSED}
                        rows += _time_case(torch, case, flops, found, inputs, runs)
                    del inputs
    name, driver = device_description()
    columns = [
        ("dtype", "dtype"),
        ("head_dim", "D"),
        ("seqlen", "S"),
        ("causal", "causal"),
        ("peer", "peer"),
        ("ms", "ms"),
        ("tflops", "TFLOP/s"),
        ("cuattn_speedup", "cuattn speed-up"),
        ("max_abs_diff", "max |diff| vs cuattn"),
    ]
    title = "Prefill" + cut.note
    publish("prefill", title, table(rows, columns), dict(rows=rows), args.out, name, driver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
