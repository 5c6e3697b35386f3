"""decode.py (the CPU kernel for queries of at most DECODE_QUERY_ROWS rows) keeps the NaN
rules of docs/semantics.md through the merge of its parts, and with a single part.

test_attention.py's NaN tests use long queries, which flash.py serves. Here the keys are
forced into small tiles and split into parts, so that a NaN lies in one part of several and
rows see no key in some parts."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn
from cuattn.backends import cpu as cpu_backend

from .helpers import assert_close, qkv
from .oracle import attention_oracle

PARTS = [1, 4]


@pytest.fixture
def decode_plan(monkeypatch):
    """Forces decode.py's plan to 16-key tiles in ``parts`` parts; returns the setter."""

    def force(parts):
        monkeypatch.setattr(cpu_backend, "decode_plan", lambda *args: (16, parts))

    return force


def _same_nans_and_close_elsewhere(out, lse, expected_out, expected_lse):
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(expected_lse))
    seen = ~np.isnan(expected_out)
    assert_close(out[seen], expected_out[seen], np.float32)
    seen = ~np.isnan(expected_lse)
    assert_close(lse[seen], expected_lse[seen], np.float32, what="lse")


@pytest.mark.parametrize("parts", PARTS)
def test_nan_reaches_the_rows_and_columns_it_touches_in_decoding(rng, decode_plan, parts):
    decode_plan(parts)
    q, k, v = qkv(rng, 2, 3, 200, 4, 2, 32, np.float32)
    q[0, 1, 0, 3] = np.nan  # one row
    k[1, 150, 1, 2] = np.nan  # every row of query heads 2 and 3 in batch 1: a late part
    v[0, 9, 0, 1] = np.nan  # column 1 of query heads 0 and 1 in batch 0: the first part
    out, lse = cuattn.attention(q, k, v, return_lse=True, backend="cpu")
    expected_out, expected_lse = attention_oracle(q, k, v)
    assert 0 < np.isnan(expected_out).sum() < expected_out.size
    _same_nans_and_close_elsewhere(out, lse, expected_out, expected_lse)


@pytest.mark.parametrize("parts", PARTS)
def test_a_nan_learned_sink_reaches_rows_without_keys_in_decoding(rng, decode_plan, parts):
    """Bottom-right causal with more queries than keys: the first rows see no key in any
    part, and the NaN sink still makes every row of its head NaN."""
    decode_plan(parts)
    q, k, v = qkv(rng, 1, 12, 40, 2, 1, 16, np.float32)
    k_short, v_short = k[:, :5], v[:, :5]
    sinks = np.array([np.nan, 0.5], np.float32)
    options = dict(sinks=sinks, causal=True)
    out, lse = cuattn.attention(q, k_short, v_short, return_lse=True, backend="cpu", **options)
    expected_out, expected_lse = attention_oracle(q, k_short, v_short, **options)
    assert np.isnan(expected_out[:, :, 0]).all() and np.isfinite(expected_out[:, :, 1]).all()
    _same_nans_and_close_elsewhere(out, lse, expected_out, expected_lse)


@pytest.mark.parametrize("parts", PARTS)
def test_rows_that_no_part_reaches_are_empty_in_decoding(rng, decode_plan, parts):
    """A window that shows each row only keys in one part: the other parts see nothing
    (-inf maximum, weight 0 in the merge), and rows before the first key give 0 and -inf."""
    decode_plan(parts)
    q, k, v = qkv(rng, 1, 10, 100, 4, 2, 16, np.float32)
    k_short, v_short = k[:, :7], v[:, :7]
    options = dict(causal=True, window=(2, 0))
    out, lse = cuattn.attention(q, k_short, v_short, return_lse=True, backend="cpu", **options)
    expected_out, expected_lse = attention_oracle(q, k_short, v_short, **options)
    assert (expected_lse[:, :, :3] == -np.inf).all()
    _same_nans_and_close_elsewhere(out, lse, expected_out, expected_lse)
    out, lse = cuattn.attention(q, k, v, return_lse=True, backend="cpu", **options)
    expected_out, expected_lse = attention_oracle(q, k, v, **options)
    _same_nans_and_close_elsewhere(out, lse, expected_out, expected_lse)
