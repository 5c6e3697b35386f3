"""KV-cache calls whose device lengths the host does not read (check_lengths=False):
planned for the caches' capacity, each sequence's length read by the kernels, and so
capturable in a CUDA graph (docs/graphs.md)."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import (
    DTYPES,
    assert_close,
    cache_step,
    call,
    random_array,
    skip_if_unavailable,
)
from .oracle import kvcache_oracle


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_unchecked_device_lengths_give_the_checked_result(rng, planned, dtype):
    # Lengths far below the capacity: the launch sized for full caches gives the short
    # sequences splits that see no key at all, which the combine must leave out.
    skip_if_unavailable("cuda")
    capacity, lengths = 1200, np.array([37, 900, 0], np.int32)
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 3, capacity, 2, 8, 2, 64, dtype)
    options = dict(causal=True, window=(500, 0), sink_tokens=3)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths, **options)
    results = {}
    for check in (False, True):
        results[check] = call(
            cuattn.attention_with_kvcache,
            "cuda",
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            lengths,
            check_lengths=check,
            return_lse=True,
            **options,
        )
    unchecked, checked = planned
    if dtype != np.float32:  # float32's blocks, one per query head, reach the GPU's target first
        assert unchecked.num_splits > checked.num_splits, "planned for full caches"
    for out, lse in results.values():  # the two plans merge in different orders
        assert_close(out, expected[0], dtype)
        assert_close(lse, expected[1], dtype, what="lse")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emulate", marks=pytest.mark.emulate)])
def test_host_lengths_are_checked_even_when_told_not_to(rng, backend):
    # Checking lengths the host holds costs no wait for the GPU, so it is never skipped.
    skip_if_unavailable(backend)
    q, k_cache, v_cache, k_new, v_new = cache_step(rng, 2, 64, 3, 2, 2, 32, np.float32)
    before = k_cache.copy()
    with pytest.raises(ValueError, match="cache_seqlens: sequence 1 holds 62 tokens"):
        cuattn.attention_with_kvcache(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            np.array([3, 62], np.int32),
            check_lengths=False,
            backend=backend,
        )
    np.testing.assert_array_equal(k_cache, before)


@pytest.mark.emulate
def test_kernels_plan_for_the_capacity_and_clamp_the_lengths_they_read(
    rng, emulate_options, planned
):
    """Unread lengths as the API hands them to the kernels, some of them ones it would
    refuse, run under the sanitizer: the launch is sized for full caches (so the short
    sequences have splits that see no key), a length past the capacity reads the whole cache
    and nothing after it (without the clamp in params.cuh the last sequence's keys run off its
    end), a negative one reads nothing."""
    skip_if_unavailable("emulate")
    from cuattn import backends
    from cuattn.dlpack import from_numpy
    from cuattn.spec import MaskOptions, kvcache_spec, unread_kvcache_sequences

    emulate_options(multiprocessors=1000)  # splits bound by the keys, not the GPU
    capacity, new_tokens = 700, 2
    q, k_cache, v_cache, _, _ = cache_step(rng, 4, capacity, 1, 4, 2, 32, np.float16)
    lengths = np.array([-5, 40, 300, capacity + 7], np.int32)
    out = np.full(q.shape, np.nan, np.float16)
    lse = np.full((4, 4, 1), np.nan, np.float32)
    raw = {
        name: from_numpy(array)
        for name, array in dict(
            q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths
        ).items()
    }
    spec = kvcache_spec(raw, None, MaskOptions(causal=True, return_lse=True))
    sequences = unread_kvcache_sequences(
        4, capacity, 1, new_tokens, {"cache_seqlens": raw["cache_seqlens"]}
    )
    backends.get("emulate").forward(
        spec,
        raw["q"],
        raw["k_cache"],
        raw["v_cache"],
        from_numpy(out),
        from_numpy(lse),
        None,
        sequences,
    )
    assert planned[-1].num_splits >= 4  # more than sequence 1's one tile can fill
    # Keys seen: max(0, min(length + new_tokens, capacity)), without appending anything.
    seen = np.clip(lengths.astype(np.int64) + new_tokens, 0, capacity)
    expected = kvcache_oracle(q, k_cache, v_cache, None, None, seen, causal=True)
    assert_close(out, expected[0], np.float16)
    assert_close(lse, expected[1], np.float16, what="lse")
    assert (out[0] == 0).all() and (lse[0] == -np.inf).all()  # sequence 0 sees no key


# --- CUDA graphs (PyTorch) -------------------------------------------------------------------


def _torch_step(rng, batch, capacity, heads_q, heads_kv, head_dim):
    import torch

    from .helpers import to_backend

    q, k_cache, v_cache, k_new, v_new = cache_step(
        rng, batch, capacity, 1, heads_q, heads_kv, head_dim, np.float16
    )
    host = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    device = {name: to_backend(array, "cuda") for name, array in host.items()}
    assert all(isinstance(t, torch.Tensor) for t in device.values())
    return host, device


@pytest.mark.gpu
def test_a_captured_decoding_step_replays_with_new_lengths_and_tokens(rng):
    torch = pytest.importorskip("torch")

    skip_if_unavailable("cuda")
    batch, capacity = 2, 4096
    host, device = _torch_step(rng, batch, capacity, 8, 2, 128)
    lengths = np.array([100, 3000], np.int32)
    device_lengths = torch.from_numpy(lengths).cuda()

    def step():
        return cuattn.attention_with_kvcache(
            device["q"],
            device["k_cache"],
            device["v_cache"],
            device["k_new"],
            device["v_new"],
            device_lengths,
            causal=True,
            check_lengths=False,
        )

    # Warm-up off the capture (it compiles and loads the kernels), then the caches are put
    # back as they were: the warm-up appended to them.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for name in ("k_cache", "v_cache"):
        device[name].copy_(torch.from_numpy(host[name]).cuda())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    k_cache, v_cache = host["k_cache"].copy(), host["v_cache"].copy()
    for _ in range(3):  # each replay: fresh tokens, the lengths one further
        for name in ("q", "k_new", "v_new"):
            host[name] = random_array(rng, host[name].shape, np.float16)
            device[name].copy_(torch.from_numpy(host[name]).cuda())
        device_lengths.copy_(torch.from_numpy(lengths).cuda())
        graph.replay()
        expected, _, k_cache, v_cache = kvcache_oracle(
            host["q"], k_cache, v_cache, host["k_new"], host["v_new"], lengths, causal=True
        )
        assert_close(out.cpu().numpy(), expected, np.float16)
        lengths = lengths + 1


@pytest.mark.gpu
def test_what_a_graph_cannot_replay_is_refused_during_capture(rng):
    torch = pytest.importorskip("torch")

    skip_if_unavailable("cuda")
    _, device = _torch_step(rng, 2, 256, 4, 2, 64)
    device_lengths = torch.tensor([10, 20], dtype=torch.int32, device="cuda")
    arrays = (device["q"], device["k_cache"], device["v_cache"], device["k_new"], device["v_new"])
    cuattn.attention_with_kvcache(*arrays, device_lengths, check_lengths=False)  # warm-up
    for lengths, check, argument in (
        (device_lengths, True, "check_lengths"),  # a read back: a wait the capture forbids
        ([10, 20], False, "cache_seqlens"),  # host values: the graph would replay them
    ):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match=f"^{argument}: "):
            with torch.cuda.graph(graph):
                cuattn.attention_with_kvcache(*arrays, lengths, check_lengths=check)
