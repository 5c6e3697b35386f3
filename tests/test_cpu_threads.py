"""The threads a CPU call runs on: a call too small to share out runs on the calling thread
alone, any other on every numba thread; the kernels call BLAS from each of those threads,
so every BLAS library is held at one thread meanwhile. The caller's own counts come back
afterwards, also when the kernel fails."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

import cuattn
from cuattn.backends import cpu as cpu_backend

from .helpers import assert_close, qkv
from .oracle import attention_oracle

# (kernel factory patched in cpu_backend, query rows): decode.py serves short queries,
# flash.py the rest.
KERNELS = [("decode_forward", 1), ("attention_forward", cpu_backend.DECODE_QUERY_ROWS + 1)]
KEYS, HEADS, HEAD_DIM = 40, 2, 16
# The threshold as shipped (tests/conftest.py sets it to 0 while each test runs).
SHIPPED_SERIAL_MULTIPLY_ADDS = cpu_backend.SERIAL_MULTIPLY_ADDS


def _blas_threads() -> list[int]:
    controller = ThreadpoolController().select(user_api="blas")
    return [library.num_threads for library in controller.lib_controllers]


@pytest.fixture
def caller_threads():
    """BLAS at 2 threads while the test runs, as a caller's own setting, and numba at all
    of its threads; skips where either has fewer than 2."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    with ThreadpoolController().limit(limits=2, user_api="blas"):
        blas = _blas_threads()
        if not blas or min(blas) < 2:
            pytest.skip(f"no BLAS library that takes 2 threads here (counts {blas})")
        yield numba.get_num_threads(), blas


class _KernelFailed(RuntimeError):
    pass


def _spy(seen: list, fail: bool):
    """A stand-in for a kernel factory: records the thread counts the kernel would run
    under."""

    def kernel(*args):
        seen.append((numba.get_num_threads(), _blas_threads()))
        if fail:
            raise _KernelFailed("the kernel failed")

    return lambda words: kernel


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("serial", [False, True], ids=["shared", "serial"])
@pytest.mark.parametrize("factory, rows", KERNELS, ids=[name for name, _ in KERNELS])
def test_kernels_run_on_the_threads_their_size_asks_and_the_caller_keeps_its_own(
    rng, monkeypatch, caller_threads, factory, rows, serial, fail
):
    numba_threads, blas_threads = caller_threads
    multiply_adds = rows * KEYS * HEADS * HEAD_DIM
    # The threshold just above or at the call's size.
    monkeypatch.setattr(cpu_backend, "SERIAL_MULTIPLY_ADDS", multiply_adds + serial)
    seen = []
    monkeypatch.setattr(cpu_backend, factory, _spy(seen, fail))
    q, k, v = qkv(rng, 1, rows, KEYS, HEADS, 1, HEAD_DIM, np.float32)
    if fail:
        with pytest.raises(_KernelFailed):
            cuattn.attention(q, k, v, backend="cpu")
    else:
        cuattn.attention(q, k, v, backend="cpu")
    assert len(seen) == 1
    kernel_numba_threads, kernel_blas_threads = seen[0]
    assert kernel_numba_threads == (1 if serial else numba_threads)
    assert kernel_blas_threads == [1] * len(blas_threads)
    assert (numba.get_num_threads(), _blas_threads()) == (numba_threads, blas_threads)


def test_a_caller_that_limits_numba_threads_is_obeyed(rng, monkeypatch, caller_threads):
    seen = []
    monkeypatch.setattr(cpu_backend, "decode_forward", _spy(seen, False))
    q, k, v = qkv(rng, 1, 1, KEYS, HEADS, 1, HEAD_DIM, np.float32)
    numba.set_num_threads(1)
    try:
        cuattn.attention(q, k, v, backend="cpu")
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(caller_threads[0])
    assert seen[0][0] == 1


# (batch, query rows, keys, query heads, KV heads, head dim): decode.py and flash.py, GQA.
SMALL_CALLS = [(2, 1, 37, 4, 2, 16), (1, 3, 20, 6, 1, 32), (1, 33, 33, 2, 2, 8)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", SMALL_CALLS, ids=lambda shape: "x".join(map(str, shape)))
def test_small_calls_on_the_calling_thread_match_the_oracle(rng, monkeypatch, shape, dtype):
    """The rest of the suite runs every call on all threads (tests/conftest.py); here the
    shipped threshold puts these calls on one."""
    monkeypatch.setattr(cpu_backend, "SERIAL_MULTIPLY_ADDS", SHIPPED_SERIAL_MULTIPLY_ADDS)
    batch, rows, keys, heads_q, heads_kv, head_dim = shape
    assert batch * rows * keys * heads_q * head_dim < SHIPPED_SERIAL_MULTIPLY_ADDS
    q, k, v = qkv(rng, batch, rows, keys, heads_q, heads_kv, head_dim, dtype)
    out, lse = cuattn.attention(q, k, v, causal=True, return_lse=True, backend="cpu")
    expected_out, expected_lse = attention_oracle(q, k, v, causal=True)
    assert_close(out, expected_out, dtype)
    assert_close(lse, expected_lse, np.float32, what="lse")
