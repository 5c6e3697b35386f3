"""The CUDA kernels that exist, one record per template instantiation.

This table is where runtime options become compile-time parameters: a call's spec picks
one entry (``forward_kernel``), the entry names the C++ template instantiation NVRTC
compiles and the emulator builds, and carries the launch geometry both backends use.
Tile sizes live here and only here; the kernels take them as template arguments and trap
if launched with less shared memory than their tiles need.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from .dlpack import BFLOAT16
from .spec import AttentionSpec, Sequences

# Head dims the kernels are compiled for; a call's head dim rounds up to the next one. The
# padding columns are zero in shared memory and the k16 loops run over them too (a loop
# bound known at compile time is worth more than the skipped steps; see kernels/fwd.cu).
HEAD_DIMS = (32, 64, 96, 128, 192, 256)

_DTYPE_NAMES = {"float16": "cuattn::half", "bfloat16": "cuattn::bfloat16", "float32": "float"}
_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


class Tile(NamedTuple):
    """A forward block's shape: query rows, keys per tile, warps, and how many K/V tiles
    it keeps in shared memory (fwd.cu: one, or a ring that copies ahead of the loop)."""

    block_m: int
    block_n: int
    warps: int
    kv_stages: int = 1

    def __str__(self) -> str:
        stages = f"s{self.kv_stages}" if self.kv_stages > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.warps}{stages}"

    @classmethod
    def parse(cls, text: str) -> Tile:
        """The tile ``str(tile)`` wrote: "128x64x8", or "128x64x8s2" with two K/V stages."""
        found = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:s(\d+))?", text)
        if found is None:
            raise ValueError(
                f"tile: expected block_m x block_n x warps, optionally s<stages> "
                f"(like 128x64x8s2), got {text!r}"
            )
        return cls(*(int(part) for part in found.groups() if part is not None))


# The tile per (tensor cores?, head dim). Chosen so that every instantiation compiles for
# sm_80 and sm_90 with no register spills (tests/test_kernel_build.py), and at head dims 64
# and 128 by timing candidates on an H200 (bench/tiles.py; bench/results/tiles-*): 64 x 32
# was the fastest at 64, 128 x 64 over 8 warps at 128. 256 needs the narrow key tile to
# stay in registers.
_TENSOR_CORE_TILES = {d: Tile(64, 64, 4) for d in HEAD_DIMS} | {
    64: Tile(64, 32, 4),
    128: Tile(128, 64, 8),
    256: Tile(64, 16, 4),
}
# Where one architecture's fastest tile differs from the table's (timed there by bench/tiles.py):
# "sm_90" -> head dim -> tile, for prefill (decoding keeps the decoding tile). Every prefill
# variant of such a tile must compile without spills for its architecture, which
# tests/test_kernel_build.py checks and `bench resources` reports ahead
# (bench/results/resources-sm_*). sm_90's entries won 8354313's sweep on the H200 (bench/NOTES.md,
# item 19): at D=64 the fastest tile, 128x64x4s2, 1.33-1.55x as fast as the table's; at D=128 the
# fastest whose variants all compile without spills (NVRTC 13.0 and 13.5), 128x32x4,
# 1.25-1.30x. The faster 128x64x4s2 spills there. sm_80 was never timed, so it keeps the table.
ARCH_TILES: dict[str, dict[int, Tile]] = {
    "sm_90": {64: Tile(128, 64, 4, 2), 128: Tile(128, 32, 4)},
}
_SIMT_TILES = {d: Tile(32, 32, 4) for d in HEAD_DIMS}  # 4 lanes per row: 32 rows = 4 warps
# Decoding (at most this many query rows per block: one token, or the packed query heads
# of a group) takes a tile of DECODE_ROWS rows with the prefill tile's per-warp work (16
# rows a warp), so registers are unchanged; the smaller block leaves room for more blocks
# per multiprocessor, which split-KV fills. Both targets were measured (bench/tiles.py).
DECODE_ROWS = 32
DECODE_BLOCKS_PER_MULTIPROCESSOR = 4
PREFILL_BLOCKS_PER_MULTIPROCESSOR = 2


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
    # Grouped-query packing: a block takes all query heads of one KV head (tensor cores only).
    pack_gqa: bool = False
    # A tile other than the table's, for tuning (bench/tiles.py): a Tile or a tuple of its
    # fields.
    tile_override: Tile | tuple[int, ...] | None = None
    # The decoding tile (DECODE_ROWS rows; tensor cores only).
    decode: bool = False

    source = "fwd.cu"
    params_type = "cuattn::AttentionParams"

    def __post_init__(self):
        if self.tile_override is None:
            return
        if not self.tensor_cores:
            # Its block is 4 lanes per row (block_m * 4 threads): a warp count means nothing.
            raise ValueError("tile_override: the float32 kernel's tile is fixed")
        tile = Tile(*self.tile_override)
        if tile.kv_stages < 1:
            raise ValueError(f"tile_override: kv_stages must be at least 1, got {tile.kv_stages}")
        object.__setattr__(self, "tile_override", tile)

    @property
    def tensor_cores(self) -> bool:
        return self.dtype != "float32"

    @functools.cached_property  # read several times a launch (block size, shared memory...)
    def tile(self) -> Tile:
        if self.tile_override is not None:
            return self.tile_override
        if not self.tensor_cores:
            return _SIMT_TILES[self.head_dim]
        tile = _TENSOR_CORE_TILES[self.head_dim]
        if self.decode:
            return tile._replace(
                block_m=DECODE_ROWS, warps=tile.warps * DECODE_ROWS // tile.block_m
            )
        return tile

    @property
    def block_m(self) -> int:
        return self.tile.block_m

    @property
    def block_n(self) -> int:
        return self.tile.block_n

    @property
    def threads(self) -> int:
        return self.tile.warps * 32

    @functools.cached_property
    def shared_bytes(self) -> int:
        """Dynamic shared memory: a Q tile and a K and a V tile per stage, rows padded by
        16 bytes (tile.cuh's SharedTile)."""
        tile = self.tile
        itemsize = 4 if self.dtype == "float32" else 2
        row_bytes = self.head_dim * itemsize + 16
        return (tile.block_m + 2 * tile.kv_stages * tile.block_n) * row_bytes

    @functools.cached_property  # the key of the loaded kernel, looked up every launch
    def name(self) -> str:
        """A key naming every parameter, usable as a C identifier."""
        flags = "".join(
            suffix
            for on, suffix in (
                (self.windowed, "_windowed"),
                (self.softcap, "_softcap"),
                (self.pack_gqa, "_packed"),
                (self.decode, "_decode"),
            )
            if on
        )
        if self.tile_override is not None:
            flags += "_m{}n{}w{}s{}".format(*self.tile_override)
        return f"forward_{_SHORT[self.dtype]}_d{self.head_dim}{flags}"

    @property
    def expression(self) -> str:
        """The C++ name of the instantiation (NVRTC name expression)."""
        block_m, block_n, warps, kv_stages = self.tile
        flags = f"{str(self.windowed).lower()}, {str(self.softcap).lower()}"
        if self.tensor_cores:
            return (
                f"cuattn::flash_forward<{_DTYPE_NAMES[self.dtype]}, {self.head_dim}, {block_m}, "
                f"{block_n}, {warps}, {kv_stages}, {flags}, {str(self.pack_gqa).lower()}>"
            )
        assert not self.pack_gqa, "the SIMT kernel does not pack query heads"
        assert kv_stages == 1, "the SIMT kernel keeps one K and one V tile"
        return f"cuattn::flash_forward_simt<{self.head_dim}, {block_m}, {block_n}, {flags}>"

    def variants(self) -> tuple[ForwardKernel, ...]:
        """This kernel's siblings that differ only in flags (they build together)."""
        tensor_core_only = (False, True) if self.tensor_cores else (False,)
        return tuple(
            replace(self, windowed=w, softcap=s, pack_gqa=p, decode=d)
            for w in (False, True)
            for s in (False, True)
            for p in tensor_core_only
            for d in tensor_core_only
        )


def prefill_tile(head_dim: int, arch: str | None = None) -> Tile:
    """The table's tensor-core tile for prefill at ``head_dim`` (one of HEAD_DIMS) on
    ``arch``."""
    return ARCH_TILES.get(arch, {}).get(head_dim) or _TENSOR_CORE_TILES[head_dim]


def forward_kernel(
    spec: AttentionSpec,
    pack_gqa: bool = False,
    tile: Tile | None = None,
    decode: bool = False,
    arch: str | None = None,
) -> ForwardKernel:
    """The instantiation that computes ``spec`` on ``arch`` (None: the table's tile, for any
    architecture), or with ``tile`` instead of the table's."""
    windowed = spec.window_left >= 0 or spec.window_right >= 0
    dtype, head_dim = dtype_name(spec.dtype), padded_head_dim(spec.head_dim)
    if tile is None and not decode and dtype != "float32":
        tile = ARCH_TILES.get(arch, {}).get(head_dim)
    return ForwardKernel(dtype, head_dim, windowed, spec.softcap > 0, pack_gqa, tile, decode)


@dataclass(frozen=True)
class CombineKernel:
    """Split-KV's second kernel: merges the splits' states (combine.cu). A block takes a
    slice of ``columns`` head-dim columns of ``rows // lanes(splits)`` (output row, head)
    pairs."""

    dtype: str

    source = "combine.cu"
    params_type = "cuattn::AttentionParams"
    threads = 256  # combine.cu's kCombineThreads
    columns = 32  # kCombineColumns
    rows = 32  # kCombineRows: rows of threads, shared out among pairs
    batch = 8  # kCombineBatch: splits a lane loads at once
    shared_bytes = 8192  # a 32-byte SplitState per thread

    @functools.cached_property
    def name(self) -> str:
        return f"combine_{_SHORT[self.dtype]}"

    @property
    def expression(self) -> str:
        return f"cuattn::combine_splits<{_DTYPE_NAMES[self.dtype]}>"

    def lanes(self, splits: int) -> int:
        """combine.cu's combine_lanes: lanes per pair, the fewest (a power of 2, at most
        ``rows``) that take every split in one batch each."""
        lanes = 1
        while lanes < self.rows and lanes * self.batch < splits:
            lanes *= 2
        return lanes

    def grid(self, rows: int, heads: int, head_dim: int, splits: int) -> tuple[int, int, int]:
        pairs_per_block = self.rows // self.lanes(splits)
        slices = -(-head_dim // self.columns)
        return (-(-rows * heads // pairs_per_block) * slices, 1, 1)


# Grid dimensions y and z may not exceed this on any CUDA device.
MAX_GRID_YZ = 65535
# The split count is set by the blocks target (a few blocks per multiprocessor); at the
# default target this cap binds only for a launch of one block before splitting (multi-query
# decoding of one sequence), where 128, the cap before, left a 132-multiprocessor GPU one
# small block on each. More splits timed slower while combine_splits issued its loads one
# after another (bench/NOTES.md, item 21 for the rewrite).
MAX_SPLITS = 512


@dataclass(frozen=True)
class ForwardPlan:
    """How one call runs: the kernel, its grid, and how many splits of the keys."""

    kernel: ForwardKernel
    grid: tuple[int, int, int]
    num_splits: int
    split_rows: int  # output rows (batch entries x seqlen) a split's workspace holds

    @property
    def combine(self) -> CombineKernel:
        return _combine_kernel(self.kernel.dtype)


@functools.cache
def _combine_kernel(dtype: str) -> CombineKernel:
    return CombineKernel(dtype)  # one per dtype, its properties computed once


def plan_forward(
    spec: AttentionSpec,
    sequences: Sequences,
    q_shape: tuple[int, ...],
    multiprocessors: int,
    *,
    tile: Tile | None = None,
    blocks_per_multiprocessor: int | None = None,
    arch: str | None = None,
) -> ForwardPlan:
    """Choose packing and the split count from the shapes and the GPU's multiprocessors.

    Few query rows per KV head (decoding) pack the query heads of a group into one block, so
    K and V are read once per group. When even then the blocks cannot fill the GPU and the
    keys are many, the keys are split (flash-decoding): each split is a block of its own,
    and a second small kernel merges the splits by their lse. ``arch`` ("sm_90") picks its
    tiles from ARCH_TILES; ``tile`` and ``blocks_per_multiprocessor`` (the split target) are
    for tuning.
    """
    kernel, row_blocks, heads, blocks_per_multiprocessor = _kernel_choice(
        spec, sequences.max_query_len, tile, blocks_per_multiprocessor, arch
    )
    sequences_count = len(sequences.table)
    blocks = row_blocks * heads * sequences_count
    max_keys = int(sequences.table[:, 4].max()) if sequences_count else 0
    key_tiles = -(-max_keys // kernel.block_n)
    splits = 1
    target = blocks_per_multiprocessor * multiprocessors
    if blocks and blocks < target and key_tiles >= 4:
        # Enough blocks for every multiprocessor, each split at least two tiles long.
        splits = max(1, min(target // blocks, key_tiles // 2, MAX_SPLITS))
    # spec.py keeps heads and sequences within the grid's limit; splits must stay within it too.
    splits = min(splits, MAX_GRID_YZ // max(sequences_count, 1))
    grid = (row_blocks, heads, sequences_count * splits)
    return ForwardPlan(kernel, grid, splits, q_shape[0] * q_shape[1])


# Decoding asks for the same kernel step after step (only the key count grows): the choice
# is kept, as making it again cost tens of microseconds of a step's host time
# (CPU-measured). It depends only on its arguments and the tile tables (ARCH_TILES and the
# rest), which do not change at run time.
@functools.lru_cache(maxsize=1024)
def _kernel_choice(
    spec: AttentionSpec,
    max_query_len: int,
    tile: Tile | None,
    blocks_per_multiprocessor: int | None,
    arch: str | None,
) -> tuple[ForwardKernel, int, int, int]:
    """The kernel, its blocks along the query rows, along the heads, and the blocks per
    multiprocessor to aim for."""
    group = spec.num_heads_q // spec.num_heads_kv
    unpacked = forward_kernel(spec, tile=tile, arch=arch)
    pack = unpacked.tensor_cores and group > 1 and max_query_len < unpacked.block_m
    rows = max_query_len * (group if pack else 1)
    decode = unpacked.tensor_cores and tile is None and rows <= DECODE_ROWS
    kernel = forward_kernel(spec, pack_gqa=pack, tile=tile, decode=decode, arch=arch)
    if blocks_per_multiprocessor is None:
        blocks_per_multiprocessor = (
            DECODE_BLOCKS_PER_MULTIPROCESSOR if decode else PREFILL_BLOCKS_PER_MULTIPROCESSOR
        )
    heads = spec.num_heads_kv if pack else spec.num_heads_q
    return kernel, -(-rows // kernel.block_m), heads, blocks_per_multiprocessor


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


@dataclass(frozen=True)
class AppendKernel:
    """The kernel that writes new keys and values into a KV cache (append.cu): a block per
    (sequence, new token) and cache."""

    dtype: str

    source = "append.cu"
    params_type = "cuattn::AppendParams"
    threads = 128  # append.cu's kAppendThreads
    shared_bytes = 0

    @property
    def name(self) -> str:
        return f"append_{_SHORT[self.dtype]}"

    @property
    def expression(self) -> str:
        return f"cuattn::append_kv<{_DTYPE_NAMES[self.dtype]}>"

    def grid(self, batch: int, new_tokens: int) -> tuple[int, int, int]:
        return (batch * new_tokens, 2, 1)


def dtype_name(dtype) -> str:
    """ "float16", "bfloat16" or "float32"."""
    return "bfloat16" if dtype == BFLOAT16 else dtype.name


@functools.cache
def all_kernels(
    arch: str | None = None,
) -> tuple[ForwardKernel | CombineKernel | MergeKernel | AppendKernel, ...]:
    """Every instantiation cuattn can launch on ``arch``: the table's, and that architecture's
    own prefill tiles (ARCH_TILES); with no ``arch``, the table's alone."""
    dtypes = ("float16", "bfloat16", "float32")
    forward = tuple(
        variant
        for dtype in dtypes
        for head_dim in HEAD_DIMS
        for variant in ForwardKernel(dtype, head_dim, False, False).variants()
    )
    forward += tuple(
        variant
        for dtype in ("float16", "bfloat16")
        for head_dim, tile in ARCH_TILES.get(arch, {}).items()
        for variant in ForwardKernel(dtype, head_dim, False, False, False, tile).variants()
        if not variant.decode  # decoding keeps the decoding tile
    )
    return forward + tuple(
        kernel(dtype) for kernel in (CombineKernel, MergeKernel, AppendKernel) for dtype in dtypes
    )
