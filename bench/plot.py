"""Pictures of result files: a PNG beside each JSON, where a picture reads better than a
table. matplotlib is optional (pip install "cuattn[bench]"); without it nothing is drawn."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _lines(axis, series: dict, xlabel: str, ylabel: str, title: str, log_x: bool = True) -> None:
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        axis.plot(xs, ys, marker="o", label=label)
    if log_x:
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def plot(path: Path) -> Path | None:
    """Draw ``path``'s results (a cpu-, prefill-, decode- or memory- JSON) to a PNG beside it."""
    plt = _pyplot()
    if plt is None:
        print("plot skipped: matplotlib is not installed (pip install 'cuattn[bench]')")
        return None
    data = json.loads(Path(path).read_text())
    env = data["environment"]
    kind = Path(path).name.split("-")[0]
    subtitle = f"{env['device'] if env['device'] != 'cpu' else env['cpu']}, {env['date'][:10]}"
    if kind == "cpu":
        figure, axis = plt.subplots(figsize=(6, 3.5))
        rows = data["throughput"]
        peers = sorted({r["peer"] for r in rows})
        for i, causal in enumerate((False, True)):
            values = [
                next(r["gflops"] for r in rows if r["peer"] == p and r["causal"] == causal)
                for p in peers
            ]
            axis.bar(
                [j + 0.4 * i for j in range(len(peers))],
                values,
                width=0.4,
                label="causal" if causal else "non-causal",
            )
        axis.set_xticks([j + 0.2 for j in range(len(peers))], peers)
        axis.set_ylabel("GFLOP/s")
        axis.set_title(f"CPU attention, S=4096, H=8, D=64, float32\n{subtitle}", fontsize=9)
        axis.legend()
    elif kind == "prefill":
        groups = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in data["rows"]})
        columns = min(len(groups), 4)
        rows = -(-len(groups) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.5 * rows), squeeze=False)
        for axis in axes.flat[len(groups) :]:
            axis.set_visible(False)
        for axis, (dtype, dim, causal) in zip(axes.flat, groups, strict=False):
            series = defaultdict(list)
            for r in data["rows"]:
                if (r["dtype"], r["head_dim"], r["causal"]) == (dtype, dim, causal):
                    series[r["peer"]].append((r["seqlen"], r["tflops"]))
            _lines(
                axis,
                series,
                "sequence length",
                "TFLOP/s",
                f"{dtype} D={dim} {'causal' if causal else 'non-causal'}\n{subtitle}",
            )
    elif kind == "decode":
        figure, axis = plt.subplots(figsize=(6, 3.5))
        series = defaultdict(list)
        for r in data["rows"]:
            series[f"B={r['batch']} Hkv={r['heads_kv']}"].append((r["cache_len"], r["gb_s"]))
        _lines(axis, series, "cache length", "GB/s", f"decode bandwidth\n{subtitle}")
        axis.axhline(data["copy_bandwidth"] / 1e9, color="gray", linestyle="--", label="copy")
    elif kind == "memory":
        figure, axis = plt.subplots(figsize=(6, 3.5))
        series = defaultdict(list)
        for r in data["rows"]:
            for peer, key in (("cuattn", "cuattn_mib"), ("naive", "naive_mib")):
                if r[key] != "OOM":
                    series[peer].append((r["seqlen"], r[key]))
        _lines(axis, series, "sequence length", "peak MiB beyond inputs", f"memory\n{subtitle}")
        axis.set_yscale("log")
    else:
        raise ValueError(f"{path}: no plot for results of kind {kind!r}")
    figure.tight_layout()
    target = Path(path).with_suffix(".png")
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(plot(Path(argument)))
