"""Shared fixtures: fresh random data per test, poisoned results, GPU detection."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import cuattn.interop


@pytest.fixture(autouse=True)
def poison_results(monkeypatch):
    """Every result buffer starts as NaN, so an element no kernel wrote cannot pass."""
    monkeypatch.setattr(cuattn.interop, "POISON_RESULTS", True)


@pytest.fixture(autouse=True)
def cpu_calls_use_every_thread(monkeypatch):
    """The CPU backend runs small calls on one thread (SERIAL_MULTIPLY_ADDS); the tests'
    calls are small, and would then never run the kernels' threads side by side. Tests of
    that choice set the threshold back themselves."""
    from cuattn.backends import cpu

    monkeypatch.setattr(cpu, "SERIAL_MULTIPLY_ADDS", 0)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test's id: fresh data for each check, reproducible runs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as error:  # a driver without a device raises its own errors
        return f"no usable CUDA device ({error})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            if reason is None:
                reason = _gpu_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def emulate_under_sanitizer():
    """The emulated kernels run under AddressSanitizer in the test suite (set
    CUATTN_EMULATE_SANITIZE=0 to run them in-process instead, e.g. to debug one)."""
    from cuattn import backends

    if (
        backends.unavailable_reason("emulate") is None
        and os.environ.get("CUATTN_EMULATE_SANITIZE") != "0"
    ):
        backends.get("emulate").configure(sanitize=True)
    yield


@pytest.fixture
def emulate_options():
    """Changes the emulation backend's options for one test: emulate_options(schedule=...)."""
    from cuattn import backends

    backend = backends.get("emulate")
    saved = backend.options

    def change(**options):
        backend.configure(**options)

    yield change
    backend.options = saved


@pytest.fixture
def planned(monkeypatch):
    """Records the plans the emulation and CUDA backends launch."""
    from cuattn.backends import cuda, emulate

    plans = []
    original = emulate.plan_forward

    def spy(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(emulate, "plan_forward", spy)
    monkeypatch.setattr(cuda, "plan_forward", spy)
    return plans
