"""Clean-spectrum anomaly: a codec-routed per-frequency outlier score beside the CNN detector.

Why (issue 11): a trigger that adds energy at a few frequencies (SIG's sinusoid, FTrojan's and
CTRL's chroma DCT bumps, Trojan watermarks) is a many-sigma outlier *at those frequencies* for
a clean image, yet the CNN, trained on the paper's random manipulations, treats most of them as
clean. This model needs no attack and no training: it learns, from clean images only, the RMS
of every DCT coefficient (per channel), and scores an image by its largest coefficient measured
in those units (``max |X[u, v, c]| / s[u, v, c]``, DC excluded). It is the statistical twin of
the paper's premise: natural images have a predictable spectrum, triggers break it.

JPEG images have their own outliers (8x8 block artifacts at the grid frequencies, much stronger
after re-encoding at quality 50), so one set of statistics would have to tolerate them and miss
SIG on lossless images. A *codec router* therefore sends each image to one of two sets of
statistics: it takes the 8x8 block DCT of the image's luma on the JPEG grid and measures the
share of high-frequency block coefficients that are near zero (JPEG quantisation zeroes most of
them; a lossless photo keeps sensor and texture noise there). Blurred or resized lossless images
also look "JPEG-like"; that only sends them to the more tolerant statistics.

Everything is in-graph Keras ops on the detector's DCT input (basis matmuls, abs, max,
comparisons), so it lives inside the detector ``.keras`` and is scored by the same
``tfbd evaluate`` / ``scan`` call. :class:`CombineScores` merges it with the CNN so that an image
is flagged when the CNN flags it *or* its anomaly ratio exceeds 1 (the spectral operating point
set by :func:`fit` on held-out clean images and their benign variants).

A second statistic (``texture=True``, what :func:`fit` builds): the same largest coefficient
divided by the image's *texture level*, the median of its ``|X| / scale`` over every coefficient
relative to the clean images' median (never below 1). Why: a contrast-raised or heavily textured
clean image lifts every coefficient, so it reaches a high max-z without any trigger, and those
images set the max-z threshold above most SIG images; a trigger lifts a few coefficients and
leaves the median where it was. Measured while designing it (exploration, natural32 statistics,
2,000 ``cifar10:lossless`` images, thresholds at 1% of the clean set and its benign variants):
SIG 10% -> 78% at the threshold, but FTrojan on TSRD 96% -> 81% and Trojan-WM (whose watermark
lifts many coefficients) 93% -> 10%, so the layer flags when *either* statistic passes its
threshold, both thresholds scaled together to keep the target FPR (SIG 69%, FTrojan/TSRD 94%).

Shapes: :class:`SpectralAnomaly` maps ``(batch, H, W, 3)`` DCT coefficients of 0..255 pixels to
``(batch,)`` anomaly ratios (> 1: flagged); H and W multiples of 8 for the router (others: every
image is treated as lossless).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from . import frequency, models, perturb
from .errors import TfbdError

NEAR_ZERO = 1.0     # |8x8 block DCT coefficient| below this (0..255 luma units) counts as zeroed
HF_MIN = 6          # block positions with p + q >= HF_MIN are the "high frequencies" JPEG zeroes
ROUTE_CUT = 0.55    # share of near-zero HF block coefficients above which an image is JPEG-like
                    # (measured: lossless CIFAR-10 / natural32 median 0.19, 98th pct 0.52; JPEG q75
                    # median 0.85, 2nd pct 0.58)


def _block_basis(n: int) -> np.ndarray:
    """``(n, n)`` matrix applying the orthonormal 8-point DCT to each 8-sample block."""
    return np.kron(np.eye(n // 8, dtype=np.float32), frequency.dct_matrix(8).astype(np.float32))


def _hf_block_mask(h: int, w: int) -> np.ndarray:
    p = np.arange(h) % 8
    q = np.arange(w) % 8
    return (np.add.outer(p, q) >= HF_MIN).astype(np.float32)


@keras.saving.register_keras_serializable(package="tfbackdoor")
class SpectralAnomaly(keras.layers.Layer):
    """Codec-routed clean-spectrum anomaly ratio of DCT inputs.

    Weights (non-trainable, set by :func:`fit`): ``scale`` ``(2, H, W, C)`` per-coefficient RMS of
    clean images (row 0: lossless-like images, row 1: JPEG-like), ``thresholds`` ``(2,)`` the
    max-z that flags at the fitted FPR for each. With ``texture=True`` also ``texture_ref`` ``(2,)``
    (the clean images' median ``|X| / scale``) and ``texture_thresholds`` ``(2,)`` (the threshold
    of max-z divided by the texture level). Output ``(batch,)``: max-z / threshold of the image's
    branch, or the larger of the two statistics' ratios with ``texture`` (> 1 is flagged).
    """

    def __init__(self, route_cut=ROUTE_CUT, near_zero=NEAR_ZERO, texture=False, **kwargs):
        super().__init__(**kwargs)
        self.route_cut = float(route_cut)
        self.near_zero = float(near_zero)
        self.texture = bool(texture)   # False: models fitted before the texture statistic existed

    def build(self, input_shape):
        h, w, c = int(input_shape[1]), int(input_shape[2]), int(input_shape[3])
        self.scale = self.add_weight(shape=(2, h, w, c), initializer="ones", trainable=False, name="scale")
        self.thresholds = self.add_weight(shape=(2,), initializer="ones", trainable=False, name="thresholds")
        if self.texture:
            self.texture_ref = self.add_weight(shape=(2,), initializer="ones", trainable=False, name="texture_ref")
            self.texture_thresholds = self.add_weight(shape=(2,), initializer="ones", trainable=False,
                                                      name="texture_thresholds")
        self._build_constants(h, w, c)

    def _build_constants(self, h, w, c):
        """The DCT bases, the router's block basis and masks (no weights)."""
        d_h, d_w = frequency.dct_matrix(h).astype(np.float32), frequency.dct_matrix(w).astype(np.float32)
        self._d_h, self._d_w = ops.convert_to_tensor(d_h), ops.convert_to_tensor(d_w)
        self._routable = h % 8 == 0 and w % 8 == 0
        if self._routable:
            self._b_h = ops.convert_to_tensor(_block_basis(h))
            self._b_w = ops.convert_to_tensor(_block_basis(w))
            self._hf = ops.convert_to_tensor(_hf_block_mask(h, w))
        dc = np.ones((h, w, c), np.float32)
        dc[0, 0, :] = 0.0          # the DC term (mean brightness) is never evidence
        self._not_dc = ops.convert_to_tensor(dc)

    def _pixels(self, coeffs):
        """``(batch, H, W, C)`` the pixels of DCT ``coeffs``: ``D^T X D`` per channel (the inverse
        orthonormal DCT), unrounded."""
        return ops.einsum("uh,nuvc,vw->nhwc", self._d_h, coeffs, self._d_w)

    def _pixels_and_blocks(self, coeffs):
        """``(pixels (batch, H, W, C), blocks (batch, H, W))`` of a routable size: the inverse DCT
        and the 8x8 block DCT (JPEG grid) of its centred BT.601 luma, each block's coefficients in
        its place."""
        pix = self._pixels(coeffs)
        luma = pix[..., 0] * 0.299 + pix[..., 1] * 0.587 + pix[..., 2] * 0.114 - 128.0
        return pix, ops.einsum("ph,nhw,qw->npq", self._b_h, luma, self._b_w)

    def route(self, coeffs, blocks=None):
        """``(batch,)`` 1.0 where the image looks JPEG-compressed, else 0.0. ``blocks``: the
        image's :meth:`_pixels_and_blocks` blocks if the caller has them already."""
        if not self._routable:
            return ops.zeros((ops.shape(coeffs)[0],), coeffs.dtype)
        if blocks is None:
            _, blocks = self._pixels_and_blocks(coeffs)
        near = ops.cast(ops.abs(blocks) < self.near_zero, coeffs.dtype) * self._hf
        share = ops.sum(near, axis=(1, 2)) / ops.sum(self._hf)
        return ops.cast(share > self.route_cut, coeffs.dtype)

    def _branch_scale(self, branch):
        """``(batch, H, W, C)`` each image's row of ``scale`` (its branch's clean RMS)."""
        return self._pick(self.scale, ops.reshape(branch, (-1, 1, 1, 1)))

    def _z(self, coeffs, branch):
        """``(batch, H*W*C)`` ``|X| / scale`` under each image's branch statistics, DC set to 0."""
        z = ops.abs(coeffs) / self._branch_scale(branch) * self._not_dc
        return ops.reshape(z, (ops.shape(z)[0], -1))

    def max_z(self, coeffs, branch):
        """``(batch,)`` largest ``|X| / scale`` of each image under its branch's statistics."""
        return ops.max(self._z(coeffs, branch), axis=1)

    def statistics(self, coeffs, branch):
        """``(max_z, texture)``, each ``(batch,)``: the largest ``|X| / scale`` and the median one
        (the DC's 0 included: one of ``H*W*C`` values), before any reference or threshold."""
        z = self._z(coeffs, branch)
        return ops.max(z, axis=1), ops.quantile(z, 0.5, axis=1)

    @staticmethod
    def _pick(pair, branch):
        """Row 0 of ``pair`` where ``branch`` is 0 (lossless-like), row 1 where it is 1 (broadcast)."""
        return pair[0] * (1.0 - branch) + pair[1] * branch

    def call(self, coeffs):
        branch = self.route(coeffs)
        if not self.texture:
            return self.max_z(coeffs, branch) / self._pick(self.thresholds, branch)
        m, med = self.statistics(coeffs, branch)
        level = ops.maximum(med / self._pick(self.texture_ref, branch), 1.0)
        return ops.maximum(m / self._pick(self.thresholds, branch),
                           m / level / self._pick(self.texture_thresholds, branch))

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        config = super().get_config()
        config.update({"route_cut": self.route_cut, "near_zero": self.near_zero, "texture": self.texture})
        return config


