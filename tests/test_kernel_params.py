"""cuattn/kernel_params.py lays out kernels/params.cuh's struct byte for byte."""

from __future__ import annotations

import subprocess

import pytest

from cuattn.backends.emulate import compiler
from cuattn.kernel_params import FIELDS, PARAMS_DTYPE
from cuattn.kernels import kernel_dir


def test_python_layout_matches_the_header(tmp_path):
    cxx = compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    prints = "\n".join(
        f'    std::printf("{name} %zu\\n", offsetof(cuattn::AttentionParams, {name}));'
        for name, _ in FIELDS
    )
    program = tmp_path / "layout.cpp"
    program.write_text(f"""#include <cstddef>
#include <cstdio>
#include "params.cuh"
int main() {{
{prints}
    std::printf("sizeof %zu\\n", sizeof(cuattn::AttentionParams));
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
    assert int(offsets.pop("sizeof")) == PARAMS_DTYPE.itemsize
    assert {name: int(offset) for name, offset in offsets.items()} == {
        name: PARAMS_DTYPE.fields[name][1] for name, _ in FIELDS
    }
