"""cuattn/kernel_params.py lays out the kernels' argument structs byte for byte."""

from __future__ import annotations

import subprocess

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
