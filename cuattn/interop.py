"""Arrays in, arrays out: the one module that knows about NumPy, CuPy, PyTorch and JAX.

A call's arrays are imported once, with no copy, into :class:`~cuattn.dlpack.RawArray`
(pointer, shape, strides in elements, dtype, device). Results are allocated by the
caller's own framework (so PyTorch's caching allocator owns PyTorch results), written
by a backend, and handed back as that framework's array. On a GPU, work is ordered on
the caller's current stream; nothing synchronizes the device.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .dlpack import (
    BFLOAT16,
    CPU,
    Device,
    DLPackExport,
    RawArray,
    device_of,
    from_numpy,
    import_array,
)

FRAMEWORKS = ("numpy", "cupy", "torch", "jax")


@functools.cache
def framework_module(name: str):
    """A framework's module, imported at its first use (cuattn needs none of them) and kept:
    importlib's lookup of an imported module takes microseconds, several times a call."""
    return importlib.import_module(name)


def _framework_of(name: str, array) -> str:
    if isinstance(array, np.ndarray):
        return "numpy"
    module = type(array).__module__.partition(".")[0]
    if module in ("jax", "jaxlib"):
        return "jax"
    if module in ("torch", "cupy"):
        return module
    if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
        return "dlpack"
    raise TypeError(
        f"{name}: expected an array (NumPy, CuPy, PyTorch, JAX or any DLPack producer), "
        f"got {type(array).__name__}"
    )


def _legacy_to_dlpack(stream_handle: int) -> int:
    # DLPack forbids 0 as a stream value: the legacy default stream is spelled 1. As a
    # CUDA handle 1 is cudaStreamLegacy, so the value can be launched on as it is.
    return 1 if stream_handle == 0 else stream_handle


def current_stream(framework: str, device: Device) -> int | None:
    """The caller's current CUDA stream on ``device`` (None on the CPU)."""
    if device.kind != "cuda":
        return None
    if framework == "torch":
        torch = framework_module("torch")
        return _legacy_to_dlpack(torch.cuda.current_stream(device.index).cuda_stream)
    # CuPy users, and JAX, which exposes no stream: we run on CuPy's current stream and
    # DLPack makes JAX's pending work visible to it.
    cupy = _require_cupy()
    with cupy.cuda.Device(device.index):
        return _legacy_to_dlpack(cupy.cuda.get_current_stream().ptr)


def _require_cupy():
    try:
        return framework_module("cupy")
    except ImportError as error:
        raise RuntimeError(
            "arrays on a CUDA device need CuPy: pip install 'cuattn[cuda13]' (or [cuda12])"
        ) from error


class _StreamHandle:
    """A raw cudaStream_t offered through the CUDA stream protocol."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def cupy_stream(handle: int):
    """CuPy's view of a stream it does not own, given as a raw handle: through the CUDA
    stream protocol where CuPy has it (14 and later, which deprecates ExternalStream)."""
    cupy = _require_cupy()
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(handle)
    return from_external(_StreamHandle(handle))


@dataclass
class CallArrays:
    """A call's arrays, imported: the framework results go back to, device and stream."""

    framework: str
    device: Device
    stream: int | None
    raw: dict[str, RawArray] = field(default_factory=dict)
    # The array a result's framework and device are taken from (q, by convention).
    template: object = None


def import_arrays(
    arrays: dict[str, object],
    *,
    optional: tuple[str, ...] = (),
    writable: tuple[str, ...] = (),
) -> CallArrays:
    """Import named arrays; all must share framework and device.

    ``optional`` names the arrays that may be None (then skipped); any other None is an
    error. ``writable`` names the arrays the call writes in place (a KV cache): they must be
    mutable memory.
    """
    for name, array in arrays.items():
        if array is None and name not in optional:
            raise TypeError(f"{name}: expected an array, got None")
    present = {name: a for name, a in arrays.items() if a is not None}
    first_name, first = next(iter(present.items()))
    framework = _framework_of(first_name, first)
    # Plain PyTorch tensors are read from their attributes once, device included; None
    # stands for the rest, which go through DLPack.
    plain: dict[str, RawArray | None] = {}
    device = None
    for name, array in present.items():
        other = _framework_of(name, array)
        if other != framework:
            raise TypeError(
                f"{name}: is a {other} array but {first_name} is a {framework} array; "
                "pass all arrays of one call from the same framework"
            )
        plain[name] = _from_torch(array) if framework == "torch" else None
        where = plain[name].device if plain[name] is not None else _device_of(name, array)
        if device is None:
            device = where
        if where != device:
            raise ValueError(
                f"{name}: is on {where} but {first_name} is on {device}; "
                "all arrays of one call must be on the same device"
            )
    stream = current_stream(framework, device)
    call = CallArrays(framework, device, stream, template=first)
    for name, array in present.items():
        call.raw[name] = plain[name] or _import(name, array, framework, stream)
    for name in writable:
        if name in call.raw and (call.raw[name].readonly or framework == "jax"):
            raise TypeError(
                f"{name}: is written in place, but this {framework} array is read-only "
                "(JAX arrays are immutable: use NumPy, CuPy or PyTorch buffers for a KV cache)"
            )
    return call


