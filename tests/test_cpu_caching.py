"""numba's disk cache of the CPU kernel: reused while its sources are unchanged, and compiled
again when any of them changes, the file defining the kernel or one it inlines code from."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from cuattn.backends.cpu import decode, flash
from cuattn.backends.cpu.caching import _SourcesCache

# A kernel in one file calling an inlined function in another, as flash.py calls exp2.py.
_KERNEL = """
    import sys
    from pathlib import Path

    import numba

    from cuattn.backends.cpu.caching import compile_cached

    import helper

    def kernel(x):
        return helper.step(x)

    here = Path(__file__).parent
    compiled = compile_cached(
        kernel, numba.int64(numba.int64), [here / "kernel.py", here / "helper.py"]
    )
    print(compiled(1), sum(compiled.stats.cache_hits.values()))
"""

_HELPER = """
    import numba

    @numba.njit(inline="always")
    def step(x):
        return x + {increment}
"""


def _run(directory: Path) -> tuple[int, int]:
    """(the kernel's result, how many times it was loaded from the cache) in a new process."""
    result = subprocess.run(
        [sys.executable, str(directory / "kernel.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=directory,
    )
    value, hits = result.stdout.split()
    return int(value), int(hits)


def test_a_change_to_an_inlined_source_compiles_the_kernel_again(tmp_path):
    (tmp_path / "kernel.py").write_text(textwrap.dedent(_KERNEL))
    helper = tmp_path / "helper.py"
    helper.write_text(textwrap.dedent(_HELPER.format(increment=1)))

    assert _run(tmp_path) == (2, 0)  # compiled, and saved
    assert _run(tmp_path) == (2, 1)  # loaded from the cache
    # Only the helper changes; numba's own stamp (kernel.py's contents) does not.
    helper.write_text(textwrap.dedent(_HELPER.format(increment=5)))
    assert _run(tmp_path) == (6, 0)
    assert _run(tmp_path) == (6, 1)


def test_the_kernel_cache_covers_every_source_of_the_backend():
    for kernel in (
        flash.attention_forward(np.dtype(np.uint32)),
        decode.decode_forward(np.dtype(np.uint32)),
    ):
        assert isinstance(kernel._cache, _SourcesCache)
    backend = Path(flash.__file__).parent
    assert flash.SOURCES == sorted(backend.glob("*.py"))
    assert {"flash.py", "decode.py", "mask.py", "bits.py", "exp2.py", "blas.py"} <= {
        path.name for path in flash.SOURCES
    }
