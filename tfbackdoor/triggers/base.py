"""The trigger base: the ``Trigger`` class, the uint8 <-> float rule, serialisation and pattern files.

Every trigger is a callable object: ``trigger(images)`` takes a uint8 tensor ``(N, H, W, 3)`` (or a
single ``(H, W, 3)`` image) and returns a uint8 tensor of the same shape; subclasses implement
``apply(x)`` on float images in [0, 1] with TensorFlow ops. Classes register themselves in
:data:`_CLASSES` (the paper's in :mod:`.paper`, the zoo's in :mod:`.zoo`), which
:func:`from_config` reads; the package imports both, so every class is known once
``tfbackdoor.triggers`` is imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from ..errors import TfbdError
from ..specs import data_root

#: class name -> class, for :func:`from_config` (filled by :mod:`.paper` and :mod:`.zoo`).
_CLASSES = {}


def _as_batch(images):
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise TypeError(f"triggers take uint8 images, got {images.dtype}")
    single = images.shape.rank == 3
    return (images[tf.newaxis] if single else images), single


def _to_uint8(x):
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


class Trigger:
    """Base class: subclasses implement ``apply(x)`` on float images ``(N, H, W, 3)`` in [0, 1]."""

    name = "trigger"

    def __call__(self, images):
        batch, single = _as_batch(images)
        out = _to_uint8(self.apply(tf.cast(batch, tf.float32) / 255.0))
        return out[0] if single else out

    def apply(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


def _resize_pattern(p: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    if p.shape[0] == size and p.shape[1] == size:
        return p.astype(np.float32)
    return tf.image.resize(p.astype(np.float32), (size, size), method=method).numpy()


def _batch_key(x, salt):
    """A stateless-RNG seed from a batch's pixel sum and ``salt``: the same batch gives the same draws."""
    return tf.stack([tf.cast(tf.reduce_sum(x * 255.0), tf.int64), tf.constant(salt, tf.int64)])


def serialize(trigger: Trigger) -> dict:
    return {"class_name": type(trigger).__name__, "config": trigger.get_config()}


def from_config(d: dict) -> Trigger:
    cfg = dict(d["config"])
    if d["class_name"] in ("Compose", "OneOf"):
        cfg["triggers"] = [from_config(t) for t in cfg["triggers"]]
    return _CLASSES[d["class_name"]](**cfg)


def read_pattern(path) -> np.ndarray:
    """Read a trigger file as float32 ``(H, W, 3)``: PNG/JPEG scaled to [0, 1]; ``.npy`` as stored.

    ``.npy`` arrays of shape ``(1, H, W, 3)``, ``(3, H, W)`` or ``(H, W)`` are brought to
    ``(H, W, 3)``. Raises :class:`TfbdError` naming the file for missing or unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise TfbdError(f"trigger file not found: {path}")
    try:
        if path.suffix.lower() == ".npy":
            a = np.load(path, allow_pickle=False).astype(np.float32)
            if a.ndim == 4 and a.shape[0] == 1:
                a = a[0]
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = np.transpose(a, (1, 2, 0))
            if a.ndim == 2:
                a = a[..., None]
            if a.ndim != 3 or a.shape[-1] not in (1, 3):
                raise TfbdError(f"{path}: trigger array has shape {a.shape}, expected (H, W, 3)")
            return np.broadcast_to(a, a.shape[:2] + (3,)).astype(np.float32)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
    except TfbdError:
        raise
    except Exception as e:
        raise TfbdError(f"{path}: cannot read trigger file ({type(e).__name__}: {e})") from None


def trigger_dir_default() -> Path:
    return data_root() / "triggers"
