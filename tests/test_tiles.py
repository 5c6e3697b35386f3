"""The tile shapes bench/tiles.py times on a GPU compute the right function before anyone
times them: each candidate runs against the oracle, under emulation here and on the GPU
(and its sanitizers) there. Candidates with two m16 row tiles per warp take code paths the
table's 16-row tiles never do, and rings of K/V stages a copy schedule of their own."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import cuattn
from bench.tiles import DECODE_TILES, PREFILL_TILES
from cuattn.backends import cuda, emulate
from cuattn.kernels import plan_forward

from .helpers import BFLOAT16, assert_close, call, qkv
from .oracle import attention_oracle

CANDIDATES = [
    (head_dim, tile) for head_dim, tiles in PREFILL_TILES.items() for tile in tiles if tile
]
DECODE_CANDIDATES = [tile for tile in DECODE_TILES if tile]
# Emulated twice: with each cp.async copy landing at its wait, and as it is issued with each
# warp running on to its barrier before the next moves (each shows a different kind of race
# in a copy schedule: emulate.COPY_LANDINGS).
BACKENDS = [
    pytest.param("emulate", marks=pytest.mark.emulate),
    pytest.param("emulate-overwrites", marks=pytest.mark.emulate),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.fixture
def plan_with(monkeypatch, emulate_options):
    """Runs the candidate tile (and split target) on a backend: returns the backend's name."""

    def plan(backend, **overrides):
        if backend == "emulate-overwrites":
            emulate_options(schedule="warps", copies="at-issue")
            backend = "emulate"
        module = emulate if backend == "emulate" else cuda
        monkeypatch.setattr(module, "plan_forward", functools.partial(plan_forward, **overrides))
        return backend

    return plan


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim, tile", CANDIDATES, ids=[f"d{d}-{t}" for d, t in CANDIDATES])
def test_every_candidate_tile_matches_the_oracle(rng, plan_with, backend, head_dim, tile):
    backend = plan_with(backend, tile=tile)
    # Lengths that divide no tile, GQA, and a causal window with sink tokens that hides whole
    # tiles; then the same shapes unmasked.
    q, k, v = qkv(rng, 2, 150, 333, 4, 2, head_dim, BFLOAT16)
    for options in (dict(causal=True, window=(70, 0), sink_tokens=3), {}):
        out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True, **options)
        expected_out, expected_lse = attention_oracle(q, k, v, **options)
        assert_close(out, expected_out, BFLOAT16)
        assert_close(lse, expected_lse, BFLOAT16, what="lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tile", DECODE_CANDIDATES, ids=str)
def test_every_decoding_candidate_matches_the_oracle(rng, plan_with, backend, tile):
    # Split-KV over sequences of different lengths: splits of one tile and of several, splits
    # with none, and a sequence shorter than the copies a ring issues ahead of its first tile.
    backend = plan_with(backend, tile=tile, blocks_per_multiprocessor=16)
    q, k_cache, v_cache = qkv(rng, 3, 1, 700, 8, 2, 128, BFLOAT16)
    lengths = np.array([700, 37, 300], np.int32)
    out = call(cuattn.attention_with_kvcache, backend, q, k_cache, v_cache, cache_seqlens=lengths)
    for b, length in enumerate(lengths):
        expected, _ = attention_oracle(
            q[b : b + 1], k_cache[b : b + 1, :length], v_cache[b : b + 1, :length]
        )
        assert_close(out[b : b + 1], expected, BFLOAT16)
