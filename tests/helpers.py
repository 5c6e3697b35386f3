"""Random inputs and dtype tolerances, shared by the tests."""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)

# Outputs are convex combinations of values ~N(0, 1). float32 results differ from the
# float64 oracle only by accumulation order and exp2's one ulp; half-precision results
# also carry one rounding of the output and, on tensor cores, of the probabilities.
TOLERANCE = {
    np.dtype(np.float32): dict(atol=1e-5, rtol=1e-5),
    np.dtype(np.float16): dict(atol=2e-3, rtol=2e-3),
    BFLOAT16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# lse is float32 in every dtype, computed from the (rounded) inputs exactly.
LSE_TOLERANCE = dict(atol=1e-4, rtol=1e-5)


def random_array(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Standard normal data in ``dtype``: never zeros, never a pattern."""
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def cache_step(rng, batch, capacity, new_tokens, heads_q, heads_kv, head_dim, dtype):
    """q, k_cache, v_cache, k_new, v_new of one decoding step (new_tokens query and new
    tokens), fresh random data."""
    q = random_array(rng, (batch, new_tokens, heads_q, head_dim), dtype)
    caches = [random_array(rng, (batch, capacity, heads_kv, head_dim), dtype) for _ in "kv"]
    new = [random_array(rng, (batch, new_tokens, heads_kv, head_dim), dtype) for _ in "kv"]
    return q, *caches, *new


def qkv(rng, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype):
    q = random_array(rng, (batch, seqlen_q, heads_q, head_dim), dtype)
    k = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    v = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    return q, k, v


def as_float64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def assert_close(actual, expected, dtype, what="out"):
    """Elementwise |actual - expected| <= atol + rtol * |expected|, NaN never passes."""
    actual = as_float64(actual)
    expected = as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tolerance = TOLERANCE[np.dtype(dtype)] if what == "out" else LSE_TOLERANCE
    both_inf = np.isinf(expected) & (actual == expected)
    with np.errstate(invalid="ignore"):
        error = np.where(both_inf, 0.0, np.abs(actual - expected))
    magnitude = np.where(np.isfinite(expected), np.abs(expected), 0.0)
    bound = tolerance["atol"] + tolerance["rtol"] * magnitude
    bad = ~(error <= bound)  # NaN compares False, so it is bad
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        # NaN where any bad element is NaN (a poisoned output left unwritten, say).
        worst = np.max(np.where(bad, error, 0))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements off; worst error "
            f"{worst:.3g}, first at {at}: got {actual[at]!r}, "
            f"want {expected[at]!r} (dtype {np.dtype(dtype).name}, {tolerance})"
        )


# --- running the public API on each backend ---------------------------------------------------

CPU_SIDE_BACKENDS = ("cpu", "emulate")


def backend_params():
    """pytest params for every backend: CPU-side ones always, CUDA marked ``gpu``."""
    import pytest

    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("emulate", id="emulate", marks=pytest.mark.emulate),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]


def skip_if_unavailable(backend: str) -> None:
    import pytest

    from cuattn import backends

    reason = backends.unavailable_reason(backend)
    if reason:
        pytest.skip(f"backend {backend!r}: {reason}")


def to_backend(array, backend: str):
    """Host data placed where ``backend`` computes (PyTorch CUDA tensors for the GPU, as
    they are the one GPU framework with bfloat16)."""
    if not isinstance(array, np.ndarray) or backend in CPU_SIDE_BACKENDS:
        return array  # None, and plain numbers such as max_seqlen_q, stay as they are
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(array).cuda()


def to_host(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    import torch

    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            return array.view(torch.int16).numpy().view(BFLOAT16)
        return array.numpy()
    return np.asarray(array)


def call(function, backend: str, *arrays, **options):
    """Call a public function with arrays moved to ``backend``; results back on the host."""
    skip_if_unavailable(backend)
    moved = [to_backend(a, backend) for a in arrays]
    options = {
        name: to_backend(value, backend) if isinstance(value, np.ndarray) else value
        for name, value in options.items()
    }
    result = function(*moved, backend=backend, **options)
    if isinstance(result, tuple):
        return tuple(to_host(r) for r in result)
    return to_host(result)
