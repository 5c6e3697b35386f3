"""The CPU backend never materialises seqlen_q x seqlen_k: its extra memory is O(tile)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process so that the resident-memory high-water mark is ours alone.
CHILD = textwrap.dedent("""
    import numpy as np, cuattn
    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, 64, 1, 8), dtype=np.float32)
    cuattn.attention(small, small, small, causal=True)   # compile / load first
    q, k, v = (rng.standard_normal((1, 16384, 1, 8), dtype=np.float32) for _ in range(3))
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
    out = cuattn.attention(q, k, v)
    print(status("VmHWM:") - before - out.nbytes)
""")


def test_peak_memory_is_independent_of_the_score_matrix():
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    extra = int(done.stdout.split()[-1])
    # One float32 score matrix would be 16384**2 * 4 bytes = 1 GiB.
    assert extra < 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and output"
