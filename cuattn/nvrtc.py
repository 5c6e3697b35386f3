"""NVRTC through ctypes: the one compiler of the GPU kernels, with or without a GPU.

The CUDA backend compiles with it at run time; the tests compile every instantiation with
it for sm_80 and sm_90 on machines without a GPU and read ptxas's register and spill
report. Same library, same options; but releases differ (NVRTC 13.0 refused a generic lambda
in device code that 13.5 took), so CI compiles every kernel with the oldest CUDA 13 release
as well as the newest (.ci/run). ``$CUATTN_NVRTC`` names the library to use.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .kernels import kernel_dir

# -Xptxas=-v makes NVRTC's log carry ptxas's resource report for every kernel.
BASE_OPTIONS = ("--std=c++17", "-Xptxas=-v")


class NvrtcError(RuntimeError):
    """Compilation failed; the message holds NVRTC's log."""


def _candidates() -> list[str]:
    """Where libnvrtc may be: $CUATTN_NVRTC alone where set; else the nvidia-cuda-nvrtc
    wheel, CUDA_PATH, the loader's path."""
    if os.environ.get("CUATTN_NVRTC"):
        return [os.environ["CUATTN_NVRTC"]]
    found = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            found += sorted(glob.glob(os.path.join(entry, pattern)), reverse=True)
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")), reverse=True)
    found += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    return [path for path in found if "builtins" not in path and not path.endswith(".alt.so")]


def _load_builtins_beside(candidate: str) -> None:
    """Loads the libnvrtc-builtins beside a libnvrtc path, which libnvrtc opens by name when
    it compiles: some wheels' libnvrtc (13.0's) has no RPATH to find it by."""
    folder = os.path.dirname(candidate)
    if not folder:
        return
    for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so.*"))):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)


@functools.cache
def library() -> ctypes.CDLL:
    errors = []
    for candidate in _candidates():
        try:
            _load_builtins_beside(candidate)
            lib = ctypes.CDLL(candidate)
        except OSError as error:
            errors.append(f"{candidate}: {error}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise NvrtcError(
        "NVRTC was not found (pip install nvidia-cuda-nvrtc, or install CUDA); tried:\n  "
        + "\n  ".join(errors[-6:])
    )


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(status: int, what: str) -> None:
    if status != 0:
        raise NvrtcError(f"{what}: {library().nvrtcGetErrorString(status).decode()}")


@dataclass(frozen=True)
class KernelResources:
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


@dataclass(frozen=True)
class Program:
    """A compiled program: the binary, and per name expression its mangled name."""

    binary: bytes
    is_cubin: bool
    lowered_names: dict[str, str]
    log: str

    def resources(self) -> dict[str, KernelResources]:
        """ptxas's report, per name expression."""
        by_mangled = {}
        current = None
        for line in self.log.splitlines():
            if m := re.search(r"Function properties for (\S+)", line):
                current = m.group(1)
            elif current and (
                m := re.search(
                    r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads",
                    line,
                )
            ):
                stack, stores, loads = map(int, m.groups())
                by_mangled[current] = [stack, stores, loads]
            elif current and (m := re.search(r"Used (\d+) registers", line)):
                by_mangled[current].insert(0, int(m.group(1)))
                current = None
        return {
            expression: KernelResources(*by_mangled[mangled])
            for expression, mangled in self.lowered_names.items()
            if mangled in by_mangled
        }


def compile_program(
    source_name: str,
    expressions: list[str],
    arch: str,
    *,
    cubin: bool = True,
    root: Path | None = None,
    extra_options: tuple[str, ...] = (),
) -> Program:
    """Compile ``kernels/<source_name>`` for ``arch`` (e.g. "sm_90"), instantiating every
    name expression. ``cubin=False`` gives PTX for a virtual architecture instead."""
    lib = library()
    root = root or kernel_dir()
    source = (root / source_name).read_bytes()
    program = ctypes.c_void_p()
    _check(
        lib.nvrtcCreateProgram(ctypes.byref(program), source, source_name.encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        for expression in expressions:
            _check(
                lib.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression"
            )
        target = arch if cubin else arch.replace("sm_", "compute_")
        options = [f"-arch={target}", f"-I{root}", *BASE_OPTIONS, *extra_options]
        array = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(program, len(options), array)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log_buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log_buffer)
        log = log_buffer.value.decode(errors="replace")
        if status != 0:
            raise NvrtcError(f"compiling {source_name} for {arch} failed:\n{log}")
        lowered = {}
        for expression in expressions:
            name = ctypes.c_char_p()
            _check(
                lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(name)),
                "nvrtcGetLoweredName",
            )
            lowered[expression] = name.value.decode()
        get_size, get = (
            (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
            if cubin
            else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
        )
        _check(get_size(program, ctypes.byref(size)), "binary size")
        binary = ctypes.create_string_buffer(size.value)
        _check(get(program, binary), "binary")
        return Program(binary.raw, cubin, lowered, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))
