"""The trigger base: the ``Trigger`` class, the uint8 <-> float rule, serialisation and pattern files.

Every trigger is a callable object: ``trigger(images)`` takes a uint8 tensor ``(N, H, W, 3)`` (or a
single ``(H, W, 3)`` image) and returns a uint8 tensor of the same shape; subclasses implement
``apply(x)`` on float images in [0, 1] with TensorFlow ops. Every class is a Keras layer registered
with ``keras.saving.register_keras_serializable(package="tfbackdoor")`` (the paper's in :mod:`.paper`,
the zoo's in :mod:`.zoo`; the package imports both), so :func:`serialize` / :func:`from_config` are
Keras's own ``serialize_keras_object`` / ``deserialize_keras_object``.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from ..errors import TfbdError
from ..specs import data_root

def _as_batch(images):
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise TypeError(f"triggers take uint8 images, got {images.dtype}")
    single = images.shape.rank == 3
    return (images[tf.newaxis] if single else images), single


def _to_uint8(x):
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


#: characters a TensorFlow name scope may not hold (trigger names such as ``smooth:random``,
#: ``badnets+jpeg75`` or ``file:DIR/x.npy`` do)
_NOT_IN_SCOPE = re.compile(r"[^A-Za-z0-9_.>-]")


def _scope_name(name: str) -> str:
    name = _NOT_IN_SCOPE.sub("_", name)
    return name if name[:1].isalnum() or name[:1] == "." else "t" + name


@keras.saving.register_keras_serializable(package="tfbackdoor")
class Trigger(keras.layers.Layer):
    """Base class: subclasses implement ``apply(x)`` on float images ``(N, H, W, 3)`` in [0, 1].

    A Keras layer (uint8 in, uint8 out, no weights): ``name`` is the trigger's name as the
    registry gives it (the class's ``name`` by default); TensorFlow name scopes get it with the
    characters they refuse replaced by ``_``.
    """

    name = "trigger"

    def __init__(self, name=None, **kwargs):
        name = name or type(self).name
        super().__init__(name=_scope_name(name), **{"autocast": False, **kwargs})
        self.name = name   # Keras refuses "/" in a layer name; file triggers' names hold paths

    def _open_name_scope(self):
        shown, self.name = self.name, _scope_name(self.name)
        try:
            return super()._open_name_scope()
        finally:
            self.name = shown

    def build(self, input_shape=None):
        pass   # no weights (sub-triggers of OneOf, Compose, JpegTrigger have none either)

    def call(self, images):
        batch, single = _as_batch(images)
        out = _to_uint8(self.apply(tf.cast(batch, tf.float32) / 255.0))
        return out[0] if single else out

    def compute_output_shape(self, input_shape):
        return input_shape

    def apply(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

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
    """Keras's ``serialize_keras_object`` (class, registered name ``tfbackdoor>Class``, config)."""
    return keras.saving.serialize_keras_object(trigger)


def from_config(d: dict) -> Trigger:
    """Keras's ``deserialize_keras_object``; also takes a bare ``{"class_name", "config"}`` of a tfbackdoor class."""
    return keras.saving.deserialize_keras_object({"registered_name": f"tfbackdoor>{d['class_name']}", **d})


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