#: YCbCr (JPEG's BT.601 full range) from RGB, rows Y, Cb, Cr; linear, so it applies to DCT coefficients
#: channel by channel (the offsets only touch the DC term, which is never evidence).
YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
#: Frequency bands of :class:`BandAnomaly` for 32-px inputs, as ranges of ``u + v`` (scaled with the size).
BAND_EDGES_32 = ((1, 4), (5, 8), (9, 12), (13, 20), (21, 62))


def band_edges(h: int, w: int) -> list:
    """``[(lo, hi), ...]`` of ``u + v`` for an ``h x w`` DCT: :data:`BAND_EDGES_32` scaled by ``h / 32``, the
    last band reaching ``h + w - 2``."""
    f = h / 32.0
    edges = [(max(1, int(round(lo * f))) if i else 1, int(round(hi * f)) if i < len(BAND_EDGES_32) - 1 else h + w - 2)
             for i, (lo, hi) in enumerate(BAND_EDGES_32)]
    return [(lo if i == 0 else edges[i - 1][1] + 1, hi) for i, (lo, hi) in enumerate(edges)]


def band_masks(h: int, w: int) -> np.ndarray:
    """``(bands, h, w)`` float32 masks of :func:`band_edges` (the DC term in none)."""
    uv = np.add.outer(np.arange(h), np.arange(w))
    return np.stack([((uv >= lo) & (uv <= hi)).astype(np.float32) for lo, hi in band_edges(h, w)])


#: JPEG's example luminance quantisation table (ITU-T T.81 Annex K, the one libjpeg, PIL and TensorFlow
#: scale by quality), in block order ``[u, v]``.
JPEG_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
#: what :func:`fit`'s ``statistic`` takes
STATISTICS = ("max", "texture", "bands", "grid", "island", "island-only")
UNUSED = 1.0e30    # the threshold of a statistic left out of the fit ("island-only"): it never passes
GRID_QUALITIES = (10, 100)   # the JPEG qualities the grid statistic tries (inclusive)
GRID_BIG = 2.5     # |block coefficient| (luma levels) above which it can show the lattice
GRID_TOL = 1.25    # distance to the nearest lattice point below which a coefficient fits it
GRID_FLOOR = 0.5   # floor of the quiet blocks' RMS distance (about the decoder's rounding noise)
GRID_CLIPPED = 24  # blocks with more pixels than this (of 64) at 0 or 255 are left out of the maximum


