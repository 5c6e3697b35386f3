"""Arrays of every framework in, the same kind out, and no copies on the way."""

from __future__ import annotations

import gc
import warnings

import ml_dtypes
import numpy as np
import pytest

import cuattn
from cuattn import backends, interop
from cuattn.dlpack import BFLOAT16, DLPackExport, from_numpy, import_array

from .helpers import assert_close, random_array
from .oracle import attention_oracle


@pytest.fixture
def spy(monkeypatch):
    """Records the pointers and strides the CPU backend was handed."""
    seen = {}
    backend = backends.get("cpu")
    original = backend.forward

    def forward(spec, q, k, v, out, lse, *rest, **options):
        seen.update(q=q, k=k, v=v, out=out, lse=lse)
        return original(spec, q, k, v, out, lse, *rest, **options)

    monkeypatch.setattr(backend, "forward", forward)
    return seen


def test_numpy_in_numpy_out_written_in_place(rng, spy):
    q, k, v = (random_array(rng, (1, 40, 2, 32), np.float32) for _ in range(3))
    out = cuattn.attention(q, k, v)
    assert type(out) is np.ndarray and out.flags.c_contiguous
    assert out.ctypes.data == spy["out"].ptr  # what the kernel wrote is what we return
    assert spy["q"].ptr == q.ctypes.data


def test_numpy_bfloat16_from_ml_dtypes(rng):
    q, k, v = (random_array(rng, (1, 40, 2, 32), ml_dtypes.bfloat16) for _ in range(3))
    out = cuattn.attention(q, k, v, causal=True)
    assert out.dtype == BFLOAT16
    assert_close(out, attention_oracle(q, k, v, causal=True)[0], BFLOAT16)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_torch_in_torch_out(rng, spy, dtype_name):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    q, k, v = (torch.randn(2, 33, 4, 64, dtype=torch.float32).to(dtype) for _ in range(3))
    out, lse = cuattn.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == q.device
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    assert out.data_ptr() == spy["out"].ptr and lse.data_ptr() == spy["lse"].ptr
    host = [t.float().numpy() for t in (q, k, v)]
    expected_out, expected_lse = attention_oracle(*host, causal=True)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": BFLOAT16}[dtype_name]
    assert_close(out.float().numpy(), expected_out, np_dtype)
    assert_close(lse.numpy(), expected_lse, np_dtype, what="lse")


def test_torch_heads_first_layout_goes_in_without_a_copy(spy):
    torch = pytest.importorskip("torch")
    # The (B, H, S, D) layout SDPA users hold, seen as (B, S, H, D) by a transpose.
    q, k, v = (torch.randn(2, 4, 97, 64).transpose(1, 2) for _ in range(3))
    out = cuattn.attention(q, k, v, causal=True)
    assert spy["q"].ptr == q.data_ptr() and spy["q"].strides == q.stride()
    assert spy["k"].ptr == k.data_ptr() and spy["v"].strides == v.stride()
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_jax_in_jax_out(rng, spy, dtype_name):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    host = [random_array(rng, (1, 50, 2, 32), np.float32) for _ in range(3)]
    q, k, v = (jnp.asarray(a, dtype=getattr(jnp, dtype_name)) for a in host)
    out = cuattn.attention(q, k, v, window=(7, 3))
    assert isinstance(out, jax.Array) and out.dtype == q.dtype
    assert out.unsafe_buffer_pointer() == spy["out"].ptr  # handed over, not copied
    expected, _ = attention_oracle(
        *(np.asarray(a).astype(np.float32) for a in (q, k, v)), window=(7, 3)
    )
    dtype = np.float32 if dtype_name == "float32" else BFLOAT16
    assert_close(np.asarray(out).astype(np.float32), expected, dtype)


