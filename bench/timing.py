"""How we time: warm-up excluded, many runs, the median with its spread.

Host timing (perf_counter) serves the CPU backend; GPU timing uses CUDA events and is
in timing_cuda.py so that this module needs no GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, quartiles and extremes of ``runs`` timed calls."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, samples) -> Timing:
        s = np.asarray(samples, np.float64)
        return cls(
            float(np.median(s)),
            float(np.percentile(s, 25)),
            float(np.percentile(s, 75)),
            float(s.min()),
            float(s.max()),
            int(s.size),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def time_host(
    function: Callable[[int], object], *, warmup: int = 1, runs: int = 5, min_seconds: float = 0.0
) -> Timing:
    """Time ``function(i)`` on the host; ``i`` picks one of the caller's rotating inputs."""
    for i in range(warmup):
        function(i)
    samples = []
    start = time.perf_counter()
    i = 0
    while len(samples) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        function(warmup + i)
        samples.append(time.perf_counter() - t0)
        i += 1
    return Timing.of(samples)


def attention_flops(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool
) -> float:
    """FLOPs of the two matrix products, 4 * B * H * Sq * Sk * D, halved for causal (as
    FlashAttention's benchmarks count them)."""
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal else flops
