"""cuattn/kernel_params.py lays out the kernels' argument structs byte for byte."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from cuattn.backends.emulate import compiler
from cuattn.kernel_params import (
    APPEND_DTYPE,
    APPEND_FIELDS,
    FIELDS,
    MERGE_DTYPE,
    MERGE_FIELDS,
    PARAMS_DTYPE,
)
from cuattn.kernels import kernel_dir

STRUCTS = {
    "AttentionParams": ("params.cuh", FIELDS, PARAMS_DTYPE),
    "MergeParams": ("combine.cu", MERGE_FIELDS, MERGE_DTYPE),
    "AppendParams": ("append.cu", APPEND_FIELDS, APPEND_DTYPE),
}


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_python_layout_matches_the_header(tmp_path, struct):
    cxx = compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    header, fields, dtype = STRUCTS[struct]
    prints = "\n".join(
        f'    std::printf("{name} %zu\\n", offsetof(cuattn::{struct}, {name}));'
        for name, _ in fields
    )
    program = tmp_path / "layout.cpp"
    program.write_text(f"""#include <cstddef>
#include <cstdio>
#include "platform.cuh"
#include "{header}"
int main() {{
{prints}
    std::printf("sizeof %zu\\n", sizeof(cuattn::{struct}));
}}
""")
    subprocess.run(
        [cxx, "-std=c++20", "-I", str(kernel_dir()), str(program), "-o", str(tmp_path / "layout")],
        check=True,
        capture_output=True,
    )
    output = subprocess.run(
        [str(tmp_path / "layout")], check=True, capture_output=True, text=True
    ).stdout
    offsets = dict(line.split() for line in output.splitlines())
    # Every Python field exists in the header (or the program would not compile) at the same
    # offset, and the sizes agree, so the header has no field Python lacks.
    assert int(offsets.pop("sizeof")) == dtype.itemsize
    assert {name: int(offset) for name, offset in offsets.items()} == {
        name: dtype.fields[name][1] for name, _ in fields
    }


def test_the_packed_parameters_equal_the_numpy_record(rng):
    # attention_params packs its values with struct (kernel_params._packer): the bytes
    # must be those NumPy lays out for the same values, fields and padding.
    from cuattn.kernel_params import _PARAMS_PACKER

    integers = [int(x) for x in rng.integers(-(2**62), 2**62, len(FIELDS) - 2)]
    integers[:11] = [abs(x) for x in integers[:11]]  # the pointers are unsigned
    values = [*integers, float(rng.standard_normal()), float(rng.standard_normal())]
    packed = np.frombuffer(bytearray(_PARAMS_PACKER.pack(*values)), PARAMS_DTYPE)
    assert packed.tobytes() == np.array([tuple(values)], PARAMS_DTYPE).tobytes()
    assert packed.shape == (1,) and packed.flags.writeable  # the CUDA backend sets splits in it


def test_parameters_go_to_cupy_by_value_as_one_unstructured_value(rng):
    # CuPy reads a by-value argument's address through __array_interface__; the view must be
    # the record's own memory and bytes, one element, with no fields for it to spell out.
    from cuattn.kernel_params import by_value

    params = np.zeros(1, PARAMS_DTYPE)
    params[0]["num_splits"] = int(rng.integers(2, 100))
    value = by_value(params)
    assert value.shape == (1,) and value.size == 1 and value.dtype.names is None
    assert value.dtype.itemsize == PARAMS_DTYPE.itemsize and value.tobytes() == params.tobytes()
    address = params.__array_interface__["data"][0]
    assert value.__array_interface__["data"][0] == address
    assert value.__array_interface__["descr"] == [("", f"|V{PARAMS_DTYPE.itemsize}")]
