"""Random digital manipulations (detector training) and benign processing (codec-aware clean side).

Long (~650 lines) by design: the two layers share the stateless-seed helpers and the draw/apply
pattern, and most of the length is the ten manipulations, each a short method of one class.

Both are registered Keras layers in the manner of Keras's own preprocessing layers
(``keras.layers.RandomContrast``): each separates the random draw (``get_random_transformation``)
from its application (``transform_images``), takes a seed, and round-trips through ``get_config``
(:func:`keras.saving.serialize_keras_object`). All ops are stateless TensorFlow ops, vectorised over
the batch, so they run inside ``tf.data`` maps. The seed is an int setting or, per call, a (2,)
stateless seed (``layer(images, seed)``), so a ``tf.data`` map can give each batch its own draws
reproducibly; a ``keras.random.SeedGenerator`` would draw afresh at every call instead.

:class:`RandomManipulation` applies exactly ONE random manipulation to each image, from the
paper's five (:data:`MANIPULATIONS`):

0. ``white_block``: a white rectangle of random size, mostly in a corner;
1. ``color_block``: a rectangle of random size filled with random pixels or a random colour;
2. ``noise``: additive Gaussian noise of random strength and brightening mean;
3. ``shadow``: a random convex polygon darkened by a random factor;
4. ``blend``: add another random sample of the batch at a small weight;

or from the wider generic set (:data:`GENERIC_MANIPULATIONS`: also ``mix``, ``small_patch``,
``smooth_field``, ``chroma_bump``, ``warp``; see the class). None is a known attack.

:class:`BenignProcessing` applies what real pipelines do to clean images (JPEG re-encoding at a
random quality, brightness/contrast changes, blur, down-and-up resizing). In detector training
it is applied to *every* image before the clean/poisoned split, so both sides carry the same
codec artifacts and only the manipulation tells them apart.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

MANIPULATIONS = ("white_block", "color_block", "noise", "shadow", "blend")   # the paper's five
GENERIC_MANIPULATIONS = MANIPULATIONS + ("mix", "small_patch", "smooth_field", "chroma_bump", "warp")


def _seed(seed):
    return tf.cast(tf.convert_to_tensor(seed), tf.int64) if not isinstance(seed, int) else tf.constant([seed, 0], tf.int64)


def _sub(seed, k):
    """Derive the k-th independent stateless seed from a (2,) seed."""
    return tf.random.experimental.stateless_fold_in(seed, k)


def _log_uniform_int(shape, seed, lo, hi):
    """Integers in [lo, hi] drawn log-uniformly, so small sizes are as common as large ones."""
    u = tf.random.stateless_uniform(shape, seed, math.log(lo), math.log(hi + 1))
    return tf.clip_by_value(tf.cast(tf.floor(tf.exp(u)), tf.int32), lo, hi)


def _rect_mask(seed, n, h, w, min_side, max_side, corner_prob=0.0, max_margin=0):
    """A boolean ``(n, h, w, 1)`` mask of one random axis-aligned rectangle per image.

    Sides are log-uniform in [min_side, max_side]: small patches (a BadNets square is 4 px of a
    32 px image) are the hardest to see and must be common in training. With probability
    ``corner_prob`` the rectangle sits in one of the four corners, ``0..max_margin`` px from
    both edges (where patch triggers such as BadNets are put, and where the paper's training
    code puts every block); otherwise anywhere.
    """
    rh = _log_uniform_int([n], _sub(seed, 0), min_side, max_side)
    rw = _log_uniform_int([n], _sub(seed, 1), min_side, max_side)
    top = tf.cast(tf.random.stateless_uniform([n], _sub(seed, 2)) * tf.cast(h - rh + 1, tf.float32), tf.int32)
    left = tf.cast(tf.random.stateless_uniform([n], _sub(seed, 3)) * tf.cast(w - rw + 1, tf.float32), tf.int32)
    if corner_prob > 0:
        margin = tf.random.stateless_uniform([n, 2], _sub(seed, 4), 0, max_margin + 1, tf.int32)
        corner = tf.random.stateless_uniform([n, 2], _sub(seed, 5), 0, 2, tf.int32)  # (bottom?, right?)
        c_top = tf.where(corner[:, 0] == 1, h - margin[:, 0] - rh, margin[:, 0])
        c_left = tf.where(corner[:, 1] == 1, w - margin[:, 1] - rw, margin[:, 1])
        use = tf.random.stateless_uniform([n], _sub(seed, 6)) < corner_prob
        top = tf.clip_by_value(tf.where(use, c_top, top), 0, h - rh)
        left = tf.clip_by_value(tf.where(use, c_left, left), 0, w - rw)
    r = tf.range(h)[None, :]
    c = tf.range(w)[None, :]
    in_r = (r >= top[:, None]) & (r < (top + rh)[:, None])
    in_c = (c >= left[:, None]) & (c < (left + rw)[:, None])
    return (in_r[:, :, None] & in_c[:, None, :])[..., None]


def _polygon_mask(seed, n, h, w, vertices=5):
    """A boolean ``(n, h, w, 1)`` mask of one random convex polygon per image.

    Vertices are drawn at sorted random angles around a random centre, so the polygon is
    star-shaped; taking the intersection of the half-planes of its edges makes it convex.
    """
    cy = tf.random.stateless_uniform([n, 1], _sub(seed, 0)) * h
    cx = tf.random.stateless_uniform([n, 1], _sub(seed, 1)) * w
    radius = tf.random.stateless_uniform([n, 1], _sub(seed, 2), 0.2, 0.7) * min(h, w)
    ang = tf.sort(tf.random.stateless_uniform([n, vertices], _sub(seed, 3), 0.0, 2 * math.pi), axis=1)
    rad = radius * tf.random.stateless_uniform([n, vertices], _sub(seed, 4), 0.6, 1.0)
    py, px = cy + rad * tf.sin(ang), cx + rad * tf.cos(ang)            # n V
    qy, qx = tf.roll(py, -1, 1), tf.roll(px, -1, 1)
    yy = tf.cast(tf.range(h), tf.float32)[None, None, :, None] + 0.5   # 1 1 H 1
    xx = tf.cast(tf.range(w), tf.float32)[None, None, None, :] + 0.5   # 1 1 1 W
    # Points left of every CCW edge (cross product >= 0) are inside.
    cross = (qx - px)[..., None, None] * (yy - py[..., None, None]) - (qy - py)[..., None, None] * (xx - px[..., None, None])
    return tf.reduce_all(cross >= 0, axis=1)[..., None]


def _bilinear_sample(x, ys, xs):
    """Sample float ``(N, H, W, C)`` images at real-valued pixel coordinates ``ys, xs`` ``(N, H, W)``.

    Bilinear, clamped at the edges, vectorised with one batched gather per corner (TensorFlow
    has no grid-sample op; ``tf.image`` only warps by affine/projective maps).
    """
    h, w = x.shape[1], x.shape[2]
    ys = tf.clip_by_value(ys, 0.0, h - 1.0)
    xs = tf.clip_by_value(xs, 0.0, w - 1.0)
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, h - 1), tf.minimum(x0 + 1, w - 1)
    flat = tf.reshape(x, [tf.shape(x)[0], h * w, x.shape[3]])

    def at(yy, xx):
        return tf.gather(flat, yy * w + xx, batch_dims=1)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def _idct_field(coeffs):
    """Spatial pattern ``(N, H, W, C)`` of orthonormal 2-D DCT coefficients ``coeffs`` (same shape)."""
    from .frequency import idct2d   # frequency imports keras; keep perturb's import light

    return idct2d(coeffs)


def _freq_grid(h, w):
    u = tf.cast(tf.range(h), tf.float32)[:, None]
    v = tf.cast(tf.range(w), tf.float32)[None, :]
    return u, v


class _Preprocessing(keras.layers.Layer):
    """What :class:`RandomManipulation` and :class:`BenignProcessing` share as Keras layers: uint8 in and
    out, no weights, ``layer(images, seed)`` with an int or tensor seed, and a config made of the
    constructor settings named in ``_SETTINGS`` (:meth:`settings`) beside Keras's own keys."""

    _SETTINGS = ()

    def __init__(self, **kwargs):
        super().__init__(**{"autocast": False, **kwargs})
        self._allow_non_tensor_positional_args = True   # the seed may be a plain int, passed positionally

    def build(self, input_shape=None):
        pass

    def compute_output_shape(self, input_shape):
        return input_shape

    def settings(self) -> dict:
        """The constructor's settings (ranges as lists), without Keras's name, trainable and dtype."""
        values = {k: getattr(self, k) for k in self._SETTINGS}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}

    def get_config(self):
        return {**super().get_config(), **self.settings()}


