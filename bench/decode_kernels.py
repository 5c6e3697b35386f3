"""Decoding calls to run under Nsight Compute, and its CSV made into a table: the time of
each kernel of a call (the split forward pass and the combine) and the bytes it moved,
where `bench decode` times the call as a whole.

    ncu --clock-control none --csv \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        python3 -m cuattn bench decode_kernels [--targets none,2] > ncu.csv
    python3 -m cuattn bench decode_kernels --table ncu.csv

Each shape is called three times per split target (blocks per multiprocessor; "none":
the plan's own), bfloat16, one query token, 32 query heads, head dim 128: the shapes of
`bench decode` whose cache is read least efficiently. The launches of one call are
consecutive in the table; the random inputs' own kernels are left out of it.
"""

from __future__ import annotations

import argparse
import csv
import sys

from .tiles import tuned_plan

SHAPES = (  # batch, KV heads, cache length
    (1, 1, 32768),
    (1, 1, 131072),
    (1, 8, 32768),
    (8, 1, 32768),
    (1, 8, 4096),
    (8, 8, 4096),
    (8, 1, 4096),
    (64, 1, 4096),
)
HEADS_Q, HEAD_DIM, CALLS = 32, 128, 3
_METRIC_SCALES = {
    "ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
    "s": 1e6, "second": 1e6,
}  # fmt: skip
_BYTE_SCALES = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}


def run(targets: list[int | None]) -> None:
    import torch

    import cuattn

    for batch, heads_kv, length in SHAPES:
        q = torch.randn(batch, 1, HEADS_Q, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        k, v = (
            torch.randn(batch, length, heads_kv, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            for _ in "kv"
        )
        for target in targets:
            with tuned_plan(blocks_per_multiprocessor=target):
                for _ in range(CALLS):
                    cuattn.attention_with_kvcache(q, k, v, cache_seqlens=length)
                torch.cuda.synchronize()
            print(f"B={batch} Hkv={heads_kv} cache={length} target={target}: {CALLS} calls")


def kernel_table(lines: list[str]) -> list[dict]:
    """One row per cuattn kernel launch in ncu's --csv output (other kernels left out):
    its ID, name, grid, microseconds, MB read and written."""
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no table of ncu --csv in it (a header line starting "ID")')
    launches: dict[str, dict] = {}
    for record in csv.DictReader(lines[start:]):
        if "cuattn::" not in record["Kernel Name"]:
            continue
        row = launches.setdefault(
            record["ID"],
            dict(id=int(record["ID"]), kernel=record["Kernel Name"], grid=record["Grid Size"]),
        )
        value, unit = float(record["Metric Value"].replace(",", "")), record["Metric Unit"]
        if record["Metric Name"] == "gpu__time_duration.sum":
            row["us"] = value * _METRIC_SCALES[unit]
        elif record["Metric Name"].startswith("dram__bytes_"):
            kind = "mb_read" if "read" in record["Metric Name"] else "mb_written"
            row[kind] = value * _BYTE_SCALES[unit]
    return list(launches.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="cuattn bench decode_kernels", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--targets", default="none", help="split targets, e.g. none,2,8")
    parser.add_argument("--table", metavar="CSV", help="print the table of an ncu --csv output")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table, errors="replace") as file:
            try:
                rows = kernel_table(file.read().splitlines())
            except ValueError as error:
                parser.error(f"--table {args.table}: {error}")
        for row in rows:
            name = row["kernel"].split("(")[0].removeprefix("void ")[:90]
            print(
                f"{row['id']:>5} {name:90s} {row['grid']:>14s} {row.get('us', 0):9.2f} us "
                f"{row.get('mb_read', 0):8.2f} MB read {row.get('mb_written', 0):7.2f} MB written"
            )
        return 0
    run([None if t == "none" else int(t) for t in args.targets.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
