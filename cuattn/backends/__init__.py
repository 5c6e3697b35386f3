"""Backends, and how a call picks one.

``"auto"`` follows the data: CUDA for arrays on a GPU, the numba CPU backend for host
arrays. ``"emulate"`` runs the CUDA kernels' own source on the CPU (host arrays). A backend
that is asked for but cannot run says why.
"""

from __future__ import annotations

import importlib

from ..dlpack import Device

BACKENDS = ("cpu", "cuda", "emulate")

# Module and class of each backend, imported on first use so that a missing optional
# dependency (CuPy, a C++ compiler) only matters to the backend that needs it.
_WHERE = {
    "cpu": ("cuattn.backends.cpu", "CpuBackend"),
    "cuda": ("cuattn.backends.cuda", "CudaBackend"),
    "emulate": ("cuattn.backends.emulate", "EmulateBackend"),
}
_instances: dict[str, object] = {}


class BackendUnavailable(RuntimeError):
    """The backend that was asked for cannot run here; the message says why."""


def get(name: str):
    """The backend called ``name``, created once."""
    if name not in _instances:
        module_name, class_name = _WHERE[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise BackendUnavailable(f"backend {name!r} is not available: {error}") from error
        _instances[name] = getattr(module, class_name)()
    return _instances[name]


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run here, else why not."""
    try:
        return get(name).unavailable_reason()
    except BackendUnavailable as error:
        return str(error)


def select(name: str, device: Device):
    """The backend for a call whose arrays live on ``device``."""
    if name == "auto":
        name = "cuda" if device.kind == "cuda" else "cpu"
    if name not in _WHERE:
        choices = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"backend: expected 'auto', {choices}; got {name!r}")
    wants_device = "cuda" if name == "cuda" else "cpu"
    if device.kind != wants_device:
        where = (
            "GPU (CuPy, PyTorch or JAX CUDA) arrays" if wants_device == "cuda" else "host arrays"
        )
        raise ValueError(f"backend: {name!r} computes on {where}, but the arrays are on {device}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(reason)
    return get(name)
