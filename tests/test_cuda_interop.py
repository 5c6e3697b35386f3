"""GPU arrays of every framework in, the same kind out, ordered on the caller's stream.

These need a GPU (marked ``gpu``); tests/test_interop.py checks the same promises on the host.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuattn

from .helpers import assert_close, random_array, skip_if_unavailable, to_host
from .oracle import attention_oracle

pytestmark = pytest.mark.gpu


@pytest.fixture
def spy(monkeypatch):
    """Records the arrays the CUDA backend was handed, and the stream it launched on."""
    skip_if_unavailable("cuda")
    seen = {}
    backend = cuattn.backends.get("cuda")
    original = backend.forward

    def forward(spec, q, k, v, out, lse, sinks, sequences, stream=None, allocate=None):
        seen.update(q=q, k=k, v=v, out=out, lse=lse, stream=stream)
        return original(spec, q, k, v, out, lse, sinks, sequences, stream, allocate)

    monkeypatch.setattr(backend, "forward", forward)
    return seen


def test_cupy_in_cupy_out_written_in_place(rng, spy):
    cupy = pytest.importorskip("cupy")
    host = [random_array(rng, (2, 77, 4, 64), np.float16) for _ in range(3)]
    q, k, v = (cupy.asarray(a) for a in host)
    out, lse = cuattn.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float16
    assert out.data.ptr == spy["out"].ptr and lse.data.ptr == spy["lse"].ptr
    assert spy["q"].ptr == q.data.ptr
    expected_out, expected_lse = attention_oracle(*host, causal=True)
    assert_close(out.get(), expected_out, np.float16)
    assert_close(lse.get(), expected_lse, np.float16, what="lse")


def test_torch_heads_first_layout_goes_in_without_a_copy(spy):
    torch = pytest.importorskip("torch")
    q, k, v = (
        torch.randn(2, 4, 300, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for _ in range(3)
    )
    out = cuattn.attention(q, k, v, causal=True)
    assert spy["q"].ptr == q.data_ptr() and spy["q"].strides == q.stride()
    assert spy["v"].ptr == v.data_ptr() and spy["v"].strides == v.stride()
    assert out.device == q.device and out.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).double() for t in (q, k, v)), is_causal=True
    ).transpose(1, 2)
    assert_close(to_host(out), expected.cpu().numpy(), to_host(q[:1, :1, :1, :1]).dtype)


def test_work_is_ordered_on_the_callers_torch_stream(spy):
    torch = pytest.importorskip("torch")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # Produced and consumed on the side stream, with no synchronisation in between:
        # the kernel must run after the inputs are written and before the copy reads out.
        q, k, v = (torch.randn(1, 4096, 8, 64, device="cuda", dtype=torch.float16) for _ in "qkv")
        out = cuattn.attention(q, k, v)
        result = out.float().cpu()
    assert spy["stream"] == side.cuda_stream
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).float() for t in (q, k, v))
    ).transpose(1, 2)
    torch.testing.assert_close(result, expected.cpu(), atol=2e-3, rtol=2e-3)


def test_work_is_ordered_on_the_callers_cupy_stream(rng, spy):
    cupy = pytest.importorskip("cupy")
    host = [random_array(rng, (1, 500, 4, 64), np.float16) for _ in range(3)]
    with cupy.cuda.Stream(non_blocking=True) as stream:
        q, k, v = (cupy.asarray(a) for a in host)
        out = cuattn.attention(q, k, v, causal=True)
        result = out.get(stream=stream)
        stream.synchronize()
    assert spy["stream"] == stream.ptr
    assert_close(result, attention_oracle(*host, causal=True)[0], np.float16)


def test_jax_gpu_in_jax_gpu_out(rng):
    jax = pytest.importorskip("jax")
    skip_if_unavailable("cuda")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as error:
        pytest.skip(f"JAX sees no GPU: {error}")
    host = [random_array(rng, (2, 90, 4, 64), np.float32) for _ in range(3)]
    q, k, v = (jax.device_put(a, device) for a in host)
    out = cuattn.attention(q, k, v, causal=True)
    assert isinstance(out, jax.Array) and out.devices() == {device}
    assert_close(np.asarray(out), attention_oracle(*host, causal=True)[0], np.float32)


def test_host_and_device_arrays_do_not_mix(rng):
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    skip_if_unavailable("cuda")
    q = random_array(rng, (1, 8, 2, 32), np.float16)
    with pytest.raises(TypeError, match="k: is a cupy array but q is a numpy array"):
        cuattn.attention(q, cupy.asarray(q), q)
    host = torch.from_numpy(q)
    with pytest.raises(ValueError, match="v: is on .* but q is on"):
        cuattn.attention(host, host, host.cuda())
