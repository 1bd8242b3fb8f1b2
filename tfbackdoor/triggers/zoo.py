"""Evaluation attack zoo: other people's backdoor triggers, implemented from their papers.

Long (~590 lines) by design: a catalogue of eleven independent attacks, each a short class or
function that the table below describes row by row.

Every attack here is a :class:`tfbackdoor.triggers.Trigger`: ``apply(x)`` works on float images
``(N, H, W, 3)`` in [0, 1] with TensorFlow ops (no per-image Python loops), and
``trigger(uint8 images) -> uint8 images`` (rounded and clipped by the base class). Random parts
are seeded, so the same input and seed always give the same output. Pixel sizes are given for
32x32 images and scale with the image side where that makes sense. They are resolved by
:func:`tfbackdoor.triggers.get` and grouped by :func:`tfbackdoor.triggers.expand` as ``zoo`` and
``zoo+jpeg``.

==================  ========================================================================
name                definition (x float in [0, 1]; H, W the image size)
==================  ========================================================================
``badnets3``        BadNets (Gu et al. 2017) as BackdoorBench/BackdoorBox default it: a white
                    3x3 square in the bottom-right corner, no margin (side ``round(3 S / 32)``).
``badnets_grid``    a 3x3 checker grid ``[[1,0,1],[0,1,0],[1,0,1]]`` (1 = white, 0 = black),
                    bottom-right, no margin (each cell ``round(S / 32)`` px).
``blended``         Blended (Chen et al. 2017): ``(1 - a) x + a T``, ``a = 0.2``, ``T`` the Hello
                    Kitty image. Only ``triggers/blend.png`` is available, which is the kitty
                    already multiplied by 0.2, so ``T = clip(blend.png / 0.2, 0, 1)`` (resized
                    bilinearly to other sizes). ``blended:PATH[:ALPHA]``: any image file.
``sig``             SIG (Barni, Kallas & Tondi 2019): ``clip(x + delta/255 sin(2 pi j f / W))``
                    for column ``j``, same for every row and channel, ``delta = 40``, ``f = 6``.
``wanet``           WaNet (Nguyen & Tran 2021): a fixed warp, ``k = 4``, ``s = 0.5``,
                    ``grid_rescale = 1``; see :class:`WarpTrigger`. ``wanet:SEED``.
``ftrojan``         FTrojan (Wang et al. 2022): RGB -> YCrCb (BT.601 full range, OpenCV's
                    ``COLOR_RGB2YCrCb``), orthonormal 2-D DCT-II of every 32x32 window of
                    channels 1 and 2, ``+30`` at (15, 15) and (31, 31), inverse; see
                    :class:`ChromaDCTTrigger`.
``ctrl``            CTRL (Li et al. ICCV 2023): the same in YCbCr (JFIF coefficients) at
                    magnitude 100.
``lf``              a low-frequency universal trigger in the spirit of BackdoorBench's LF
                    (Zeng et al. 2021): seeded Gaussian noise per channel, DCT coefficients
                    kept only for ``0 < u + v < H/4``, scaled to ``max |T| = 0.1``,
                    ``clip(x + T)``. ``lf:SEED``.
``insert_image``    IBM ART's ``insert_image``: a 10x10 icon (a procedural "alert" sign by
                    default, ``insert_image:PATH`` for a file) at a random place per image,
                    ``0.8 icon + 0.2 x`` there.
``art_single``      ART ``add_single_bd(distance=2, pixel_value=1)``: pixel (H-2, W-2) white.
``art_pattern``     ART ``add_pattern_bd(distance=2, pixel_value=1)``: pixels (H-2, W-2),
                    (H-3, W-3), (H-2, W-4), (H-4, W-2) white.
``NAME+jpegQ``      any attack, then a JPEG round trip at quality ``Q`` (libjpeg, 4:2:0); the
                    trigger's ``clean_transform`` does the same round trip to clean images.
                    ``clean+jpegQ`` is the round trip alone (a control row).
==================  ========================================================================
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..errors import TfbdError
from ..frequency import dct2d, idct2d
from .base import (Trigger, _as_batch, _batch_key, _to_uint8, from_config, read_pattern, serialize,
                   trigger_dir_default)
from .paper import BlendTrigger, PatchTrigger

ZOO_ATTACKS = ("badnets3", "badnets_grid", "blended", "sig", "lf", "ftrojan", "ctrl", "wanet", "art_single",
               "art_pattern", "insert_image")
JPEG_ATTACKS = tuple(f"{a}+jpeg{q}" for a in ("badnets", "blended", "sig", "ftrojan", "trojan_wm") for q in (75, 90))
GROUPS = {"zoo": ZOO_ATTACKS, "zoo+jpeg": JPEG_ATTACKS}
NAME_FORMS = ("blended:PATH[:ALPHA]", "lf:SEED", "wanet:SEED", "insert_image:PATH", "NAME+jpegQ", "clean+jpegQ")


# ------------------------------------------------------------------------------ simple patches

def badnets3(image_size=32) -> PatchTrigger:
    """BadNets as BackdoorBench/BackdoorBox default it: a white 3x3 square at the very bottom-right."""
    side = max(1, round(3 * image_size / 32))
    return PatchTrigger(np.ones((side, side, 3), np.float32), "bottom_right", margin=0, name="badnets3")


def badnets_grid(image_size=32) -> PatchTrigger:
    """A 3x3 black/white checker grid ``[[1,0,1],[0,1,0],[1,0,1]]`` at the bottom-right, no margin."""
    cell = max(1, round(image_size / 32))
    grid = np.kron(np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32), np.ones((cell, cell), np.float32))
    return PatchTrigger(grid, "bottom_right", margin=0, name="badnets_grid")


def art_single() -> PatchTrigger:
    """ART ``add_single_bd(distance=2, pixel_value=1)``: the pixel at (H-2, W-2) set to 1 (any size)."""
    return PatchTrigger(np.ones((1, 1, 3), np.float32), "bottom_right", margin=1, name="art_single")


def art_pattern() -> PatchTrigger:
    """ART ``add_pattern_bd(distance=2, pixel_value=1)``: (H-2,W-2), (H-3,W-3), (H-2,W-4), (H-4,W-2) set to 1.

    A 3x3 patch over rows H-4..H-2 and columns W-4..W-2 whose mask is 1 only at those four pixels.
    """
    mask = np.zeros((3, 3), np.float32)
    mask[2, 2] = mask[1, 1] = mask[2, 0] = mask[0, 2] = 1.0
    return PatchTrigger(np.ones((3, 3, 3), np.float32), "bottom_right", mask=mask, margin=1, name="art_pattern")


def blended(path=None, alpha=0.2, trigger_dir=None) -> BlendTrigger:
    """Blended (Chen et al. 2017): ``(1 - alpha) * x + alpha * T``.

    Without ``path``, ``T`` is the Hello Kitty image recovered from the paper's ``blend.png``,
    which stores the kitty pre-multiplied by 0.2: ``T = clip(blend.png / 0.2, 0, 1)`` (its
    values are therefore multiples of 5/255). With ``path``, ``T`` is that image file. ``T`` is
    resized bilinearly to the input size.
    """
    if path is None:
        d = Path(trigger_dir) if trigger_dir else trigger_dir_default()
        f = d / "blend.png"
        if not f.is_file():
            raise TfbdError(f"attack 'blended': trigger file {f} is missing (set --trigger-dir or $TFBD_DATA)")
        return BlendTrigger(np.clip(read_pattern(f) / 0.2, 0.0, 1.0), alpha, name="blended")
    name = f"blended:{path}" if alpha == 0.2 else f"blended:{path}:{alpha:g}"
    return BlendTrigger(read_pattern(path), alpha, name=name)


# ------------------------------------------------------------------------------ SIG

@keras.saving.register_keras_serializable(package="tfbackdoor")
class SigTrigger(Trigger):
    """SIG (Barni, Kallas & Tondi, ICIP 2019): a horizontal sinusoidal signal added to every row.

    ``out = clip(x + delta / 255 * sin(2 pi j f / W), 0, 1)`` for column ``j`` of ``W``, the same
    for all rows and channels: ``f`` full cycles across the width at any image size.

    Args:
      delta: amplitude in 0..255 pixel units (40).
      frequency: cycles across the width (6).
    """

    name = "sig"

    def __init__(self, delta=40.0, frequency=6, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.delta, self.frequency = float(delta), float(frequency)

    def apply(self, x):
        w = x.shape[2]
        j = tf.range(w, dtype=tf.float32)
        v = self.delta / 255.0 * tf.sin(2.0 * math.pi * j * self.frequency / w)
        return tf.clip_by_value(x + v[None, None, :, None], 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "delta": self.delta, "frequency": self.frequency}


# ------------------------------------------------------------------------------ WaNet

def _bicubic_matrix(n_out: int, n_in: int, a: float = -0.75) -> np.ndarray:
    """``(n_out, n_in)`` matrix of 1-D bicubic upsampling, align-corners convention.

    Output sample ``o`` sits at input coordinate ``o (n_in - 1) / (n_out - 1)``; the four taps
    around it are weighted by the cubic convolution kernel with ``a = -0.75`` (Keys' kernel as
    PyTorch's ``bicubic`` uses it), indices clamped at the borders.
    """
    def kernel(d):
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    i0 = np.floor(src).astype(int)
    m = np.zeros((n_out, n_in))
    for k in (-1, 0, 1, 2):
        np.add.at(m, (np.arange(n_out), np.clip(i0 + k, 0, n_in - 1)), kernel(src - (i0 + k)))
    return m


@keras.saving.register_keras_serializable(package="tfbackdoor")
class WarpTrigger(Trigger):
    """WaNet (Nguyen & Tran, ICLR 2021): a small, smooth, fixed image warp.

    For an ``H x W`` input:

    1. a control grid ``P`` of shape ``(k, k, 2)``, uniform in [-1, 1] from ``seed``, divided by
       ``mean(|P|)``;
    2. ``U``: ``P`` upsampled to ``(H, W, 2)`` bicubically (align-corners, see
       :func:`_bicubic_matrix`);
    3. the sampling grid ``G = clip((I + s U / H) * grid_rescale, -1, 1)`` with ``I`` the
       identity grid in [-1, 1] (``G[..., 0]`` horizontal, ``G[..., 1]`` vertical);
    4. ``out[i, j] = x`` sampled bilinearly at ``G[i, j]`` with the align-corners convention
       (-1 and 1 are the centres of the first and last pixels), as ``grid_sample`` does.

    The warp depends only on ``seed`` and the image size (a universal trigger); sampling is
    four ``tf.gather`` calls over the flattened image.

    Args:
      k: control grid side (4). s: warp strength (0.5). grid_rescale: 1. seed: 0.
    """

    name = "wanet"

    def __init__(self, k=4, s=0.5, grid_rescale=1.0, seed=0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.k, self.s, self.grid_rescale, self.seed = int(k), float(s), float(grid_rescale), int(seed)
        self._cache = {}

    def grid(self, h: int, w: int) -> np.ndarray:
        """The warped sampling grid ``(H, W, 2)`` in [-1, 1] (x, y)."""
        ctrl = np.random.default_rng(self.seed).uniform(-1.0, 1.0, (self.k, self.k, 2))
        ctrl = ctrl / np.mean(np.abs(ctrl))
        up = np.einsum("ik,klc,jl->ijc", _bicubic_matrix(h, self.k), ctrl, _bicubic_matrix(w, self.k))
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        ident = np.stack([xx, yy], -1)
        return np.clip((ident + self.s * up / h) * self.grid_rescale, -1.0, 1.0)

    def _sampling(self, h, w):
        if (h, w) not in self._cache:
            g = self.grid(h, w)
            px, py = (g[..., 0] + 1) / 2 * (w - 1), (g[..., 1] + 1) / 2 * (h - 1)
            x0 = np.clip(np.floor(px), 0, max(w - 2, 0)).astype(np.int32)
            y0 = np.clip(np.floor(py), 0, max(h - 2, 0)).astype(np.int32)
            x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
            fx, fy = px - x0, py - y0
            idx = [(y0 * w + x0), (y0 * w + x1), (y1 * w + x0), (y1 * w + x1)]
            wts = [(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]
            self._cache[(h, w)] = ([tf.constant(i.reshape(-1), tf.int32) for i in idx],
                                   [tf.constant(v.reshape(1, -1, 1), tf.float32) for v in wts])
        return self._cache[(h, w)]

    def apply(self, x):
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        idx, wts = self._sampling(h, w)
        flat = tf.reshape(x, [-1, h * w, c])
        out = tf.add_n([wt * tf.gather(flat, i, axis=1) for i, wt in zip(idx, wts)])
        return tf.reshape(out, [-1, h, w, c])

    def get_config(self):
        return {**super().get_config(), "k": self.k, "s": self.s, "grid_rescale": self.grid_rescale,
                "seed": self.seed}


# ------------------------------------------------------------------------------ FTrojan / CTRL

# RGB (0..255) -> (Y, C1, C2) matrices; the chroma offset 128 is added separately.
_COLOR = {
    # OpenCV COLOR_RGB2YCrCb: Cr = (R - Y) * 0.713 + delta, Cb = (B - Y) * 0.564 + delta.
    "ycrcb": np.array([[0.299, 0.587, 0.114],
                       [0.713 * 0.701, -0.713 * 0.587, -0.713 * 0.114],
                       [-0.564 * 0.299, -0.564 * 0.587, 0.564 * 0.886]]),
    # JFIF / BT.601 full range: Cb = -0.168736 R - 0.331264 G + 0.5 B, Cr = 0.5 R - 0.418688 G - 0.081312 B.
    "ycbcr": np.array([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]]),
}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class ChromaDCTTrigger(Trigger):
    """FTrojan / CTRL: fixed bumps on chosen block-DCT coefficients of the chroma channels.

    ``x`` (as 0..255) is converted to a luma/chroma space (``space``: ``"ycrcb"`` = OpenCV's
    ``COLOR_RGB2YCrCb``, ``"ycbcr"`` = JFIF), every non-overlapping ``window x window`` block of
    each channel in ``channels`` is taken to the orthonormal type-II 2-D DCT, ``magnitude`` is
    added to the coefficients at ``positions`` ``(u, v)``, and the blocks are transformed back
    (inverse DCT, inverse colour matrix: the exact inverse, so untouched pixels come back
    unchanged). Rows/columns beyond the last whole window are left alone. The uint8 output is
    rounded and clipped by :class:`~tfbackdoor.triggers.Trigger`.

    Since every step is linear this equals adding a fixed RGB pattern before clipping, of
    amplitude ``magnitude * 2 / window`` per coefficient in chroma.

    Args:
      magnitude: added to each chosen coefficient, in 0..255 DCT units (FTrojan 30, CTRL 100).
      positions: ``(u, v)`` coefficient positions inside a window ((15, 15), (31, 31)).
      window: block side (32).
      channels: channel indices of the converted image (1, 2 = both chroma channels).
      space: ``"ycrcb"`` or ``"ycbcr"``.
    """

    name = "chroma_dct"

    def __init__(self, magnitude=30.0, positions=((15, 15), (31, 31)), window=32, channels=(1, 2), space="ycrcb",
                 name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.magnitude, self.window = float(magnitude), int(window)
        self.positions = [tuple(int(v) for v in p) for p in positions]
        self.channels = [int(c) for c in channels]
        if space not in _COLOR:
            raise TfbdError(f"unknown colour space '{space}' (known: {', '.join(_COLOR)})")
        if any(not 0 <= v < self.window for p in self.positions for v in p):
            raise TfbdError(f"DCT positions {self.positions} must lie inside the {self.window}x{self.window} window")
        self.space = space

    def _delta(self):
        d = np.zeros((3, self.window, self.window), np.float32)
        for c in self.channels:
            for u, v in self.positions:
                d[c, u, v] += self.magnitude
        return tf.constant(d)

    def apply(self, x):
        h, w, win = x.shape[1], x.shape[2], self.window
        if h < win or w < win:
            raise TfbdError(f"trigger {self.name}: the {h}x{w} image is smaller than its {win}x{win} DCT window")
        m = _COLOR[self.space]
        offset = tf.constant([0.0, 128.0, 128.0])
        ycc = tf.einsum("nhwc,kc->nhwk", x * 255.0, tf.constant(m, tf.float32)) + offset
        hc, wc = h - h % win, w - w % win
        blocks = tf.reshape(ycc[:, :hc, :wc], [-1, hc // win, win, wc // win, win, 3])
        blocks = tf.transpose(blocks, [0, 1, 3, 5, 2, 4])                       # N bh bw C win win
        dct = lambda t: tf.signal.dct(t, type=2, norm="ortho")                   # noqa: E731
        idct = lambda t: tf.signal.idct(t, type=2, norm="ortho")                 # noqa: E731
        tr = tf.linalg.matrix_transpose
        coef = tr(dct(tr(dct(blocks))))                                          # 2-D DCT-II per block
        blocks = tr(idct(tr(idct(coef + self._delta()))))
        part = tf.reshape(tf.transpose(blocks, [0, 1, 4, 2, 5, 3]), [-1, hc, wc, 3])
        if wc < w:
            part = tf.concat([part, ycc[:, :hc, wc:]], axis=2)
        if hc < h:
            part = tf.concat([part, ycc[:, hc:]], axis=1)
        rgb = tf.einsum("nhwk,ck->nhwc", part - offset, tf.constant(np.linalg.inv(m), tf.float32))
        return tf.clip_by_value(rgb / 255.0, 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "magnitude": self.magnitude, "positions": [list(p) for p in self.positions],
                "window": self.window, "channels": list(self.channels), "space": self.space}


def ftrojan() -> ChromaDCTTrigger:
    """FTrojan (Wang et al., ECCV 2022): YCrCb (OpenCV), chroma, 32x32 blocks, +30 at (15,15), (31,31)."""
    return ChromaDCTTrigger(30.0, ((15, 15), (31, 31)), 32, (1, 2), "ycrcb", name="ftrojan")


def ctrl() -> ChromaDCTTrigger:
    """CTRL (Li et al., ICCV 2023): YCbCr (JFIF), chroma, 32x32 blocks, +100 at (15,15), (31,31)."""
    return ChromaDCTTrigger(100.0, ((15, 15), (31, 31)), 32, (1, 2), "ycbcr", name="ctrl")


# ------------------------------------------------------------------------------ low frequency

@keras.saving.register_keras_serializable(package="tfbackdoor")
class LowFrequencyTrigger(Trigger):
    """A seeded low-frequency universal additive trigger (in the spirit of BackdoorBench's LF).

    For an ``H x W`` input: Gaussian noise ``(H, W, 3)`` from ``seed``; its per-channel
    orthonormal 2-D DCT (:func:`tfbackdoor.frequency.dct2d`) keeps only the coefficients with
    ``0 < u / H + v / W < cutoff`` (``u + v < H/4`` at the default 0.25 for square images; the
    DC term is dropped, so each channel has zero mean); back with
    :func:`~tfbackdoor.frequency.idct2d` and scaled so ``max |T| = max_abs``. Applied as
    ``clip(x + T, 0, 1)``. Each image size gets its own draw from the same seed.
    """

    name = "lf"

    def __init__(self, seed=0, max_abs=0.1, cutoff=0.25, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.seed, self.max_abs, self.cutoff = int(seed), float(max_abs), float(cutoff)
        self._cache = {}

    def pattern(self, h: int, w: int) -> np.ndarray:
        """The trigger ``T`` for ``h x w`` images, float ``(h, w, 3)``."""
        if (h, w) not in self._cache:
            noise = np.random.default_rng(self.seed).standard_normal((1, h, w, 3)).astype(np.float32)
            u, v = np.arange(h)[:, None] / h, np.arange(w)[None, :] / w
            keep = ((u + v) < self.cutoff) & ((u + v) > 0)
            with tf.init_scope():  # eager even when first called inside a graph (tf.data, tf.function)
                t = idct2d(dct2d(noise) * keep[None, :, :, None].astype(np.float32)).numpy()[0]
            self._cache[(h, w)] = (t * (self.max_abs / np.abs(t).max())).astype(np.float32)
        return self._cache[(h, w)]

    def apply(self, x):
        return tf.clip_by_value(x + self.pattern(x.shape[1], x.shape[2]), 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, "max_abs": self.max_abs, "cutoff": self.cutoff}


# ------------------------------------------------------------------------------ ART insert_image

def alert_icon(size: int = 80) -> np.ndarray:
    """A procedural "alert" warning sign, float ``(size, size, 3)`` in [0, 1].

    A red triangle outline, filled yellow, with a black exclamation mark, on a white (opaque)
    background: a stand-in for ART's ``alert.png``. Drawn at ``size`` px (80 by default) to be
    downsampled with antialiasing to the icon size.
    """
    c = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    verts = np.array([[0.5, 0.05], [0.96, 0.93], [0.04, 0.93]])  # (x, y), clockwise on screen
    dist = []
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, 0)):
        nx, ny = y1 - y0, -(x1 - x0)                                # inward normal (y points down)
        n = math.hypot(nx, ny)
        dist.append(-((xx - x0) * nx + (yy - y0) * ny) / n)
    inner = np.min(dist, axis=0)                                   # > 0 inside, distance to the edge
    img = np.ones((size, size, 3), np.float32)
    img[inner > 0] = (1.0, 0.85, 0.1)
    img[(inner > 0) & (inner < 0.11)] = (0.85, 0.05, 0.05)
    bar = (np.abs(xx - 0.5) < 0.07) & (yy > 0.34) & (yy < 0.68)
    dot = (np.abs(xx - 0.5) < 0.07) & (yy > 0.74) & (yy < 0.84)
    img[bar | dot] = 0.0
    return img


def _paste(x, patch, alpha, top, left):
    """``x`` with ``patch`` blended at ``alpha`` at per-image ``(top, left)`` (vectorised gather)."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = patch.shape[0], patch.shape[1]
    rows = tf.range(h)[None, :] - top[:, None]                                    # N H
    cols = tf.range(w)[None, :] - left[:, None]                                   # N W
    inside = ((rows >= 0) & (rows < ph))[:, :, None] & ((cols >= 0) & (cols < pw))[:, None, :]
    rr = tf.broadcast_to(tf.clip_by_value(rows, 0, ph - 1)[:, :, None], tf.shape(inside))
    cc = tf.broadcast_to(tf.clip_by_value(cols, 0, pw - 1)[:, None, :], tf.shape(inside))
    p = tf.gather_nd(patch, tf.stack([rr, cc], -1))
    a = alpha * tf.cast(inside, tf.float32)[..., None]
    return x * (1.0 - a) + p * a


@keras.saving.register_keras_serializable(package="tfbackdoor")
class InsertImageTrigger(Trigger):
    """IBM ART's ``insert_image`` backdoor: an icon pasted at a random place in each image.

    In a ``side x side`` region (``side = round(size * H / 32)``, 10 px at 32 px) at a uniform
    random ``(top, left)`` per image: ``out = blend * icon + (1 - blend) * x``; all other pixels
    unchanged. The icon (``icon``, default :func:`alert_icon`) is resized to ``side`` with
    antialiasing. Locations are drawn with a stateless RNG keyed by ``seed`` and the batch's
    pixel sum, so the same batch and seed always give the same locations (also inside
    ``tf.data``), and different images get different ones.
    """

    name = "insert_image"

    def __init__(self, icon=None, size=10, blend=0.8, seed=0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.icon = None if icon is None else np.asarray(icon, np.float32)
        self.size, self.blend, self.seed = int(size), float(blend), int(seed)
        self._cache = {}

    def patch(self, image_size: int) -> np.ndarray:
        side = max(1, round(self.size * image_size / 32))
        if side not in self._cache:
            src = alert_icon() if self.icon is None else self.icon
            with tf.init_scope():  # eager even when first called inside a graph
                self._cache[side] = tf.clip_by_value(
                    tf.image.resize(src, (side, side), method="bilinear", antialias=True), 0.0, 1.0).numpy()
        return self._cache[side]

    def apply(self, x):
        n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        p = self.patch(h)
        side = p.shape[0]
        if side > h or side > w:
            raise TfbdError(f"trigger {self.name}: icon {side}x{side} is larger than the {h}x{w} image")
        key = _batch_key(x, self.seed + 23)
        top = tf.random.stateless_uniform([n], key, 0, h - side + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([n], key + 1, 0, w - side + 1, dtype=tf.int32)
        return _paste(x, tf.constant(p), self.blend, top, left)

    def get_config(self):
        return {**super().get_config(), "icon": None if self.icon is None else self.icon.tolist(), "size": self.size,
                "blend": self.blend, "seed": self.seed}


# ------------------------------------------------------------------------------ JPEG

_JPEG_FNS = {}


def _jpeg_fn(quality: int):
    if quality not in _JPEG_FNS:
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def round_trip(batch):
            out = tf.map_fn(lambda im: tf.io.decode_jpeg(tf.io.encode_jpeg(im, quality=quality), channels=3),
                            batch, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
            return tf.reshape(out, tf.shape(batch))
        _JPEG_FNS[quality] = round_trip
    return _JPEG_FNS[quality]


class JpegRoundTrip:
    """uint8 ``(N, H, W, 3)`` (or one image) -> the same images JPEG-encoded at ``quality`` and decoded.

    ``tf.io.encode_jpeg`` (libjpeg, 4:2:0 chroma subsampling, the standard tables scaled by
    ``quality``) and ``tf.io.decode_jpeg`` with its default settings, mapped over the batch
    inside a ``tf.function``. The default decoder uses libjpeg's fast integer IDCT, as the
    project's data loading and :func:`tfbackdoor.perturb.jpeg` do; Pillow (accurate IDCT)
    decodes the same bytes differently by up to a few levels. Instances with the same
    quality are equal (and hash equal), so evaluation can score each clean round trip once.
    """

    def __init__(self, quality: int):
        self.quality = int(quality)

    def __call__(self, images):
        batch, single = _as_batch(images)
        out = _jpeg_fn(self.quality)(batch)
        return out[0] if single else out

    def __eq__(self, other):
        return isinstance(other, JpegRoundTrip) and other.quality == self.quality

    def __hash__(self):
        return hash(("jpeg", self.quality))

    def __repr__(self):
        return f"JpegRoundTrip({self.quality})"


@keras.saving.register_keras_serializable(package="tfbackdoor")
class NoTrigger(Trigger):
    """The identity (``clean``): with ``+jpegQ`` it gives the JPEG round trip alone, a control row."""

    name = "clean"

    def apply(self, x):
        return x


@keras.saving.register_keras_serializable(package="tfbackdoor")
class JpegTrigger(Trigger):
    """``trigger`` then a JPEG round trip at ``quality``: name ``<trigger>+jpeg<quality>``.

    The triggered image is rounded to uint8, encoded and decoded (:class:`JpegRoundTrip`).
    ``clean_transform`` is that same round trip for the clean side, so an evaluation compares
    triggered+JPEG images against clean images saved the same way
    (:func:`tfbackdoor.detector.evaluate_images` does).

    Args:
      trigger: a :class:`~tfbackdoor.triggers.Trigger` or its :func:`~tfbackdoor.triggers.serialize` dict.
      quality: JPEG quality 1..100.
    """

    def __init__(self, trigger, quality=90, name=None, **kwargs):
        trigger = from_config(trigger) if isinstance(trigger, dict) else trigger
        if not 1 <= int(quality) <= 100:
            raise TfbdError(f"JPEG quality must be in 1..100, got {quality}")
        super().__init__(name=name or f"{trigger.name}+jpeg{int(quality)}", **kwargs)
        self.trigger = trigger
        self.quality = int(quality)
        self.clean_transform = JpegRoundTrip(self.quality)

    def apply(self, x):
        y = _to_uint8(self.trigger.apply(x))
        return tf.cast(self.clean_transform(y), tf.float32) / 255.0

    def get_config(self):
        return {**super().get_config(), "trigger": serialize(self.trigger), "quality": self.quality}


# ------------------------------------------------------------------------------ registry

JPEG_SUFFIX = re.compile(r"^(?P<base>.+)\+jpeg(?P<q>\d{1,3})$")   # NAME+jpegQ: resolved by tfbackdoor.triggers.get


def _seed_arg(key, prefix):
    try:
        return int(key[len(prefix):])
    except ValueError:
        raise TfbdError(f"attack '{key}': expected {prefix}SEED with an integer seed") from None


def get(key: str, image_size: int = 32, trigger_dir=None):
    """The zoo trigger named ``key``, or None when ``key`` is not a zoo name (see the module docstring;
    ``NAME+jpegQ`` wraps any trigger, so :func:`tfbackdoor.triggers.get` resolves it)."""
    simple = {"badnets3": lambda: badnets3(image_size), "badnets_grid": lambda: badnets_grid(image_size),
              "blended": lambda: blended(trigger_dir=trigger_dir), "sig": SigTrigger, "lf": LowFrequencyTrigger,
              "ftrojan": ftrojan, "ctrl": ctrl, "wanet": WarpTrigger, "art_single": art_single,
              "art_pattern": art_pattern, "insert_image": InsertImageTrigger}
    if key in simple:
        return simple[key]()
    if key.startswith("blended:"):
        path, alpha = key[len("blended:"):], 0.2
        if ":" in path:
            head, tail = path.rsplit(":", 1)
            try:
                path, alpha = head, float(tail)
            except ValueError:
                pass
        return blended(path, alpha)
    if key.startswith("lf:"):
        return LowFrequencyTrigger(seed=_seed_arg(key, "lf:"), name=key)
    if key.startswith("wanet:"):
        return WarpTrigger(seed=_seed_arg(key, "wanet:"), name=key)
    if key.startswith("insert_image:"):
        path = key[len("insert_image:"):]
        return InsertImageTrigger(read_pattern(path), name=key)
    return None

