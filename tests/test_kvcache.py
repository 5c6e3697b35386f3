"""attention_with_kvcache(): in-place append, then attention over each sequence's length."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import (
    DTYPES,
    assert_close,
    backend_params,
    random_array,
    skip_if_unavailable,
    to_backend,
    to_host,
)
from .oracle import attention_oracle, kvcache_oracle

KVCACHE_CASES = [
    # (id, batch, capacity, seqlen_q, new_tokens, heads_q, heads_kv, head_dim, lengths, options)
    ("decode", 3, 700, 1, 1, 8, 2, 64, [0, 313, 698], dict(causal=True)),
    ("chunked-prefill", 2, 600, 37, 37, 4, 4, 64, [5, 400], dict(causal=True)),
    ("speculative", 2, 300, 4, 4, 4, 1, 128, [256, 17], dict(causal=True, window=(63, 0))),
    ("no-append", 2, 280, 3, 0, 4, 2, 32, [280, 70], dict(causal=True)),
    ("sinks-window", 1, 900, 1, 1, 2, 2, 64, [850], dict(window=(127, 0), sink_tokens=4)),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", KVCACHE_CASES, ids=[c[0] for c in KVCACHE_CASES])
def test_kvcache_matches_oracle(rng, backend, dtype, case):
    _, batch, capacity, seqlen_q, new, heads_q, heads_kv, head_dim, lengths, options = case
    skip_if_unavailable(backend)
    q = random_array(rng, (batch, seqlen_q, heads_q, head_dim), dtype)
    k_cache = random_array(rng, (batch, capacity, heads_kv, head_dim), dtype)
    v_cache = random_array(rng, (batch, capacity, heads_kv, head_dim), dtype)
    k_new = random_array(rng, (batch, new, heads_kv, head_dim), dtype) if new else None
    v_new = random_array(rng, (batch, new, heads_kv, head_dim), dtype) if new else None
    lengths = np.array(lengths, np.int32)
    expected = kvcache_oracle(q, k_cache, v_cache, k_new, v_new, lengths, **options)
    caches = [to_backend(k_cache, backend), to_backend(v_cache, backend)]
    out, lse = cuattn.attention_with_kvcache(
        to_backend(q, backend),
        *caches,
        to_backend(k_new, backend),
        to_backend(v_new, backend),
        to_backend(lengths, backend),
        return_lse=True,
        backend=backend,
        **options,
    )
    assert_close(to_host(out), expected[0], dtype)
    assert_close(to_host(lse), expected[1], dtype, what="lse")
    # The cache now holds the new tokens, and nothing else in it changed.
    np.testing.assert_array_equal(to_host(caches[0]), expected[2])
    np.testing.assert_array_equal(to_host(caches[1]), expected[3])


@pytest.mark.parametrize("backend", backend_params())
def test_overflow_is_refused_before_anything_is_written(rng, backend):
    skip_if_unavailable(backend)
    q = random_array(rng, (2, 1, 2, 32), np.float32)
    k_cache = random_array(rng, (2, 64, 2, 32), np.float32)
    v_cache = random_array(rng, (2, 64, 2, 32), np.float32)
    k_new = random_array(rng, (2, 3, 2, 32), np.float32)
    before = (k_cache.copy(), v_cache.copy())
    caches = [to_backend(k_cache, backend), to_backend(v_cache, backend)]
    with pytest.raises(ValueError, match="cache_seqlens: sequence 1 holds 62 tokens"):
        cuattn.attention_with_kvcache(
            to_backend(q, backend),
            *caches,
            to_backend(k_new, backend),
            to_backend(k_new, backend),
            to_backend(np.array([3, 62], np.int32), backend),
            backend=backend,
        )
    np.testing.assert_array_equal(to_host(caches[0]), before[0])
    np.testing.assert_array_equal(to_host(caches[1]), before[1])


@pytest.mark.parametrize("backend", backend_params())
def test_cache_equals_plain_attention_over_the_filled_prefix(rng, backend):
    """The package checks itself: decode over a cache == attention over what it holds."""
    skip_if_unavailable(backend)
    q = random_array(rng, (1, 5, 4, 64), np.float32)
    k_cache = random_array(rng, (1, 500, 2, 64), np.float32)
    v_cache = random_array(rng, (1, 500, 2, 64), np.float32)
    length = 333
    from_cache = to_host(
        cuattn.attention_with_kvcache(
            to_backend(q, backend),
            to_backend(k_cache, backend),
            to_backend(v_cache, backend),
            cache_seqlens=length,
            causal=True,
            backend=backend,
        )
    )
    plain = to_host(
        cuattn.attention(
            to_backend(q, backend),
            to_backend(k_cache[:, :length], backend),
            to_backend(v_cache[:, :length], backend),
            causal=True,
            backend=backend,
        )
    )
    np.testing.assert_array_equal(from_cache, plain)
    expected, _ = attention_oracle(q, k_cache[:, :length], v_cache[:, :length], causal=True)
    assert_close(from_cache, expected, np.float32)


def test_a_cache_filled_to_one_length_needs_no_lengths_on_the_device():
    """A decoding batch whose caches hold the same number of tokens reaches the kernel as a
    key count in its parameters: no copy of the lengths to the device on every step."""
    from cuattn.dlpack import from_numpy
    from cuattn.kernel_params import attention_params
    from cuattn.spec import MaskOptions, kvcache_sequences, kvcache_spec

    q = np.ones((3, 1, 4, 32), np.float16)
    cache = np.ones((3, 64, 2, 32), np.float16)
    arrays = [from_numpy(a) for a in (q, cache, cache, q.copy())]
    for lengths, on_device, keys in (([40, 40, 40], False, 42), ([40, 7, 40], True, 64)):
        lengths = np.array(lengths, np.int32)
        device_lengths = {"cache_seqlens": from_numpy(lengths)}
        raw = {"q": arrays[0], "k_cache": arrays[1], "v_cache": arrays[2]}
        spec = kvcache_spec({**raw, **device_lengths}, lengths, MaskOptions(causal=True))
        sequences = kvcache_sequences(lengths, 1, 2, device_lengths)
        assert list(sequences.table[:, 4]) == list(lengths + 2)
        params = attention_params(spec, *arrays, None, None, sequences)[0]
        assert (params["cache_seqlens"] != 0) == on_device
        assert params["seqlen_k"] == keys  # the shared count, or the capacity


@pytest.mark.emulate
@pytest.mark.parametrize("lengths", [[5, 14, -3], [14, 14, 14]], ids=["per-sequence", "one-length"])
def test_the_append_kernel_writes_nothing_outside_a_cache_whatever_the_lengths(rng, lengths):
    """The API refuses an append that would overflow before anything runs; the kernel checks
    each row again, for every other caller. Launched here with lengths the API would refuse,
    under the sanitizer: rows outside the cache are skipped (without the check, the sanitizer
    faults past the last sequence and other sequences' rows are overwritten), rows inside are
    written."""
    skip_if_unavailable("emulate")
    from cuattn import backends
    from cuattn.dlpack import from_numpy

    caches = [random_array(rng, (3, 16, 2, 32), np.float16) for _ in range(2)]
    new = [random_array(rng, (3, 4, 2, 32), np.float16) for _ in range(2)]
    expected = [c.copy() for c in caches]
    for cache, fresh in zip(expected, new, strict=True):
        for b, length in enumerate(lengths):
            for token in range(4):
                if 0 <= length + token < 16:
                    cache[b, length + token] = fresh[b, token]
    backends.get("emulate").append_kv(
        *(from_numpy(a) for a in (*caches, *new)), np.array(lengths, np.int32)
    )
    for cache, wanted in zip(caches, expected, strict=True):
        np.testing.assert_array_equal(cache, wanted)


@pytest.mark.parametrize("backend", backend_params())
def test_host_lengths_may_be_a_strided_view(rng, backend):
    skip_if_unavailable(backend)
    q = random_array(rng, (2, 1, 4, 32), np.float16)
    caches = [random_array(rng, (2, 300, 2, 32), np.float16) for _ in "kv"]
    new = [random_array(rng, (2, 1, 2, 32), np.float16) for _ in "kv"]
    lengths = np.array([250, -1, 17, -1], np.int32)[::2]  # the -1 are never read
    expected = kvcache_oracle(q, *caches, *new, lengths, causal=True)
    out = cuattn.attention_with_kvcache(
        to_backend(q, backend),
        *(to_backend(a, backend) for a in (*caches, *new)),
        lengths,
        causal=True,
        backend=backend,
    )
    assert_close(to_host(out), expected[0], np.float16)


@pytest.mark.parametrize("backend", backend_params())
def test_k_and_v_caches_may_be_views_of_one_buffer(rng, backend):
    """A packed KV buffer (batch, capacity, 2, heads, dim) serves as both caches: each append
    writes its own half and leaves the other's new rows in place (the emulator's sanitizer
    copies of the two interleaved views included)."""
    skip_if_unavailable(backend)
    q = random_array(rng, (2, 1, 4, 32), np.float16)
    kv = random_array(rng, (2, 64, 2, 2, 32), np.float16)
    new = random_array(rng, (2, 2, 2, 2, 32), np.float16)
    lengths = np.array([10, 40], np.int32)
    expected = kvcache_oracle(
        q, kv[:, :, 0], kv[:, :, 1], new[:, :, 0], new[:, :, 1], lengths, causal=True
    )
    packed = to_backend(kv, backend)
    fresh = to_backend(new, backend)
    out = cuattn.attention_with_kvcache(
        to_backend(q, backend),
        packed[:, :, 0],
        packed[:, :, 1],
        fresh[:, :, 0],
        fresh[:, :, 1],
        lengths,
        causal=True,
        backend=backend,
    )
    assert_close(to_host(out), expected[0], np.float16)
    np.testing.assert_array_equal(to_host(packed)[:, :, 0], expected[2])
    np.testing.assert_array_equal(to_host(packed)[:, :, 1], expected[3])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emulate", marks=pytest.mark.emulate)])
@pytest.mark.parametrize("batch, new_tokens", [(0, 2), (2, 0)], ids=["no-sequences", "no-tokens"])
def test_an_empty_append_is_a_no_op_on_every_backend(rng, backend, batch, new_tokens):
    """KVCache's rolling copies reach the backends without the API's emptiness check."""
    skip_if_unavailable(backend)
    from cuattn import backends
    from cuattn.dlpack import from_numpy

    caches = [random_array(rng, (batch, 8, 2, 32), np.float16) for _ in range(2)]
    before = [c.copy() for c in caches]
    new = [random_array(rng, (batch, new_tokens, 2, 32), np.float16) for _ in range(2)]
    backends.get(backend).append_kv(
        *(from_numpy(a) for a in (*caches, *new)), np.full(batch, 3, np.int32)
    )
    for cache, old in zip(caches, before, strict=True):
        np.testing.assert_array_equal(cache, old)
