"""Decoding on the GPU: one new token attending to a KV cache, bound by reading K and V.

B in {1, 8, 64}, cache length in {4k, 32k, 128k}, 32 query heads, 32 / 8 / 1 KV heads
(multi-head, GQA-8, multi-query), head dim 128, bfloat16. Reported: achieved bandwidth
(bytes of K and V read, plus q and the output) over the device-to-device copy bandwidth
measured in the same run (issue 5's target: at least 80% on every row with B * len >= 32k),
the ratio to PyTorch SDPA on the same cache (target 1.5x), and the seed's GQA table: decode
time of MHA, GQA-8 and MQA for the same query heads, and each one's speed-up over MHA.
Also the host time per call of cuattn and SDPA (launches back to back, no waiting): a
call whose host time exceeds its GPU time is bound by the host; the time of a whole
decoding step, this token's key and value appended to the cache in place, then attention
over it; and the call captured in a CUDA graph (device lengths, check_lengths=False:
docs/graphs.md), its GPU time and the host time of a replay.

    python -m cuattn bench decode [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from .report import progress, publish, table, until_terminated

HEADS_Q, HEAD_DIM = 32, 128
# Caches larger than this share of the GPU's memory are skipped (with a note).
MEMORY_SHARE = 0.6
HOST_RUNS = 100  # calls timed back to back for the host-time columns


def copy_bandwidth(torch) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB."""
    from .timing_cuda import time_cuda

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    timing = time_cuda(lambda i: target.copy_(source), runs=10)
    return 2 * source.numel() / timing.median


