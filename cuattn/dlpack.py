"""The DLPack protocol in both directions, read and written with ctypes.

Reading the capsule ourselves, rather than through ``numpy.from_dlpack`` or
``cupy.from_dlpack``, is what lets bfloat16 through: NumPy and CuPy have no bfloat16 of
their own, yet PyTorch and JAX hand us bfloat16 tensors, and a kernel needs only a
pointer, a shape, strides and a dtype. Nothing here imports a framework.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# DLDeviceType values from dlpack.h.
DL_CPU = 1
DL_CUDA = 2
DL_CUDA_HOST = 3
DL_CUDA_MANAGED = 13

# DLDataTypeCode values from dlpack.h.
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT, _DL_BOOL = 0, 1, 2, 4, 6

_DTYPE_OF_CODE = {
    (_DL_FLOAT, 16): np.dtype(np.float16),
    (_DL_FLOAT, 32): np.dtype(np.float32),
    (_DL_FLOAT, 64): np.dtype(np.float64),
    (_DL_BFLOAT, 16): BFLOAT16,
    (_DL_INT, 8): np.dtype(np.int8),
    (_DL_INT, 16): np.dtype(np.int16),
    (_DL_INT, 32): np.dtype(np.int32),
    (_DL_INT, 64): np.dtype(np.int64),
    (_DL_UINT, 8): np.dtype(np.uint8),
    (_DL_UINT, 16): np.dtype(np.uint16),
    (_DL_UINT, 32): np.dtype(np.uint32),
    (_DL_UINT, 64): np.dtype(np.uint64),
    (_DL_BOOL, 8): np.dtype(np.bool_),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_OF_CODE.items()}

# DLManagedTensorVersioned.flags bit for memory the consumer must not write.
_FLAG_READ_ONLY = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_Deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _Deleter),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_LEGACY_NAME = b"dltensor"
_VERSIONED_NAME = b"dltensor_versioned"

# Private prototypes of the capsule C API, so that our argtypes never leak into
# ctypes.pythonapi, which other code shares.
_capsule_get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi)
)
_capsule_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)
_capsule_new = ctypes.PYFUNCTYPE(
    ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p
)(("PyCapsule_New", ctypes.pythonapi))
# The capsule destructor receives a capsule whose reference count is already zero, so it
# must only be looked at through raw pointers, never turned back into a Python object.
_capsule_is_valid_raw = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi)
)
_capsule_get_pointer_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


@dataclass(frozen=True)
class Device:
    """Where memory lives: ``Device("cpu")`` or ``Device("cuda", ordinal)``."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"


CPU = Device("cpu")


@dataclass(eq=False)
class RawArray:
    """A plain strided buffer: what every backend works from.

    ``strides`` count elements, not bytes. ``owner`` keeps the memory alive for as long
    as this object is referenced (the DLPack capsule, or the array we allocated).
    """

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    device: Device
    readonly: bool
    owner: object

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        """A zero-copy NumPy view of host memory (bfloat16 as ml_dtypes.bfloat16)."""
        if self.device.kind != "cpu":
            raise ValueError(f"a NumPy view needs host memory; this array is on {self.device}")
        if self.size == 0:
            return np.empty(self.shape, self.dtype)
        # __array_interface__ has no bfloat16 type string; a same-width unsigned view of the
        # memory, relabelled afterwards, is exact and keeps the owner chain intact.
        carrier = np.dtype(f"u{self.dtype.itemsize}") if self.dtype == BFLOAT16 else self.dtype
        holder = _HostMemory(self, carrier)
        view = np.asarray(holder)
        return view.view(self.dtype) if carrier != self.dtype else view