@keras.saving.register_keras_serializable(package="tfbackdoor")
class RandomManipulation(_Preprocessing):
    """One random manipulation per image, drawn from ``kinds``.

    The paper's five (:data:`MANIPULATIONS`; defaults follow the paper's own training code,
    its ``patching_train``): blocks of 2..7 px (at 32 px) mostly in a corner, a random-colour
    block made of random pixels, Gaussian noise with a brightening mean, a random shadow
    polygon, and an *additive* blend with another image (``x + a * other``, clipped).

    Five more generic kinds (:data:`GENERIC_MANIPULATIONS`), none of them a known attack: each is
    a random family of digital changes (fresh parameters per image) that the paper's five do not
    span, so a detector trained on them has seen global, low-frequency and geometric changes
    as well as blunt patches:

    5. ``mix``: a *convex* blend with another image, ``(1 - a) x + a other``;
    6. ``small_patch``: a 1..4 px patch (at 32 px) of solid, checker or random-offset content,
       near a corner or anywhere;
    7. ``smooth_field``: an additive random field whose DCT coefficients follow a Gaussian
       envelope of random width (smooth shading up to mid-frequency texture), or a single random
       cosine grating, of random amplitude;
    8. ``chroma_bump``: one to three random DCT basis functions added along a random colour
       direction (mostly chroma, zero-sum over RGB) at random frequencies;
    9. ``warp``: a smooth random sub-pixel-to-pixel displacement field (bilinear resampling).

    Each image's kind is drawn first; each manipulation then runs only on the images that drew
    it (``tf.dynamic_partition`` / ``tf.dynamic_stitch``), so the cost per image is that of one
    manipulation, not of all of them. Sizes and frequencies scale with the image side.

    Args:
      kinds: the kinds to draw from, uniformly (repeat a name to weight it).
      block_size: ``(min, max)`` block side as a fraction of the image side.
      corner_prob: probability that a block sits in a corner (else anywhere).
      corner_margin: largest distance of a corner block from the edges, as a fraction of the side.
      pixel_color_prob: probability that a colour block is random pixels (else one solid colour).
      noise_std: ``(min, max)`` Gaussian noise std in 0..255 units.
      noise_mean: ``(min, max)`` mean of the noise (a brightening offset) in 0..255 units.
      shadow: ``(min, max)`` brightness factor inside the shadow polygon.
      blend_alpha: ``(min, max)`` weight ``a`` of the other sample (``blend`` and ``mix``).
      blend_mode: ``"add"`` (``blend`` is ``x + a * other``, the paper's) or ``"mix"`` (convex).
      patch_size: ``(min, max)`` side of ``small_patch`` in px at 32 px.
      field_amplitude: ``(min, max)`` peak of ``smooth_field`` in 0..255 units.
      bump_magnitude: ``(min, max)`` DCT magnitude of each ``chroma_bump`` (0..255 image units).
      warp_pixels: ``(min, max)`` largest displacement of ``warp`` in px at 32 px.
      seed: default seed (an int); ``__call__`` also takes a per-batch seed tensor of shape (2,).

    Input: uint8 ``(N, H, W, 3)``. Output: uint8 ``(N, H, W, 3)``.
    """

    _SETTINGS = ("kinds", "block_size", "corner_prob", "corner_margin", "pixel_color_prob", "noise_std", "noise_mean",
                 "shadow", "blend_alpha", "blend_mode", "patch_size", "field_amplitude", "bump_magnitude",
                 "warp_pixels", "seed")

    def __init__(self, kinds=MANIPULATIONS, block_size=(0.06, 0.22), corner_prob=0.75, corner_margin=0.16,
                 pixel_color_prob=0.5, noise_std=(3.0, 8.5), noise_mean=(0.0, 25.0), shadow=(0.35, 0.8),
                 blend_alpha=(0.1, 0.3), blend_mode="add", patch_size=(1, 4), field_amplitude=(6.0, 40.0),
                 bump_magnitude=(10.0, 60.0), warp_pixels=(0.3, 1.5), seed=0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(kinds, str):
            kinds = parse_kinds(kinds)
        unknown = set(kinds) - set(GENERIC_MANIPULATIONS)
        if unknown or not kinds:
            raise ValueError(f"unknown manipulations {sorted(unknown)} (known: {', '.join(GENERIC_MANIPULATIONS)})")
        if blend_mode not in ("add", "mix"):
            raise ValueError(f"unknown blend_mode {blend_mode!r} (known: add, mix)")
        self.kinds = tuple(kinds)
        self.block_size = tuple(block_size)
        self.corner_prob = float(corner_prob)
        self.corner_margin = float(corner_margin)
        self.pixel_color_prob = float(pixel_color_prob)
        self.noise_std = tuple(noise_std)
        self.noise_mean = tuple(noise_mean)
        self.shadow = tuple(shadow)
        self.blend_alpha = tuple(blend_alpha)
        self.blend_mode = blend_mode
        self.patch_size = tuple(patch_size)
        self.field_amplitude = tuple(field_amplitude)
        self.bump_magnitude = tuple(bump_magnitude)
        self.warp_pixels = tuple(warp_pixels)
        self.seed = int(seed)

    def get_random_transformation(self, images, seed):
        """The per-image kind (index into :data:`GENERIC_MANIPULATIONS`) and the seed of the rest."""
        n = tf.shape(images)[0]
        seed = _seed(seed)
        choice_ids = tf.constant([GENERIC_MANIPULATIONS.index(k) for k in self.kinds], tf.int32)
        pick = tf.random.stateless_uniform([n], _sub(seed, 0), 0, len(self.kinds), tf.int32)
        return {
            "kind": tf.gather(choice_ids, pick),
            "seed": seed,
            "blend_shift": tf.random.stateless_uniform([], _sub(seed, 9), 1, tf.maximum(n, 2), tf.int32),
        }

    # -- the manipulations: float (m, H, W, 3) 0..255 images (+ the other images) -> float
    def _white_block(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        lo, hi, margin = self._block_sides(h, w)
        return tf.where(_rect_mask(_sub(seed, 1), m, h, w, lo, hi, self.corner_prob, margin), 255.0, x)

    def _color_block(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        lo, hi, margin = self._block_sides(h, w)
        solid = tf.random.stateless_uniform([m, 1, 1, 3], _sub(seed, 3), 0.0, 255.0)
        pixels = tf.random.stateless_uniform(tf.shape(x), _sub(seed, 10), 0.0, 255.0)
        use_pixels = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 11)) < self.pixel_color_prob
        mask = _rect_mask(_sub(seed, 2), m, h, w, lo, hi, self.corner_prob, margin)
        return tf.where(mask, tf.where(use_pixels, pixels, solid), x)

    def _noise(self, x, other, seed):
        m = tf.shape(x)[0]
        return (x + tf.random.stateless_normal(tf.shape(x), _sub(seed, 4))
                * tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 5), *self.noise_std)
                + tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 12), *self.noise_mean))

    def _shadow(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        factor = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 7), *self.shadow)
        return tf.where(_polygon_mask(_sub(seed, 6), m, h, w), x * factor, x)

    def _alpha(self, x, seed):
        return tf.random.stateless_uniform([tf.shape(x)[0], 1, 1, 1], _sub(seed, 8), *self.blend_alpha)

    def _blend(self, x, other, seed):
        a = self._alpha(x, seed)
        return x + a * other if self.blend_mode == "add" else (1.0 - a) * x + a * other

    def _mix(self, x, other, seed):
        a = self._alpha(x, seed)
        return (1.0 - a) * x + a * other

    def _small_patch(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        scale = min(h, w) / 32.0
        lo, hi = max(1, round(self.patch_size[0] * scale)), max(1, round(self.patch_size[1] * scale))
        mask = _rect_mask(_sub(seed, 1), m, h, w, lo, hi, 0.5, max(0, round(2 * scale)))
        u = tf.random.stateless_uniform([m, 4, 1, 1, 1], _sub(seed, 2))
        c1 = tf.where(u[:, 0] < 0.3, 255.0, tf.random.stateless_uniform([m, 1, 1, 3], _sub(seed, 3), 0.0, 255.0))
        c2 = tf.where(u[:, 1] < 0.5, 0.0, tf.random.stateless_uniform([m, 1, 1, 3], _sub(seed, 4), 0.0, 255.0))
        r, c = tf.range(h)[:, None], tf.range(w)[None, :]
        parity = tf.cast((r + c) % 2, tf.bool)[None, :, :, None]
        content = tf.where((u[:, 2] < 0.4) & parity, c2, c1)
        offset = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 5), 20.0, 80.0)
        offset *= tf.sign(tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 6), -1.0, 1.0))
        content = tf.where(u[:, 3] < 0.25, x + offset, content)
        return tf.where(mask, content, x)

    def _smooth_field(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        side = min(h, w)
        uu, vv = _freq_grid(h, w)
        # Gaussian envelope over frequency, width log-uniform from 1 to side/3 frequencies.
        width = tf.exp(tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 1), 0.0, math.log(side / 3.0)))
        env = tf.exp(-0.5 * (tf.square(uu) + tf.square(vv))[None, :, :, None] / tf.square(width))
        colour = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 2)) < 0.5   # per-channel or shared field
        z = tf.random.stateless_normal([m, h, w, 3], _sub(seed, 3))
        z = tf.where(colour, z, z[..., :1])
        # or a single cosine grating at a random frequency below the band's middle
        gu = tf.random.stateless_uniform([m], _sub(seed, 4), 0, side // 2, tf.int32)
        gv = tf.random.stateless_uniform([m], _sub(seed, 5), 0, side // 2, tf.int32)
        grating = (tf.one_hot(gu, h)[:, :, None] * tf.one_hot(gv, w)[:, None, :])[..., None]
        use_grating = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 6)) < 0.3
        coeffs = tf.where(use_grating, grating * tf.ones([1, 1, 1, 3]), z * env)
        dc = tf.cast((uu == 0) & (vv == 0), tf.float32)[None, :, :, None]
        coeffs = coeffs * (1.0 - dc)
        field = _idct_field(coeffs)
        field /= tf.maximum(tf.reduce_max(tf.abs(field), axis=[1, 2, 3], keepdims=True), 1e-6)
        amp = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 7), *self.field_amplitude)
        return x + amp * field

    def _chroma_bump(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        k = 3
        pu = tf.random.stateless_uniform([m, k], _sub(seed, 1), 0, h, tf.int32)
        pv = tf.random.stateless_uniform([m, k], _sub(seed, 2), 0, w, tf.int32)
        keep = tf.cast(tf.range(k)[None, :] < tf.random.stateless_uniform([m, 1], _sub(seed, 3), 1, k + 1, tf.int32),
                       tf.float32)
        sign = tf.sign(tf.random.stateless_uniform([m, k], _sub(seed, 4), -1.0, 1.0))
        mag = tf.random.stateless_uniform([m, k], _sub(seed, 5), *self.bump_magnitude) * sign * keep
        coeffs = tf.einsum("mk,mkh,mkw->mhw", mag, tf.one_hot(pu, h), tf.one_hot(pv, w))[..., None]
        pattern = _idct_field(coeffs)                                          # m H W 1
        d = tf.random.stateless_normal([m, 1, 1, 3], _sub(seed, 6))
        chroma = d - tf.reduce_mean(d, axis=-1, keepdims=True)                 # zero-sum: no luminance
        luma = tf.ones_like(d)
        d = tf.where(tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 7)) < 0.75, chroma, luma)
        d /= tf.maximum(tf.norm(d, axis=-1, keepdims=True), 1e-6)
        return x + pattern * d * math.sqrt(3.0)

    def _warp(self, x, other, seed):
        m, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        side = min(h, w)
        uu, vv = _freq_grid(h, w)
        width = tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 1), 1.0, 3.0) * side / 32.0
        env = tf.exp(-0.5 * (tf.square(uu) + tf.square(vv))[None, :, :, None] / tf.square(width))
        disp = _idct_field(tf.random.stateless_normal([m, h, w, 2], _sub(seed, 2)) * env)
        disp /= tf.maximum(tf.reduce_max(tf.abs(disp), axis=[1, 2, 3], keepdims=True), 1e-6)
        disp *= tf.random.stateless_uniform([m, 1, 1, 1], _sub(seed, 3), *self.warp_pixels) * side / 32.0
        rows = tf.cast(tf.range(h), tf.float32)[None, :, None]
        cols = tf.cast(tf.range(w), tf.float32)[None, None, :]
        return _bilinear_sample(x, rows + disp[..., 0], cols + disp[..., 1])

    def _block_sides(self, h, w):
        side = min(h, w)
        lo, hi = max(1, int(round(self.block_size[0] * side))), max(1, int(round(self.block_size[1] * side)))
        return lo, hi, int(round(self.corner_margin * side))

    def transform_images(self, images, t):
        x = tf.cast(images, tf.float32)
        other = tf.roll(x, t["blend_shift"], axis=0)
        n = tf.shape(x)[0]
        used = [k for k in GENERIC_MANIPULATIONS if k in self.kinds]
        ids = tf.dynamic_partition(tf.range(n), t["kind"], len(GENERIC_MANIPULATIONS))
        idx, parts = [], []
        for k, name in enumerate(GENERIC_MANIPULATIONS):
            if name not in used:
                continue
            sub = ids[k]
            fn = getattr(self, "_" + name)
            parts.append(fn(tf.gather(x, sub), tf.gather(other, sub), _sub(t["seed"], 100 + k)))
            idx.append(sub)
        out = tf.dynamic_stitch(idx, parts)
        out = tf.ensure_shape(out, images.shape if images.shape.rank == 4 else [None] * 4)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    def call(self, images, seed=None):
        images = tf.convert_to_tensor(images)
        t = self.get_random_transformation(images, self.seed if seed is None else seed)
        return self.transform_images(images, t)


