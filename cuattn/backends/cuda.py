"""The CUDA backend: kernels/ compiled by NVRTC, loaded through cupy.RawModule.

Compile once, cache twice: each instantiation is compiled on first use for the device's
architecture, the cubin kept on disk (cuattn/cache.py) with its mangled names, and the
loaded module kept per device in this process. Launches go to the caller's stream.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .. import nvrtc
from ..cache import cached_file, digest
from ..dlpack import RawArray
from ..interop import cupy_stream, framework_module
from ..kernel_params import (
    SplitWorkspace,
    append_lengths,
    append_params,
    attention_params,
    by_value,
    merge_params,
)
from ..kernels import (
    AppendKernel,
    CombineKernel,
    ForwardKernel,
    MergeKernel,
    all_kernels,
    dtype_name,
    kernel_dir,
    plan_forward,
)
from ..spec import AttentionSpec, Sequences

# Dynamic shared memory past this needs the kernel's opt-in attribute.
_DEFAULT_SHARED_LIMIT = 48 * 1024


Kernel = ForwardKernel | CombineKernel | MergeKernel | AppendKernel


def _cupy():
    return framework_module("cupy")


def _compile_into_cache(kernel: Kernel, arch: str) -> float:
    start = time.perf_counter()
    CudaBackend._compiled(kernel, arch)
    return time.perf_counter() - start


def precompile(
    arch: str, kernels: list[Kernel] | None = None, jobs: int | None = None
) -> list[tuple[str, float]]:
    """Compile ``kernels`` (by default every instantiation) for ``arch`` into the disk cache,
    ``jobs`` NVRTC processes at a time, so that no first call pays for compiling; needs no
    GPU. Returns (kernel name, seconds) per kernel, about 0 for those already cached."""
    kernels = all_kernels(arch) if kernels is None else kernels
    # Fresh processes: forking a parent that already holds a CUDA context is not safe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        seconds = pool.map(_compile_into_cache, kernels, [arch] * len(kernels))
        return [(kernel.name, s) for kernel, s in zip(kernels, seconds, strict=True)]


class CudaBackend:
    name = "cuda"

    def __init__(self):
        self._functions: dict[tuple[str, int], object] = {}
        self._sm_counts: dict[int, int] = {}
        self._arches: dict[int, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            cupy = _cupy()
        except ImportError:
            return "CuPy is not installed (pip install 'cuattn[cuda13]' or 'cuattn[cuda12]')"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA device is visible"
        except Exception as error:  # the driver's own exception types
            return f"no usable CUDA device ({error})"
        try:
            nvrtc.library()
        except nvrtc.NvrtcError as error:
            return str(error)
        return None

    def describe(self) -> str:
        cupy = _cupy()
        device = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
        major, minor = nvrtc.version()
        return (
            f"{name} (sm_{device.compute_capability}), CuPy {cupy.__version__}, "
            f"NVRTC {major}.{minor}"
        )

    @staticmethod
    def _compiled(kernel: Kernel, arch: str) -> tuple[str, str]:
        """(cubin path, mangled kernel name), compiled on a miss of the disk cache."""
        sources = [p.read_bytes() for p in sorted(kernel_dir().glob("*.cu*"))]
        stem = digest(
            [kernel.expression, arch, *nvrtc.BASE_OPTIONS, repr(nvrtc.version()), *sources]
        )

        def compile_to(path):
            program = nvrtc.compile_program(kernel.source, [kernel.expression], arch)
            # The name first: a cubin in the cache always has its name beside it.
            cached_file(
                "cuda",
                f"{stem}.name",
                lambda p: p.write_text(program.lowered_names[kernel.expression]),
            )
            path.write_bytes(program.binary)

        cubin = cached_file("cuda", f"{stem}.cubin", compile_to)
        return str(cubin), cubin.with_suffix(".name").read_text()

    def _function(self, kernel: Kernel, device_id: int):
        """The loaded kernel for ``device_id``: compiled or read from disk once per process."""
        key = (kernel.name, device_id)
        with self._lock:
            if key not in self._functions:
                cupy = _cupy()
                with cupy.cuda.Device(device_id) as device:
                    path, mangled = self._compiled(kernel, self._arch(device.id))
                    function = cupy.RawModule(path=path).get_function(mangled)
                    if kernel.shared_bytes > _DEFAULT_SHARED_LIMIT:
                        function.max_dynamic_shared_size_bytes = kernel.shared_bytes
                self._functions[key] = function
            return self._functions[key]

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
        """``allocate(count)``: ``count`` float32 of device scratch memory, a RawArray whose
        owner holds it (by default from CuPy's pool)."""
        cupy = _cupy()
        device_id = q.device.index
        with cupy.cuda.Device(device_id), cupy_stream(stream):
            plan = plan_forward(
                spec,
                sequences,
                q.shape,
                self._multiprocessors(device_id),
                arch=self._arch(device_id),
            )
            # Device memory allocated here goes back to its pool when the call returns; the
            # pool hands it out again only in this stream's order, after the kernels.
            lengths = {}
            for name, raw in sequences.lengths.items():
                if raw.device.kind == "cpu":  # lengths given as an int, a list or a host array
                    # CuPy stages the copy through pinned memory on the current stream: the
                    # call does not wait for the GPU.
                    on_device = cupy.asarray(raw.numpy())
                    raw = RawArray(
                        on_device.data.ptr,
                        raw.shape,
                        raw.strides,
                        raw.dtype,
                        q.device,
                        True,
                        on_device,
                    )
                lengths[name] = raw
            sequences = Sequences(sequences.kind, sequences.table, sequences.new_tokens, lengths)
            split = None
            if plan.num_splits > 1:
                # One allocation for both: outputs (16-byte aligned, as the combine kernel's
                # float4 reads need; allocators align more), then the lse. Held until both
                # kernels are queued; the allocator reuses it in this stream's order.
                slots = plan.num_splits * plan.split_rows * spec.num_heads_q
                count = slots * (spec.head_dim + 1)
                if allocate is None:
                    workspace = cupy.empty(count, cupy.float32)
                    base = workspace.data.ptr
                else:
                    workspace = allocate(count)
                    base = workspace.ptr
                if base % 16:
                    raise RuntimeError(f"split workspace at {base:#x}: not 16-byte aligned")
                out_bytes = slots * spec.head_dim * 4
                split = SplitWorkspace(plan.num_splits, plan.split_rows, base, base + out_bytes)
            params = attention_params(spec, q, k, v, out, lse, sinks, sequences, split)
            kernel = plan.kernel
            self._function(kernel, device_id)(
                plan.grid,
                (kernel.threads, 1, 1),
                (by_value(params),),
                shared_mem=kernel.shared_bytes,
            )
            if plan.num_splits > 1:
                combine = plan.combine
                self._function(combine, device_id)(
                    combine.grid(plan.split_rows, spec.num_heads_q, spec.head_dim, plan.num_splits),
                    (combine.threads, 1, 1),
                    (by_value(params),),
                    shared_mem=combine.shared_bytes,
                )

    def _arch(self, device_id: int) -> str:
        if device_id not in self._arches:
            self._arches[device_id] = f"sm_{_cupy().cuda.Device(device_id).compute_capability}"
        return self._arches[device_id]

    def _multiprocessors(self, device_id: int) -> int:
        if device_id not in self._sm_counts:
            properties = _cupy().cuda.runtime.getDeviceProperties(device_id)
            self._sm_counts[device_id] = int(properties["multiProcessorCount"])
        return self._sm_counts[device_id]

    def merge(self, out_a, lse_a, out_b, lse_b, out, lse, stream=None) -> None:
        cupy = _cupy()
        kernel = MergeKernel(dtype_name(out.dtype))
        rows = out.shape[0] * out.shape[1] * out.shape[2]
        with cupy.cuda.Device(out.device.index):
            function = self._function(kernel, out.device.index)
            function(
                kernel.grid(rows),
                (kernel.threads, 1, 1),
                (by_value(merge_params(out_a, lse_a, out_b, lse_b, out, lse)),),
                stream=cupy_stream(stream),
            )

    def append_kv(
        self,
        k_cache: RawArray,
        v_cache: RawArray,
        k_new: RawArray,
        v_new: RawArray,
        cache_seqlens: np.ndarray | RawArray,
        stream: int | None = None,
    ) -> None:
        """``cache_seqlens``: host lengths, or the caller's device array, read by the kernel."""
        cupy = _cupy()
        batch, new_tokens = k_new.shape[:2]
        if batch * new_tokens == 0:  # nothing to write (and no grid of zero blocks)
            return
        kernel = AppendKernel(dtype_name(k_cache.dtype))
        with cupy.cuda.Device(k_cache.device.index), cupy_stream(stream):
            if isinstance(cache_seqlens, RawArray):
                lengths, host_lengths, filled = cache_seqlens, None, 0
            else:
                lengths, (host_lengths, filled) = None, append_lengths(cache_seqlens)
            if host_lengths is not None:
                # Staged through pinned memory on the current stream, like the forward
                # call's lengths; freed to CuPy's pool in stream order.
                on_device = cupy.asarray(host_lengths)
                lengths = RawArray(
                    on_device.data.ptr,
                    (batch,),
                    (1,),
                    np.dtype(np.int32),
                    k_cache.device,
                    True,
                    on_device,
                )
            self._function(kernel, k_cache.device.index)(
                kernel.grid(batch, new_tokens),
                (kernel.threads, 1, 1),
                (by_value(append_params(k_cache, v_cache, k_new, v_new, lengths, filled)),),
            )
