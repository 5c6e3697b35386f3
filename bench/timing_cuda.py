"""GPU timing: CUDA events around each call, the L2 cache flushed before every run, warm-up
excluded, the median of many runs. Every peer is launched on one stream (PyTorch's
current stream, which CuPy is pointed at too), so the events time exactly its work."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from .timing import Timing, time_host

# Larger than the L2 of any current GPU (50 MiB on H100): writing it evicts the inputs.
_FLUSH_BYTES = 256 * 2**20


@contextlib.contextmanager
def one_stream():
    """CuPy's current stream set to PyTorch's, for the duration."""
    import torch

    from cuattn.interop import cupy_stream

    with cupy_stream(torch.cuda.current_stream().cuda_stream):
        yield


def time_cuda(function: Callable[[int], object], *, warmup: int = 3, runs: int = 20) -> Timing:
    """Time ``function(i)`` (``i`` picks one of the caller's rotating input sets)."""
    import cupy

    flush = cupy.empty(_FLUSH_BYTES, cupy.uint8)
    with one_stream():
        stream = cupy.cuda.get_current_stream()
        for i in range(warmup):
            function(i)
        samples = []
        for i in range(runs):
            flush.fill(i % 255)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            function(warmup + i)
            end.record(stream)
            end.synchronize()
            samples.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return Timing.of(samples)


def host_time(function: Callable[[int], object], *, warmup: int = 3, runs: int = 20) -> Timing:
    """Host seconds per call of ``function(i)``: what the calling thread spends launching,
    calls back to back without waiting for the GPU. Where this exceeds the GPU time the
    call is bound by its host work, and the CUDA-event time of a lone call includes it."""
    import cupy

    with one_stream():
        timing = time_host(function, warmup=warmup, runs=runs)
        cupy.cuda.get_current_stream().synchronize()
    return timing


def captured(function: Callable[[], object]):
    """A PyTorch CUDA graph of ``function()``, run once on a side stream before the capture
    (compiling and loading what it needs, as a capture cannot)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return graph


def device_description() -> tuple[str, str]:
    """(device name, driver version)."""
    import cupy

    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    driver = cupy.cuda.runtime.driverGetVersion()
    return properties["name"].decode(), f"{driver // 1000}.{driver % 1000 // 10}"
