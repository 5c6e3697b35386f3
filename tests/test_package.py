"""An installed wheel carries the CUDA sources and the benchmarks, and finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_kernels_and_benchmarks(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cuattn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {
        p.relative_to(ROOT / "kernels").as_posix()
        for p in (ROOT / "kernels").rglob("*")
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp")
    }
    assert {f"cuattn/kernel_sources/{name}" for name in kernels} <= names
    assert "cuattn/bench/cpu.py" in names
    metadata = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    )
    for requirement in ("numpy", "numba", "scipy", "ml_dtypes", "threadpoolctl"):
        assert f"Requires-Dist: {requirement}" in metadata, (
            f"{requirement} missing from install_requires"
        )
    # An unpacked wheel, imported on its own, finds its own copy of the sources.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "import cuattn.kernels as k; print(k.kernel_dir())"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found) == tmp_path / "site" / "cuattn" / "kernel_sources"
