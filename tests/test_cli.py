"""The command line works on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "cuattn", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_info_lists_the_backends():
    done = _run("info")
    assert done.returncode == 0, done.stderr
    assert "cuattn " in done.stdout and "backend cpu" in done.stdout


def test_demo_checks_itself_against_float64():
    done = _run("demo", "--seqlen", "300")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max |error|" in done.stdout and "OK" in done.stdout


def test_info_reports_compile_time_and_registers():
    done = _run("info", "--compile", "sm_80")
    assert done.returncode == 0, done.stderr
    assert "forward_bf16_d128_windowed" in done.stdout and "0 bytes spilled" in done.stdout
