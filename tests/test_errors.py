"""Every error path of SEMANTICS.md "Errors": the exception names the argument, what it
got and what it needs, and comes before any backend runs."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import BFLOAT16, random_array


@pytest.fixture
def arrays(rng):
    q = random_array(rng, (2, 5, 4, 64), np.float32)
    k = random_array(rng, (2, 7, 2, 64), np.float32)
    v = random_array(rng, (2, 7, 2, 64), np.float32)
    return q, k, v


def _raises(error, pattern, function, *args, **kwargs):
    with pytest.raises(error, match=pattern):
        function(*args, **kwargs)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (
            lambda q, k, v: (q[0], k, v),
            ValueError,
            r"q: expected 4 dimensions .* got shape \(5, 4, 64\)",
        ),
        (
            lambda q, k, v: (q, k[:, :, :, :32], v),
            ValueError,
            r"v: shape must equal k's \(2, 7, 2, 32\)",
        ),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"k: batch must equal q's 2, got 1"),
        (
            lambda q, k, v: (q, k, v[:, :6]),
            ValueError,
            r"v: shape must equal k's \(2, 7, 2, 64\), got \(2, 6, 2, 64\)",
        ),
        (
            lambda q, k, v: (q, k[:, :, :, :32], v[:, :, :, :32]),
            ValueError,
            r"k: head_dim must equal q's 64, got 32",
        ),
        (
            lambda q, k, v: (q, np.repeat(k, 3, 2)[:, :, :3], np.repeat(v, 3, 2)[:, :, :3]),
            ValueError,
            r"k: num_heads_kv must divide q's num_heads 4 .* got 3",
        ),
        (
            lambda q, k, v: (q.astype(np.float16), k, v),
            TypeError,
            r"k: dtype must match q's float16, got float32",
        ),
        (
            lambda q, k, v: (q, k, v.astype(BFLOAT16)),
            TypeError,
            r"v: dtype must match q's float32, got bfloat16",
        ),
        (
            lambda q, k, v: (q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)),
            TypeError,
            r"q: dtype must be float16, bfloat16 or float32, got float64",
        ),
        (lambda q, k, v: (q.astype(np.int32), k, v), TypeError, r"q: dtype must be .* got int32"),
        (
            lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]),
            ValueError,
            r"q: head_dim must be a multiple of 8 from 8 to 256, got 12",
        ),
        (
            lambda q, k, v: (
                np.zeros((2, 5, 4, 264), np.float32),
                np.zeros((2, 7, 2, 264), np.float32),
                np.zeros((2, 7, 2, 264), np.float32),
            ),
            ValueError,
            r"q: head_dim must be .* got 264",
        ),
        (
            lambda q, k, v: (q[..., ::2], k[..., ::2], v[..., ::2]),
            ValueError,
            r"q: the last dimension \(head_dim\) must be contiguous, "
            r"got strides \(1280, 256, 64, 2\)",
        ),
        (
            lambda q, k, v: (q, k, np.asfortranarray(v)),
            ValueError,
            r"v: the last dimension \(head_dim\) must be contiguous",
        ),
    ],
    ids=[
        "q-ndim",
        "v-shape",
        "batch",
        "v-seqlen",
        "head-dim",
        "heads-divide",
        "k-dtype",
        "v-dtype",
        "float64",
        "int32",
        "head-dim-multiple",
        "head-dim-max",
        "q-strided-last-dim",
        "v-fortran",
    ],
)
def test_attention_refuses_bad_arrays(arrays, change, error, pattern):
    _raises(error, pattern, cuattn.attention, *change(*arrays))


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(window=(-2, 0)), ValueError, r"window\[0\] \(left\): must be >= -1, got -2"),
        (dict(window=(4, -3)), ValueError, r"window\[1\] \(right\): must be >= -1, got -3"),
        (dict(window=(4,)), ValueError, r"window: expected a pair \(left, right\), got \(4,\)"),
        (dict(window=(1.5, 0)), TypeError, r"window\[0\] \(left\): expected an int, got float"),
        (dict(causal=1), TypeError, r"causal: expected a bool, got int"),
        (dict(scale=float("nan")), ValueError, r"scale: expected a finite float, got nan"),
        (dict(softcap=-1.0), ValueError, r"softcap: expected a finite float >= 0"),
        # Finite in float64, past float32's range where the kernels take them.
        (dict(scale=1e39), ValueError, r"scale: must be within \+-2.359e\+38 .* got 1e\+39"),
        (dict(softcap=1e39), ValueError, r"softcap: must be at most 2.359e\+38 .* got 1e\+39"),
        (
            dict(scale=1.0, softcap=1e-39),
            ValueError,
            r"softcap: scale / softcap must be within float32's range",
        ),
        (dict(sink_tokens=-1), ValueError, r"sink_tokens: must be >= 0, got -1"),
        (
            dict(sinks=np.zeros(3, np.float32)),
            ValueError,
            r"sinks: expected shape \(4,\), one logit per query head, got \(3,\)",
        ),
        (
            dict(sinks=np.zeros(4, np.float16)),
            TypeError,
            r"sinks: dtype must be float32, got float16",
        ),
        (
            dict(backend="tpu"),
            ValueError,
            r"backend: expected 'auto', 'cpu', 'cuda', 'emulate'; got 'tpu'",
        ),
        (
            dict(backend="cuda"),
            ValueError,
            r"backend: 'cuda' computes on GPU .* but the arrays are on cpu",
        ),
    ],
    ids=[
        "window-left",
        "window-right",
        "window-pair",
        "window-int",
        "causal-bool",
        "scale",
        "softcap",
        "scale-float32",
        "softcap-float32",
        "scale-over-softcap-float32",
        "sink-tokens",
        "sinks-shape",
        "sinks-dtype",
        "backend-name",
        "backend-device",
    ],
)
def test_attention_refuses_bad_options(arrays, options, error, pattern):
    _raises(error, pattern, cuattn.attention, *arrays, **options)


def test_not_an_array_is_named(arrays):
    q, k, v = arrays
    _raises(TypeError, r"k: expected an array .* got list", cuattn.attention, q, k.tolist(), v)


@pytest.mark.parametrize("missing", ["q", "k", "v"])
def test_a_missing_array_is_named(arrays, missing):
    given = dict(zip("qkv", arrays, strict=True), **{missing: None})
    _raises(TypeError, rf"{missing}: expected an array, got None", cuattn.attention, **given)


def test_merge_names_a_missing_array(rng):
    out = random_array(rng, (1, 3, 2, 8), np.float32)
    lse = random_array(rng, (1, 2, 3), np.float32)
    _raises(
        TypeError,
        r"lse_a: expected an array, got None",
        cuattn.merge_attention_states,
        out,
        None,
        out,
        lse,
    )


def test_an_unsupported_framework_dtype_is_named(arrays):
    torch = pytest.importorskip("torch")
    q, k, v = arrays
    complex_k = torch.from_numpy(k).to(torch.complex64)
    _raises(
        TypeError,
        r"k: could not be read through DLPack: unsupported DLPack dtype",
        cuattn.attention,
        torch.from_numpy(q),
        complex_k,
        torch.from_numpy(v),
    )


def test_a_jax_tracer_is_named(arrays):
    jax = pytest.importorskip("jax")
    q, k, v = (jax.numpy.asarray(a) for a in arrays)
    _raises(
        TypeError,
        r"q: a \w+Tracer is not an array in memory .*under jax.jit, arrays are tracers",
        jax.jit(lambda q: cuattn.attention(q, k, v)),
        q,
    )


def test_mixed_frameworks_are_refused(arrays):
    torch = pytest.importorskip("torch")
    q, k, v = arrays
    _raises(
        TypeError,
        r"k: is a torch array but q is a numpy array",
        cuattn.attention,
        q,
        torch.from_numpy(k),
        v,
    )


def test_tensor_requiring_grad_is_named(arrays):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a) for a in arrays)
    q.requires_grad_(True)
    _raises(TypeError, r"q: could not be read through DLPack", cuattn.attention, q, k, v)


# --- varlen -------------------------------------------------------------------------------------


@pytest.fixture
def packed(rng):
    q = random_array(rng, (12, 4, 64), np.float32)
    k = random_array(rng, (15, 2, 64), np.float32)
    v = random_array(rng, (15, 2, 64), np.float32)
    return q, k, v


@pytest.mark.parametrize(
    "cu_q, cu_k, max_q, max_k, error, pattern",
    [
        (
            [0, 7, 5, 12],
            [0, 5, 10, 15],
            7,
            5,
            ValueError,
            r"cu_seqlens_q: must be non-decreasing prefix sums, got 7 then 5 at index 1",
        ),
        ([1, 7, 12], [0, 5, 15], 7, 10, ValueError, r"cu_seqlens_q: must start at 0, got 1"),
        (
            [0, 7, 13],
            [0, 5, 15],
            7,
            10,
            ValueError,
            r"cu_seqlens_q: last entry 13 exceeds q's length 12",
        ),
        (
            [0, 7, 12],
            [0, 5, 10, 15],
            7,
            5,
            ValueError,
            r"cu_seqlens_k: must have the same length as cu_seqlens_q \(3\), got 4",
        ),
        (
            [0, 7, 12],
            [0, 5, 15],
            6,
            10,
            ValueError,
            r"max_seqlen_q: a sequence has length 7, more than max_seqlen_q=6",
        ),
        ([0, 7, 12], [0, 5, 15], 7, -1, ValueError, r"max_seqlen_k: must be >= 0, got -1"),
    ],
    ids=["decreasing", "start", "past-end", "lengths", "max-q", "max-k-negative"],
)
def test_varlen_refuses_bad_prefix_sums(packed, cu_q, cu_k, max_q, max_k, error, pattern):
    q, k, v = packed
    _raises(
        error,
        pattern,
        cuattn.attention_varlen,
        q,
        k,
        v,
        np.array(cu_q, np.int32),
        np.array(cu_k, np.int32),
        max_q,
        max_k,
    )


def test_varlen_refuses_int64_prefix_sums(packed):
    q, k, v = packed
    _raises(
        TypeError,
        r"cu_seqlens_q: dtype must be int32, got int64",
        cuattn.attention_varlen,
        q,
        k,
        v,
        np.array([0, 12]),
        np.array([0, 15], np.int32),
        12,
        15,
    )


# --- kv cache -----------------------------------------------------------------------------------


@pytest.fixture
def cache(rng):
    q = random_array(rng, (2, 1, 4, 64), np.float32)
    k_cache = random_array(rng, (2, 16, 2, 64), np.float32)
    v_cache = random_array(rng, (2, 16, 2, 64), np.float32)
    k_new = random_array(rng, (2, 1, 2, 64), np.float32)
    return q, k_cache, v_cache, k_new


def test_kvcache_refuses_k_new_without_v_new(cache):
    q, k_cache, v_cache, k_new = cache
    _raises(
        ValueError,
        r"v_new: k_new and v_new come together",
        cuattn.attention_with_kvcache,
        q,
        k_cache,
        v_cache,
        k_new,
        None,
        np.array([1, 2], np.int32),
    )


def test_kvcache_refuses_new_tokens_of_another_shape(cache):
    q, k_cache, v_cache, k_new = cache
    wrong = np.concatenate([k_new, k_new], axis=2)
    _raises(
        ValueError,
        r"k_new: expected shape \(2, seqlen_new, 2, 64\) .* got \(2, 1, 4, 64\)",
        cuattn.attention_with_kvcache,
        q,
        k_cache,
        v_cache,
        wrong,
        wrong,
        np.array([1, 2], np.int32),
    )


@pytest.mark.parametrize(
    "lengths, error, pattern",
    [
        (
            np.array([1, 16], np.int32),
            ValueError,
            r"cache_seqlens: sequence 1 holds 16 tokens and 1 new ones would pass "
            r"the cache's capacity of 16",
        ),
        (np.array([1, -2], np.int32), ValueError, r"cache_seqlens: lengths must be >= 0, got -2"),
        (np.array([1, 2, 3], np.int32), ValueError, r"cache_seqlens: expected shape \(2,\)"),
        (np.array([1, 2], np.int64), TypeError, r"cache_seqlens: dtype must be int32, got int64"),
        # 2**31 - 1 + 1 new token wrapped to a negative int32 and passed the check; the
        # append then wrote nothing and the attention read past the cache (a segfault).
        (
            np.array([1, 2**31 - 1], np.int32),
            ValueError,
            r"cache_seqlens: sequence 1 holds 2147483647 tokens and 1 new ones would pass",
        ),
        ([1, 2**31 - 1], ValueError, r"cache_seqlens: sequence 1 holds 2147483647 tokens"),
        (2**31 - 1, ValueError, r"cache_seqlens: sequence 0 holds 2147483647 tokens"),
        ([1, 2**32 + 1], ValueError, r"cache_seqlens: lengths must fit in int32, got 4294967297"),
        ([1.7, 2], TypeError, r"cache_seqlens: expected integer lengths, got float64"),
        (True, TypeError, r"cache_seqlens: expected integer lengths, got bool"),
        # Below int32's range: the cast would wrap it to the valid length 3.
        ([1, -(2**32) + 3], ValueError, r"cache_seqlens: lengths must be >= 0, got -4294967293"),
        (-(2**32) + 3, ValueError, r"cache_seqlens: lengths must be >= 0, got -4294967293"),
    ],
    ids=[
        "overflow",
        "negative",
        "shape",
        "dtype",
        "int32-wrap",
        "int32-wrap-list",
        "int32-wrap-int",
        "past-int32-list",
        "float-list",
        "bool",
        "below-int32-list",
        "below-int32-int",
    ],
)
def test_kvcache_refuses_bad_lengths_and_writes_nothing(cache, lengths, error, pattern):
    q, k_cache, v_cache, k_new = cache
    before = k_cache.copy()
    _raises(
        error, pattern, cuattn.attention_with_kvcache, q, k_cache, v_cache, k_new, k_new, lengths
    )
    np.testing.assert_array_equal(k_cache, before)


@pytest.mark.parametrize("lengths", [[], (), np.zeros(0, np.int32)], ids=["list", "tuple", "array"])
def test_kvcache_takes_no_lengths_for_no_sequences(rng, lengths):
    q = random_array(rng, (0, 1, 4, 64), np.float32)
    k_cache = random_array(rng, (0, 16, 2, 64), np.float32)
    out = cuattn.attention_with_kvcache(q, k_cache, k_cache, cache_seqlens=lengths)
    assert out.shape == (0, 1, 4, 64)


def test_kvcache_refuses_lengths_with_gaps_from_a_framework(cache):
    # The kernels read length b at element b; a NumPy view is made whole instead (test_kvcache).
    torch = pytest.importorskip("torch")
    q, k_cache, v_cache, k_new = (torch.from_numpy(a) for a in cache)
    lengths = torch.tensor([1, 0, 2, 0], dtype=torch.int32)[::2]
    before = k_cache.clone()
    _raises(
        ValueError,
        r"cache_seqlens: must be contiguous, got a stride of 2 elements",
        cuattn.attention_with_kvcache,
        q,
        k_cache,
        v_cache,
        k_new,
        k_new,
        lengths,
    )
    assert torch.equal(k_cache, before)


def test_kvcache_refuses_a_read_only_cache(cache):
    q, k_cache, v_cache, k_new = cache
    k_cache.flags.writeable = False
    _raises(
        TypeError,
        r"k_cache: is written in place, but this numpy array is read-only",
        cuattn.attention_with_kvcache,
        q,
        k_cache,
        v_cache,
        k_new,
        k_new,
        np.array([1, 2], np.int32),
    )


def test_kvcache_refuses_jax_caches(cache):
    jnp = pytest.importorskip("jax.numpy")
    q, k_cache, v_cache, k_new = (jnp.asarray(a) for a in cache)
    _raises(
        TypeError,
        r"k_cache: is written in place, but this jax array is read-only",
        cuattn.attention_with_kvcache,
        q,
        k_cache,
        v_cache,
        k_new,
        k_new,
        jnp.asarray(np.array([1, 2], np.int32)),
    )
