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


def _sweep_row(head_dim, case, tile, us, kind="prefill"):
    return dict(kind=kind, head_dim=head_dim, case=f"{kind} {case} D={head_dim}", tile=tile, us=us)


def test_the_sweeps_fastest_tile_is_the_best_over_all_of_a_head_dims_cases():
    from bench.tiles import fastest_prefill_tiles

    rows = [
        # D=64: 128x32x4 wins one case by far but loses the other; 128x64x4 wins both a little.
        _sweep_row(64, "a", "default", 100.0),
        _sweep_row(64, "a", "128x32x4", 50.0),
        _sweep_row(64, "a", "128x64x4", 90.0),
        _sweep_row(64, "b", "default", 100.0),
        _sweep_row(64, "b", "128x32x4", 300.0),
        _sweep_row(64, "b", "128x64x4", 90.0),
        # D=128: nothing beats the table; a faster tile that missed a case does not count.
        _sweep_row(128, "a", "default", 100.0),
        _sweep_row(128, "a", "128x64x4s2", 110.0),
        _sweep_row(128, "b", "default", 100.0),
        _sweep_row(128, "b", "128x64x4s2", 120.0),
        _sweep_row(128, "a", "128x32x4", 10.0),
        # Decoding rows are not prefill's business.
        _sweep_row(128, "c", "default", 100.0, kind="decode"),
        _sweep_row(128, "c", "32x64x2s2", 1.0, kind="decode"),
    ]
    assert fastest_prefill_tiles(rows) == {64: "128x64x4", 128: "default"}


def test_prefill_times_the_sweeps_fastest_tile_where_it_is_not_the_tables(tmp_path):
    from bench.prefill import candidate_tiles
    from cuattn.kernels import ForwardKernel, Tile

    sweep = tmp_path / "tiles.json"
    rows = [
        _sweep_row(64, "a", "default", 100.0),
        _sweep_row(64, "a", "128x64x4s2", 80.0),
        _sweep_row(128, "a", "default", 100.0),
        _sweep_row(128, "a", "128x32x4", 130.0),
    ]
    sweep.write_text(json.dumps(dict(environment={}, rows=rows)))
    assert candidate_tiles(sweep) == {64: Tile(128, 64, 4, 2)}
    # A sweep that named the table's tile (as it stands now) rather than "default", in the
    # rows of sweeps before 3c2ad1a, whose cases alone give their kind and head dim.
    table = str(ForwardKernel("bfloat16", 128, False, False).tile)
    rows = [
        dict(case="prefill B=4 S=4096 Hkv=16 D=128", tile="128x32x4", us=100.0),
        dict(case="prefill B=4 S=4096 Hkv=16 D=128", tile=table, us=50.0),
        dict(case="prefill B=4 S=4096 Hkv=16 D=128", tile="default", us=100.0),
    ]
    sweep.write_text(json.dumps(dict(environment={}, rows=rows)))
    assert candidate_tiles(sweep) == {}


def test_tiles_are_written_and_read_back():
    from cuattn.kernels import Tile

    for tile in (Tile(128, 64, 8), Tile(32, 64, 2, 3)):
        assert Tile.parse(str(tile)) == tile
    with pytest.raises(ValueError, match="tile: expected"):
        Tile.parse("128x64")


def test_a_benchmark_cut_short_still_publishes_what_it_measured():
    # gpu_check.sh's per-step limit sends SIGTERM; the loop stops, the caller publishes.
    import os
    import signal
    import time

    from bench.report import until_terminated

    before = signal.getsignal(signal.SIGTERM)
    rows = []
    with until_terminated() as cut:
        rows.append("first")
        try:  # as a benchmark guards each peer: the time limit must get through
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        except Exception:
            rows.append("swallowed")
        rows.append("never")
    assert rows == ["first"] and "cut short" in cut.note
    with until_terminated() as whole:
        rows.append("second")
    assert whole.note == "" and rows == ["first", "second"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_resource_report_covers_every_prefill_variant_of_a_candidate():
    from bench.resources import candidate_variants, measure
    from cuattn import nvrtc
    from cuattn.kernels import Tile

    variants = candidate_variants(64, Tile(128, 64, 4, 2))
    flags = {(k.dtype, k.windowed, k.softcap, k.pack_gqa) for k in variants}
    assert len(variants) == len(flags) == 16  # 2 dtypes x mask x softcap x packing
    assert all(k.tile == Tile(128, 64, 4, 2) and not k.decode for k in variants)
    try:
        nvrtc.library()
    except nvrtc.NvrtcError as error:
        pytest.skip(str(error))
    figures = measure("sm_90", candidate_variants(64, None)[:2])
    assert all(f["registers"] > 0 and f["spilled"] == f["stack"] == 0 for f in figures)


def test_a_tuned_plan_holds_inside_its_block_only():
    from bench.tiles import tuned_plan
    from cuattn.backends import cuda
    from cuattn.kernels import Tile

    original = cuda.plan_forward
    with pytest.raises(RuntimeError), tuned_plan(tile=Tile(128, 32, 4)):
        assert cuda.plan_forward.keywords == {"tile": Tile(128, 32, 4)}
        raise RuntimeError  # a failing case restores the table's plan too
    assert cuda.plan_forward is original


def test_the_ncu_table_keeps_cuattns_launches_in_microseconds_and_megabytes():
    from bench.decode_kernels import kernel_table

    header = '"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"'
    lines = ["==PROF== Connected to process", header]
    for launch, kernel, metrics in (
        (0, "void at::normal_kernel(float)", (("gpu__time_duration.sum", "ns", "2,848"),)),
        (
            1,
            "void cuattn::combine_splits<cuattn::bfloat16>(cuattn::AttentionParams)",
            (
                ("dram__bytes_read.sum", "Kbyte", "545.5"),
                ("dram__bytes_write.sum", "byte", "0"),
                ("gpu__time_duration.sum", "ns", "4,672"),
            ),
        ),
    ):
        for name, unit, value in metrics:
            lines.append(f'"{launch}","{kernel}","(256, 1, 1)","{name}","{unit}","{value}"')
    (row,) = kernel_table(lines)
    assert row["id"] == 1 and row["grid"] == "(256, 1, 1)"
    assert row["us"] == pytest.approx(4.672)
    assert row["mb_read"] == pytest.approx(0.5455) and row["mb_written"] == 0
