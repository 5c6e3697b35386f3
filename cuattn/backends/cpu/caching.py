"""numba's on-disk cache for the CPU kernels, kept fresh across every file they are compiled
from.

numba checks a cached function against the file that defines it and nothing else. The kernels
in flash.py and decode.py inline code from the backend's other files (bits.py, exp2.py,
blas.py, mask.py, ...): after a change to one of those alone (an upgrade that left the
kernel's own file as it was, whose old cache files stay behind in ``__pycache__``, or an
edit in a checkout), numba loaded the machine code compiled from the old one. Here the
cache's freshness stamp also covers the contents of every given source file, so a change to
any of them compiles the kernel again.

This reaches into numba's caching classes (``FunctionCache`` and a dispatcher's ``_cache``),
which numba does not document; tests/test_cpu_caching.py checks the behaviour end to end, so
a numba release that changes them fails there rather than silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numba
from numba.core.caching import FunctionCache


def sources_digest(paths: Iterable[Path]) -> str:
    """A digest of the names and contents of ``paths``, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _SourcesCache(FunctionCache):
    """numba's cache of one function, stale as soon as any of ``sources`` changes."""

    def __init__(self, py_func: Callable, sources: Iterable[Path]):
        super().__init__(py_func)
        # numba compares this stamp, saved in the cache's index, with the one it computes
        # when loading; any difference discards the index and compiles again.
        self._cache_file._source_stamp = (
            self._cache_file._source_stamp,
            sources_digest(sources),
        )


def compile_cached(
    py_func: Callable, signature, sources: Iterable[Path], **options
) -> numba.core.dispatcher.Dispatcher:
    """``numba.njit([signature], cache=True, **options)(py_func)``, whose cache is also
    invalidated by a change to any file of ``sources``."""
    dispatcher = numba.njit(**options)(py_func)
    dispatcher._cache = _SourcesCache(py_func, sources)
    dispatcher.compile(signature)
    # As njit does with explicit signatures: no other types compile on the fly.
    dispatcher.disable_compile()
    return dispatcher
