"""convert.mha_to_gqa: mean-pooled K/V heads."""

from __future__ import annotations

import numpy as np
import pytest

from cuattn.convert import mha_to_gqa


def test_groups_are_contiguous_heads_averaged(rng):
    heads, kv_heads, dim, hidden = 8, 2, 4, 5
    weight = rng.standard_normal((heads * dim, hidden))
    pooled = mha_to_gqa(weight, heads, kv_heads)
    per_head = weight.reshape(heads, dim, hidden)
    expected = np.stack([per_head[g * 4 : (g + 1) * 4].mean(0) for g in range(kv_heads)]).reshape(
        -1, hidden
    )
    np.testing.assert_allclose(pooled, expected)
    bias = rng.standard_normal(heads * dim)
    np.testing.assert_allclose(mha_to_gqa(bias, heads, 1), bias.reshape(heads, dim).mean(0))


def test_pooled_keys_serve_the_query_heads_of_their_group(rng):
    """With identical heads inside each group, the GQA projection reproduces MHA exactly."""
    heads, kv_heads, dim, hidden = 8, 4, 16, 32
    group_weights = rng.standard_normal((kv_heads, dim, hidden))
    mha = np.repeat(group_weights, heads // kv_heads, axis=0).reshape(heads * dim, hidden)
    np.testing.assert_allclose(mha_to_gqa(mha, heads, kv_heads), group_weights.reshape(-1, hidden))


def test_torch_weights_stay_torch(rng):
    torch = pytest.importorskip("torch")
    weight = torch.randn(8 * 16, 32, dtype=torch.bfloat16)
    pooled = mha_to_gqa(weight, 8, 2)
    assert (
        isinstance(pooled, torch.Tensor)
        and pooled.shape == (32, 32)
        and pooled.dtype == torch.bfloat16
    )


def test_bad_group_count_is_named():
    with pytest.raises(ValueError, match="num_kv_heads: must divide num_heads=8, got 3"):
        mha_to_gqa(np.zeros((32, 4)), 8, 3)


def test_bad_arguments_are_named():
    weight = np.zeros((32, 4))
    with pytest.raises(TypeError, match="num_heads: expected an int, got float"):
        mha_to_gqa(weight, 8.0, 2)
    with pytest.raises(TypeError, match="weight: expected a weight or bias array .* got list"):
        mha_to_gqa(weight.tolist(), 8, 2)
    with pytest.raises(TypeError, match="weight: .* got float64 of 0 dimensions"):
        mha_to_gqa(np.float64(1.0), 8, 2)
    with pytest.raises(ValueError, match="head_dim: must be >= 1, got 0"):
        mha_to_gqa(weight, 8, 2, head_dim=0)