def graph_times(function, runs: int) -> tuple[float | None, float | None, str | None]:
    """Microseconds of GPU time and of host time per replay of ``function()`` captured in a
    CUDA graph, and None; where the capture fails, None, None and why (the run goes on)."""
    from .timing_cuda import captured, host_time, time_cuda

    try:
        replay = captured(function).replay
    except Exception as failure:  # the framework's or the driver's own exception types
        reason = f"{type(failure).__name__}: {str(failure).splitlines()[0][:100]}"
        print(f"  capture failed: {reason}")
        return None, None, reason
    gpu = time_cuda(lambda i: replay(), runs=runs).median
    host = host_time(lambda i: replay(), runs=HOST_RUNS).median
    return round(gpu * 1e6, 1), round(host * 1e6, 1), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="cuattn bench decode", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and runs")
    parser.add_argument("--out", help="directory for the results (default bench/results)")
    args = parser.parse_args(argv)
    import torch

    import cuattn

    from .timing_cuda import device_description, host_time, time_cuda

    batches = (1, 8) if args.quick else (1, 8, 64)
    lengths = (4096, 32768) if args.quick else (4096, 32768, 131072)
    kv_heads = (32, 8, 1)
    runs = 5 if args.quick else 20
    _, total = torch.cuda.mem_get_info()
    copy = copy_bandwidth(torch)
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s")
    rows = []
    with until_terminated() as cut:
        for batch in batches:
            for length in progress(lengths, f"B={batch}"):
                for heads_kv in kv_heads:
                    cache_bytes = 2 * batch * length * heads_kv * HEAD_DIM * 2
                    if cache_bytes > MEMORY_SHARE * total:
                        print(
                            f"  B={batch} len={length} Hkv={heads_kv}: a "
                            f"{cache_bytes / 2**30:.0f} GiB cache does not fit; skipped"
                        )
                        continue
                    shape = (batch, length, heads_kv, HEAD_DIM)
                    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                    queries = [
                        torch.randn(
                            batch, 1, HEADS_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16
                        )
                        for _ in range(2)
                    ]
                    moved = cache_bytes + 2 * queries[0].numel() * 2
                    step_kv = [
                        torch.randn(
                            batch, 1, heads_kv, HEAD_DIM, device="cuda", dtype=torch.bfloat16
                        )
                        for _ in range(2)
                    ]

                    def ours(i, q=queries, k=k_cache, v=v_cache, n=length):
                        return cuattn.attention_with_kvcache(q[i % 2], k, v, cache_seqlens=n)

                    def step(i, q=queries, k=k_cache, v=v_cache, new=step_kv, n=length):
                        # The cache holds n - 1 tokens; the step writes the n-th, then attends.
                        return cuattn.attention_with_kvcache(
                            q[i % 2], k, v, new[0], new[1], cache_seqlens=n - 1
                        )

                    def sdpa(i, q=queries, k=k_cache, v=v_cache, g=HEADS_Q // heads_kv):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q[i % 2].transpose(1, 2),
                            k.transpose(1, 2),
                            v.transpose(1, 2),
                            enable_gqa=g > 1,
                        ).transpose(1, 2)

                    error = float((ours(0).float() - sdpa(0).float()).abs().max())
                    timing = time_cuda(ours, runs=runs)
                    try:
                        sdpa_time = time_cuda(sdpa, runs=runs).median
                    except Exception as failure:  # e.g. no GQA support in this PyTorch
                        print(
                            f"  SDPA skipped: {type(failure).__name__}: "
                            f"{str(failure).splitlines()[0][:100]}"
                        )
                        sdpa_time = None
                    step_us = round(time_cuda(step, runs=runs).median * 1e6, 1)
                    # A decoding loop's lengths change from call to call: so do these. More
                    # calls than the GPU timings take: a host's time varies more, and each
                    # call costs a fraction of a millisecond.
                    host_us = round(
                        host_time(
                            lambda i, f=ours, n=length: f(i, n=n - i % 8), runs=HOST_RUNS
                        ).median
                        * 1e6,
                        1,
                    )
                    sdpa_host_us = (
                        round(host_time(sdpa, runs=HOST_RUNS).median * 1e6, 1)
                        if sdpa_time
                        else None
                    )
                    device_lengths = torch.full((batch,), length, dtype=torch.int32).cuda()
                    graph_us, graph_host_us, graph_error = graph_times(
                        lambda q=queries[0], k=k_cache, v=v_cache, n=device_lengths: (
                            cuattn.attention_with_kvcache(
                                q, k, v, None, None, n, check_lengths=False
                            )
                        ),
                        runs,
                    )
                    rows.append(
                        dict(
                            batch=batch,
                            cache_len=length,
                            heads_kv=heads_kv,
                            us=round(timing.median * 1e6, 1),
                            gb_s=round(moved / timing.median / 1e9),
                            of_copy=f"{moved / timing.median / copy:.0%}",
                            vs_sdpa=round(sdpa_time / timing.median, 2) if sdpa_time else None,
                            max_abs_diff=f"{error:.1e}",
                            host_us=host_us,
                            sdpa_host_us=sdpa_host_us,
                            step_us=step_us,
                            graph_us=graph_us,
                            graph_host_us=graph_host_us,
                            graph_error=graph_error,
                            timing=timing.as_dict(),
                        )
                    )
                    print(
                        f"  B={batch} len={length} Hkv={heads_kv}: {timing.median * 1e6:.1f} us, "
                        f"{rows[-1]['gb_s']} GB/s ({rows[-1]['of_copy']} of copy)",
                        flush=True,
                    )
                    del k_cache, v_cache, queries, step_kv
                    torch.cuda.empty_cache()
    # The seed's GQA table: the same query heads, fewer KV heads to read.
    gqa = []
    for row in rows:
        if row["heads_kv"] == HEADS_Q:
            for other in rows:
                if (other["batch"], other["cache_len"]) == (row["batch"], row["cache_len"]):
                    gqa.append(
                        dict(
                            batch=row["batch"],
                            cache_len=row["cache_len"],
                            kind={32: "MHA", 8: "GQA-8", 1: "MQA"}[other["heads_kv"]],
                            us=other["us"],
                            speedup_over_mha=round(row["us"] / other["us"], 2),
                        )
                    )
    name, driver = device_description()
    text = table(
        rows,
        [
            ("batch", "B"),
            ("cache_len", "cache"),
            ("heads_kv", "Hkv"),
            ("us", "us"),
            ("gb_s", "GB/s"),
            ("of_copy", "of copy bandwidth"),
            ("vs_sdpa", "vs SDPA"),
            ("max_abs_diff", "max |diff| vs SDPA"),
            ("host_us", "host us per call"),
            ("sdpa_host_us", "SDPA host us per call"),
            ("step_us", "us with this step's append"),
            ("graph_us", "us in a CUDA graph"),
            ("graph_host_us", "host us per graph replay"),
        ],
    )
    gqa_text = table(
        gqa,
        [
            ("batch", "B"),
            ("cache_len", "cache"),
            ("kind", "attention"),
            ("us", "us"),
            ("speedup_over_mha", "speed-up over MHA"),
        ],
    )
    publish(
        "decode",
        "Decode" + cut.note,
        f"Device-to-device copy: {copy / 1e9:.0f} GB/s.\n\n{text}\n\n## GQA\n\n{gqa_text}",
        dict(copy_bandwidth=copy, rows=rows, gqa=gqa),
        args.out,
        name,
        driver,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
