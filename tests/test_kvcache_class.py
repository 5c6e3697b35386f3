"""cuattn.KVCache: plain and rolling caches against attention over the whole history."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import assert_close, random_array, skip_if_unavailable, to_backend, to_host
from .oracle import attention_oracle

HEADS_Q, HEADS_KV, DIM = 4, 2, 32


def _steps(rng, steps, dtype=np.float32):
    q = random_array(rng, (2, steps, HEADS_Q, DIM), dtype)
    k = random_array(rng, (2, steps, HEADS_KV, DIM), dtype)
    v = random_array(rng, (2, steps, HEADS_KV, DIM), dtype)
    return q, k, v


BACKENDS = [
    "cpu",
    pytest.param("emulate", marks=pytest.mark.emulate),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def _attend(cache, backend, q, k, v):
    """One step on ``backend`` with the arrays where it computes; the result on the host."""
    moved = [to_backend(np.ascontiguousarray(a), backend) for a in (q, k, v)]
    return to_host(cache.attend(*moved, backend=backend))


def _like(backend, rng):
    skip_if_unavailable(backend)
    return to_backend(random_array(rng, (1,), np.float32), backend) if backend == "cuda" else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_cache_decodes_like_attention_over_the_prefix(rng, backend):
    q, k, v = _steps(rng, 40)
    cache = cuattn.KVCache(2, HEADS_KV, DIM, capacity=64, dtype="float32", like=_like(backend, rng))
    prompt = 25
    out = _attend(cache, backend, q[:, :prompt], k[:, :prompt], v[:, :prompt])
    assert_close(
        out,
        attention_oracle(q[:, :prompt], k[:, :prompt], v[:, :prompt], causal=True)[0],
        np.float32,
    )
    for t in range(prompt, 40):
        out = _attend(cache, backend, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        expected, _ = attention_oracle(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], causal=True)
        assert_close(out, expected, np.float32)
    assert cache.lengths.tolist() == [40, 40]
    with pytest.raises(
        ValueError, match="cache_seqlens: sequence 0 holds 40 tokens and 30 new ones"
    ):
        _attend(cache, backend, *_steps(rng, 30))
    assert cache.lengths.tolist() == [40, 40]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "prompt", [0, 10, 37], ids=["no-prompt", "short-prompt", "prompt-past-window"]
)
def test_rolling_cache_keeps_sinks_and_window_in_bounded_memory(rng, backend, prompt):
    window, sinks, steps = 16, 3, 60
    q, k, v = _steps(rng, steps)
    like = _like(backend, rng)
    cache = cuattn.KVCache(
        2, HEADS_KV, DIM, dtype="float32", window=window, sink_tokens=sinks, like=like
    )
    assert cache.k.shape == (2, sinks + window, HEADS_KV, DIM)
    mask = dict(causal=True, window=(window - 1, 0), sink_tokens=sinks)
    if prompt:
        out = _attend(cache, backend, q[:, :prompt], k[:, :prompt], v[:, :prompt])
        assert_close(
            out,
            attention_oracle(q[:, :prompt], k[:, :prompt], v[:, :prompt], **mask)[0],
            np.float32,
        )
    for t in range(prompt, steps):
        out = _attend(cache, backend, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        expected, _ = attention_oracle(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **mask)
        assert_close(out, expected, np.float32)
    assert cache.k.shape == (2, sinks + window, HEADS_KV, DIM)  # memory did not grow
    assert cache.lengths.tolist() == [steps, steps]


def test_torch_cache_stays_in_torch(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a) for a in _steps(rng, 5))
    cache = cuattn.KVCache(2, HEADS_KV, DIM, capacity=8, dtype="bfloat16", like=q)
    assert isinstance(cache.k, torch.Tensor) and cache.k.dtype == torch.bfloat16
    out = cache.attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, HEADS_Q, DIM)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rolling_cache_takes_chunks_of_any_size_at_any_fill(rng, backend):
    """Chunks (chunked prefill, several accepted tokens at once) into a rolling cache that
    already holds tokens, before and after it wraps, with the two sequences at different
    lengths (one reset)."""
    window, sinks = 16, 3
    cache = cuattn.KVCache(
        2,
        HEADS_KV,
        DIM,
        dtype="float32",
        window=window,
        sink_tokens=sinks,
        like=_like(backend, rng),
    )
    mask = dict(causal=True, window=(window - 1, 0), sink_tokens=sinks)
    history = [[], []]  # per sequence, the (k, v) of every step since its last reset
    # (new tokens, queries): chunks shorter and longer than the window (one past twice its
    # size), single tokens, and steps whose queries are only the last of their tokens.
    steps = [(5, 5), (1, 1), (7, 7), (20, 20), (1, 1), (3, 2), (16, 16), (40, 3), (2, 2), (9, 4)]
    for i, (new, queries) in enumerate(steps):
        if i == 4:
            cache.reset([1])
            history[1] = []
        q, k, v = _steps(rng, new)
        moved = [
            to_backend(np.ascontiguousarray(a), backend) for a in (q[:, new - queries :], k, v)
        ]
        out, lse = (to_host(a) for a in cache.attend(*moved, return_lse=True, backend=backend))
        for b in range(2):
            history[b].append((k[b : b + 1], v[b : b + 1]))
            keys = np.concatenate([step[0] for step in history[b]], axis=1)
            values = np.concatenate([step[1] for step in history[b]], axis=1)
            expected = attention_oracle(q[b : b + 1, new - queries :], keys, values, **mask)
            assert_close(out[b : b + 1], expected[0], np.float32)
            assert_close(lse[b : b + 1], expected[1], np.float32, what="lse")
    assert cache.lengths.tolist() == [sum(n for n, _ in steps), sum(n for n, _ in steps[4:])]
    assert cache.k.shape == (2, sinks + window, HEADS_KV, DIM)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="capacity: a plain cache needs a capacity"):
        cuattn.KVCache(1, 2, 32)
    with pytest.raises(
        ValueError, match="capacity: a rolling cache holds sink_tokens \\+ window = 12"
    ):
        cuattn.KVCache(1, 2, 32, capacity=10, window=8, sink_tokens=4)
    with pytest.raises(TypeError, match="dtype: must be float16, bfloat16 or float32, got float64"):
        cuattn.KVCache(1, 2, 32, capacity=8, dtype="float64")


def test_dtypes_of_every_framework_are_taken():
    torch = pytest.importorskip("torch")
    for dtype, expected in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        assert cuattn.KVCache(1, 2, 32, capacity=8, dtype=dtype).k.dtype.name == expected
    with pytest.raises(TypeError, match="dtype: must be float16, bfloat16 or float32, got int8"):
        cuattn.KVCache(1, 2, 32, capacity=8, dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype: must be float16, bfloat16 or float32, got 'x'"):
        cuattn.KVCache(1, 2, 32, capacity=8, dtype="x")


def test_reset_takes_indices_masks_and_nothing(rng):
    cache = cuattn.KVCache(3, 1, 8, capacity=4, dtype="float32")
    step = random_array(rng, (3, 1, 1, 8), np.float32)
    cache.attend(step, step, step)
    cache.reset([])
    np.testing.assert_array_equal(cache.lengths, [1, 1, 1])
    cache.reset(np.array([True, False, False]))
    cache.reset([2])
    np.testing.assert_array_equal(cache.lengths, [0, 1, 0])
    with pytest.raises(ValueError, match="sequences: index 3 is out of bounds .* holds 3"):
        cache.reset([3])
    with pytest.raises(TypeError, match="sequences: expected sequence indices or a bool mask"):
        cache.reset([0.5])
    with pytest.raises(TypeError, match="v_new: expected this step's array, got None"):
        cache.attend(step, step, None)
    np.testing.assert_array_equal(cache.lengths, [0, 1, 0])


def test_a_bad_rolling_step_is_refused_before_any_write(rng):
    cache = cuattn.KVCache(2, HEADS_KV, DIM, dtype="float32", window=8, sink_tokens=2)
    cache.attend(*_steps(rng, 5))
    before = cache.k.copy(), cache.v.copy()
    q, k, v = _steps(rng, 3)
    for error, args, message in (
        (ValueError, (q, k[:, :, :1], v), r"k_new: expected shape \(2, seqlen_new, 2, 32\)"),
        (ValueError, (q, k, v[:, :2]), r"v_new: shape must equal k_new's \(2, 3, 2, 32\)"),
        (ValueError, (q[:1], k, v), "k_cache: batch must equal q's 1, got 2"),
        (ValueError, (q[..., :16], k, v), "k_cache: head_dim must equal q's 16, got 32"),
        (TypeError, (q, k.astype(np.float16), v), "k_new: dtype must match q's float32"),
        (ValueError, (q, k[:, :1], v[:, :1]), "q: a rolling cache attends for its new tokens"),
    ):
        with pytest.raises(error, match=message):
            cache.attend(*args)
        np.testing.assert_array_equal(cache.k, before[0], err_msg=message)
        np.testing.assert_array_equal(cache.v, before[1], err_msg=message)
    assert cache.lengths.tolist() == [5, 5]
