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

from .helpers import qkv

# (kernel factory patched in cpu_backend, query rows): decode.py serves short queries,
# flash.py the rest.
KERNELS = [("decode_forward", 1), ("attention_forward", cpu_backend.DECODE_QUERY_ROWS + 1)]
KEYS, HEADS, HEAD_DIM = 40, 2, 16


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