def parse_kinds(text):
    """``"paper"``, ``"generic"`` or comma-separated kind names -> a tuple of kinds (repeats weight a kind)."""
    groups = {"paper": MANIPULATIONS, "generic": GENERIC_MANIPULATIONS}
    out = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        if item in groups:
            out.extend(groups[item])
        elif item in GENERIC_MANIPULATIONS:
            out.append(item)
        else:
            raise ValueError(f"unknown manipulation '{item}' (known: paper, generic, {', '.join(GENERIC_MANIPULATIONS)})")
    if not out:
        raise ValueError("no manipulation given (use paper, generic or kind names)")
    return tuple(out)


# ----------------------------------------------------------------------------- benign processing

def jpeg(image, quality):
    """JPEG round-trip of one uint8 ``(H, W, 3)`` image at ``quality`` (an int or int tensor).

    Uses libjpeg's defaults (4:2:0 chroma subsampling, like most encoders and the CIFAR-10 copy).
    """
    encoded = tf.raw_ops.EncodeJpegVariableQuality(images=image, quality=tf.cast(quality, tf.int32))
    return tf.io.decode_jpeg(encoded, channels=3)


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of float ``(H, W, 3)`` with a scalar ``sigma`` tensor (5 taps)."""
    k = tf.range(-2.0, 3.0)
    g = tf.exp(-0.5 * tf.square(k / tf.maximum(sigma, 1e-3)))
    g = g / tf.reduce_sum(g)
    img = x[tf.newaxis]
    kh = tf.tile(tf.reshape(g, [5, 1, 1, 1]), [1, 1, 3, 1])
    kw = tf.tile(tf.reshape(g, [1, 5, 1, 1]), [1, 1, 3, 1])
    img = tf.pad(img, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="SYMMETRIC")
    img = tf.nn.depthwise_conv2d(img, kh, [1, 1, 1, 1], "VALID")
    img = tf.nn.depthwise_conv2d(img, kw, [1, 1, 1, 1], "VALID")
    return img[0]


def _resize_down_up(x, factor):
    # the dynamic shape: a graph retraced for a second image size (``_fixed``'s reduce_retracing)
    # has no static height and width
    hw = tf.shape(x)[:2]
    small = tf.cast(tf.maximum(tf.round(tf.cast(hw, tf.float32) * factor), 4.0), tf.int32)
    y = tf.image.resize(x, small, method="bilinear", antialias=True)
    return tf.image.resize(y, hw, method="bilinear")


def _on_subset(x, mask, fn, *params):
    """``x`` with ``fn(x[mask], *(p[mask] for p in params))`` in the rows where ``mask`` is true.

    Only the selected images are computed, so a step drawn by 10% of the batch costs 10%. Gather and
    scatter, not ``dynamic_partition`` / ``dynamic_stitch`` as in :class:`RandomManipulation`: with a
    mask that is constant all-false in a graph, TensorFlow 2.21's graph optimiser breaks the
    ``tf.map_fn`` fed by a partition ("Trying to access element 0 in a list with 0 elements").
    """
    idx = tf.where(mask)[:, 0]
    out = fn(tf.gather(x, idx), *[tf.gather(p, idx) for p in params])
    return tf.ensure_shape(tf.tensor_scatter_nd_update(x, idx[:, None], out), x.shape)


def _gaussian_blur_batch(x, sigma):
    """:func:`_gaussian_blur` of float ``(N, H, W, C)`` with one ``sigma`` per image ``(N,)``.

    ``depthwise_conv2d`` takes one kernel per channel, not per image, so the batch is folded into
    the channels (``1, H, W, N * C``) and each image's channels get its own 5 taps.
    """
    m, h, w, c = tf.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
    k = tf.range(-2.0, 3.0)
    g = tf.exp(-0.5 * tf.square(k[None, :] / tf.maximum(sigma, 1e-3)[:, None]))
    g = tf.repeat(tf.transpose(g / tf.reduce_sum(g, axis=1, keepdims=True)), c, axis=1)   # 5 (N*C), image-major
    p = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="SYMMETRIC")
    p = tf.reshape(tf.transpose(p, [1, 2, 0, 3]), [1, h + 4, w + 4, m * c])
    p = tf.nn.depthwise_conv2d(p, tf.reshape(g, [5, 1, m * c, 1]), [1, 1, 1, 1], "VALID")
    p = tf.nn.depthwise_conv2d(p, tf.reshape(g, [1, 5, m * c, 1]), [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(p[0], [h, w, m, c]), [2, 0, 1, 3])


def _down_up_sizes(n, factor_range):
    """The side lengths ``max(round(n * f), 4)`` that a factor ``f`` in ``factor_range`` can give."""
    lo = max(4, math.floor(n * min(factor_range)))
    return lo, max(lo, math.ceil(n * max(factor_range)))


_DOWN_UP = {}


def _down_up_matrices(n, lo, hi):
    """``(hi - lo + 1, n, n)``: for each size ``s`` in ``lo..hi`` the linear map of resizing a length-``n``
    axis to ``s`` (bilinear, antialiased) and back to ``n`` (bilinear), as :func:`_resize_down_up` does.

    ``tf.image.resize`` takes one output size per call, so images of one batch resized to their
    own random sizes would need a per-image loop. Both resizes are linear and separable, so each
    is an ``n x n`` matrix per axis, made here once by ``tf.image.resize`` itself on the unit
    vectors (exactly its kernel, nothing re-derived) and applied to a batch as one ``einsum``.
    """
    key = (n, lo, hi)
    if key not in _DOWN_UP:
        with tf.init_scope():   # eager, once, even when first called while tracing a tf.data map
            mats = []
            for s in range(lo, hi + 1):
                y = tf.image.resize(tf.eye(n)[:, :, None, None], (s, 1), method="bilinear", antialias=True)
                y = tf.image.resize(y, (n, 1), method="bilinear")
                mats.append(tf.transpose(y[:, :, 0, 0]))   # column i: the response to unit vector i
            _DOWN_UP[key] = tf.stack(mats).numpy()
    return _DOWN_UP[key]


def _resize_down_up_batch(x, factor, factor_range):
    """:func:`_resize_down_up` of float ``(N, H, W, C)`` with one ``factor`` per image ``(N,)`` drawn in
    ``factor_range`` (which bounds the sizes the matrices are made for)."""
    out = x
    for axis, n in ((1, x.shape[1]), (2, x.shape[2])):
        lo, hi = _down_up_sizes(n, factor_range)
        small = tf.cast(tf.maximum(tf.round(float(n) * factor), 4.0), tf.int32)
        mats = tf.gather(tf.constant(_down_up_matrices(n, lo, hi)), tf.clip_by_value(small, lo, hi) - lo)   # N n n
        out = tf.einsum("nri,nicd->nrcd", mats, out) if axis == 1 else tf.einsum("nci,nrid->nrcd", mats, out)
    return out


def _jpeg_batch(images, quality):
    """:func:`jpeg` of uint8 ``(N, H, W, 3)`` images, each at its own ``quality`` ``(N,)``.

    Encoding is per image by nature (one image per ``encode_jpeg`` call, no vectorised kernel and
    no ``vectorized_map`` converter), so this is a graph ``tf.map_fn`` over the images given.
    """
    shape = images.shape[1:]
    return tf.map_fn(lambda a: tf.ensure_shape(jpeg(a[0], a[1]), shape), (images, quality),
                     fn_output_signature=tf.TensorSpec(shape, tf.uint8))


@keras.saving.register_keras_serializable(package="tfbackdoor")
class BenignProcessing(_Preprocessing):
    """Random benign processing of a uint8 ``(N, H, W, 3)`` batch (or one ``(H, W, 3)`` image).

    Each image draws each step with its own probability and its own parameters, and the steps
    run in the order a real pipeline applies them: resize down-and-up or blur, then
    brightness/contrast, then JPEG re-encoding. All draws for a batch come from one stateless
    seed; every step is batched and runs only on the images that drew it (JPEG, per image by
    nature, is a ``tf.map_fn`` over those images alone).

    Args:
      p_jpeg: probability of a JPEG round-trip at a quality drawn from ``jpeg_quality``.
      jpeg_quality: ``(min, max)`` JPEG quality.
      p_color: probability of a brightness/contrast change (``brightness`` delta in 0..255 units,
        ``contrast`` factor range).
      p_blur: probability of a Gaussian blur with sigma in ``blur_sigma``.
      p_resize: probability of resizing down by a factor in ``resize`` and back up.
    """

    _SETTINGS = ("p_jpeg", "jpeg_quality", "p_color", "brightness", "contrast", "p_blur", "blur_sigma", "p_resize",
                 "resize", "seed")

    def __init__(self, p_jpeg=0.5, jpeg_quality=(40, 95), p_color=0.3, brightness=30.0, contrast=(0.7, 1.3),
                 p_blur=0.1, blur_sigma=(0.3, 1.0), p_resize=0.1, resize=(0.5, 0.9), seed=0, **kwargs):
        super().__init__(**kwargs)
        self.p_jpeg, self.jpeg_quality = float(p_jpeg), tuple(jpeg_quality)
        self.p_color, self.brightness, self.contrast = float(p_color), float(brightness), tuple(contrast)
        self.p_blur, self.blur_sigma = float(p_blur), tuple(blur_sigma)
        self.p_resize, self.resize = float(p_resize), tuple(resize)
        self.seed = int(seed)

    def get_random_transformation(self, images, seed):
        """Per-image draws ``(N,)`` for a batch ``images``: which steps run, and their parameters."""
        n = tf.shape(images)[0]
        seed = _seed(seed)
        u = tf.random.stateless_uniform([n, 4], _sub(seed, 0))
        return {
            "do_resize": u[:, 0] < self.p_resize, "factor": tf.random.stateless_uniform([n], _sub(seed, 1), *self.resize),
            "do_blur": u[:, 1] < self.p_blur, "sigma": tf.random.stateless_uniform([n], _sub(seed, 2), *self.blur_sigma),
            "do_color": u[:, 2] < self.p_color,
            "delta": tf.random.stateless_uniform([n], _sub(seed, 3), -self.brightness, self.brightness),
            "gain": tf.random.stateless_uniform([n], _sub(seed, 4), *self.contrast),
            "do_jpeg": u[:, 3] < self.p_jpeg,
            "quality": tf.random.stateless_uniform([n], _sub(seed, 5), self.jpeg_quality[0], self.jpeg_quality[1] + 1,
                                                   tf.int32),
        }

    def transform_images(self, images, t):
        images = tf.convert_to_tensor(images)
        x = tf.cast(images, tf.float32)
        # (a step of probability 0 is left out of the graph; the draws stay the same)
        if self.p_resize > 0:
            x = _on_subset(x, t["do_resize"], lambda a, f: _resize_down_up_batch(a, f, self.resize), t["factor"])
        if self.p_blur > 0:
            x = _on_subset(x, t["do_blur"], _gaussian_blur_batch, t["sigma"])
        if self.p_color > 0:   # (x - mean) * gain + mean + delta as one per-image scale and offset
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            do = t["do_color"][:, None, None, None]
            gain, delta = t["gain"][:, None, None, None], t["delta"][:, None, None, None]
            x = x * tf.where(do, gain, 1.0) + tf.where(do, mean * (1.0 - gain) + delta, 0.0)
        out = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
        if self.p_jpeg > 0:
            out = _on_subset(out, t["do_jpeg"], _jpeg_batch, t["quality"])
        return tf.ensure_shape(out, images.shape)

    def call(self, images, seed=None):
        images = tf.convert_to_tensor(images)
        seed = self.seed if seed is None else seed
        if images.shape.rank == 3:   # one image
            return self.transform_images(images[None], self.get_random_transformation(images[None], seed))[0]
        return self.transform_images(images, self.get_random_transformation(images, seed))


def parse_benign(text, seed=0):
    """``BenignProcessing`` from ``"key=value,..."`` overrides of its defaults (the CLI's ``--benign``).

    Ranges take ``lo:hi`` (``contrast=0.6:1.4``). Empty text gives the defaults. An unknown key or a
    bad value raises ``ValueError`` naming it.
    """
    kwargs = {}
    defaults = BenignProcessing().settings()
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults or key == "seed":
            known = ", ".join(k for k in defaults if k != "seed")
            raise ValueError(f"bad benign setting '{item}' (KEY=VALUE with KEY one of: {known})")
        try:
            if isinstance(defaults[key], list):
                lo, hi = val.split(":")
                kwargs[key] = (type(defaults[key][0])(lo), type(defaults[key][0])(hi))
            else:
                kwargs[key] = float(val)
        except ValueError:
            raise ValueError(f"bad benign setting '{item}' (expected {'lo:hi' if isinstance(defaults[key], list) else 'a number'})") from None
    return BenignProcessing(seed=seed, **kwargs)


# Fixed benign variants for evaluation (FPR on processed clean images): name -> per-image fn.
def _fixed(fn):
    # A graph (tf.function) map: eager tf.map_fn would run the ops image by image in Python.
    @tf.function(reduce_retracing=True)
    def mapped(images):
        return tf.map_fn(fn, images, fn_output_signature=tf.uint8)

    def batch_fn(images):
        return mapped(tf.convert_to_tensor(images))
    return batch_fn


def _u8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


BENIGN_VARIANTS = {
    "jpeg50": _fixed(lambda im: jpeg(im, 50)),
    "jpeg75": _fixed(lambda im: jpeg(im, 75)),
    "jpeg90": _fixed(lambda im: jpeg(im, 90)),
    "brighter": _fixed(lambda im: _u8(tf.cast(im, tf.float32) + 25.0)),
    "darker": _fixed(lambda im: _u8(tf.cast(im, tf.float32) - 25.0)),
    "contrast": _fixed(lambda im: _u8((tf.cast(im, tf.float32) - tf.reduce_mean(tf.cast(im, tf.float32))) * 1.25
                                      + tf.reduce_mean(tf.cast(im, tf.float32)))),
    "blur": _fixed(lambda im: _u8(_gaussian_blur(tf.cast(im, tf.float32), tf.constant(0.7)))),
    "resize": _fixed(lambda im: _u8(_resize_down_up(tf.cast(im, tf.float32), tf.constant(0.75)))),
}
