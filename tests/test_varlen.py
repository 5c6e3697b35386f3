"""attention_varlen(): packed sequences against the oracle, and against the padded batch."""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import DTYPES, assert_close, backend_params, call, random_array
from .oracle import varlen_oracle


def _packed(rng, lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype):
    cu_q = np.concatenate(([0], np.cumsum(lengths_q))).astype(np.int32)
    cu_k = np.concatenate(([0], np.cumsum(lengths_k))).astype(np.int32)
    q = random_array(rng, (cu_q[-1], heads_q, head_dim), dtype)
    k = random_array(rng, (cu_k[-1], heads_kv, head_dim), dtype)
    v = random_array(rng, (cu_k[-1], heads_kv, head_dim), dtype)
    return q, k, v, cu_q, cu_k


VARLEN_CASES = [
    ("self-attention", [97, 1, 300, 33], [97, 1, 300, 33], dict(causal=True)),
    ("cross-lengths", [40, 7, 260], [300, 1, 12], dict(causal=True)),
    ("empty-sequences", [0, 50, 0, 9], [10, 0, 0, 20], {}),
    ("window-sinks", [280, 31], [500, 31], dict(window=(40, 0), sink_tokens=3)),
    ("softcap-learned-sinks", [65, 130], [65, 257], dict(softcap=20.0, with_sinks=True)),
    # At most 16 query rows each: the CPU backend's decode kernel, at offsets in the packed axes.
    ("short-queries", [1, 0, 16, 3], [300, 5, 0, 40], dict(causal=True)),
    ("short-queries-window", [4, 1, 9], [270, 33, 9], dict(window=(50, 0), sink_tokens=2)),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_matches_oracle(rng, backend, dtype, case):
    _, lengths_q, lengths_k, options = case
    heads_q, heads_kv, head_dim = 4, 2, 64
    q, k, v, cu_q, cu_k = _packed(rng, lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype)
    options = dict(options)
    if options.pop("with_sinks", False):
        options["sinks"] = rng.uniform(-1.0, 2.0, heads_q).astype(np.float32)
    out, lse = call(
        cuattn.attention_varlen,
        backend,
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(lengths_q),
        max(lengths_k),
        return_lse=True,
        **options,
    )
    expected_out, expected_lse = varlen_oracle(q, k, v, cu_q, cu_k, **options)
    assert out.shape == q.shape and lse.shape == (heads_q, q.shape[0])
    assert_close(out, expected_out, dtype)
    assert_close(lse, expected_lse, dtype, what="lse")


@pytest.mark.parametrize("backend", backend_params())
def test_varlen_equals_the_padded_batch(rng, backend):
    """Equal lengths packed give exactly what the padded (batch, seqlen) call gives."""
    batch, seqlen = 3, 157
    q = random_array(rng, (batch, seqlen, 4, 64), np.float32)
    k = random_array(rng, (batch, seqlen, 2, 64), np.float32)
    v = random_array(rng, (batch, seqlen, 2, 64), np.float32)
    cu = (np.arange(batch + 1) * seqlen).astype(np.int32)
    padded = call(cuattn.attention, backend, q, k, v, causal=True)
    packed = call(
        cuattn.attention_varlen,
        backend,
        q.reshape(-1, 4, 64),
        k.reshape(-1, 2, 64),
        v.reshape(-1, 2, 64),
        cu,
        cu,
        seqlen,
        seqlen,
        causal=True,
    )
    np.testing.assert_array_equal(packed.reshape(padded.shape), padded)
