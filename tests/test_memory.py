"""The CPU backend never materialises seqlen_q x seqlen_k: its extra memory is O(tile)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process so that the resident-memory high-water mark is ours alone: it
# prints the growth of that mark over attention without a mask on arrays of shape LARGE
# (after a call on SMALL, to compile), less the output's bytes.
CHILD = textwrap.dedent("""
    import numpy as np, cuattn
    rng = np.random.default_rng(0)
    def arrays(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim):
        return (
            rng.standard_normal((batch, seqlen, heads, head_dim), dtype=np.float32)
            for seqlen, heads in ((seqlen_q, heads_q), (seqlen_k, heads_kv), (seqlen_k, heads_kv))
        )
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    cuattn.attention(*arrays(*SMALL), causal=True)
    q, k, v = arrays(*LARGE)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
    out = cuattn.attention(q, k, v)
    print(status("VmHWM:") - before - out.nbytes)
""")


def _extra_memory(small: tuple, large: tuple) -> int:
    """Bytes the CPU backend's peak memory grows by, beyond its output, over attention with
    arrays of shape (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim) ``large``."""
    script = f"SMALL, LARGE = {small}, {large}\n" + CHILD
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    return int(done.stdout.split()[-1])


def test_peak_memory_is_independent_of_the_score_matrix():
    extra = _extra_memory((1, 64, 64, 1, 1, 8), (1, 16384, 16384, 1, 1, 8))
    # One float32 score matrix would be 16384**2 * 4 bytes = 1 GiB.
    assert extra < 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and output"


def test_decoding_many_sequences_keeps_no_state_per_sequence():
    """With enough sequences to occupy every thread, each thread writes a sequence's rows
    from its own running state: nothing is kept per sequence until a merge."""
    extra = _extra_memory((2, 3, 40, 32, 4, 128), (256, 16, 32, 32, 4, 128))
    # The running state of every row (256 x 16 x 32 rows of 128 float32) would be 64 MiB;
    # the lse the backend keeps when none is asked for is 0.5 MiB.
    assert extra < 16 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and output"