class _HostMemory:
    """Exposes a RawArray to NumPy through the array interface and owns it meanwhile."""

    def __init__(self, raw: RawArray, carrier: np.dtype):
        itemsize = raw.dtype.itemsize
        self._raw = raw
        self.__array_interface__ = {
            "version": 3,
            "shape": raw.shape,
            "typestr": carrier.str,
            "data": (raw.ptr, raw.readonly),
            "strides": tuple(s * itemsize for s in raw.strides),
        }


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides, in elements, of ``shape``."""
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _device_of(device_type: int, device_id: int) -> Device:
    if device_type in (DL_CPU, DL_CUDA_HOST):
        return CPU
    if device_type in (DL_CUDA, DL_CUDA_MANAGED):
        return Device("cuda", device_id)
    raise TypeError(f"unsupported DLPack device type {device_type} (cuattn handles CPU and CUDA)")


def device_of(array) -> Device:
    """The device of any object that speaks DLPack, without exporting it."""
    device_type, device_id = array.__dlpack_device__()
    return _device_of(int(device_type), int(device_id))


def import_array(array, *, stream: int | None = None) -> RawArray:
    """Wrap any ``__dlpack__`` producer as a RawArray, with no copy.

    ``stream`` is the CUDA stream the caller will use the memory on: per the DLPack
    protocol the producer makes its pending work visible to that stream.
    """
    device = device_of(array)
    kwargs = {} if device.kind == "cpu" else {"stream": stream}
    try:
        capsule = array.__dlpack__(max_version=(1, 0), **kwargs)
    except TypeError:  # a producer from before DLPack 1.0 knows no max_version
        capsule = array.__dlpack__(**kwargs)
    name = _capsule_get_name(capsule)
    if name == _VERSIONED_NAME:
        managed = _DLManagedTensorVersioned.from_address(_capsule_get_pointer(capsule, name))
        readonly = bool(managed.flags & _FLAG_READ_ONLY)
    elif name == _LEGACY_NAME:
        managed = _DLManagedTensor.from_address(_capsule_get_pointer(capsule, name))
        readonly = False
    else:
        raise TypeError(f"{type(array).__name__}.__dlpack__ returned a capsule named {name!r}")
    tensor = managed.dl_tensor
    if tensor.dtype.lanes != 1:
        raise TypeError(f"vector DLPack dtypes are not supported (lanes={tensor.dtype.lanes})")
    key = (tensor.dtype.code, tensor.dtype.bits)
    if key not in _DTYPE_OF_CODE:
        raise TypeError(f"unsupported DLPack dtype (code={key[0]}, bits={key[1]})")
    dtype = _DTYPE_OF_CODE[key]
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    if tensor.strides:
        strides = tuple(tensor.strides[i] for i in range(tensor.ndim))
    else:
        strides = contiguous_strides(shape)
    # The capsule stays referenced: when it is collected unconsumed, its producer's
    # destructor calls the deleter, which is what keeps the memory alive until then.
    return RawArray(
        ptr=(tensor.data or 0) + tensor.byte_offset,
        shape=shape,
        strides=strides,
        dtype=dtype,
        device=_device_of(tensor.device.device_type, tensor.device.device_id),
        readonly=readonly,
        owner=capsule,
    )


def from_numpy(array: np.ndarray) -> RawArray:
    """A RawArray over a NumPy array's memory (no copy)."""
    itemsize = array.dtype.itemsize
    if any(s % itemsize for s in array.strides):
        raise ValueError("array strides must be whole elements")
    return RawArray(
        ptr=array.ctypes.data,
        shape=tuple(array.shape),
        strides=tuple(s // itemsize for s in array.strides),
        dtype=array.dtype,
        device=CPU,
        readonly=not array.flags.writeable,
        owner=array,
    )


# --- export -------------------------------------------------------------------------------

# Every exported struct, with the shape and stride arrays it points to and the RawArray
# whose memory it describes, keyed by the struct's address: that address is what the
# deleter receives, whichever of the two struct layouts was handed out.
_exports: dict[int, tuple] = {}
_exports_lock = threading.Lock()


@_Deleter
def _release_export(managed_ptr):
    with _exports_lock:
        _exports.pop(managed_ptr, None)


_CapsuleDestructor = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@_CapsuleDestructor
def _destroy_capsule(capsule_ptr):
    # A consumer that took the tensor renamed the capsule to "used_..." and owns the
    # deleter call; an untouched capsule still owns it.
    for name in (_LEGACY_NAME, _VERSIONED_NAME):
        if _capsule_is_valid_raw(capsule_ptr, name):
            _release_export(_capsule_get_pointer_raw(capsule_ptr, name))
            return


class DLPackExport:
    """A DLPack producer over a RawArray, for consumers that can only import (JAX).

    ``wait_for_stream(consumer_stream)`` is called when the consumer names a CUDA stream, so
    that the stream which wrote the memory can be ordered before it.
    """

    def __init__(self, raw: RawArray, wait_for_stream: Callable[[int], None] | None = None):
        self._raw = raw
        self._wait_for_stream = wait_for_stream

    def __dlpack_device__(self) -> tuple[int, int]:
        return (DL_CPU, 0) if self._raw.device.kind == "cpu" else (DL_CUDA, self._raw.device.index)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("cuattn exports its results without copies; copy=True is refused")
        if stream is not None and self._wait_for_stream is not None and stream != -1:
            self._wait_for_stream(int(stream))
        raw = self._raw
        versioned = max_version is not None and tuple(max_version) >= (1, 0)
        managed = _DLManagedTensorVersioned() if versioned else _DLManagedTensor()
        shape = (ctypes.c_int64 * max(raw.ndim, 1))(*raw.shape)
        strides = (ctypes.c_int64 * max(raw.ndim, 1))(*raw.strides)
        code, bits = _CODE_OF_DTYPE[np.dtype(raw.dtype)]
        tensor = managed.dl_tensor
        tensor.data = raw.ptr or None
        tensor.device = _DLDevice(*self.__dlpack_device__())
        tensor.ndim = raw.ndim
        tensor.dtype = _DLDataType(code, bits, 1)
        tensor.shape = shape
        tensor.strides = strides
        tensor.byte_offset = 0
        managed.deleter = _release_export
        if versioned:
            managed.version = _DLPackVersion(1, 0)
            managed.flags = _FLAG_READ_ONLY if raw.readonly else 0
        address = ctypes.addressof(managed)
        with _exports_lock:
            _exports[address] = (managed, shape, strides, raw)
        name = _VERSIONED_NAME if versioned else _LEGACY_NAME
        return _capsule_new(address, name, ctypes.cast(_destroy_capsule, ctypes.c_void_p))
