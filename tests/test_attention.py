"""attention(): every backend against the float64 oracle, over the contract's sweep.

One body per behaviour, run on each backend through the public API with ``backend=``.
Sizes are awkward on purpose (1, 97, 1025, 1999; seqlen_q != seqlen_k both ways) so
that no length divides a tile, and masks are chosen to hide whole tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import DTYPES, assert_close, backend_params, call, qkv, random_array
from .oracle import attention_oracle

# (id, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, options)
CASES = [
    ("mha", 2, 33, 33, 4, 4, 64, {}),
    ("head-dim-8", 1, 17, 23, 2, 2, 8, dict(causal=True)),
    ("head-dim-80", 1, 97, 97, 2, 1, 80, {}),
    ("head-dim-128", 1, 40, 300, 2, 2, 128, dict(causal=True)),
    ("head-dim-256", 1, 70, 45, 2, 2, 256, {}),
    ("q-longer-than-k", 1, 300, 97, 2, 2, 64, {}),
    ("q-longer-than-k-causal", 2, 300, 97, 2, 1, 64, dict(causal=True)),
    ("k-longer-than-q-causal", 1, 97, 1025, 4, 2, 64, dict(causal=True)),
    ("decode-one-query", 3, 1, 1025, 8, 2, 64, dict(causal=True)),
    ("gqa-2", 1, 65, 129, 4, 2, 32, {}),
    ("gqa-4", 2, 65, 65, 8, 2, 32, dict(causal=True)),
    ("gqa-8", 1, 50, 90, 8, 1, 16, {}),
    ("mqa", 1, 300, 300, 6, 1, 64, dict(causal=True)),
    ("window-left-only", 1, 600, 600, 2, 2, 64, dict(window=(37, -1))),
    ("window-right-only", 1, 600, 600, 2, 2, 64, dict(window=(-1, 40))),
    ("window-both", 1, 700, 1999, 2, 1, 64, dict(window=(100, 25))),
    ("window-zero", 1, 300, 300, 2, 2, 32, dict(window=(0, 0))),
    ("causal-window", 1, 1999, 1999, 1, 1, 32, dict(causal=True, window=(300, -1))),
    ("sink-tokens", 1, 700, 700, 2, 2, 64, dict(causal=True, window=(63, 0), sink_tokens=4)),
    ("sink-tokens-past-window", 1, 300, 900, 2, 1, 64, dict(window=(50, 0), sink_tokens=300)),
    ("learned-sinks", 2, 97, 97, 4, 2, 64, dict(causal=True, with_sinks=True)),
    ("learned-sinks-masked-rows", 1, 40, 10, 2, 2, 32, dict(causal=True, with_sinks=True)),
    ("softcap", 1, 97, 300, 2, 2, 64, dict(softcap=5.0, scale=0.3)),
    ("softcap-causal", 1, 300, 300, 2, 1, 64, dict(softcap=30.0, causal=True)),
    ("scale", 1, 33, 77, 2, 2, 64, dict(scale=0.05)),
    # Any finite scale is allowed (see also test_negative_scale_with_outlying_keys), and at
    # zero every visible key weighs the same.
    ("negative-scale", 1, 97, 300, 2, 1, 64, dict(scale=-0.125, causal=True)),
    ("zero-scale", 1, 70, 200, 2, 2, 32, dict(scale=0.0, causal=True)),
    ("fully-masked-rows", 1, 600, 40, 2, 2, 64, dict(causal=True, window=(5, 0))),
]


def _options(rng, heads_q, options):
    options = dict(options)
    if options.pop("with_sinks", False):
        options["sinks"] = rng.uniform(-2.0, 3.0, heads_q).astype(np.float32)
    return options


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_oracle(rng, backend, dtype, case):
    _, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, options = case
    q, k, v = qkv(rng, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype)
    options = _options(rng, heads_q, options)
    out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True, **options)
    expected_out, expected_lse = attention_oracle(q, k, v, **options)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, expected_out, dtype)
    assert lse.dtype == np.float32 and lse.shape == (batch, heads_q, seqlen_q)
    assert_close(lse, expected_lse, dtype, what="lse")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scores_rising_along_the_keys(rng, backend, dtype, causal):
    # The kernels move a row's reference maximum only when a tile passes it by more than a
    # slack (kernels/softmax.cuh), and rescale the row's output only then. Keys that grow
    # along the sequence (scores up to about 25 standard deviations) make each row's maximum
    # climb tile after tile, a few base-2 units a tile: rows move their reference on some
    # tiles and keep it on others, and the last keys dominate.
    q, k, v = qkv(rng, 1, 70, 700, 2, 1, 64, dtype)
    growth = np.linspace(0.2, 12.0, 700, dtype=np.float32)[None, :, None, None]
    k = (k.astype(np.float32) * growth).astype(dtype)
    out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True, causal=causal)
    expected_out, expected_lse = attention_oracle(q, k, v, causal=causal)
    assert_close(out, expected_out, dtype)
    assert_close(lse, expected_lse, dtype, what="lse")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_negative_scale_with_outlying_keys(rng, backend, dtype):
    # Below zero the largest score is the smallest dot's. Half the keys here, at random, have
    # a dot of at least 1000 with every query, a score under -180 in base 2 at scale -0.125:
    # they weigh nothing, but a kernel that took the largest dot for the row's maximum would
    # exponentiate the other scores against it, to 2^180 and more, which overflows float32.
    # (A lane holds a few keys of each tile; at random, nearly every lane holds such a key.)
    q, k, v = qkv(rng, 1, 97, 300, 2, 1, 64, dtype)
    q = q.astype(np.float32)
    q[..., 0] = np.abs(q[..., 0]) + 1.0
    q = q.astype(dtype)
    k = k.astype(np.float32)
    outlying = rng.random(k.shape[1]) < 0.5
    k[:, outlying] = 0.0
    k[:, outlying, :, 0] = 1000.0
    k = k.astype(dtype)
    out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True, scale=-0.125, causal=True)
    expected_out, expected_lse = attention_oracle(q, k, v, scale=-0.125, causal=True)
    assert_close(out, expected_out, dtype)
    assert_close(lse, expected_lse, dtype, what="lse")


@pytest.mark.parametrize("backend", backend_params())
def test_windows_and_sink_tokens_past_every_key_bound_nothing(rng, backend):
    # Any bound is allowed; one far past the keys (here past 64-bit positions) is no bound.
    q, k, v = qkv(rng, 1, 70, 150, 2, 2, 32, np.float32)
    unbounded = call(cuattn.attention, backend, q, k, v)
    far = call(cuattn.attention, backend, q, k, v, window=(2**70, 2**63), sink_tokens=2**64)
    np.testing.assert_array_equal(far, unbounded)


@pytest.mark.parametrize("backend", backend_params())
def test_causal_is_the_window_with_right_edge_zero(rng, backend):
    q, k, v = qkv(rng, 1, 300, 400, 2, 2, 64, np.float32)
    causal = call(cuattn.attention, backend, q, k, v, causal=True)
    window = call(cuattn.attention, backend, q, k, v, window=(-1, 0))
    np.testing.assert_array_equal(causal, window)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_strided_inputs_are_read_in_place(rng, backend, dtype):
    # A packed qkv tensor sliced into q, k, v, and a (B, H, S, D) tensor seen as (B, S, H, D).
    # (The CPU backend hands float32 K and V rows to BLAS where they are, strides and all.)
    packed = random_array(rng, (2, 97, 3, 4, 64), dtype)
    q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
    heads_first = random_array(rng, (2, 4, 97, 64), dtype).transpose(0, 2, 1, 3)
    for query in (q, heads_first):
        out = call(cuattn.attention, backend, query, k, v, causal=True)
        expected, _ = attention_oracle(query, k, v, causal=True)
        assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_reversed_and_repeated_key_rows(rng, backend):
    """Keys in reverse order (a negative row stride) and one value row repeated (a zero
    stride, and read-only: np.broadcast_to). BLAS takes neither as a matrix: the CPU backend
    copies such tiles rather than reading them in place."""
    q = random_array(rng, (2, 70, 4, 64), np.float32)
    k = random_array(rng, (2, 300, 2, 64), np.float32)[:, ::-1]
    v = np.broadcast_to(random_array(rng, (2, 1, 2, 64), np.float32), (2, 300, 2, 64))
    out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True, causal=True)
    expected_out, expected_lse = attention_oracle(q, k, v, causal=True)
    assert_close(out, expected_out, np.float32)
    assert_close(lse, expected_lse, np.float32, what="lse")


@pytest.mark.parametrize("backend", backend_params())
def test_nan_reaches_the_rows_and_columns_it_touches(rng, backend):
    """A NaN in a query row, in a key or in one column of a value reaches what it touches
    in exact arithmetic, and nothing else: the row, every row of the KV head's query heads,
    the value's column. (A NaN value at a key that a mask hides from a row, inside a tile
    the row reads, is not covered: 0 x NaN reaches the row, as in flash-attn.)"""
    q, k, v = qkv(rng, 2, 70, 300, 4, 2, 64, np.float32)
    q[0, 5, 0, 3] = np.nan
    k[1, 7, 1, 2] = np.nan
    v[0, 9, 0, 1] = np.nan
    out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True)
    expected_out, expected_lse = attention_oracle(q, k, v)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(expected_lse))
    assert 0 < np.isnan(out).sum() < out.size
    seen = ~np.isnan(expected_out)
    assert_close(out[seen], expected_out[seen], np.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_a_nan_learned_sink_reaches_every_row_of_its_head(rng, backend):
    """The sink is in every row's denominator, a row that sees no key included (the first
    rows here: more queries than keys, bottom-right causal), so a NaN sink makes its head's
    rows NaN, and nothing else."""
    q, k, v = qkv(rng, 1, 40, 10, 2, 2, 32, np.float32)
    sinks = np.array([np.nan, 0.5], np.float32)
    out, lse = call(cuattn.attention, backend, q, k, v, sinks=sinks, causal=True, return_lse=True)
    expected_out, expected_lse = attention_oracle(q, k, v, sinks=sinks, causal=True)
    assert np.isnan(expected_out[:, :, 0]).all() and np.isnan(expected_lse[:, 0]).all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(expected_lse))
    assert_close(out[:, :, 1], expected_out[:, :, 1], np.float32)
    assert_close(lse[:, 1], expected_lse[:, 1], np.float32, what="lse")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "shape_q, shape_kv",
    [
        ((0, 5, 2, 64), (0, 5, 2, 64)),
        ((2, 0, 2, 64), (2, 5, 2, 64)),
        ((2, 5, 2, 64), (2, 0, 1, 64)),
    ],
    ids=["batch-0", "seqlen-q-0", "seqlen-k-0"],
)
def test_empty_inputs_give_correctly_shaped_results(rng, backend, shape_q, shape_kv):
    q = random_array(rng, shape_q, np.float32)
    k = random_array(rng, shape_kv, np.float32)
    v = random_array(rng, shape_kv, np.float32)
    out, lse = call(cuattn.attention, backend, q, k, v, return_lse=True)
    assert out.shape == shape_q and lse.shape == (shape_q[0], shape_q[2], shape_q[1])
    # With no keys at all every row sees nothing: zeros and -inf, never NaN.
    assert np.all(out == 0) and np.all(lse == -np.inf)
