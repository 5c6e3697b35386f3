"""The CUDA kernels that exist, one record per template instantiation.

This table is where runtime options become compile-time parameters: a call's spec picks
one entry (``forward_kernel``), the entry names the C++ template instantiation NVRTC
compiles and the emulator builds, and carries the launch geometry both backends use.
Tile sizes live here and only here; the kernels take them as template arguments and trap
if launched with less shared memory than their tiles need.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from .dlpack import BFLOAT16
from .spec import AttentionSpec

# Head dims the kernels are compiled for; a call's head dim rounds up to the next one and
# the padding columns are zero in shared memory (and skipped by the k16 loops).
HEAD_DIMS = (32, 64, 96, 128, 192, 256)

_DTYPE_NAMES = {"float16": "cuattn::half", "bfloat16": "cuattn::bfloat16", "float32": "float"}
_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}

# (block_m, block_n, warps) per (tensor cores?, head dim). Chosen so that every
# instantiation compiles for sm_80 and sm_90 with no register spills
# (tests/test_kernel_build.py); 128-row tiles spill at head dims >= 64.
_TENSOR_CORE_TILES = {d: (64, 64, 4) for d in HEAD_DIMS}
_SIMT_TILES = {d: (32, 32, 4) for d in HEAD_DIMS}  # 4 lanes per row: 32 rows = 4 warps


def kernel_dir() -> Path:
    """The CUDA sources: kernels/ of a checkout, or cuattn/kernel_sources of a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "kernels", here / "kernel_sources"):
        if (candidate / "fwd.cu").is_file():
            return candidate
    raise FileNotFoundError(
        f"cuattn's CUDA sources (fwd.cu) are neither in {here.parent / 'kernels'} "
        f"nor in {here / 'kernel_sources'}"
    )


def padded_head_dim(head_dim: int) -> int:
    return next(d for d in HEAD_DIMS if d >= head_dim)


@dataclass(frozen=True)
class ForwardKernel:
    """One instantiation of the forward kernel (fwd.cu)."""

    dtype: str  # "float16", "bfloat16" or "float32"
    head_dim: int  # one of HEAD_DIMS
    windowed: bool  # any causal / window / sink-token mask
    softcap: bool

    source = "fwd.cu"
    params_type = "cuattn::AttentionParams"

    @property
    def tensor_cores(self) -> bool:
        return self.dtype != "float32"

    @property
    def tile(self) -> tuple[int, int, int]:
        """(block_m, block_n, warps)."""
        return (_TENSOR_CORE_TILES if self.tensor_cores else _SIMT_TILES)[self.head_dim]

    @property
    def block_m(self) -> int:
        return self.tile[0]

    @property
    def threads(self) -> int:
        return self.tile[2] * 32

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory: a Q tile and a K and a V tile, rows padded by 16 bytes
        (tile.cuh's SharedTile)."""
        block_m, block_n, _ = self.tile
        itemsize = 4 if self.dtype == "float32" else 2
        row_bytes = self.head_dim * itemsize + 16
        return (block_m + 2 * block_n) * row_bytes

    @property
    def name(self) -> str:
        """A key naming every parameter, usable as a C identifier."""
        flags = ("_windowed" if self.windowed else "") + ("_softcap" if self.softcap else "")
        return f"forward_{_SHORT[self.dtype]}_d{self.head_dim}{flags}"

    @property
    def expression(self) -> str:
        """The C++ name of the instantiation (NVRTC name expression)."""
        block_m, block_n, warps = self.tile
        flags = f"{str(self.windowed).lower()}, {str(self.softcap).lower()}"
        if self.tensor_cores:
            return (
                f"cuattn::flash_forward<{_DTYPE_NAMES[self.dtype]}, {self.head_dim}, {block_m}, "
                f"{block_n}, {warps}, {flags}>"
            )
        return f"cuattn::flash_forward_simt<{self.head_dim}, {block_m}, {block_n}, {flags}>"

    def grid(
        self, max_query_len: int, num_heads_q: int, num_sequences: int
    ) -> tuple[int, int, int]:
        """Blocks: query tiles of the longest sequence x query heads x sequences."""
        return (-(-max_query_len // self.block_m), num_heads_q, num_sequences)


def forward_kernel(spec: AttentionSpec) -> ForwardKernel:
    """The instantiation that computes ``spec``."""
    windowed = spec.window_left >= 0 or spec.window_right >= 0
    return ForwardKernel(
        dtype_name(spec.dtype), padded_head_dim(spec.head_dim), windowed, spec.softcap > 0
    )


@dataclass(frozen=True)
class MergeKernel:
    """The kernel that merges two attention states by their lse (combine.cu)."""

    dtype: str

    source = "combine.cu"
    params_type = "cuattn::MergeParams"
    threads = 128
    rows_per_block = 4  # a warp per (batch, row, head)
    shared_bytes = 0

    @property
    def name(self) -> str:
        return f"merge_{_SHORT[self.dtype]}"

    @property
    def expression(self) -> str:
        return f"cuattn::merge_states<{_DTYPE_NAMES[self.dtype]}>"

    def grid(self, rows: int) -> tuple[int, int, int]:
        return (-(-rows // self.rows_per_block), 1, 1)


def dtype_name(dtype) -> str:
    """ "float16", "bfloat16" or "float32"."""
    return "bfloat16" if dtype == BFLOAT16 else dtype.name


@functools.cache
def all_kernels() -> tuple[ForwardKernel | MergeKernel, ...]:
    """Every instantiation cuattn can launch."""
    dtypes = ("float16", "bfloat16", "float32")
    forward = tuple(
        ForwardKernel(dtype, head_dim, windowed, softcap)
        for dtype in dtypes
        for head_dim in HEAD_DIMS
        for windowed in (False, True)
        for softcap in (False, True)
    )
    return forward + tuple(MergeKernel(dtype) for dtype in dtypes)
