"""The emulation backend: kernels/'s CUDA sources compiled by g++ and run on the CPU.

The same .cu files NVRTC compiles for the GPU are built against kernels/emu (see
emu/cuda.h for what it emulates) into a shared library per group of instantiations,
cached on disk, and called through ctypes. In sanitizer mode the library is instead an
AddressSanitizer-built server process (emu/server.cpp) that receives each launch with
every array copied into a buffer of exactly its size.

Options, from the environment or ``configure()``:
  CUATTN_EMULATE_SANITIZE=1          run under AddressSanitizer
  CUATTN_EMULATE_SCHEDULE=forward|reverse|shuffled|warps   thread order between barriers
  CUATTN_EMULATE_WORKERS=N           OS threads running blocks (default: one per core)
  CUATTN_EMULATE_TIME_LIMIT=seconds  a launch running longer fails (default 600)
  CUATTN_EMULATE_MULTIPROCESSORS=N   the GPU size launches are planned for (default 8)
  CUATTN_EMULATE_COPIES=at-wait|at-issue   when cp.async copies write shared memory
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..cache import cached_file, digest
from ..dlpack import RawArray, from_numpy
from ..kernel_params import (
    SplitWorkspace,
    append_lengths,
    append_params,
    attention_params,
    merge_params,
)
from ..kernels import AppendKernel, MergeKernel, dtype_name, kernel_dir, plan_forward
from ..spec import AttentionSpec, Sequences

# Thread orders between synchronization points (emu/runtime.h); "warps": each warp runs to
# its next barrier before the next warp moves.
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2, "warps": 3}
# When a cp.async copy lands (emu/runtime.h): at its wait, which shows reads of copies not
# yet waited for, or at issue, which shows copies that overwrite what other warps still read.
COPY_LANDINGS = {"at-wait": 0, "at-issue": 1}


class EmulationFault(RuntimeError):
    """An emulated kernel faulted: the message says where (file:line) and why."""


@dataclasses.dataclass
class EmulationOptions:
    schedule: str = "forward"
    seed: int = 0
    workers: int = 0
    time_limit: float = 600.0
    sanitize: bool = False
    # Build from another copy of kernels/ (a kernel being debugged, or a test's planted bug).
    kernel_dir: Path | None = None
    # The GPU size that launch planning assumes (split-KV depends on it).
    multiprocessors: int = 8
    copies: str = "at-wait"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule: expected one of {sorted(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.copies not in COPY_LANDINGS:
            raise ValueError(
                f"copies: expected one of {sorted(COPY_LANDINGS)}, got {self.copies!r}"
            )

    @classmethod
    def from_environment(cls) -> EmulationOptions:
        env = os.environ
        return cls(
            schedule=env.get("CUATTN_EMULATE_SCHEDULE", "forward"),
            seed=int(env.get("CUATTN_EMULATE_SEED", "0")),
            workers=int(env.get("CUATTN_EMULATE_WORKERS", "0")),
            time_limit=float(env.get("CUATTN_EMULATE_TIME_LIMIT", "600")),
            sanitize=env.get("CUATTN_EMULATE_SANITIZE", "") not in ("", "0"),
            multiprocessors=int(env.get("CUATTN_EMULATE_MULTIPROCESSORS", "8")),
            copies=env.get("CUATTN_EMULATE_COPIES", "at-wait"),
            kernel_dir=Path(env["CUATTN_EMULATE_KERNEL_DIR"])
            if env.get("CUATTN_EMULATE_KERNEL_DIR")
            else None,
        )


class _LaunchOptions(ctypes.Structure):
    """emu/runtime.h's LaunchOptions."""

    _fields_ = [
        ("schedule", ctypes.c_int),
        ("seed", ctypes.c_uint),
        ("workers", ctypes.c_int),
        ("time_limit_seconds", ctypes.c_double),
        ("stack_bytes", ctypes.c_size_t),
        ("copy_landing", ctypes.c_int),
    ]


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _sources(root: Path) -> list[bytes]:
    """Every file a library is built from, so that an edit makes a new cache entry."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    return [str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() for p in files]


@dataclasses.dataclass(frozen=True)
class LibraryKernel:
    """One launchable entry of an emulation library."""

    name: str  # how launches ask for it
    expression: str  # the C++ instantiation, e.g. cuattn::flash_forward<...>
    params_type: str = "cuattn::AttentionParams"  # the struct the kernel takes by value


def library_source(sources: tuple[str, ...], kernels: tuple[LibraryKernel, ...]) -> str:
    """The translation unit of one library: runtime, kernel sources, launcher table."""
    table = ",\n".join(
        f'    {{"{k.name}", &cuemu_module::launch_kernel<{k.params_type}, &{k.expression}>}}'
        for k in kernels
    )
    return "\n".join(
        [
            "// Written by cuattn/backends/emulate.py.",
            '#include "emu/module.h"',
            *[f'#include "{s}"' for s in sources],
            f"CUEMU_MODULE_TABLE(\n{table}\n)",
            "#ifdef CUEMU_SERVER",
            '#include "emu/server.cpp"',
            "#endif",
            "",
        ]
    )


_FLAGS = ["-std=c++20", "-g", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function"]
_LIBRARY_FLAGS = ["-O2", "-fPIC", "-shared"]
_SERVER_FLAGS = ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer", "-DCUEMU_SERVER"]


def build(
    root: Path, sources: tuple[str, ...], kernels: tuple[LibraryKernel, ...], sanitize: bool
) -> Path:
    """The library (or sanitizer server) of ``kernels`` from ``sources`` under ``root``,
    compiled once and then taken from the cache."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the emulation backend needs a C++ compiler (g++); none was found")
    source = library_source(sources, kernels)
    flags = _FLAGS + (_SERVER_FLAGS if sanitize else _LIBRARY_FLAGS)
    listed = [(root / s).read_bytes() for s in sources]  # sources may also lie outside root
    key = digest([source, " ".join(flags), _compiler_version(cxx), *_sources(root), *listed])
    name = f"{key}.{'server' if sanitize else 'so'}"

    def compile_to(output: Path) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as handle:
            handle.write(source)
        try:
            done = subprocess.run(
                [cxx, *flags, "-I", str(root), handle.name, "-o", str(output)],
                capture_output=True,
                text=True,
            )
        finally:
            os.unlink(handle.name)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the emulated kernels failed:\n{done.stderr[-20000:]}")

    return cached_file("emulate", name, compile_to)


