"""The benchmarks' shared pieces: timing, FLOP counting, result files and their plots."""

from __future__ import annotations

import json

import pytest

from bench.plot import plot
from bench.report import environment, publish, table, write
from bench.timing import Timing, attention_flops, time_host


def test_flops_follow_flash_attentions_convention():
    assert attention_flops(2, 8, 1024, 1024, 64, causal=False) == 4 * 2 * 8 * 1024 * 1024 * 64
    assert attention_flops(2, 8, 1024, 1024, 64, causal=True) == 2 * 2 * 8 * 1024 * 1024 * 64


def test_timing_reports_the_median_and_spread():
    timing = Timing.of([3.0, 1.0, 2.0, 10.0, 2.5])
    assert timing.median == 2.5 and timing.min == 1.0 and timing.max == 10.0 and timing.runs == 5
    calls = []
    measured = time_host(calls.append, warmup=2, runs=4)
    assert calls == list(range(6)) and measured.runs == 4  # warm-up first, inputs rotated


def test_table_is_markdown():
    assert table([dict(a=1, b="x")], [("a", "A"), ("b", "B")]) == "| A | B |\n|---|---|\n| 1 | x |"


ROWS = {
    "cpu": dict(
        throughput=[
            dict(peer=p, causal=c, gflops=g)
            for p, g in (("a", 10), ("b", 20))
            for c in (False, True)
        ],
        memory=[],
    ),
    "prefill": dict(
        rows=[
            dict(dtype="float16", head_dim=64, causal=False, peer=p, seqlen=s, tflops=s / 100)
            for p in ("cuattn", "SDPA flash")
            for s in (512, 1024)
        ]
    ),
    "decode": dict(
        copy_bandwidth=3e12,
        rows=[
            dict(batch=1, heads_kv=h, cache_len=n, gb_s=n / 10)
            for h in (8, 32)
            for n in (4096, 32768)
        ],
    ),
    "memory": dict(
        rows=[
            dict(seqlen=s, cuattn_mib=1.0, naive_mib="OOM" if s > 2048 else s / 4)
            for s in (1024, 2048, 4096)
        ]
    ),
}


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_every_result_kind_plots(tmp_path, kind):
    pytest.importorskip("matplotlib")
    path = write(f"{kind}-test", dict(environment=environment(), **ROWS[kind]), tmp_path)
    assert json.loads(path.read_text())["environment"]["git_commit"]
    png = plot(path)
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publish_writes_the_json_and_a_headed_markdown_file(tmp_path, capsys):
    path = publish(
        "tiles", "Tiles", "| a |", dict(rows=[{"a": 1}]), tmp_path, "Some GPU", "13.0", False
    )
    assert path.name.startswith("tiles-Some_GPU-") and path.suffix == ".json"
    assert json.loads(path.read_text())["rows"] == [{"a": 1}]
    markdown = path.with_suffix(".md").read_text()
    assert markdown.startswith("# Tiles, Some GPU, driver 13.0, ") and "commit " in markdown
    assert "| a |" in markdown and "| a |" in capsys.readouterr().out
