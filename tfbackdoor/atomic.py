"""Atomic output files: write to a temporary file beside the target, then rename.

An interrupted command never leaves a partial output, and an existing file is replaced only by a
complete one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def sidecar_path(out) -> Path:
    """The JSON written beside an output file: same folder and stem (``screener.tflite`` ->
    ``screener.json``, ``victim.keras`` -> ``victim.json``); a path without suffix gets ``.json`` appended
    (edge/screen.py also accepts ``screener.tflite.json``)."""
    out = Path(out)
    return out.with_suffix(".json") if out.suffix else out.with_name(out.name + ".json")


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path in ``path``'s folder; on success give it the usual file mode
    (``0666 & ~umask``; ``mkstemp`` makes it 0600) and rename it to ``path``; on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix if suffix is not None else (path.suffix or ".tmp"), dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