def _extent(raw: RawArray) -> tuple[int, int]:
    """(first byte address, byte count) of the memory ``raw`` can reach."""
    if raw.size == 0:
        return raw.ptr, 0
    low = sum(min(0, (n - 1) * s) for n, s in zip(raw.shape, raw.strides, strict=True))
    high = sum(max(0, (n - 1) * s) for n, s in zip(raw.shape, raw.strides, strict=True))
    itemsize = raw.dtype.itemsize
    return raw.ptr + low * itemsize, (high - low + 1) * itemsize


def _overlapping(extents: dict[str, tuple[int, int]]) -> set[str]:
    """The names of the (start, size) extents that share a byte with another one."""
    return {
        name
        for name, (start, size) in extents.items()
        for other, (other_start, other_size) in extents.items()
        if other != name and start < other_start + other_size and other_start < start + size
    }


def _copy_view_back(raw: RawArray, start: int, returned: bytes) -> None:
    """Writes back only ``raw``'s own elements from the server's copy of its extent. Writable
    arrays may be interleaved views of one buffer (K and V caches as kv[:, :, 0] and
    kv[:, :, 1]): copying back one whole extent would restore the other's old values."""
    itemsize = raw.dtype.itemsize
    copy = np.ndarray(
        raw.shape,
        raw.dtype,
        buffer=returned,
        offset=raw.ptr - start,
        strides=tuple(s * itemsize for s in raw.strides),
    )
    raw.numpy()[...] = copy


class _Library:
    def __init__(self, path: Path):
        self._library = ctypes.CDLL(str(path))
        self._launch = self._library.cuattn_launch
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(_LaunchOptions),
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]

    def launch(
        self,
        name: str,
        params: np.ndarray,
        dims,
        options: _LaunchOptions,
        arrays: dict[str, RawArray],
        writable: set[str],
    ) -> None:
        error = ctypes.create_string_buffer(8192)
        status = self._launch(
            name.encode(),
            params.ctypes.data,
            (ctypes.c_uint * 7)(*dims),
            ctypes.byref(options),
            error,
            len(error),
        )
        if status != 0:
            raise EmulationFault(error.value.decode(errors="replace"))