ISLAND_MIN_SIDE = 3     # a flat island's shortest side at 32 px (scaled with the image side)
ISLAND_MAX_AREA = 25    # and its largest area at 32 px (scaled with the image area)
ISLAND_MIN_STEP = 8.0   # an island must stand out of its ring by more than this many levels
ISLAND_NEAR_TOL = 4.0   # pixels within this many levels (every channel) of the island's colour are "alike"
ISLAND_NEAR_TOL_ROUND8 = 8.0   # the tolerance of detectors saved before the layer recorded it (round 8)
ISLAND_NEAR_MAX = 8     # an island counts only when at most this many pixels elsewhere are alike
ISLAND_TOP = 8          # islands per image (the largest steps) whose colour is looked for elsewhere
ISLAND_MAX_SIDE = 64    # larger images are area-downsampled first (the search grows ~ side^4): island_factor
ISLAND_POOL_SIDE = 32   # ... by the smallest integer factor that brings their longer side to this or below
_ISLAND_OUTSIDE = -1.0e4


def island_settings(near_tol=ISLAND_NEAR_TOL) -> dict:
    """The island statistic's constants, as the fit report and the screener sidecar record them
    (``near_tol``: the layer's, :attr:`BandAnomaly.island_near_tol`)."""
    return {"min_side": ISLAND_MIN_SIDE, "max_area": ISLAND_MAX_AREA, "min_step": ISLAND_MIN_STEP,
            "near_tol": float(near_tol), "near_max": ISLAND_NEAR_MAX, "top": ISLAND_TOP}


