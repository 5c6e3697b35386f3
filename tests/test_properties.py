"""Property tests: random shapes and masks against the oracle, and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuattn
from cuattn.backends import cpu as cpu_backend

from .helpers import DTYPES, assert_close, qkv
from .oracle import attention_oracle

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def problems(draw, longest_query=600):
    heads_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    left = draw(st.integers(-1, 300))
    right = draw(st.integers(-1, 300))
    return dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, longest_query)),
        seqlen_k=draw(st.integers(1, 600)),
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        head_dim=draw(st.sampled_from([8, 16, 40, 64, 96, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        options=dict(
            causal=draw(st.booleans()),
            window=(left, right),
            sink_tokens=draw(st.integers(0, 8)),
            softcap=draw(st.sampled_from([0.0, 0.0, 10.0])),
        ),
        learned_sinks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@SETTINGS
@given(problem=problems())
def test_random_problems_match_the_oracle(problem):
    _matches_the_oracle(problem)


@SETTINGS
@given(
    problem=problems(),
    block_q=st.sampled_from([16, 48, 64]),
    block_k=st.sampled_from([16, 40]),
    packed_heads=st.sampled_from([1, 2, 4]),
)
def test_small_cpu_tiles_match_the_oracle(problem, block_q, block_k, packed_heads, monkeypatch):
    """Tiles far smaller than the problems: masks cut and hide many tiles of every problem,
    and the rows of a cut tile that see none of its keys are skipped; with the query heads
    of a KV head one tile or several."""
    monkeypatch.setattr(cpu_backend, "tile_sizes", lambda *args: (block_q, block_k))
    # A divisor of the group size, as the kernel needs.
    monkeypatch.setattr(
        cpu_backend, "heads_per_tile", lambda group, *args: math.gcd(group, packed_heads)
    )
    _matches_the_oracle(problem)


@SETTINGS
@given(
    problem=problems(longest_query=cpu_backend.DECODE_QUERY_ROWS),
    block_k=st.sampled_from([16, 40]),
    parts=st.sampled_from([1, 2, 3, 7]),
)
def test_cpu_decode_kernel_matches_the_oracle(problem, block_k, parts, monkeypatch):
    """Queries short enough for decode.py, with its keys in small tiles split into parts
    (more parts than tiles included), so that masks cut and hide tiles and parts."""
    monkeypatch.setattr(cpu_backend, "decode_plan", lambda *args: (block_k, parts))
    _matches_the_oracle(problem)


def _matches_the_oracle(problem):
    rng = np.random.default_rng(problem["seed"])
    q, k, v = qkv(
        rng,
        problem["batch"],
        problem["seqlen_q"],
        problem["seqlen_k"],
        problem["heads_q"],
        problem["heads_kv"],
        problem["head_dim"],
        problem["dtype"],
    )
    options = dict(problem["options"])
    if problem["learned_sinks"]:
        options["sinks"] = rng.uniform(-2, 2, problem["heads_q"]).astype(np.float32)
    out, lse = cuattn.attention(q, k, v, return_lse=True, backend="cpu", **options)
    expected_out, expected_lse = attention_oracle(q, k, v, **options)
    assert_close(out, expected_out, problem["dtype"])
    assert_close(lse, expected_lse, problem["dtype"], what="lse")


@SETTINGS
@given(seqlen_k=st.integers(2, 700), seed=st.integers(0, 2**32 - 1))
def test_unmasked_attention_ignores_key_order(seqlen_k, seed):
    """Without a mask, attention is a function of the set of (key, value) pairs."""
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 1, 33, seqlen_k, 4, 2, 64, np.float32)
    order = rng.permutation(seqlen_k)
    out = cuattn.attention(q, k, v, backend="cpu")
    shuffled = cuattn.attention(q, k[:, order], v[:, order], backend="cpu")
    np.testing.assert_allclose(shuffled, out, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("seqlen", [1, 255, 256, 257, 1025])
def test_lse_and_output_agree_with_a_split_of_the_keys(rng, seqlen):
    """Attention over [A; B] is the lse-weighted merge of attention over A and over B."""
    q, k, v = qkv(rng, 1, 17, seqlen + 40, 2, 2, 64, np.float32)
    whole = cuattn.attention(q, k, v, backend="cpu")
    o_a, lse_a = cuattn.attention(q, k[:, :seqlen], v[:, :seqlen], return_lse=True)
    o_b, lse_b = cuattn.attention(q, k[:, seqlen:], v[:, seqlen:], return_lse=True)
    lse = np.logaddexp(lse_a, lse_b)
    w_a = np.exp(lse_a - lse).transpose(0, 2, 1)[..., None]
    w_b = np.exp(lse_b - lse).transpose(0, 2, 1)[..., None]
    np.testing.assert_allclose(w_a * o_a + w_b * o_b, whole, atol=2e-6, rtol=2e-6)