class _Server:
    """An AddressSanitizer-built server process (emu/server.cpp) and its protocol."""

    def __init__(self, path: Path):
        self._path = path
        self._process = None
        self._stderr = None

    def _start(self):
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1")
        self._process = subprocess.Popen(
            [str(self._path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )

    def launch(
        self,
        name: str,
        params: np.ndarray,
        dims,
        options: _LaunchOptions,
        arrays: dict[str, RawArray],
        writable: set[str],
    ) -> None:
        if self._process is None or self._process.poll() is not None:
            self._start()
        buffers = []
        request = [
            struct.pack("<I", len(name)),
            name.encode(),
            struct.pack("<7I", *dims),
            bytes(options),
            struct.pack("<I", params.nbytes),
            params.tobytes(),
            struct.pack("<I", len(arrays)),
        ]
        for field, raw in arrays.items():
            start, size = _extent(raw)
            offset = params.dtype.fields[field][1]
            request.append(
                struct.pack("<QBIIQ", size, field in writable, 1, offset, raw.ptr - start)
            )
            request.append(ctypes.string_at(start, size) if size else b"")
            buffers.append((field, start, size))
        try:
            self._process.stdin.write(b"".join(request))
            self._process.stdin.flush()
            status, error_length = struct.unpack("<II", self._read(8))
            error = self._read(error_length).decode(errors="replace")
            shared = _overlapping({f: (a, n) for f, a, n in buffers if f in writable})
            for field, start, size in buffers:
                if field in writable:
                    returned = self._read(size)
                    if field in shared:
                        _copy_view_back(arrays[field], start, returned)
                    else:
                        ctypes.memmove(start, returned, size)
        except (BrokenPipeError, EOFError) as broken:
            self._process.wait()
            self._stderr.seek(0)
            report = self._stderr.read().decode(errors="replace")
            self._process = None
            raise EmulationFault(f"the sanitizer server stopped:\n{report[-20000:]}") from broken
        if status != 0:
            raise EmulationFault(error)

    def _read(self, size: int) -> bytes:
        data = self._process.stdout.read(size)
        if len(data) != size:
            raise EOFError
        return data

    def close(self):
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait()


class EmulateBackend:
    name = "emulate"

    def __init__(self):
        self.options = EmulationOptions.from_environment()
        self._loaded: dict[Path, object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def unavailable_reason() -> str | None:
        if compiler() is None:
            return "no C++ compiler found (install g++, or set CXX)"
        return None

    def describe(self) -> str:
        mode = "AddressSanitizer" if self.options.sanitize else "plain"
        return f"{compiler()} ({mode}, schedule {self.options.schedule})"

    def configure(self, **changes) -> EmulationOptions:
        """Change options (see the module docstring); returns the previous ones."""
        previous = self.options
        self.options = dataclasses.replace(previous, **changes)
        return previous

    def run_kernel(
        self,
        sources: tuple[str, ...],
        kernels: tuple[LibraryKernel, ...],
        name: str,
        params: np.ndarray,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_bytes: int,
        arrays: dict[str, RawArray],
        writable: set[str],
    ) -> None:
        """Launch kernel ``name`` of the library made of ``kernels``. ``params`` is the
        struct the kernel takes; ``arrays`` maps its pointer fields to the memory they
        point into (the sanitizer server copies exactly that memory), ``writable`` names
        those the kernel writes."""
        root = self.options.kernel_dir or kernel_dir()
        path = build(Path(root), sources, kernels, self.options.sanitize)
        options = _LaunchOptions(
            SCHEDULES[self.options.schedule],
            self.options.seed,
            self.options.workers,
            self.options.time_limit,
            0,
            COPY_LANDINGS[self.options.copies],
        )
        with self._lock:
            if path not in self._loaded:
                self._loaded[path] = _Server(path) if self.options.sanitize else _Library(path)
            self._loaded[path].launch(
                name, params, (*grid, *block, shared_bytes), options, arrays, writable
            )

    def forward(
        self,
        spec: AttentionSpec,
        q: RawArray,
        k: RawArray,
        v: RawArray,
        out: RawArray,
        lse: RawArray | None,
        sinks: RawArray | None,
        sequences: Sequences,
        stream: int | None = None,
        allocate: Callable[[int], RawArray] | None = None,
    ) -> None:
        """``allocate(count)``: as for the CUDA backend (host memory here); without it the
        split workspace is NumPy's."""
        plan = plan_forward(spec, sequences, q.shape, self.options.multiprocessors)
        arrays = {
            "q": q,
            "k": k,
            "v": v,
            "out": out,
            "lse": lse,
            "sinks": sinks,
            **sequences.lengths,
        }
        arrays = {name: raw for name, raw in arrays.items() if raw is not None}
        writable, split = {"out", "lse"}, None
        if plan.num_splits > 1:
            slots = plan.num_splits * plan.split_rows * spec.num_heads_q
            if allocate is None:
                workspace = from_numpy(np.empty(slots * (spec.head_dim + 1), np.float32))
            else:
                workspace = allocate(slots * (spec.head_dim + 1))
            # Poisoned, like every result buffer (whoever allocated it): a slot no split
            # wrote shows as NaN. Outputs first, then the lse, as on the GPU.
            whole = workspace.numpy()
            whole.fill(np.nan)
            arrays["split_out"] = from_numpy(whole[: slots * spec.head_dim])
            arrays["split_lse"] = from_numpy(whole[slots * spec.head_dim :])
            split = SplitWorkspace(
                plan.num_splits, plan.split_rows, arrays["split_out"].ptr, arrays["split_lse"].ptr
            )
            writable = {"split_out", "split_lse"}
        params = attention_params(spec, q, k, v, out, lse, sinks, sequences, split)
        # One library per (dtype, head dim): its flag variants compile together.
        variants = tuple(LibraryKernel(k.name, k.expression) for k in plan.kernel.variants())
        self.run_kernel(
            (plan.kernel.source,),
            variants,
            plan.kernel.name,
            params,
            plan.grid,
            (plan.kernel.threads, 1, 1),
            plan.kernel.shared_bytes,
            arrays,
            writable,
        )
        if plan.num_splits > 1:
            combine = plan.combine
            self.run_kernel(
                (combine.source,),
                (LibraryKernel(combine.name, combine.expression),),
                combine.name,
                params,
                combine.grid(plan.split_rows, spec.num_heads_q, spec.head_dim, plan.num_splits),
                (combine.threads, 1, 1),
                combine.shared_bytes,
                arrays,
                {"out", "lse"},
            )

    def merge(self, out_a, lse_a, out_b, lse_b, out, lse, stream=None) -> None:
        kernel = MergeKernel(dtype_name(out.dtype))
        entry = LibraryKernel(kernel.name, kernel.expression, kernel.params_type)
        rows = out.shape[0] * out.shape[1] * out.shape[2]
        arrays = {
            "out_a": out_a,
            "lse_a": lse_a,
            "out_b": out_b,
            "lse_b": lse_b,
            "out": out,
            "lse": lse,
        }
        self.run_kernel(
            (kernel.source,),
            (entry,),
            kernel.name,
            merge_params(out_a, lse_a, out_b, lse_b, out, lse),
            kernel.grid(rows),
            (kernel.threads, 1, 1),
            kernel.shared_bytes,
            arrays,
            {"out", "lse"},
        )

    def append_kv(
        self,
        k_cache: RawArray,
        v_cache: RawArray,
        k_new: RawArray,
        v_new: RawArray,
        cache_seqlens: np.ndarray,
        stream: int | None = None,
    ) -> None:
        batch, new_tokens = k_new.shape[:2]
        if batch * new_tokens == 0:  # nothing to write (and no grid of zero blocks)
            return
        kernel = AppendKernel(dtype_name(k_cache.dtype))
        arrays = {"k_cache": k_cache, "v_cache": v_cache, "k_new": k_new, "v_new": v_new}
        lengths, (host_lengths, filled) = None, append_lengths(cache_seqlens)
        if host_lengths is not None:
            lengths = arrays["cache_seqlens"] = from_numpy(host_lengths)
        self.run_kernel(
            (kernel.source,),
            (LibraryKernel(kernel.name, kernel.expression, kernel.params_type),),
            kernel.name,
            append_params(k_cache, v_cache, k_new, v_new, lengths, filled),
            kernel.grid(batch, new_tokens),
            (kernel.threads, 1, 1),
            kernel.shared_bytes,
            arrays,
            {"k_cache", "v_cache"},
        )
