"""Decoding: grouped-query packing and split-KV (flash-decoding), planned and checked.

The package checks itself: the same call split into many pieces and into none agrees, and
both agree with the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuattn
from cuattn import backends
from cuattn.backends import emulate
from cuattn.dlpack import from_numpy
from cuattn.kernel_params import SplitWorkspace, attention_params
from cuattn.kernels import MAX_SPLITS, CombineKernel, plan_forward
from cuattn.spec import (
    MaskOptions,
    attention_spec,
    batched_sequences,
    kvcache_sequences,
    kvcache_spec,
)

from .helpers import DTYPES, assert_close, cache_step, call, qkv
from .oracle import attention_oracle, kvcache_oracle


def _decode_plan(
    batch, heads_q, heads_kv, cache_len, multiprocessors, seqlen_q=1, dtype=np.float16, arch=None
):
    q = np.zeros((batch, seqlen_q, heads_q, 128), dtype)
    cache = np.zeros((batch, cache_len, heads_kv, 128), dtype)
    lengths = np.full(batch, cache_len, np.int32)
    raw = {
        "q": from_numpy(q),
        "k_cache": from_numpy(cache),
        "v_cache": from_numpy(cache),
        "cache_seqlens": from_numpy(lengths),
    }
    spec = kvcache_spec(raw, lengths, MaskOptions(causal=True))
    sequences = kvcache_sequences(lengths, seqlen_q, 0)
    return plan_forward(spec, sequences, q.shape, multiprocessors, arch=arch)


def test_decoding_packs_query_heads_and_splits_the_keys_to_fill_the_gpu():
    plan = _decode_plan(batch=1, heads_q=32, heads_kv=8, cache_len=128 * 1024, multiprocessors=132)
    assert plan.kernel.pack_gqa and plan.grid[:2] == (1, 8)  # 4 query heads per block
    assert plan.kernel.decode and plan.kernel.block_m == 32
    assert plan.num_splits == 66 and plan.grid[2] == 66  # 8 blocks -> 4 per multiprocessor
    # One multi-query sequence: one block before splitting, so the cap on splits decides.
    mqa = _decode_plan(batch=1, heads_q=32, heads_kv=1, cache_len=128 * 1024, multiprocessors=132)
    assert mqa.grid == (1, 1, MAX_SPLITS)
    # A big batch fills the GPU by itself: no split.
    assert (
        _decode_plan(
            batch=64, heads_q=32, heads_kv=8, cache_len=4096, multiprocessors=132
        ).num_splits
        == 1
    )
    # Multi-head attention has no group to pack.
    assert not _decode_plan(
        batch=1, heads_q=8, heads_kv=8, cache_len=4096, multiprocessors=132
    ).kernel.pack_gqa
    # A few keys are not worth splitting.
    assert (
        _decode_plan(batch=1, heads_q=32, heads_kv=8, cache_len=100, multiprocessors=132).num_splits
        == 1
    )


def test_prefill_is_neither_packed_nor_split():
    q = np.zeros((4, 2048, 32, 128), np.float16)
    k = np.zeros((4, 2048, 8, 128), np.float16)
    from cuattn.spec import attention_spec

    spec = attention_spec(
        {"q": from_numpy(q), "k": from_numpy(k), "v": from_numpy(k)}, MaskOptions()
    )
    plan = plan_forward(spec, batched_sequences(4, 2048, 2048), q.shape, 132)
    assert not plan.kernel.pack_gqa and not plan.kernel.decode
    assert plan.num_splits == 1 and plan.grid == (2048 // plan.kernel.block_m, 32, 4)


def test_an_architectures_tile_replaces_the_tables_for_its_prefill(monkeypatch):
    from cuattn import kernels
    from cuattn.spec import attention_spec

    tile = kernels.Tile(128, 32, 4, 2)
    monkeypatch.setitem(kernels.ARCH_TILES, "sm_90", {128: tile})
    kernels.all_kernels.cache_clear()  # it lists ARCH_TILES' instantiations
    kernels._kernel_choice.cache_clear()  # and kernels were chosen from the table as it was
    try:

        def prefill(dtype, head_dim, arch):
            q = np.zeros((4, 2048, 8, head_dim), dtype)
            raw = {"q": from_numpy(q), "k": from_numpy(q), "v": from_numpy(q)}
            spec = attention_spec(raw, MaskOptions())
            return plan_forward(spec, batched_sequences(4, 2048, 2048), q.shape, 132, arch=arch)

        there = prefill(np.float16, 128, "sm_90").kernel
        assert there.tile == tile and there in kernels.all_kernels("sm_90")
        assert there not in kernels.all_kernels("sm_80") and there not in kernels.all_kernels()
        elsewhere = prefill(np.float16, 128, "sm_80").kernel
        assert elsewhere.tile == kernels.prefill_tile(128) != tile
        assert elsewhere == prefill(np.float16, 128, None).kernel
        # Other head dims, float32 and decoding keep their tiles.
        assert prefill(np.float16, 64, "sm_90").kernel.tile == kernels.prefill_tile(64)
        assert prefill(np.float32, 128, "sm_90").kernel.tile.block_m != tile.block_m
        decoding = _decode_plan(1, 32, 8, 4096, 132, arch="sm_90")
        assert decoding.kernel.decode and decoding.kernel.block_m == kernels.DECODE_ROWS
    finally:
        kernels.all_kernels.cache_clear()
        kernels._kernel_choice.cache_clear()


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_split_and_packed_decoding_matches_the_oracle(rng, emulate_options, planned, dtype):
    emulate_options(multiprocessors=1000)  # a huge GPU: as many splits as the keys allow
    heads_q = 8
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 2, 700, 3, heads_q, 2, 64, dtype)
    lengths = np.array([650, 211], np.int32)
    options = dict(
        causal=True,
        window=(300, 0),
        sink_tokens=2,
        sinks=rng.uniform(-1, 2, heads_q).astype(np.float32),
    )
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths, **options)
    out, lse = cuattn.attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, lengths, return_lse=True, backend="emulate", **options
    )
    assert planned[-1].num_splits > 1 and planned[-1].kernel.pack_gqa == (dtype != np.float32)
    assert_close(out, expected[0], dtype)
    assert_close(lse, expected[1], dtype, what="lse")


@pytest.mark.emulate
def test_the_split_workspace_comes_from_the_callers_framework(rng, emulate_options, planned):
    # PyTorch tensors (on the CPU, through the emulated kernels): the workspace is a tensor
    # too, as a CUDA graph needs (docs/graphs.md), poisoned like every result.
    torch = pytest.importorskip("torch")
    from cuattn import interop

    emulate_options(multiprocessors=1000)
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 2, 900, 1, 4, 1, 64, np.float32)
    lengths = np.array([899, 450], np.int32)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths, causal=True)
    allocated = []
    original = interop.empty

    def spy(call, shape, dtype):
        allocated.append((call.framework, shape, np.dtype(dtype)))
        return original(call, shape, dtype)

    arrays = [torch.from_numpy(a.copy()) for a in (q, k_cache, v_cache, k_new, v_new)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interop, "empty", spy)
        out = cuattn.attention_with_kvcache(
            *arrays, torch.from_numpy(lengths), causal=True, backend="emulate"
        )
    plan = planned[-1]
    slots = plan.num_splits * plan.split_rows * 4
    assert plan.num_splits > 1 and isinstance(out, torch.Tensor)
    assert ("torch", (slots * 65,), np.dtype(np.float32)) in allocated
    assert_close(out.numpy(), expected[0], np.float32)


@pytest.mark.emulate
@pytest.mark.parametrize("head_dim", [8, 80, 256])
def test_the_split_combine_covers_every_head_dim(rng, emulate_options, planned, head_dim):
    # The combine kernel takes head dims in slices of 32 columns, 4 to a thread: head dims
    # that are not a multiple of 32 leave part of the last slice's threads outside the head.
    emulate_options(multiprocessors=1000)
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 2, 2000, 1, 4, 2, head_dim, np.float16)
    lengths = np.array([1999, 1337], np.int32)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths, causal=True)
    out, lse = cuattn.attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, lengths, causal=True, return_lse=True, backend="emulate"
    )
    assert planned[-1].num_splits >= 16
    assert_close(out, expected[0], np.float16)
    assert_close(lse, expected[1], np.float16, what="lse")


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("emulate", marks=pytest.mark.emulate),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_hundreds_of_splits_merge_exactly(rng, emulate_options, planned, backend):
    # One block before splitting (a single KV head) over a long cache: more splits than one
    # batch of the combine kernel's lanes takes (32 lanes x 8), so lanes 0-2 run a second
    # batch.
    # The emulated GPU is given 1000 multiprocessors; a real one with 65 or more splits the
    # keys the same 259 ways (two key tiles a split is the bound, not the 4 blocks per
    # multiprocessor).
    emulate_options(multiprocessors=1000)
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 1, 8400, 1, 2, 1, 256, np.float16)
    lengths = np.array([8300], np.int32)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths)
    out, lse = call(
        cuattn.attention_with_kvcache,
        backend,
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        lengths,
        return_lse=True,
    )
    assert 256 < planned[-1].num_splits <= MAX_SPLITS
    assert_close(out, expected[0], np.float16)
    assert_close(lse, expected[1], np.float16, what="lse")


@pytest.mark.emulate
@pytest.mark.parametrize("lanes, capacity", [(8, 3100), (16, 6450)])
def test_the_combine_shares_a_block_among_pairs(rng, emulate_options, planned, lanes, capacity):
    # Split counts whose lanes span several warps (8 and 16 lanes a pair: their states meet
    # in shared memory), with 3 query heads: the last block's spare rows of threads have no
    # pair to merge.
    emulate_options(multiprocessors=1000)
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 1, capacity, 1, 3, 1, 64, np.float16)
    lengths = np.array([capacity - 1], np.int32)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths)
    out, lse = cuattn.attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, lengths, return_lse=True, backend="emulate"
    )
    assert CombineKernel("float16").lanes(planned[-1].num_splits) == lanes
    assert_close(out, expected[0], np.float16)
    assert_close(lse, expected[1], np.float16, what="lse")


def _combined(split_out, split_lse):
    """The float64 merge of split states (splits, pairs, head_dim) / (splits, pairs): each
    split weighted by exp(lse); a split with lse -inf counts for nothing, whatever its
    output; a pair no split saw is zeros with lse -inf; a NaN lse makes its pair NaN."""
    out = np.zeros(split_out.shape[1:])
    lse = np.full(split_lse.shape[1], -np.inf)
    for pair in range(split_lse.shape[1]):
        seen = split_lse[:, pair] != -np.inf
        if not seen.any():
            continue
        lses = split_lse[seen, pair]
        top = np.nanmax(lses) if not np.isnan(lses).all() else 0.0
        weights = np.exp(lses - top)
        out[pair] = weights @ split_out[seen, pair] / weights.sum()
        lse[pair] = top + np.log(weights.sum())
    return out, lse


@pytest.mark.emulate
@pytest.mark.parametrize("splits", [3, 40, 300], ids=lambda s: f"{s}splits")
def test_the_combine_merges_split_states_by_their_lse(rng, splits):
    # The combine kernel alone, on a workspace written here: random states, some splits
    # that saw no key (lse -inf) with garbage outputs, and three rows with a rule of their
    # own. Lane counts 1, 8 and 32; head dim 40 is one whole and one partial slice.
    batch, seqlen, heads, head_dim = 2, 3, 5, 40
    pairs, rows = batch * seqlen * heads, batch * seqlen
    split_out = rng.standard_normal((splits, pairs, head_dim)).astype(np.float32)
    split_lse = rng.uniform(-20, 20, (splits, pairs)).astype(np.float32)
    unseen = rng.random((splits, pairs)) < 0.3
    split_lse[unseen] = -np.inf
    split_out[unseen] = np.nan  # what a split that saw nothing wrote must not matter
    split_lse[:, 0] = -np.inf  # pair 0: no split saw a key
    split_lse[splits // 2, 1] = np.nan  # pair 1: a NaN state
    split_out[-1, 2] = rng.standard_normal(head_dim)  # pair 2: a NaN in one column of a
    split_out[-1, 2, 7] = np.nan  # split that saw keys
    split_lse[-1, 2] = 1.0
    # q, k and v only shape the call's parameters: the combine reads none of them.
    q = rng.standard_normal((batch, seqlen, heads, head_dim)).astype(np.float32)
    kv = rng.standard_normal((batch, 1, heads, head_dim)).astype(np.float32)
    out = np.full((batch, seqlen, heads, head_dim), np.nan, np.float32)
    lse = np.full((batch, heads, seqlen), np.nan, np.float32)
    arrays = {
        name: from_numpy(array)
        for name, array in dict(
            q=q,
            k=kv,
            v=kv,
            out=out,
            lse=lse,
            split_out=split_out.reshape(-1),
            split_lse=split_lse.reshape(-1),
        ).items()
    }
    spec = attention_spec(arrays, MaskOptions())
    workspace = SplitWorkspace(splits, rows, arrays["split_out"].ptr, arrays["split_lse"].ptr)
    params = attention_params(
        spec, *(arrays[n] for n in ("q", "k", "v", "out", "lse")), None,
        batched_sequences(batch, seqlen, 1), workspace,
    )  # fmt: skip
    kernel = CombineKernel("float32")
    backends.get("emulate").run_kernel(
        (kernel.source,),
        (emulate.LibraryKernel(kernel.name, kernel.expression),),
        kernel.name,
        params,
        kernel.grid(rows, heads, head_dim, splits),
        (kernel.threads, 1, 1),
        kernel.shared_bytes,
        arrays,
        {"out", "lse"},
    )
    expected_out, expected_lse = _combined(
        split_out.astype(np.float64), split_lse.astype(np.float64)
    )
    got_out = out.reshape(pairs, head_dim)  # pairs are (batch, row, head), as out's axes
    got_lse = lse.transpose(0, 2, 1).reshape(pairs)
    assert (got_out[0] == 0).all() and got_lse[0] == -np.inf
    assert np.isnan(got_out[1]).all() and np.isnan(got_lse[1])
    assert np.isnan(got_out[2, 7]) and np.isfinite(np.delete(got_out[2], 7)).all()
    np.testing.assert_allclose(got_out, expected_out, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got_lse, expected_lse, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_a_nan_key_gives_nan_rows_in_a_split_launch_on_the_gpu(rng, planned, dtype):
    q, k, v = qkv(rng, 1, 1, 2000, 4, 2, 64, dtype)
    k[0, 1500, 1, 5] = np.nan  # read by query heads 2 and 3
    out, lse = call(cuattn.attention, "cuda", q, k, v, return_lse=True)
    assert planned[-1].num_splits > 1
    assert np.isnan(out[:, :, 2:]).all() and np.isnan(lse[:, 2:]).all()
    assert np.isfinite(out[:, :, :2]).all() and np.isfinite(lse[:, :2]).all()


@pytest.mark.emulate
def test_split_equals_unsplit(rng, emulate_options, planned):
    q, k, v = qkv(rng, 1, 1, 2000, 4, 4, 64, np.float32)
    emulate_options(multiprocessors=1)
    whole, whole_lse = cuattn.attention(q, k, v, causal=True, return_lse=True, backend="emulate")
    emulate_options(multiprocessors=1000)
    split, split_lse = cuattn.attention(q, k, v, causal=True, return_lse=True, backend="emulate")
    assert planned[0].num_splits == 1 and planned[1].num_splits > 1
    np.testing.assert_allclose(split, whole, atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(split_lse, whole_lse, atol=2e-6, rtol=2e-6)
    assert_close(split, attention_oracle(q, k, v, causal=True)[0], np.float32)


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_a_nan_key_gives_nan_rows_however_many_splits(rng, emulate_options, planned, dtype):
    q, k, v = qkv(rng, 1, 1, 2000, 4, 2, 64, dtype)
    k[0, 1500, 1, 5] = np.nan  # read by query heads 2 and 3, in one split of many
    results = []
    for multiprocessors in (1, 1000):
        emulate_options(multiprocessors=multiprocessors)
        results.append(cuattn.attention(q, k, v, return_lse=True, backend="emulate"))
    assert planned[1].num_splits > max(planned[0].num_splits, 8)
    for out, lse in results:
        assert np.isnan(out[:, :, 2:]).all() and np.isnan(lse[:, 2:]).all()
        assert np.isfinite(out[:, :, :2]).all() and np.isfinite(lse[:, :2]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_decoding_on_the_gpu_splits_a_long_cache_and_matches_the_oracle(rng, planned, dtype):
    # Batch 1 over a long cache cannot fill a real GPU without splitting the keys.
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 1, 9000, 1, 8, 2, 128, dtype)
    lengths = np.array([8777], np.int32)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths, causal=True)
    out, lse = call(
        cuattn.attention_with_kvcache,
        "cuda",
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        lengths,
        causal=True,
        return_lse=True,
    )
    assert planned[-1].num_splits > 1 and planned[-1].kernel.pack_gqa == (dtype != np.float32)
    assert_close(out, expected[0], dtype)
    assert_close(lse, expected[1], dtype, what="lse")


def test_the_combine_kernels_sizes_are_combine_cus():
    # CombineKernel launches combine.cu's kernel with sizes it restates: they must agree.
    import re

    from cuattn.kernels import kernel_dir

    source = (kernel_dir() / "combine.cu").read_text()

    def constant(name):
        return int(re.search(rf"constexpr int {name} = (\d+);", source).group(1))

    kernel = CombineKernel("float16")
    groups, rows = constant("kCombineGroups"), constant("kCombineRows")
    assert (kernel.rows, kernel.batch) == (rows, constant("kCombineBatch"))
    assert (kernel.columns, kernel.threads) == (4 * groups, groups * rows)
    assert kernel.shared_bytes == 32 * kernel.threads  # a 32-byte SplitState per thread
    # combine_lanes: the fewest lanes, a power of 2 up to kCombineRows, of one batch each.
    assert [kernel.lanes(s) for s in (2, 8, 9, 16, 17, 128, 129, 256, 257, 512)] == [
        1, 1, 2, 2, 4, 16, 32, 32, 32, 32
    ]  # fmt: skip
