"""The oracle itself, checked by hand-made cases and against PyTorch's SDPA."""

from __future__ import annotations

import math

import numpy as np
import pytest

from .helpers import random_array
from .oracle import attention_oracle, visibility


def test_seed_example_causal_window_of_three():
    # "THE CAT IS ON A CHAIR" with a causal window of 3 tokens: ON sees CAT, IS, ON.
    words = "THE CAT IS ON A CHAIR".split()
    visible = visibility(len(words), len(words), causal=True, window=(2, 0))
    row = visible[words.index("ON")]
    assert [w for w, seen in zip(words, row, strict=True) if seen] == ["CAT", "IS", "ON"]


def test_bottom_right_alignment():
    # 2 queries over 5 keys: they stand at key positions 3 and 4.
    visible = visibility(2, 5, causal=True)
    assert visible.tolist() == [[True, True, True, True, False], [True] * 5]
    # More queries than keys: the first rows see nothing.
    assert not visibility(5, 2, causal=True)[:3].any()


def test_sink_tokens_ignore_only_the_left_bound():
    visible = visibility(8, 8, causal=True, window=(1, 0), sink_tokens=2)
    assert visible[6].tolist() == [True, True, False, False, False, True, True, False]
    assert visible[0].tolist() == [True] + [False] * 7  # sinks still obey causality


def test_single_key_gives_its_value_and_its_score_as_lse(rng):
    q = random_array(rng, (1, 1, 1, 8), np.float64)
    k = random_array(rng, (1, 1, 1, 8), np.float64)
    v = random_array(rng, (1, 1, 1, 8), np.float64)
    out, lse = attention_oracle(q, k, v, scale=0.5)
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0])
    np.testing.assert_allclose(lse[0, 0, 0], 0.5 * q[0, 0, 0] @ k[0, 0, 0])


def test_fully_masked_rows_give_zero_and_minus_inf(rng):
    q = random_array(rng, (1, 4, 2, 8), np.float64)
    kv = random_array(rng, (1, 2, 2, 8), np.float64)
    out, lse = attention_oracle(q, kv, kv, causal=True)
    assert np.all(out[0, :2] == 0) and np.all(lse[0, :, :2] == -np.inf)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[0, :, 2:]))


def test_learned_sink_is_an_extra_zero_valued_logit(rng):
    q = random_array(rng, (1, 3, 1, 8), np.float64)
    k = random_array(rng, (1, 3, 1, 8), np.float64)
    v = random_array(rng, (1, 3, 1, 8), np.float64)
    sink = np.array([0.7])
    out, lse = attention_oracle(q, k, v, sinks=sink)
    scores = (q[0, :, 0] @ k[0, :, 0].T) / math.sqrt(8)
    denominator = np.exp(scores).sum(1) + np.exp(0.7)
    np.testing.assert_allclose(out[0, :, 0], (np.exp(scores) / denominator[:, None]) @ v[0, :, 0])
    np.testing.assert_allclose(lse[0, 0], np.log(denominator))


@pytest.mark.parametrize(
    "causal, window",
    [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2)), (True, (5, 0)), (False, (0, 0))],
)
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 7), (5, 11), (11, 5)])
def test_oracle_matches_torch_sdpa_with_an_explicit_mask(rng, causal, window, seqlen_q, seqlen_k):
    torch = pytest.importorskip("torch")
    q = random_array(rng, (2, seqlen_q, 4, 16), np.float64)
    k = random_array(rng, (2, seqlen_k, 2, 16), np.float64)
    v = random_array(rng, (2, seqlen_k, 2, 16), np.float64)
    out, _ = attention_oracle(q, k, v, causal=causal, window=window, softcap=0.0)
    visible = visibility(seqlen_q, seqlen_k, causal=causal, window=window)
    t = [torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)]
    expected = (
        torch.nn.functional.scaled_dot_product_attention(
            t[0],
            t[1].repeat_interleave(2, dim=1),
            t[2].repeat_interleave(2, dim=1),
            attn_mask=torch.from_numpy(visible),
        )
        .transpose(1, 2)
        .numpy()
    )
    # SDPA gives NaN for rows that see nothing; the contract says 0.
    empty_rows = ~visible.any(1)
    expected[:, empty_rows] = 0.0
    np.testing.assert_allclose(out, expected, atol=1e-12, rtol=1e-12)