class _Producer:
    """A bare DLPack producer, as an unknown framework would be."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_any_dlpack_producer_gives_numpy_results(rng):
    q, k, v = (random_array(rng, (1, 20, 2, 16), np.float32) for _ in range(3))
    out = cuattn.attention(_Producer(q), _Producer(k), _Producer(v))
    assert type(out) is np.ndarray
    assert_close(out, attention_oracle(q, k, v)[0], np.float32)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "int32"])
def test_torch_tensors_are_read_as_dlpack_would_read_them(dtype_name):
    # Plain tensors skip the DLPack export (its host time): the view must be the one the
    # export gives, for views with offsets, negative-free odd strides and broadcast axes.
    torch = pytest.importorskip("torch")
    base = torch.arange(2 * 5 * 3 * 8).reshape(2, 5, 3, 8).to(getattr(torch, dtype_name))
    for tensor in (base, base[:, 1:4].transpose(1, 2), base[..., ::2], base[:1].expand(4, 5, 3, 8)):
        fast = interop._from_torch(tensor)
        exported = import_array(tensor)
        assert fast is not None and fast.owner is tensor
        for field in ("ptr", "shape", "strides", "dtype", "device", "readonly"):
            assert getattr(fast, field) == getattr(exported, field), field


def test_torch_tensors_dlpack_would_refuse_or_treat_apart_go_through_dlpack():
    # Read from its attributes, a lazily negated view would come in un-negated (as PyTorch's
    # DLPack export hands it over: refused before either) and a meta tensor with an address
    # it does not have (DLPack refuses it).
    torch = pytest.importorskip("torch")
    negated = torch.randn(4, dtype=torch.cfloat).conj().imag
    assert negated.dtype == torch.float32 and negated.is_neg()
    for tensor in (
        torch.randn(2, 3).requires_grad_(True),
        negated,
        torch.empty(2, 3, device="meta"),
        torch.randn(2, 3, dtype=torch.cfloat),
    ):
        assert interop._from_torch(tensor) is None
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(TypeError, match="q: could not be read through DLPack"):
        cuattn.attention(q.clone().requires_grad_(True), q, q)
    with pytest.raises(TypeError, match=r"k: is a lazily negated PyTorch view .*resolve_neg"):
        plain = torch.randn(1, 1, 1, 4)
        cuattn.attention(plain, negated.reshape(1, 1, 1, 4), plain)


# --- the DLPack layer itself -------------------------------------------------------------------


def test_import_keeps_the_producer_alive():
    torch = pytest.importorskip("torch")
    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)[:, 1:]
    raw = import_array(tensor)
    assert raw.shape == (2, 2, 4) and raw.strides == (12, 4, 1) and raw.ptr == tensor.data_ptr()
    del tensor
    gc.collect()
    np.testing.assert_array_equal(
        raw.numpy(), np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, 1:]
    )


def test_read_only_numpy_arrays_import_as_read_only():
    array = np.arange(6, dtype=np.float32)
    array.flags.writeable = False
    raw = import_array(array)
    assert raw.readonly and not raw.numpy().flags.writeable


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32])
def test_export_round_trips_through_torch_without_a_copy(rng, dtype):
    torch = pytest.importorskip("torch")
    array = random_array(rng, (3, 5, 4), np.float32).astype(dtype)[:, ::2]
    tensor = torch.from_dlpack(DLPackExport(from_numpy(array)))
    assert tensor.data_ptr() == array.ctypes.data
    assert tensor.stride() == tuple(s // array.itemsize for s in array.strides)
    back = import_array(tensor).numpy()
    np.testing.assert_array_equal(back.view(np.uint8), array.view(np.uint8))
    del array
    gc.collect()
    # The export holds the memory for the consumer: still readable after the source is gone.
    assert np.isfinite(import_array(tensor).numpy().astype(np.float32)).all()


def test_cupy_sees_a_foreign_stream_without_a_deprecation_warning():
    pytest.importorskip("cupy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # CuPy 14 deprecates ExternalStream
        stream = interop.cupy_stream(1234)
    assert stream.ptr == 1234