def _device_of(name: str, array) -> Device:
    if isinstance(array, np.ndarray):
        return CPU
    try:
        return device_of(array)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from error
    except AttributeError as error:  # e.g. a JAX tracer, under jax.jit
        raise TypeError(
            f"{name}: a {type(array).__name__} is not an array in memory ({error}); "
            "pass concrete arrays (under jax.jit, arrays are tracers)"
        ) from error


def _import(name: str, array, framework: str, stream: int | None) -> RawArray:
    if framework == "numpy":
        try:
            return from_numpy(array)
        except ValueError as error:  # e.g. a field of a structured array
            raise ValueError(f"{name}: {error}") from error
    if framework == "torch":
        if array.is_neg():
            # PyTorch's DLPack export hands over the memory without the negation (2.13).
            raise TypeError(
                f"{name}: is a lazily negated PyTorch view (its neg bit is set), which DLPack "
                "would read un-negated; pass tensor.resolve_neg()"
            )
    try:
        return import_array(array, stream=stream)
    except (BufferError, RuntimeError, TypeError) as error:
        # e.g. PyTorch refuses to export a tensor that requires grad; a complex dtype.
        raise TypeError(f"{name}: could not be read through DLPack: {error}") from error


def _from_torch(tensor) -> RawArray | None:
    """A plain PyTorch tensor read from its own attributes; None for any other (which goes
    through DLPack, and its refusals: a tensor that requires grad, a conjugate view...).

    The same view DLPack would give, at a twentieth of the host time (a DLPack export costs
    20-26 us a tensor on the 2-core CPU, several times a decoding step's launches).
    DLPack's stream handshake has nothing to order here: a call runs on the tensor's
    device's current PyTorch stream, the stream it would hand to the export.
    """
    torch = framework_module("torch")
    dtype = _NUMPY_OF_TORCH.get(str(tensor.dtype))
    if (
        dtype is None  # the real dtypes alone, so no conjugate bit
        or type(tensor) not in (torch.Tensor, torch.nn.Parameter)  # no fake or traced tensors
        or tensor.layout is not torch.strided
        or tensor.requires_grad
        or tensor.is_neg()  # a lazily negated view (_import refuses it)
        or tensor.device.type not in ("cpu", "cuda")
        or torch.version.hip is not None  # "cuda" means a ROCm device there
    ):
        return None
    device = CPU if tensor.device.type == "cpu" else Device("cuda", tensor.device.index)
    return RawArray(
        tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), dtype, device, False, tensor
    )


_NUMPY_OF_TORCH = {
    "torch.float16": np.dtype(np.float16),
    "torch.float32": np.dtype(np.float32),
    "torch.float64": np.dtype(np.float64),
    "torch.bfloat16": BFLOAT16,
    "torch.int32": np.dtype(np.int32),
    "torch.int64": np.dtype(np.int64),
}


def as_cupy(raw: RawArray):
    """A CuPy view of device memory (bfloat16 as uint16, which CuPy lacks), no copy."""
    cupy = _require_cupy()
    carrier = np.dtype(np.uint16) if raw.dtype == BFLOAT16 else raw.dtype
    itemsize = raw.dtype.itemsize
    extent = sum((n - 1) * abs(s) for n, s in zip(raw.shape, raw.strides, strict=True)) + 1
    memory = cupy.cuda.UnownedMemory(
        raw.ptr, extent * itemsize if raw.size else 0, raw.owner, raw.device.index
    )
    return cupy.ndarray(
        raw.shape,
        carrier,
        cupy.cuda.MemoryPointer(memory, 0),
        strides=tuple(s * itemsize for s in raw.strides),
    )


