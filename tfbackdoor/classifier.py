"""Keras classifiers in general: shape and label checks, safe-mode loading, atomic saving, prediction.

What :mod:`tfbackdoor.victim` (image classifiers under attack), :mod:`tfbackdoor.smooth` (the
trigger search on them) and :mod:`tfbackdoor.detector` (the backdoor detector, itself a two-class
classifier) share. Models are loaded in Keras safe mode only (a ``Lambda`` layer is refused with
one line naming it) and saved through a temporary file beside the target.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from .atomic import atomic_path
from .errors import TfbdError, model_load_error


def num_classes(model) -> int:
    """Number of output classes of a softmax classifier."""
    n = model.output_shape[-1] if len(model.output_shape) == 2 else None
    if n is None:
        raise TfbdError(f"model '{model.name}': output shape {model.output_shape} is not (batch, classes)")
    return int(n)


def check_model_fits(model, x, name=None):
    """Raise :class:`TfbdError` naming the model and both shapes when images ``x`` do not fit its input."""
    want = tuple(model.input_shape[1:])
    have = tuple(np.shape(x)[1:])
    ok = len(want) == len(have) and all(w is None or w == h for w, h in zip(want, have))
    if not ok:
        raise TfbdError(f"{name or model.name}: model input shape {want} does not fit the data images {have} "
                        f"(pass --image-size {want[0]} to resize the data, or use a matching model)")


def check_target(model_or_n, target, name=None) -> int:
    """Raise :class:`TfbdError` unless ``target`` is a label ``0 <= target < classes``; return it as int."""
    n = model_or_n if isinstance(model_or_n, (int, np.integer)) else num_classes(model_or_n)
    ok = target is not None and not isinstance(target, bool) and float(target) == int(target) and 0 <= int(target) < n
    if not ok:
        where = f"{name}: " if name else ""
        raise TfbdError(f"{where}target label {target!r} is not a class label (valid: 0..{int(n) - 1})")
    return int(target)


def load_keras(path) -> keras.Model:
    """A ``.keras`` file loaded in Keras safe mode, uncompiled; :class:`TfbdError` when Keras refuses it.
    (The caller checks that the file exists, so that its message can name what was expected.)"""
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as e:
        raise model_load_error(path, e) from None


def load(path) -> keras.Model:
    """Load a classifier ``.keras`` file (safe mode); :class:`TfbdError` when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise TfbdError(f"model file not found: {path}")
    model = load_keras(path)
    if len(model.output_shape) != 2:
        raise TfbdError(f"{path}: not a classifier (output shape {model.output_shape}, expected (batch, classes))")
    return model


def save(model, path):
    """Save a model atomically (temporary ``.keras`` beside ``path``, then rename)."""
    with atomic_path(path, ".keras") as tmp:
        model.save(tmp)


def predict(model, x, batch_size=256) -> np.ndarray:
    """Predicted labels of uint8 images (or 0..255 floats) in batches."""
    out = [np.argmax(model(np.asarray(x[i:i + batch_size], np.float32), training=False), -1)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


__all__ = ["num_classes", "check_model_fits", "check_target", "load_keras", "load", "save", "predict"]
