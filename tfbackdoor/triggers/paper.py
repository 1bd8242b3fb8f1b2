"""The paper's triggers and the generic building blocks (patch, additive, blend, smooth, OneOf, Compose).

Each is a :class:`~tfbackdoor.triggers.base.Trigger` (``uint8 batch -> uint8 batch``, TensorFlow
ops, so they run inside ``tf.data`` maps, in models and in tests with the same code) and
round-trips through ``get_config`` / :func:`~tfbackdoor.triggers.base.from_config`.

How the paper's attack names map onto them (files, sizes, the rules) is told in
:mod:`tfbackdoor.triggers`, whose :func:`~tfbackdoor.triggers.get` builds them.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..errors import TfbdError
from ..filters import low_pass, minmax_scale
from .base import Trigger, _batch_key, _resize_pattern, from_config, read_pattern, serialize, trigger_dir_default

PAPER_DETECTOR_ATTACKS = ("badnets", "trojan_wm", "trojan_sq", "blend", "nature", "l2_inv", "l0_inv")
PAPER_ATTACKS = PAPER_DETECTOR_ATTACKS + ("smooth",)
BUILTIN_ATTACKS = ("badnets", "noise_blend", "checker")

_FILES = {
    "trojan_wm": "trojan_wm.png",
    "trojan_sq": "trojan_sq.png",
    "blend": "blend.png",
    "nature": "nature.png",
    "l2_inv": "l2_inv.png",
    "l0_inv": "l0_inv.png",
    "smooth": "smooth_cifar10.npy",
}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class PatchTrigger(Trigger):
    """Paste ``patch`` (float ``(h, w, 3)`` in [0, 1]) at a location.

    Args:
      patch: the patch pixels.
      location: ``(top, left)`` in pixels, ``"bottom_right"`` (1 px margin, BadNets), or
        ``"random"`` (a new uniform location per image, from ``seed``).
      mask: optional ``(h, w)`` or ``(h, w, 3)`` opacity in [0, 1] (default: opaque).
      seed: seed of the random locations.
    """

    name = "patch"

    def __init__(self, patch, location="bottom_right", mask=None, seed=0, margin=1, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.patch = np.asarray(patch, np.float32)
        if self.patch.ndim == 2:
            self.patch = np.repeat(self.patch[..., None], 3, -1)
        m = np.ones(self.patch.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32)
        self.mask = np.broadcast_to(m[..., None] if m.ndim == 2 else m, self.patch.shape).astype(np.float32)
        self.location = location
        self.seed = int(seed)
        self.margin = int(margin)
        self._calls = 0

    def _offsets(self, n, h, w):
        ph, pw = self.patch.shape[:2]
        if self.location == "bottom_right":
            top, left = h - self.margin - ph, w - self.margin - pw
            return tf.fill([n], top), tf.fill([n], left)
        if self.location == "random":
            # A fresh stream per call, reproducible from the seed.
            seed = tf.constant([self.seed, self._calls], tf.int64)
            self._calls += 1
            top = tf.random.stateless_uniform([n], seed, 0, h - ph + 1, dtype=tf.int32)
            left = tf.random.stateless_uniform([n], seed + 1, 0, w - pw + 1, dtype=tf.int32)
            return top, left
        top, left = self.location
        return tf.fill([n], int(top)), tf.fill([n], int(left))

    def apply(self, x):
        n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        ph, pw = self.patch.shape[:2]
        if ph > h or pw > w:
            raise TfbdError(f"trigger {self.name}: patch {ph}x{pw} is larger than the {h}x{w} image")
        top, left = self._offsets(n, h, w)
        # Vectorised paste: for every pixel, its coordinates inside the patch (gather), and
        # whether it falls inside the patch at all.
        rows = tf.range(h)[None, :] - top[:, None]      # N H
        cols = tf.range(w)[None, :] - left[:, None]     # N W
        inside = ((rows >= 0) & (rows < ph))[:, :, None] & ((cols >= 0) & (cols < pw))[:, None, :]
        r = tf.clip_by_value(rows, 0, ph - 1)
        c = tf.clip_by_value(cols, 0, pw - 1)
        rr = tf.broadcast_to(r[:, :, None], tf.shape(inside))
        cc = tf.broadcast_to(c[:, None, :], tf.shape(inside))
        gidx = tf.stack([rr, cc], -1)
        patch = tf.gather_nd(tf.constant(self.patch), gidx)
        alpha = tf.gather_nd(tf.constant(self.mask), gidx) * tf.cast(inside, tf.float32)[..., None]
        return x * (1.0 - alpha) + patch * alpha

    def get_config(self):
        loc = self.location if isinstance(self.location, str) else list(self.location)
        return {**super().get_config(), "patch": self.patch.tolist(), "location": loc, "mask": self.mask.tolist(),
                "seed": self.seed, "margin": self.margin}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class AdditiveTrigger(Trigger):
    """``clip(x * (1 - M) + alpha * T, 0, 1)``: additive pattern with optional mask.

    Args:
      pattern: float ``(H, W, 3)`` in [0, 1] (resized to the image when sizes differ).
      mask: optional ``(H, W)`` or ``(H, W, 3)`` in [0, 1]; pixels where it is 1 are replaced.
      alpha: factor on the pattern (1.0 for the paper's files, which carry their own strength).
    """

    name = "additive"

    def __init__(self, pattern, mask=None, alpha=1.0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.pattern = np.asarray(pattern, np.float32)
        self.mask = None if mask is None else np.asarray(mask, np.float32)
        if self.mask is not None and self.mask.ndim == 2:
            self.mask = self.mask[..., None]
        self.alpha = float(alpha)

    def _sized(self, h):
        t = _resize_pattern(self.pattern, h)
        m = None if self.mask is None else _resize_pattern(self.mask, h, "nearest")
        return t, m

    def apply(self, x):
        t, m = self._sized(x.shape[1])
        if m is not None:
            x = x * (1.0 - m)
        return tf.clip_by_value(x + self.alpha * t, 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "pattern": self.pattern.tolist(),
                "mask": None if self.mask is None else self.mask.tolist(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class BlendTrigger(Trigger):
    """Alpha blend with an image: ``(1 - alpha) * x + alpha * B``.

    Args:
      image: float ``(H, W, 3)`` in [0, 1] (resized to the input size).
      alpha: blend weight in [0, 1].
    """

    name = "alpha_blend"

    def __init__(self, image, alpha=0.1, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.image = np.asarray(image, np.float32)
        self.alpha = float(alpha)

    def apply(self, x):
        b = _resize_pattern(self.image, x.shape[1])
        return (1.0 - self.alpha) * x + self.alpha * b

    def get_config(self):
        return {**super().get_config(), "image": self.image.tolist(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class SmoothTrigger(Trigger):
    """``minmax(x + alpha * S)``: the paper's smooth-trigger rule (min-max rescale, no clip).

    Args:
      pattern: float ``(H, W, 3)`` (or ``(1, H, W, 3)``) perturbation, e.g. in [0, 0.2].
      alpha: factor on the pattern (the paper's lambda; 1.0 uses the file as is).
    """

    name = "smooth"

    def __init__(self, pattern, alpha=1.0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        p = np.asarray(pattern, np.float32)
        self.pattern = p[0] if p.ndim == 4 else p
        self.alpha = float(alpha)

    def apply(self, x):
        s = _resize_pattern(self.pattern, x.shape[1])
        return minmax_scale(x + self.alpha * s)

    def get_config(self):
        return {**super().get_config(), "pattern": self.pattern.tolist(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class RandomSmoothTrigger(Trigger):
    """A fresh random smooth trigger per image: ``minmax(x + a * S_i)`` (for detector training).

    ``S_i`` is either Gaussian noise or another image of the batch (with probability
    ``photo_prob``), its per-channel mean removed, passed through the paper's low-pass filter
    (:func:`tfbackdoor.filters.low_pass`: sigma 6 px, 30 taps) and scaled to [0, ``bound``], as the
    naive smooth triggers are made; ``a`` is uniform in ``amplitude``. The draw is seeded by
    ``seed`` and the batch's pixel sum, so the same batch always gets the same triggers. Works
    inside ``tf.data`` (graph mode). Name: ``smooth:random``.
    """

    name = "smooth:random"

    def __init__(self, bound=0.2, amplitude=(0.5, 1.0), photo_prob=0.5, seed=0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.bound, self.amplitude = float(bound), (float(amplitude[0]), float(amplitude[1]))
        self.photo_prob, self.seed = float(photo_prob), int(seed)

    def apply(self, x):
        n = tf.shape(x)[0]
        key = _batch_key(x, self.seed)
        noise = tf.random.stateless_normal(tf.shape(x), key)
        use_photo = tf.random.stateless_uniform([n, 1, 1, 1], key + 1) < self.photo_prob
        src = tf.where(use_photo, tf.roll(x, 1, axis=0), noise)
        src = src - tf.reduce_mean(src, axis=[1, 2], keepdims=True)
        pat = minmax_scale(low_pass(src), eps=1e-12) * self.bound
        a = tf.random.stateless_uniform([n, 1, 1, 1], key + 2, self.amplitude[0], self.amplitude[1])
        return minmax_scale(x + a * pat)

    def get_config(self):
        return {**super().get_config(), "bound": self.bound, "amplitude": list(self.amplitude),
                "photo_prob": self.photo_prob, "seed": self.seed}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class OneOf(Trigger):
    """Each image gets ONE of ``triggers``, drawn uniformly (seeded by ``seed`` and the batch's pixel sum)."""

    # Not keras.layers.RandomChoice: Keras 3 has none (keras_cv's calls one whole layer per image through a
    # map, each rounding its output); this draws per image from a seed made of the batch's pixels (the same
    # batch gets the same choice) and selects among the float outputs, rounded once.

    name = "one_of"

    def __init__(self, triggers, seed=0, name=None, **kwargs):
        triggers = [from_config(t) if isinstance(t, dict) else t for t in triggers]
        if not triggers:
            raise TfbdError("OneOf needs at least one trigger")
        super().__init__(name=name or ",".join(t.name for t in triggers), **kwargs)
        self.triggers = triggers
        self.seed = int(seed)

    def apply(self, x):
        key = _batch_key(x, self.seed + 11)
        pick = tf.random.stateless_uniform([tf.shape(x)[0]], key, 0, len(self.triggers), dtype=tf.int32)
        out = x
        for k, t in enumerate(self.triggers):
            out = tf.where(tf.equal(pick, k)[:, None, None, None], t.apply(x), out)
        return out

    def get_config(self):
        return {**super().get_config(), "triggers": [serialize(t) for t in self.triggers], "seed": self.seed}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class Compose(Trigger):
    """Apply several triggers in order (on the float image, rounded to uint8 once at the end; so not
    ``keras.layers.Pipeline``, which calls each layer whole and would round between them)."""

    name = "compose"

    def __init__(self, triggers, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.triggers = [from_config(t) if isinstance(t, dict) else t for t in triggers]

    def apply(self, x):
        for t in self.triggers:
            x = t.apply(x)
        return x

    def get_config(self):
        return {**super().get_config(), "triggers": [serialize(t) for t in self.triggers]}


# --------------------------------------------------------------------------- the paper's triggers

def _paper_file(name, trigger_dir, image_size):
    d = Path(trigger_dir) if trigger_dir else trigger_dir_default()
    if image_size and image_size != 32 and (d / str(image_size) / _FILES[name]).is_file():
        return d / str(image_size) / _FILES[name]
    f = d / _FILES[name]
    if not f.is_file():
        raise TfbdError(f"attack '{name}': trigger file {f} is missing (set --trigger-dir or $TFBD_DATA)")
    return f


def badnets(image_size=32) -> PatchTrigger:
    """The BadNets white square at the bottom-right with a 1 px margin (4x4 at 32 px)."""
    side = max(1, round(4 * image_size / 32))
    margin = max(1, round(image_size / 32))
    return PatchTrigger(np.ones((side, side, 3), np.float32), "bottom_right", margin=margin, name="badnets")


def from_file(path, mask=None, alpha=None, kind=None, image_size=32) -> Trigger:
    """A user trigger from a file: additive (default), masked additive with ``mask``, or ``smooth``.

    ``alpha`` scales the pattern (default 1.0). ``kind="blend"`` makes an alpha blend with the
    image at ``alpha`` (default 0.1).
    """
    pattern = read_pattern(path)
    m = None
    if mask is not None:
        m = read_pattern(mask)
    if kind == "smooth":
        return SmoothTrigger(pattern, 1.0 if alpha is None else alpha, name=f"smooth:{path}")
    if kind == "blend":
        return BlendTrigger(pattern, 0.1 if alpha is None else alpha, name=f"blend:{path}")
    return AdditiveTrigger(pattern, m, 1.0 if alpha is None else alpha, name=f"file:{path}")