def host_copy(call: CallArrays, name: str) -> np.ndarray:
    """A host copy of a small array (sequence lengths), read for validation.

    On a GPU this waits for the caller's stream: the only synchronization in a call, and
    only when lengths are passed as device arrays.
    """
    raw = call.raw[name]
    if raw.device.kind == "cpu":
        return np.array(raw.numpy())
    cupy = _require_cupy()
    with cupy.cuda.Device(raw.device.index):
        return as_cupy(raw).get(stream=cupy_stream(call.stream))


def capturing(call: CallArrays) -> bool:
    """Whether the call's stream, on the call's device, is capturing a CUDA graph (never on
    the CPU)."""
    if call.device.kind != "cuda":
        return False
    cupy = _require_cupy()
    # On the call's device: the legacy stream's handle (1) names the current device's.
    with cupy.cuda.Device(call.device.index):
        return bool(cupy.cuda.runtime.streamIsCapturing(call.stream))


# --- results --------------------------------------------------------------------------------


# Debugging aid (and what the tests run with): fill every result with NaN before a backend
# writes it, so that an element a kernel forgot to write cannot pass for a right answer.
POISON_RESULTS = os.environ.get("CUATTN_POISON_RESULTS", "") not in ("", "0")

_TORCH_DTYPES = {
    "float16": "float16",
    "float32": "float32",
    "bfloat16": "bfloat16",
    "int32": "int32",
}


@dataclass
class Result:
    """Memory a backend writes, and the caller's array it becomes."""

    raw: RawArray
    _array: object
    _finish: object = None

    def array(self):
        return self._finish(self) if self._finish is not None else self._array


def empty(call: CallArrays, shape: tuple[int, ...], dtype: np.dtype) -> Result:
    """Uninitialised memory for a result, owned by the caller's framework where possible."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    device = call.device
    if call.framework == "torch":
        torch = framework_module("torch")
        where = "cpu" if device.kind == "cpu" else f"cuda:{device.index}"
        tensor = torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES[dtype.name]), device=where)
        if POISON_RESULTS:
            tensor.fill_(float("nan"))
        return Result(_from_torch(tensor) or import_array(tensor, stream=call.stream), tensor)
    if device.kind == "cpu":
        array = _aligned_host_empty(shape, dtype)
        if POISON_RESULTS:
            array.fill(np.nan)
        result = Result(from_numpy(array), array)
    else:
        result = _cupy_empty(shape, dtype, device)
    if call.framework == "jax":
        result._finish = _to_jax
    return result


# XLA imports host memory without a copy only from 64-byte boundaries; the same boundary
# suits every SIMD width the CPU backend's loops use.
_HOST_ALIGNMENT = 64


def _aligned_host_empty(shape, dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    block = np.empty(nbytes + _HOST_ALIGNMENT, np.uint8)
    start = -block.ctypes.data % _HOST_ALIGNMENT
    return block[start : start + nbytes].view(dtype).reshape(shape)


def _cupy_empty(shape, dtype, device: Device) -> Result:
    cupy = _require_cupy()
    # CuPy has no bfloat16: such results are allocated as raw 16-bit words, described to
    # the backend (and to JAX) as bfloat16 through the RawArray.
    carrier = np.dtype(np.uint16) if dtype == BFLOAT16 else dtype
    with cupy.cuda.Device(device.index):
        array = cupy.empty(shape, carrier)
        if POISON_RESULTS:
            # all-ones bits are a NaN in every float width
            array.view(np.uint8).fill(0xFF)
    itemsize = dtype.itemsize
    raw = RawArray(
        ptr=array.data.ptr,
        shape=tuple(shape),
        strides=tuple(s // itemsize for s in array.strides),
        dtype=dtype,
        device=device,
        readonly=False,
        owner=array,
    )
    return Result(raw, array)


def _to_jax(result: Result):
    jax = framework_module("jax")
    raw = result.raw
    wait = None
    if raw.device.kind == "cuda":
        wait = _stream_waiter(raw.device)
    return jax.dlpack.from_dlpack(DLPackExport(raw, wait_for_stream=wait))


def _stream_waiter(device: Device):
    """Orders a consumer's stream after the work queued so far on our launch stream."""
    cupy = _require_cupy()
    with cupy.cuda.Device(device.index):
        event = cupy.cuda.Event(disable_timing=True)
        event.record(cupy.cuda.get_current_stream())

    def wait(consumer_stream: int) -> None:
        with cupy.cuda.Device(device.index):
            cupy_stream(consumer_stream).wait_event(event)

    return wait
