"""Output files, the one I/O module: every file a command writes goes through here, atomically.

:func:`write_json`, :func:`write_bytes`, :func:`save_npy` and :func:`save_figure` write whole
files; :func:`atomic_path` / :func:`atomic_paths` are the primitive beneath them (write to a
temporary file beside the target, then rename); :func:`sidecar_path` names the JSON beside an
output. (Input paths, ``$TFBD_DATA`` and the shipped models, are :mod:`tfbackdoor.specs`'.)

An interrupted command never leaves a partial output, and an existing file is replaced only by a
complete one. Temporary files are named ``.NAME.tmpPID.XXXX.SUFFIX`` beside ``NAME``: removed on any
error or interrupt (Ctrl-C, and SIGTERM, which ``tfbd`` turns into the same exit), and a file left by a
process that was killed outright (SIGKILL, power loss) is removed by the next write of the same output
once its process is gone. :func:`atomic_paths` commits several outputs together (``scan``'s report and
sanitised set).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
from pathlib import Path

import numpy as np


def sidecar_path(out) -> Path:
    """The JSON written beside an output file: same folder and stem (``screener.tflite`` ->
    ``screener.json``, ``victim.keras`` -> ``victim.json``); a path without suffix gets ``.json`` appended
    (edge/screen.py also accepts ``screener.tflite.json``)."""
    out = Path(out)
    return out.with_suffix(".json") if out.suffix else out.with_name(out.name + ".json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def sweep_stale(path) -> list:
    """Remove the temporary files of ``path`` left by processes that no longer run (killed outright);
    returns their names."""
    path = Path(path)
    gone = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.tmp*"))
    except OSError:
        return gone
    for f in candidates:
        m = re.match(r"\.tmp(\d+)\.", f.name[len(path.name) + 1:])
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                f.unlink()
                gone.append(f.name)
            except OSError:
                pass
    return gone


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _make_tmp(path: Path, suffix) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp{os.getpid()}.",
                               suffix=suffix if suffix is not None else (path.suffix or ".tmp"), dir=path.parent)
    os.close(fd)
    return tmp


def _publish(tmp, path):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path in ``path``'s folder; on success give it the usual file mode
    (``0666 & ~umask``; ``mkstemp`` makes it 0600) and rename it to ``path``; on error remove it."""
    with atomic_paths((path, suffix)) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*targets):
    """Like :func:`atomic_path` for several outputs committed together: ``targets`` are paths or
    ``(path, suffix)`` pairs; yields their temporary paths; only when the block succeeds are all of
    them renamed into place, one after the other with SIGINT/SIGTERM held back, so an interrupt never
    leaves a new output beside an old one (on error none is replaced and the temporary files go)."""
    pairs = [(Path(t[0]), t[1]) if isinstance(t, tuple) else (Path(t), None) for t in targets]
    tmps = []
    try:
        for path, suffix in pairs:
            tmps.append(_make_tmp(path, suffix))
        yield tmps
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for tmp, (path, _) in zip(tmps, pairs):
                _publish(tmp, path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


# ------------------------------------------------------------------------------ whole files

def write_json(obj, path):
    """Write JSON atomically (indent 2, trailing newline; numpy values as lists, anything else as ``str``)."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        f.write("\n")


def write_bytes(path, payload: bytes):
    """Write ``payload`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(payload)


def save_npy(array, path):
    """Write a float32 ``.npy`` atomically."""
    with atomic_path(path, ".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array, np.float32))


def save_figure(fig, out):
    """Save a matplotlib figure atomically (format from the suffix, PNG without one; 110 dpi, tight)."""
    with atomic_path(out, Path(out).suffix or ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
