"""The CPU backend against the CPU peers: PyTorch's SDPA and a naive NumPy attention.

Throughput at float32, B=1, H=8, D=64, S=4096, causal and not (issue 2's target: at least
0.5x SDPA, aiming at 1.0x), the peak memory beyond inputs and output at S=16384 (target:
within 64 MiB), and decoding (one query row per sequence over a cache) with MHA, GQA and MQA,
each peer measured in the same run. Prints tables, writes JSON.

    python -m cuattn bench cpu [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np

from .report import publish, table
from .timing import attention_flops, time_host

BATCH, HEADS, HEAD_DIM = 1, 8, 64
MIB = 2**20
# Decoding: one new token per sequence, float32, over a cache of DECODE_CACHE positions.
DECODE_BATCH, DECODE_CACHE, DECODE_HEADS_Q, DECODE_HEAD_DIM = 4, 8192, 32, 128
# About the largest L3 of a socket: an input set at least this large evicts itself.
LARGEST_CPU_CACHE = 2**30


def naive_numpy(q, k, v, causal):
    """softmax(Q K^T / sqrt(D)) V one head at a time, the full score matrix materialised."""
    out = np.empty_like(q)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    hidden = (
        np.triu(np.ones((seqlen_q, seqlen_k), bool), 1 + seqlen_k - seqlen_q) if causal else None
    )
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            scores = (q[b, :, h] @ k[b, :, h].T) * scale
            if causal:
                scores[hidden] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=1, keepdims=True)
            out[b, :, h] = scores @ v[b, :, h]
    return out


def _peers():
    """name -> function(q, k, v, causal) on float32 (B, S, H, D) NumPy arrays, or a reason."""
    import cuattn

    peers = {
        "cuattn (numba)": lambda q, k, v, c: cuattn.attention(q, k, v, causal=c, backend="cpu")
    }
    try:
        import torch

        def sdpa(q, k, v, causal):
            t = [torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=causal)
            return out.transpose(1, 2).numpy()

        peers["torch SDPA"] = sdpa
    except ImportError:
        peers["torch SDPA"] = "skipped: torch is not installed"
    peers["naive NumPy"] = naive_numpy
    return peers


def throughput(seqlen: int, runs: int) -> list[dict]:
    rng = np.random.default_rng(0)
    # Two input sets, alternated, so that no run reuses the previous run's cache lines.
    inputs = [
        [rng.standard_normal((BATCH, seqlen, HEADS, HEAD_DIM), dtype=np.float32) for _ in range(3)]
        for _ in range(2)
    ]
    rows = []
    for causal in (False, True):
        reference = None
        flops = attention_flops(BATCH, HEADS, seqlen, seqlen, HEAD_DIM, causal)
        results = {}
        for name, peer in _peers().items():
            if isinstance(peer, str):
                print(f"  {name}: {peer}")
                continue
            out = peer(*inputs[0], causal)
            if reference is None:
                reference = out
            error = float(np.max(np.abs(out - reference)))
            timing = time_host(lambda i, p=peer, c=causal: p(*inputs[i % 2], c), runs=runs)
            results[name] = timing
            rows.append(
                dict(
                    peer=name,
                    seqlen=seqlen,
                    causal=causal,
                    ms=round(timing.median * 1e3, 1),
                    spread_ms=f"{timing.q1 * 1e3:.1f}-{timing.q3 * 1e3:.1f}",
                    gflops=round(flops / timing.median / 1e9, 1),
                    max_abs_diff_vs_first=f"{error:.1e}",
                    timing=timing.as_dict(),
                )
            )
        ours = results.get("cuattn (numba)")
        for row in rows[-len(results) :]:
            if ours is not None:
                row["cuattn_speedup"] = round(results[row["peer"]].median / ours.median, 2)
    return rows


def _decode_peers():
    """name -> function(q, k, v) on float32 (B, S, H, D) NumPy arrays, or a reason."""
    import cuattn

    peers = {"cuattn (numba)": lambda q, k, v: cuattn.attention(q, k, v, backend="cpu")}
    try:
        import torch

        def sdpa(q, k, v):
            # The same arrays, seen as SDPA's (B, H, S, D): strided views, as a caller
            # holding a (B, S, H, D) cache passes them.
            t = [torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*t, enable_gqa=True)
            return out.transpose(1, 2).numpy()

        peers["torch SDPA"] = sdpa
    except ImportError:
        peers["torch SDPA"] = "skipped: torch is not installed"
    return peers


def decoding(runs: int) -> list[dict]:
    """Decode time and the rate K and V are read at, for MHA, GQA-8 and MQA."""
    rng = np.random.default_rng(1)
    rows = []
    for heads_kv in (DECODE_HEADS_Q, 8, 1):
        # Two input sets, alternated as in throughput() so that no run finds the cache in the
        # CPU's caches, when one set could fit in them; a larger set evicts itself.
        cache_bytes = 2 * DECODE_BATCH * DECODE_CACHE * heads_kv * DECODE_HEAD_DIM * 4
        sets = 2 if cache_bytes < LARGEST_CPU_CACHE else 1
        inputs = [
            [
                rng.standard_normal(
                    (DECODE_BATCH, length, heads, DECODE_HEAD_DIM), dtype=np.float32
                )
                for length, heads in (
                    (1, DECODE_HEADS_Q),
                    (DECODE_CACHE, heads_kv),
                    (DECODE_CACHE, heads_kv),
                )
            ]
            for _ in range(sets)
        ]
        reference, results = None, {}
        for name, peer in _decode_peers().items():
            if isinstance(peer, str):
                print(f"  {name}: {peer}")
                continue
            out = peer(*inputs[0])
            if reference is None:
                reference = out
            timing = time_host(lambda i, p=peer, x=inputs: p(*x[i % len(x)]), runs=runs)
            results[name] = timing
            rows.append(
                dict(
                    peer=name,
                    heads_kv=heads_kv,
                    ms=round(timing.median * 1e3, 1),
                    spread_ms=f"{timing.q1 * 1e3:.1f}-{timing.q3 * 1e3:.1f}",
                    gb_s=round(cache_bytes / timing.median / 1e9, 1),
                    max_abs_diff_vs_first=f"{np.max(np.abs(out - reference)):.1e}",
                    timing=timing.as_dict(),
                )
            )
        ours = results.get("cuattn (numba)")
        for row in rows[-len(results) :]:
            if ours is not None:
                row["cuattn_speedup"] = round(results[row["peer"]].median / ours.median, 2)
    return rows


def _peak_extra_child(seqlen: int, which: str) -> None:
    """Run once in a fresh process; print the peak resident memory beyond inputs + output."""
    import cuattn

    rng = np.random.default_rng(0)
    small = [rng.standard_normal((1, 64, HEADS, HEAD_DIM), dtype=np.float32) for _ in range(3)]
    function = _peers()[which]
    function(*small, True)  # compile / load everything first: code is not working memory
    q, k, v = (
        rng.standard_normal((BATCH, seqlen, HEADS, HEAD_DIM), dtype=np.float32) for _ in range(3)
    )
    del cuattn

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    before = status("VmRSS:")
    out = function(q, k, v, True)
    peak = status("VmHWM:")
    print(peak - before - out.nbytes)


def peak_extra_memory(seqlen: int, which: str) -> int:
    """Bytes of peak memory beyond inputs and output, measured in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--memory-child", str(seqlen), which],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cuattn bench cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (CI smoke)")
    parser.add_argument("--out", help="directory for the JSON (default bench/results)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _peak_extra_child(int(args.memory_child[0]), args.memory_child[1])
        return 0

    runs = 3 if args.quick else 7
    print(f"throughput: float32, B={BATCH}, H={HEADS}, D={HEAD_DIM}, S=4096")
    speed = throughput(4096, runs)
    speed_table = table(
        speed,
        [
            ("peer", "implementation"),
            ("causal", "causal"),
            ("ms", "ms (median)"),
            ("spread_ms", "IQR ms"),
            ("gflops", "GFLOP/s"),
            ("cuattn_speedup", "cuattn speed-up"),
            ("max_abs_diff_vs_first", "max |diff| vs cuattn"),
        ],
    )
    memory = []
    for seqlen, which in (
        (4096, "cuattn (numba)"),
        (16384, "cuattn (numba)"),
        (4096, "naive NumPy"),
    ):
        extra = peak_extra_memory(seqlen, which)
        memory.append(
            dict(
                peer=which,
                seqlen=seqlen,
                extra_mib=round(extra / MIB, 1),
                inputs_and_output_mib=round(4 * BATCH * seqlen * HEADS * HEAD_DIM * 4 / MIB),
            )
        )
    print(
        f"decoding: float32, B={DECODE_BATCH}, 1 query row over {DECODE_CACHE} cached, "
        f"Hq={DECODE_HEADS_Q}, D={DECODE_HEAD_DIM}"
    )
    decode = decoding(runs)
    decode_table = table(
        decode,
        [
            ("peer", "implementation"),
            ("heads_kv", "KV heads"),
            ("ms", "ms (median)"),
            ("spread_ms", "IQR ms"),
            ("gb_s", "K+V GB/s"),
            ("cuattn_speedup", "cuattn speed-up"),
            ("max_abs_diff_vs_first", "max |diff| vs cuattn"),
        ],
    )
    memory_table = table(
        memory,
        [
            ("peer", "implementation"),
            ("seqlen", "S"),
            ("inputs_and_output_mib", "inputs+output MiB"),
            ("extra_mib", "extra MiB"),
        ],
    )
    publish(
        "cpu",
        "CPU backend",
        f"{speed_table}\n\nPeak memory beyond inputs and output, causal, float32:\n\n"
        + memory_table
        + f"\n\nDecoding, float32, B={DECODE_BATCH}, one query row over {DECODE_CACHE} cached "
        + f"positions, Hq={DECODE_HEADS_Q}, D={DECODE_HEAD_DIM}; K+V GB/s: bytes of the cache "
        + "read, over the median time:\n\n"
        + decode_table,
        dict(throughput=speed, memory=memory, decoding=decode),
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