def island_factor(h: int, w: int) -> int:
    """The integer factor by which the island statistic area-downsamples ``h x w`` images: 1 up to
    ``ISLAND_MAX_SIDE`` px, else the smallest that brings the longer side to ``ISLAND_POOL_SIDE``
    or below (224 px: 7, to 32 px; a remainder of rows or columns is cropped at the bottom/right).

    Why (issue 13, round 4): the rectangle search grows ~ side^4, so a 224-px frame is searched at
    32 px. A patch pasted on a large frame scales with it (the paper's BadNets square is 28 px at
    224), and its inner 7x7 cells average to exactly its colour, so it stays a flat island at
    32 px, while the averaging leaves a natural frame's textures no flatter than a 32-px photo's."""
    side = max(h, w)
    return 1 if side <= ISLAND_MAX_SIDE else -(-side // ISLAND_POOL_SIDE)


def island_shapes(h: int, w: int, min_side=ISLAND_MIN_SIDE, max_area=ISLAND_MAX_AREA) -> list:
    """``[(rows, cols), ...]`` the rectangles the island statistic tries on ``h x w`` images:
    sides at least ``min_side`` and area at most ``max_area`` (both at 32 px, scaled with the size),
    each smaller than the image."""
    s = min(h, w) / 32.0
    lo, area = max(2, round(min_side * s)), round(max_area * s * s)
    return [(a, b) for a in range(lo, h) for b in range(lo, w) if a * b <= area]


def island_ring(h: int, w: int) -> list:
    """``[(dy, dx), ...]`` the one-pixel ring around an ``h x w`` rectangle, relative to its top-left
    pixel: the row above and below (corners included), then the column left and right."""
    return ([(-1, dx) for dx in range(-1, w + 1)] + [(h, dx) for dx in range(-1, w + 1)]
            + [(dy, -1) for dy in range(h)] + [(dy, w) for dy in range(h)])


def grid_settings() -> dict:
    """The grid statistic's constants, as the fit report and the screener sidecar record them."""
    return {"qualities": list(GRID_QUALITIES), "big": GRID_BIG, "tol": GRID_TOL, "floor": GRID_FLOOR,
            "clipped": GRID_CLIPPED}


def jpeg_tables(qualities=GRID_QUALITIES, base=JPEG_LUMA_TABLE) -> np.ndarray:
    """``(n, 8, 8)`` float32 quantisation steps of ``base`` at each quality in ``qualities[0]..[1]``,
    scaled as libjpeg's ``jpeg_quality_scaling`` does (steps at least 1)."""
    out = []
    for q in range(int(qualities[0]), int(qualities[1]) + 1):
        s = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
        out.append(np.maximum(np.floor((base * s + 50.0) / 100.0), 1.0))
    return np.stack(out).astype(np.float32)


@keras.saving.register_keras_serializable(package="tfbackdoor")
class BandAnomaly(SpectralAnomaly):
    """Codec-routed clean-spectrum anomaly over frequency bands, luma and chroma apart.

    Why (issue 11, round 6): one largest coefficient over the whole spectrum takes its threshold
    from the heaviest-tailed frequencies (edges, JPEG blocks, clipping near the top of the
    spectrum), so a trigger that stands out only among the mid frequencies (SIG's sinusoid) never
    passes it. Here the DCT coefficients go to YCbCr (JPEG's colour space: luma and chroma have
    their own statistics), are measured in units of the clean RMS per coefficient (``scale``, per
    branch as in :class:`SpectralAnomaly`), and each of 5 ``u + v`` bands (:func:`band_edges`) gives
    two statistics, the largest luma and the largest chroma value in it. Each of these 10 has its
    own threshold per branch; the image's ratio is the largest of the 10 statistic / threshold
    ratios (> 1 flagged). Explored on images the detector had recorded (never evaluation ones):
    SIG 91% at 0.5% of each clean set and benign variant, FTrojan, CTRL and Trojan-WM 100%.

    With ``grid=True`` (``fit(statistic="grid")``, issue 11 round 7) one more statistic joins the
    10: the *JPEG-grid* statistic (:meth:`grid_statistic`), evidence of a local edit made after JPEG
    decoding, with its own threshold per branch like the others.

    Weights (set by :func:`fit` with ``statistic="bands"`` or ``"grid"``): ``scale`` ``(2, H, W, 3)``
    (YCbCr RMS), ``thresholds`` ``(2, 2 * bands [+ 1])`` (luma bands, then chroma bands, then the
    grid statistic). Output ``(batch,)``.
    """

    def __init__(self, route_cut=ROUTE_CUT, near_zero=NEAR_ZERO, grid=False, island=False,
                 island_near_tol=ISLAND_NEAR_TOL, island_only=False, **kwargs):
        kwargs.pop("texture", None)
        super().__init__(route_cut, near_zero, texture=False, **kwargs)
        self.grid = bool(grid)       # False: models fitted before the grid statistic existed
        self.island = bool(island)   # False: models fitted before the island statistic existed
        # part of the config, so a saved detector keeps the rule its thresholds were fitted with
        self.island_near_tol = float(island_near_tol)
        # fitted with statistic="island-only": the other statistics' thresholds are UNUSED, so they
        # are not computed (0 in their columns; at 224 px they cost most of the layer's time)
        self.island_only = bool(island_only) and self.island

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("island") and "island_near_tol" not in config:
            config["island_near_tol"] = ISLAND_NEAR_TOL_ROUND8   # saved before the layer recorded it
        return cls(**config)

    def build(self, input_shape):
        h, w, c = int(input_shape[1]), int(input_shape[2]), int(input_shape[3])
        masks = band_masks(h, w)
        self.scale = self.add_weight(shape=(2, h, w, c), initializer="ones", trainable=False, name="scale")
        self.thresholds = self.add_weight(shape=(2, 2 * len(masks) + int(self.grid) + int(self.island)),
                                          initializer="ones", trainable=False, name="thresholds")
        self._masks = ops.convert_to_tensor(masks)
        self._ycbcr = ops.convert_to_tensor(YCBCR)
        self._build_constants(h, w, c)
        if self.grid:
            tables = jpeg_tables()
            self._tables = [ops.convert_to_tensor(t.reshape(1, 1, 8, 1, 8)) for t in tables]
            self._chance = [float(np.mean(np.minimum(1.0, 2.0 * GRID_TOL / np.delete(t.ravel(), 0)))) for t in tables]
            ac = np.ones((8, 8), np.float32)
            ac[0, 0] = 0.0
            self._ac = ops.convert_to_tensor(ac.reshape(1, 1, 8, 1, 8))
        if self.island:
            self._island = []     # per rectangle: its shape, ring offsets, which ring pixels are inside, median slot
            f = self._island_factor = island_factor(h, w)
            h, w = h // f, w // f    # the rectangles are searched on the downsampled image
            for rows, cols in island_shapes(h, w):
                ring = np.array(island_ring(rows, cols))
                ys = np.arange(h - rows + 1)[:, None, None] + ring[None, None, :, 0]
                xs = np.arange(w - cols + 1)[None, :, None] + ring[None, None, :, 1]
                inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)               # (P1, P2, R)
                slot = (inside.sum(-1) - 1) // 2                                    # the lower median
                self._island.append((rows, cols, tf.constant(ring, tf.int32), tf.constant(inside),
                                     tf.constant(slot.astype(np.int32))))
            # every rectangle position in order (rectangle by rectangle, row-major): top-left y, x and area
            self._island_pos = tf.constant(np.concatenate(
                [np.stack(np.meshgrid(np.arange(h - r + 1), np.arange(w - c + 1), [r * c], indexing="ij"),
                          -1).reshape(-1, 3) for r, c, *_ in self._island] or [np.zeros((0, 3))]).astype(np.int32))

    def grid_statistic(self, coeffs, pixels_and_blocks=None):
        """``(batch,)`` evidence of a local edit made after JPEG decoding (0 unless H and W are
        multiples of 8 with at least 2 blocks). ``pixels_and_blocks``: :meth:`_pixels_and_blocks`
        of ``coeffs`` if the caller has it already (:meth:`call` inverts the DCT once).

        Why (issue 11, round 7): a JPEG-decoded image's 8x8 block DCT coefficients (luma, on the
        JPEG grid) sit on the lattice of the encoder's quantisation steps, up to the decoder's
        rounding; any change made to the pixels afterwards (a patch, a pasted icon)
        moves the coefficients of the blocks it touches off that lattice. So, per image: the
        quality whose steps (:func:`jpeg_tables`) the coefficients fit best, counted over those
        large enough to show it (``|c| > GRID_BIG``, within ``GRID_TOL`` of a lattice point, minus
        the share a random value would fit by chance); then each block's RMS distance to that
        lattice (AC terms); the statistic is the largest block's over the mean of the quieter
        half (at least ``GRID_FLOOR``). Blocks with more than ``GRID_CLIPPED`` pixels at 0 or 255 in
        some channel are left out of the maximum: clipping (a brightened bright area) also moves a
        block off the lattice, and measured on 5,000 JPEG ``cifar10:train`` images brightened by 25
        levels, the blocks that reached the tail were mostly clipped (median 48 of 64 pixels),
        where a 4x4 patch clips 16. A global change (contrast, blur, resizing, another
        quantisation) moves every block alike and leaves the ratio low; an image that never was
        a JPEG has no lattice, and every block is as far from one.
        """
        n, h, w = ops.shape(coeffs)[0], int(coeffs.shape[1]), int(coeffs.shape[2])
        if not self._routable or (h // 8) * (w // 8) < 2:
            return ops.zeros((n,), coeffs.dtype)
        pix, blocks = pixels_and_blocks if pixels_and_blocks is not None else self._pixels_and_blocks(coeffs)
        c = ops.reshape(blocks, (-1, h // 8, 8, w // 8, 8))
        big = ops.cast(ops.abs(c) > GRID_BIG, c.dtype) * self._ac
        n_big = ops.maximum(ops.sum(big, axis=(1, 2, 3, 4)), 1.0)
        best, best_d2 = None, None
        for table, chance in zip(self._tables, self._chance):   # ~90 qualities; each keeps (n, H, W) only
            d = c - ops.round(c / table) * table
            fit = ops.sum(ops.cast(ops.abs(d) < GRID_TOL, c.dtype) * big, axis=(1, 2, 3, 4)) / n_big - chance
            if best is None:
                best, best_d2 = fit, ops.square(d)
            else:
                better = fit > best                      # ties keep the lower quality (coarser steps)
                best = ops.where(better, fit, best)
                best_d2 = ops.where(ops.reshape(better, (-1, 1, 1, 1, 1)), ops.square(d), best_d2)
        nb = (h // 8) * (w // 8)
        rms = ops.reshape(ops.sqrt(ops.sum(best_d2 * self._ac, axis=(2, 4)) / 63.0), (-1, nb))
        clip = ops.cast((ops.max(pix, axis=3) >= 254.5) | (ops.min(pix, axis=3) <= 0.5), c.dtype)
        clipped = ops.reshape(ops.sum(ops.reshape(clip, (-1, h // 8, 8, w // 8, 8)), axis=(2, 4)), (-1, nb))
        top = ops.max(ops.where(clipped > GRID_CLIPPED, 0.0, rms), axis=1)
        quiet = ops.mean(ops.sort(rms, axis=1)[:, :nb // 2], axis=1)
        return top / ops.maximum(quiet, GRID_FLOOR)

    def island_statistic(self, coeffs, pixels=None):
        """``(batch,)`` evidence of a pasted flat patch: the step around the most distinct *flat
        island* (0 without one). ``pixels``: the inverse DCT of ``coeffs`` (:meth:`_pixels`) if the
        caller has it already. Images larger than ``ISLAND_MAX_SIDE`` are searched after an
        area-downsampling by :func:`island_factor` (rounded to integers again).

        Why (issue 11, round 8): on lossless images a BadNets-style patch in a bright corner
        barely changes the spectrum, and the CNN misses most of those. But a natural photo, noisy
        and downsampled with an antialiasing filter, almost never holds a small rectangle of
        *exactly* one colour: explored on 2,000 recorded ``cifar10:lossless`` images, none had an
        island as defined here, nor did more than 0.25% of their brightened, darkened or
        contrast-raised versions, while a 3x3 or 4x4 white patch makes one in ~80% of them.
        An island is a rectangle (``island_shapes``: sides >= 3, area <= 25 at 32 px) whose pixels
        are all equal in every channel and whose one-pixel ring (``island_ring``, the part inside
        the image) holds no pixel of that colour, so it is the whole flat region. Its *step* is
        the lower median, over the ring, of the smallest channel difference to the island's
        colour (how much it stands out; a ring pixel that shares one channel, e.g. partly
        clipped, counts 0); it must exceed ``ISLAND_MIN_STEP``. Clipping makes flat regions too
        (a brightened highlight is all 255), but the clipped colour then appears elsewhere in the
        image: an island counts only when at most ``ISLAND_NEAR_MAX`` other pixels lie within
        ``ISLAND_NEAR_TOL`` levels of its colour in every channel (checked for the ``ISLAND_TOP``
        largest steps; ``island_near_tol``, a part of the layer's config). The default tolerance is
        4 levels (round 9; round 8 shipped 8, ``ISLAND_NEAR_TOL_ROUND8``, which configs saved
        without the key keep): a white patch in an image with bright, textured areas (many pixels
        5-8 levels below white) now counts too, while clipped highlights (pixels piled at exactly 0
        or 255) are still ruled out. On the recorded images above, with the CNN, BadNets 3x3
        84.7% -> 87.5% at 4 levels (0 levels: 88.8%, but then brightened, darkened and
        contrast-raised calibration images hold islands too; BENCHMARKS.md "Generality, round 9"). The
        statistic is the largest step of an island that counts.
        Pixels are the inverse DCT of ``coeffs``, rounded to 0..255.
        """
        n = ops.shape(coeffs)[0]
        if not self._island:
            return ops.zeros((n,), coeffs.dtype)
        # tf ops, not keras.ops, here: flat rectangles are rare (most clean images have none), so
        # the rings are gathered for those only (tf.where); measuring every position with
        # keras.ops costs ~50 ms per image.
        p = tf.clip_by_value(tf.round(self._pixels(coeffs) if pixels is None else pixels), 0.0, 255.0)
        f = self._island_factor
        h, w = int(coeffs.shape[1]) // f, int(coeffs.shape[2]) // f
        if f > 1:
            p = tf.round(tf.nn.avg_pool2d(p[:, :h * f, :w * f], f, f, "VALID"))
        total = int(self._island_pos.shape[0])
        # equal[(dy, dx)]: pixel (y + dy, x + dx) equals pixel (y, x) in every channel. A rectangle is
        # flat where all of its offsets are, built up row by row and column by column (stride-1
        # max and min pooling over each rectangle took ~8 ms per image here).
        equal, column, flat_at = {}, {}, {}

        def eq(dy, dx):
            if (dy, dx) not in equal:
                equal[dy, dx] = tf.reduce_all(tf.equal(p[:, dy:, dx:], p[:, :h - dy, :w - dx]), axis=-1)
            return equal[dy, dx]

        def col(rows, dx):       # (n, h - rows + 1, w - dx): offsets (0..rows-1, dx) all equal
            if (rows, dx) not in column:
                column[rows, dx] = eq(0, dx) if rows == 1 else \
                    tf.logical_and(col(rows - 1, dx)[:, :h - rows + 1], eq(rows - 1, dx))
            return column[rows, dx]

        def flat(rows, cols):    # (n, h - rows + 1, w - cols + 1): every offset of the rectangle equal
            if (rows, cols) not in flat_at:
                flat_at[rows, cols] = col(rows, 0) if cols == 1 else \
                    tf.logical_and(flat(rows, cols - 1)[:, :, :w - cols + 1], col(rows, cols - 1))
            return flat_at[rows, cols]

        images, where, steps = [], [], []
        base = 0
        for rows, cols, ring, inside, slot in self._island:
            p1, p2 = h - rows + 1, w - cols + 1
            at = tf.cast(tf.where(flat(rows, cols)), tf.int32)                      # (m, 3): image, y, x
            ys = at[:, 1:2] + ring[None, :, 0]
            xs = at[:, 2:3] + ring[None, :, 1]
            ok = tf.gather_nd(inside, at[:, 1:])                                    # (m, R)
            around = tf.gather_nd(p, tf.stack([tf.broadcast_to(at[:, :1], tf.shape(ys)),
                                               tf.clip_by_value(ys, 0, h - 1), tf.clip_by_value(xs, 0, w - 1)], -1))
            diff = tf.abs(around - tf.gather_nd(p, at)[:, None, :])                 # (m, R, 3)
            same = tf.reduce_any(tf.logical_and(tf.equal(tf.reduce_max(diff, -1), 0.0), ok), axis=-1)
            dmin = tf.sort(tf.where(ok, tf.reduce_min(diff, -1), 1.0e9), axis=-1)
            step = tf.gather(dmin, tf.gather_nd(slot, at[:, 1:]), batch_dims=1)
            keep = tf.logical_and(tf.logical_not(same), step > ISLAND_MIN_STEP)   # it stands out of its ring
            images.append(tf.boolean_mask(at[:, 0], keep))
            where.append(tf.boolean_mask(base + at[:, 1] * p2 + at[:, 2], keep))
            steps.append(tf.boolean_mask(step, keep))
            base += p1 * p2
        values = tf.scatter_nd(tf.stack([tf.concat(images, 0), tf.concat(where, 0)], -1), tf.concat(steps, 0),
                               tf.stack([tf.shape(p)[0], total]))                  # (n, rectangles)
        best, idx = tf.math.top_k(values, min(ISLAND_TOP, total))                   # ties: lower index first
        pos = tf.gather(self._island_pos, idx)                                      # (n, k, 3): y, x, area
        colour = tf.gather_nd(p, tf.stack([tf.broadcast_to(tf.range(tf.shape(p)[0])[:, None], tf.shape(idx)),
                                           pos[..., 0], pos[..., 1]], -1))          # (n, k, 3)
        alike = tf.reduce_max(tf.abs(p[:, None] - colour[:, :, None, None, :]), axis=-1) <= self.island_near_tol
        near = tf.reduce_sum(tf.cast(alike, tf.int32), axis=(2, 3)) - pos[..., 2]
        return tf.reduce_max(tf.where(tf.logical_and(best > 0.0, near <= ISLAND_NEAR_MAX), best, 0.0), axis=1)

    def band_statistics(self, coeffs, branch, pixels_and_blocks=None):
        """``(batch, 2 * bands [+ 1] [+ 1])``: the largest luma, then chroma, ``|X_ycbcr| / scale`` of
        each band (then, with ``grid``, :meth:`grid_statistic`; with ``island``,
        :meth:`island_statistic`). ``pixels_and_blocks``: :meth:`_pixels_and_blocks` of ``coeffs``
        (routable sizes), shared by both statistics; computed here if they need it and it is None."""
        if self.island_only:
            zeros = ops.zeros((ops.shape(coeffs)[0], int(self._masks.shape[0])), coeffs.dtype)
            parts = [zeros, zeros] + ([ops.reshape(zeros[:, 0], (-1, 1))] if self.grid else [])
            pixels = pixels_and_blocks[0] if pixels_and_blocks is not None else None
            return ops.concatenate(parts + [ops.reshape(self.island_statistic(coeffs, pixels), (-1, 1))], axis=1)
        z = ops.abs(ops.einsum("nuvc,dc->nuvd", coeffs, self._ycbcr)) / self._branch_scale(branch)
        zb = z[:, None] * self._masks[None, :, :, :, None]            # (n, bands, H, W, 3)
        luma = ops.max(zb[..., 0], axis=(2, 3))
        chroma = ops.max(zb[..., 1:], axis=(2, 3, 4))
        if pixels_and_blocks is None and self._routable and (self.grid or self.island):
            pixels_and_blocks = self._pixels_and_blocks(coeffs)
        pixels = pixels_and_blocks[0] if pixels_and_blocks is not None else None
        parts = [luma, chroma]
        if self.grid:
            parts.append(ops.reshape(self.grid_statistic(coeffs, pixels_and_blocks), (-1, 1)))
        if self.island:
            parts.append(ops.reshape(self.island_statistic(coeffs, pixels), (-1, 1)))
        return ops.concatenate(parts, axis=1)

    def call(self, coeffs):
        # one inverse DCT (and one block DCT) per call, shared by the router and both statistics
        both = self._pixels_and_blocks(coeffs) if self._routable else None
        branch = self.route(coeffs, None if both is None else both[1])
        thr = self._pick(self.thresholds, ops.reshape(branch, (-1, 1)))
        return ops.max(self.band_statistics(coeffs, branch, both) / thr, axis=1)

    def get_config(self):
        config = super().get_config()
        config.pop("texture", None)
        config["grid"] = self.grid
        config["island"] = self.island
        config["island_near_tol"] = self.island_near_tol
        config["island_only"] = self.island_only
        return config


@keras.saving.register_keras_serializable(package="tfbackdoor")
class CombineScores(keras.layers.Layer):
    """Flag when the CNN flags or the anomaly ratio exceeds 1, as one softmax ``(batch, 2)``.

    ``p = max(p_cnn, t * a^k / (t * a^k + 1 - t))``: the spectral term equals the detector's
    threshold ``t`` exactly at ratio ``a = 1``, so ``p > t`` iff ``p_cnn > t`` or ``a > 1``, and it
    grows smoothly with ``a`` (``k`` sets how fast) so that equal-FPR analyses still rank images.
    ``k = 32`` keeps the spectral term far below the CNN's clean scores until ``a`` nears 1
    (``a = 0.8`` gives ``p ~ 0.006`` at ``t = 0.89``); with ``k = 4`` it was 0.77 there, and clean
    images with ``a ~ 0.8`` crowded the CNN's ranking (BDR at 1% FPR fell by up to 10 points).
    Computed as ``sigmoid(logit(t) + k log a)``: the same value, without overflow for large ``a``.

    Inputs: ``[probs (batch, 2), ratio (batch,)]``. Output ``(batch, 2)``.
    """

    def __init__(self, threshold=0.5, sharpness=32.0, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.sharpness = float(sharpness)

    def call(self, inputs):
        probs, ratio = inputs
        t = min(max(self.threshold, 1e-6), 1.0 - 1e-6)
        logit = float(np.log(t / (1.0 - t))) + self.sharpness * ops.log(ops.maximum(ratio, 1e-6))
        p_spec = ops.sigmoid(logit)
        p = ops.maximum(probs[:, 1], ops.cast(p_spec, probs.dtype))
        return ops.stack([1.0 - p, p], axis=1)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        config = super().get_config()
        config.update({"threshold": self.threshold, "sharpness": self.sharpness})
        return config


def _spec(model) -> models.DetectorSpec:
    for layer in model.layers:
        if isinstance(layer, models.DetectorSpec):
            return layer
    raise TfbdError(f"model '{model.name}' is not a tfbackdoor detector (no DetectorSpec layer)")


def _cnn_probs(model):
    """The CNN's softmax tensor of a detector (before any earlier CombineScores and the spec)."""
    for layer in model.layers:
        if isinstance(layer, CombineScores):
            return layer.input[0]
    return _spec(model).input


def strip(model):
    """The detector without its spectral part (the CNN alone, same spec and info minus ``spectral``);
    ``model`` itself when it has none."""
    if not has_spectral(model):
        return model
    spec = _spec(model)
    info = {k: v for k, v in spec.info.items() if k != "spectral"}
    out = models.DetectorSpec(spec.domain, spec.arch, spec.image_size, spec.threshold, info,
                              name="detector_spec")(_cnn_probs(model))
    return keras.Model(model.input, out, name=model.name)


def has_spectral(model) -> bool:
    return any(isinstance(layer, SpectralAnomaly) for layer in model.layers)


def _variant_sets(xs, variants):
    names = list(perturb.BENIGN_VARIANTS) if variants is None else list(variants)
    out = []
    for x in xs:
        out.append(x)
        for name in names:
            out.append(perturb.BENIGN_VARIANTS[name](x).numpy())
    return out


def _coeffs(x, batch=2048):
    return np.concatenate([frequency.dct2d(x[i:i + batch]).numpy() for i in range(0, len(x), batch)]) \
        if len(x) else np.zeros((0,) + x.shape[1:], np.float32)


def _branch_stats(layer, x, statistics=None):
    """``(branch, *statistics)`` numpy arrays of uint8 images ``x`` under ``layer``: its branch per
    image and what ``statistics(coeffs, branch)`` returns (a tuple; default ``layer.statistics``:
    max-z and texture, ``(N,)`` each), 2,048 images at a time."""
    statistics = statistics or layer.statistics
    out = None
    for i in range(0, len(x), 2048):
        c = ops.convert_to_tensor(_coeffs(x[i:i + 2048]))
        br = layer.route(c)
        values = (br,) + tuple(statistics(c, br))
        out = [[] for _ in values] if out is None else out
        for k, v in enumerate(values):
            out[k].append(ops.convert_to_numpy(v))
    br, *rest = (np.concatenate(v) for v in out)
    return (br.astype(int), *rest)


def _worst_quantile(cal_stats, values, q):
    """``(2,)`` float64: per branch, the highest ``q`` quantile over the calibration sets of
    ``values(set)`` (one value per image), the images of the other branch counted as 0.
    ``cal_stats``: one :func:`_branch_stats` tuple per set (branch first)."""
    return np.array([max(float(np.quantile(np.where(st[0] == b, values(st), 0.0), q)) for st in cal_stats)
                     for b in (0, 1)])


def _branch_mean_squares(layer, fit_sets, transform=None):
    """``(mean_sq (2, H, W, C) float64, count (2,), pooled)``: the mean square of every DCT
    coefficient (after ``transform``, a ``(C, C)`` channel matrix) of the images ``layer`` routes to
    each branch; with fewer than 50 images of one kind (``pooled``) both rows are all images'."""
    sq, count = None, np.zeros(2)
    for x in fit_sets:
        c = _coeffs(x)
        br = ops.convert_to_numpy(layer.route(ops.convert_to_tensor(c))).astype(int)
        c = (c if transform is None else np.einsum("nuvc,dc->nuvd", c, transform)).astype(np.float64)
        sq = np.zeros((2,) + c.shape[1:], np.float64) if sq is None else sq
        for b in (0, 1):
            sq[b] += np.sum(c[br == b] ** 2, axis=0)
            count[b] += int(np.sum(br == b))
    pooled = count.min() < 50    # too few images of one kind: both branches share the statistics
    if pooled:
        mean = sq.sum(0) / max(count.sum(), 1)
        return np.stack([mean, mean]), count, pooled
    return sq / count[:, None, None, None], count, pooled


def _fit_bands(layer, fit_sets, cal_sets, target_fpr):
    """Set a built :class:`BandAnomaly`'s ``scale`` and ``thresholds`` (see :func:`fit`); returns
    ``(count (2,), routed (2,), thresholds (2, k))``. With ``layer.island_only`` the island statistic
    (the last) takes the whole FPR budget and every other statistic gets the threshold ``UNUSED``."""
    mean_sq, count, _ = _branch_mean_squares(layer, fit_sets, YCBCR)
    layer.scale.assign((np.sqrt(mean_sq) + 1e-3).astype(np.float32))

    band_stats = lambda c, br: (layer.band_statistics(c, br),)
    cal = [_branch_stats(layer, x, band_stats) for x in cal_sets]
    routed = sum(np.bincount(br, minlength=2) for br, _ in cal)
    k = cal[0][1].shape[1]
    used = [k - 1] if layer.island_only else list(range(k))
    q_each = 1.0 - target_fpr / 100.0 / len(used)   # Bonferroni start: each statistic its share of the budget
    q = 1.0 - target_fpr / 100.0
    thr = np.stack([np.maximum(_worst_quantile(cal, lambda st: st[1][:, j], q_each), 1e-3) if j in used
                    else np.full(2, UNUSED) for j in range(k)], axis=1).astype(np.float32)
    # then one factor per branch so that "any statistic passes" flags q of the worst set
    factor = _worst_quantile(cal, lambda st: np.max(st[1][:, used] / thr[st[0]][:, used], axis=1), q)
    for b in (0, 1):
        if factor[b] > 0:
            thr[b, used] *= float(factor[b])
    layer.thresholds.assign(thr)
    return count, routed, thr


def check_statistic(statistic, island_near_tol=None) -> float:
    """Refuse an unknown ``statistic``, or an ``island_near_tol`` given for any statistic but
    ``"island"`` or outside 0..255; return the island tolerance to use (``ISLAND_NEAR_TOL`` if None).
    Every image size is served (above ``ISLAND_MAX_SIDE`` the island statistic downsamples:
    :func:`island_factor`)."""
    if statistic not in STATISTICS:
        raise TfbdError(f"unknown spectral statistic '{statistic}' ({', '.join(STATISTICS)})")
    if island_near_tol is None:
        return ISLAND_NEAR_TOL
    if statistic not in ("island", "island-only"):
        raise TfbdError(f"the island tolerance (--island-tolerance) is only for the island statistic "
                        f"(got statistic '{statistic}')")
    tol = float(island_near_tol)
    if not 0.0 <= tol <= 255.0:
        raise TfbdError(f"the island tolerance must be 0..255 levels (got {island_near_tol})")
    return tol


def fit(model, x_fit, x_cal, target_fpr=0.5, variants=None, texture=None, statistic=None, island_near_tol=None):
    """A copy of detector ``model`` with a fitted :class:`SpectralAnomaly` beside its CNN.

    ``x_fit``: uint8 clean images (an array or a list, one per source) whose RMS spectra, as is
    and after every benign variant, become the two branches' statistics (and, with ``texture``,
    their median ``|X| / scale``: the texture reference). ``x_cal``: other clean images (array or
    list per source), never in ``x_fit``; each branch's threshold is the highest
    ``1 - target_fpr/100`` quantile over every (source, variant) set of ``x_cal``, counting the
    images routed to the other branch as unflagged, so the spectral part flags at most about
    ``target_fpr`` percent of each set. With ``texture`` both statistics get such a threshold, then
    both are raised by the factor that brings "either passes" back to that quantile.
    ``statistic``: ``"max"`` (max-z alone), ``"texture"`` (max-z and the texture statistic) or
    ``"bands"`` (:class:`BandAnomaly`: per band, luma and chroma, each threshold first at a
    ``k``-th of the budget, then all of a branch scaled together so that "any passes" flags
    ``target_fpr`` percent of the worst set) or ``"grid"`` (the bands and the JPEG-grid statistic,
    :meth:`BandAnomaly.grid_statistic`, fitted the same way) or ``"island"`` (and the island
    statistic, :meth:`BandAnomaly.island_statistic`; ``island_near_tol``, its colour tolerance,
    default ``ISLAND_NEAR_TOL``) or ``"island-only"`` (the same layer, but the island statistic
    alone is calibrated and the others get the threshold ``UNUSED``: for 224-px camera frames,
    where the bands' thresholds from a few hundred photos flag more clean frames than they
    catch triggers, and the edge screener then skips their cost, issue 13 round 4). Default ``"bands"``; without ``statistic``, ``texture=True`` /
    ``False`` picks ``"texture"`` / ``"max"``. Returns ``(model, report)``.
    """
    if statistic is None:
        statistic = "bands" if texture is None else ("texture" if texture else "max")
    tol = check_statistic(statistic, island_near_tol)
    texture = statistic == "texture"
    spec = _spec(model)
    if spec.domain != "dct":
        raise TfbdError(f"the spectral anomaly model needs a DCT-domain detector (this one is '{spec.domain}')")
    x_fit = [x_fit] if isinstance(x_fit, np.ndarray) else list(x_fit)
    x_cal = [x_cal] if isinstance(x_cal, np.ndarray) else list(x_cal)
    if not sum(len(x) for x in x_fit) or not sum(len(x) for x in x_cal):
        raise TfbdError("fitting the spectral model needs fit and calibration images (got none)")
    size = spec.image_size
    if statistic in ("bands", "grid", "island", "island-only"):
        layer = BandAnomaly(grid=statistic != "bands", island=statistic.startswith("island"),
                            island_near_tol=tol, island_only=statistic == "island-only", name="spectral_anomaly")
        layer.build((None, size, size, 3))
        count, routed, thr = _fit_bands(layer, _variant_sets(x_fit, variants), _variant_sets(x_cal, variants),
                                        target_fpr)
        extra = {"statistic": statistic, "bands": [list(e) for e in band_edges(size, size)],
                 "thresholds": [[round(float(t), 4) for t in row] for row in thr]}
        if layer.grid:
            extra["grid"] = grid_settings()
        if layer.island:
            extra["island"] = island_settings(layer.island_near_tol)
        return _assemble(model, spec, layer, x_fit, x_cal, target_fpr, count, routed, extra)
    layer = SpectralAnomaly(texture=texture, name="spectral_anomaly")
    layer.build((None, size, size, 3))

    fit_sets = _variant_sets(x_fit, variants)
    mean_sq, count, pooled_stats = _branch_mean_squares(layer, fit_sets)
    layer.scale.assign(np.sqrt(mean_sq).astype(np.float32) + 1e-3)

    if texture:   # the clean images' median |X| / scale per branch (the median over images of each one's)
        fit_stats = [_branch_stats(layer, x) for x in fit_sets]
        br = np.concatenate([f[0] for f in fit_stats])
        med = np.concatenate([f[2] for f in fit_stats])
        ref = [float(np.median(med if pooled_stats or not np.any(br == b) else med[br == b])) for b in (0, 1)]
        layer.texture_ref.assign(np.maximum(np.array(ref, np.float32), 1e-6))

    q = 1.0 - target_fpr / 100.0
    cal_stats = [_branch_stats(layer, x) for x in _variant_sets(x_cal, variants)]
    routed = sum(np.bincount(st[0], minlength=2) for st in cal_stats)

    def per_branch_threshold(values):
        """``(2,)`` float32 :func:`_worst_quantile` at ``q``, at least 1e-3."""
        return np.maximum(_worst_quantile(cal_stats, values, q), 1e-3).astype(np.float32)

    thresholds = per_branch_threshold(lambda st: st[1])
    report_extra = {}
    if texture:
        ref = ops.convert_to_numpy(layer.texture_ref)
        level = lambda st: np.maximum(st[2] / ref[st[0]], 1.0)
        tex = per_branch_threshold(lambda st: st[1] / level(st))
        either = lambda st: np.maximum(st[1] / thresholds[st[0]], st[1] / level(st) / tex[st[0]])
        factor = np.maximum(per_branch_threshold(either), 1.0)   # >= 1: each part alone reaches q
        thresholds, tex = thresholds * factor, tex * factor
        layer.texture_thresholds.assign(tex.astype(np.float32))
        report_extra = {"texture_ref": [round(float(v), 5) for v in ref],
                        "texture_thresholds": [round(float(t), 4) for t in tex]}
    layer.thresholds.assign(thresholds.astype(np.float32))

    extra = {"statistic": statistic, "thresholds": [round(float(t), 4) for t in thresholds], **report_extra}
    return _assemble(model, spec, layer, x_fit, x_cal, target_fpr, count, routed, extra)


def _assemble(model, spec, layer, x_fit, x_cal, target_fpr, count, routed, extra):
    """The detector with ``layer`` beside its CNN (:class:`CombineScores`) and its report."""
    probs = _cnn_probs(model)
    ratio = layer(model.input)
    combined = CombineScores(spec.threshold, name="combine_scores")([probs, ratio])
    info = {k: v for k, v in spec.info.items() if k != "spectral"}
    report = {"target_fpr": target_fpr, "fit_images": int(sum(len(x) for x in x_fit)),
              "calibration_images": int(sum(len(x) for x in x_cal)),
              "routed_jpeg_share_fit": round(float(count[1] / max(count.sum(), 1)), 4),
              "routed_jpeg_share_calibration": round(float(routed[1] / max(routed.sum(), 1)), 4), **extra}
    info["spectral"] = report
    out = models.DetectorSpec(spec.domain, spec.arch, spec.image_size, spec.threshold, info, name="detector_spec")(combined)
    return keras.Model(model.input, out, name=model.name), report
