"""GPU memory as the sequence grows: cuattn against the naive path that materialises the
S x S score matrix (the seed's "avoid unnecessary HBM writes", as a figure).

Peak memory allocated during one causal call beyond its inputs, B=1, 16 heads of 128,
float16, S doubling from 1k until the naive path runs out of memory.

    python -m cuattn bench memory [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys

from .report import publish, table, until_terminated

HEADS, HEAD_DIM = 16, 128


def naive(torch, q, k, v):
    """softmax(QK^T)V with every intermediate in memory, as before fused kernels."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = scores.shape[-1]
    scores = scores.masked_fill(
        torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf")
    )
    return (torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v).transpose(1, 2)


def peak_extra(torch, function, *inputs) -> int | None:
    """Peak bytes allocated by the call beyond what was allocated before it; None on OOM."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        out = function(*inputs)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="cuattn bench memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="up to 16k tokens")
    parser.add_argument("--out", help="directory for the results (default bench/results)")
    args = parser.parse_args(argv)
    import torch

    import cuattn

    from .timing_cuda import device_description

    rows = []
    with until_terminated() as cut:
        naive_alive = True
        for power in range(10, 15 if args.quick else 18):
            seqlen = 2**power
            q, k, v = (
                torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
                for _ in range(3)
            )
            output_bytes = q.numel() * 2
            ours = peak_extra(
                torch, lambda a, b, c: cuattn.attention(a, b, c, causal=True), q, k, v
            )
            theirs = (
                peak_extra(torch, lambda a, b, c: naive(torch, a, b, c), q, k, v)
                if naive_alive
                else None
            )
            naive_alive = theirs is not None
            rows.append(
                dict(
                    seqlen=seqlen,
                    output_mib=round(output_bytes / 2**20, 1),
                    cuattn_mib=round(ours / 2**20, 1) if ours is not None else "OOM",
                    naive_mib=round(theirs / 2**20, 1) if theirs is not None else "OOM",
                )
            )
            print(
                f"  S={seqlen}: cuattn {rows[-1]['cuattn_mib']} MiB, "
                f"naive {rows[-1]['naive_mib']} MiB",
                flush=True,
            )
            del q, k, v
            torch.cuda.empty_cache()
    name, driver = device_description()
    text = table(
        rows,
        [
            ("seqlen", "S"),
            ("output_mib", "output MiB"),
            ("cuattn_mib", "cuattn peak MiB"),
            ("naive_mib", "naive peak MiB"),
        ],
    )
    publish("memory", "Peak memory" + cut.note, text, dict(rows=rows), args.out, name, driver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
