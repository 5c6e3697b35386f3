"""Where compiled kernels are kept between runs: one rule for GPU binaries and emulation
libraries alike.

``$CUATTN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/cuattn``, else ``~/.cache/cuattn``;
a subdirectory per kind (``cuda``, ``emulate``). Files are named by a hash of everything
that went into them (sources, options, compiler), written to a temporary name and renamed
into place, so concurrent processes never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def cache_dir(kind: str) -> Path:
    root = os.environ.get("CUATTN_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "cuattn") if xdg else os.path.join(Path.home(), ".cache", "cuattn")
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def cached_file(kind: str, name: str, produce: Callable[[Path], None]) -> Path:
    """``<cache>/<kind>/<name>``, made by ``produce(temporary_path)`` if it is not there."""
    target = cache_dir(kind) / name
    if target.exists():
        return target
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    try:
        produce(Path(temporary))
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target
