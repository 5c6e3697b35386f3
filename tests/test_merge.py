"""merge_attention_states: attention over a union of keys from attention over its parts."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import DTYPES, assert_close, backend_params, call, qkv, random_array
from .oracle import attention_oracle


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_merging_two_halves_of_the_keys_is_attention_over_all(rng, backend, dtype):
    q, k, v = qkv(rng, 2, 37, 300, 4, 2, 64, dtype)
    split = 113
    a = cuattn.attention(q, k[:, :split], v[:, :split], return_lse=True, backend="cpu")
    b = cuattn.attention(q, k[:, split:], v[:, split:], return_lse=True, backend="cpu")
    out, lse = call(cuattn.merge_attention_states, backend, *a, *b)
    expected_out, expected_lse = attention_oracle(q, k, v)
    # Merging adds one rounding of the parts' outputs to the dtype's error.
    assert_close(out, expected_out, dtype)
    assert_close(lse, expected_lse, dtype, what="lse")


@pytest.mark.parametrize("backend", backend_params())
def test_empty_states_stay_empty_and_do_not_dilute(rng, backend):
    heads, dim = 2, 32
    out_a = random_array(rng, (1, 5, heads, dim), np.float32)
    lse_a = rng.standard_normal((1, heads, 5)).astype(np.float32)
    out_b = np.zeros_like(out_a)
    lse_b = np.full_like(lse_a, -np.inf)
    lse_a[0, 0, 1] = -np.inf  # row 1 of head 0 is empty on both sides
    out_a[0, 1, 0] = 0.0
    out, lse = call(cuattn.merge_attention_states, backend, out_a, lse_a, out_b, lse_b)
    np.testing.assert_allclose(out, out_a, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(lse, lse_a)
    assert not np.isnan(out).any()


@pytest.mark.parametrize("backend", backend_params())
def test_packed_layout(rng, backend):
    out_a, out_b = (random_array(rng, (50, 3, 16), np.float16) for _ in range(2))
    lse_a, lse_b = (rng.standard_normal((3, 50)).astype(np.float32) for _ in range(2))
    out, lse = call(cuattn.merge_attention_states, backend, out_a, lse_a, out_b, lse_b)
    total = np.logaddexp(lse_a, lse_b)
    expected = np.exp(lse_a - total).T[..., None] * out_a.astype(np.float64) + np.exp(
        lse_b - total
    ).T[..., None] * out_b.astype(np.float64)
    assert_close(out, expected, np.float16)
    assert_close(lse, total, np.float16, what="lse")


def test_mismatched_states_are_refused(rng):
    out = random_array(rng, (1, 5, 2, 16), np.float32)
    lse = np.zeros((1, 2, 5), np.float32)
    with pytest.raises(ValueError, match=r"out_b: shape must equal out_a's \(1, 5, 2, 16\)"):
        cuattn.merge_attention_states(out, lse, out[:, :4], lse)
    with pytest.raises(ValueError, match=r"lse_b: expected shape \(1, 2, 5\)"):
        cuattn.merge_attention_states(out, lse, out, lse[:, :, :4])
    with pytest.raises(TypeError, match=r"lse_a: dtype must be float32, got float64"):
        cuattn.merge_attention_states(out, lse.astype(np.float64), out, lse)
