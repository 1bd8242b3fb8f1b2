#!/usr/bin/env python3
"""Standalone LiteRT screener for backdoor-triggered images.

Runs a tfbackdoor screener model (``.tflite``) on images, folders, video
files or a camera and prints one JSON line per image or frame.  It needs only
numpy, Pillow and ``ai-edge-litert`` (or the older ``tflite-runtime``);
OpenCV (``opencv-python-headless``: ``pip install 'tfbackdoor[video]'``) is
needed only for video and camera input.  TensorFlow is never imported, and nothing from ``tfbackdoor`` is.

Why one long file: a device gets this screener by copying ``screen.py`` beside its ``.tflite``
and sidecar (edge/README.md); splitting it into modules would make that a package install. The
screener contract (sidecar fields, the verdict rule, the spectral part) is defined here and
imported by the exporter, so both sides read the same definition.

Model contract (what the tfbackdoor exporter writes):

* exactly one input: ``[1, H, W, 3]`` raw RGB pixels, dtype uint8 (fed as
  0..255) or int8 (quantized with the tensor's scale / zero point; scale 1 and
  zero point -128 means ``p - 128``);
* exactly one output: ``[1, 1]`` = P(poisoned), or ``[1, 2]`` = softmax
  ``[clean, poisoned]`` (column 1 is used); float, or int8/uint8 dequantized
  with the tensor's scale / zero point;
* a sidecar ``<model>.json`` (``model.json`` or ``model.tflite.json``) beside
  the model with ``{"threshold": t, "image_size": [H, W], "sha256": hex}``
  (the exporter writes it): without one, ``--threshold`` must be given; a
  ``sha256`` that does not match the model file is refused;
* the verdict: ``"poisoned"`` when ``score > threshold`` (strictly above),
  else ``"clean"`` -- :func:`is_flagged`;
* optionally a sidecar ``"spectral"`` entry (a detector with a clean-spectrum
  anomaly part, ``tfbackdoor.spectral``): the ``.tflite`` is then the CNN
  only, and this file recomputes the anomaly ratio in numpy
  (:class:`SpectralPart`) and combines it with the CNN's P(poisoned) as the
  detector does; the combined value is the score.

This file is where that contract is defined (section "The screener
contract"): ``tfbackdoor.export`` writes sidecars with :func:`make_sidecar`
and ``tfbackdoor.metrics`` counts flags with :func:`is_flagged`, so the
exporter, the library's metrics and this screener cannot drift apart, while
this file still runs alone (copied to a device without ``tfbackdoor``).

Images whose header declares more than ``$TFBD_MAX_PIXELS`` pixels (default
40 million) are reported and skipped without being decoded (decompression
bombs).

Command line (see ``--help`` and ``edge/README.md``)::

    python edge/screen.py [--model PATH] [--threshold T] [--every N]
        [--camera IDX] [--max-frames N] [--resize stretch|crop]
        [--out FILE.csv|FILE.jsonl] [--summary-only] SOURCES...

Library use (repository root on ``sys.path``)::

    from edge.screen import Screener, iter_sources, run
    screener = Screener("saved_models/screener_cifar10_int8.tflite")
    p = screener.score(rgb_uint8_hxwx3)
    summary = run(screener, iter_sources(["photos/"]))
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, NoReturn, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

PROG = "screen"
#: The pip extra that installs the video/camera decoder (OpenCV) beside tfbackdoor.
VIDEO_EXTRA = "tfbackdoor[video]"
DEFAULT_MODEL_NAME = "screener_cifar10_int8.tflite"
DEFAULT_MAX_PIXELS = 40_000_000
RESIZE_MODES = ("crop", "stretch")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})

#: What :func:`iter_sources` yields: a source name and either an RGB uint8
#: ``H x W x 3`` array or the exception that made the item unreadable.
Item = Tuple[str, Union[np.ndarray, Exception]]


class ModelError(Exception):
    """The model file is missing, unloadable, or not a tfbackdoor screener.

    The message is one line that starts with the offending file's path.
    """


class UnreadableInput(Exception):
    """An image, video or camera that cannot be read (reported and skipped)."""


def max_pixels() -> int:
    """Largest width x height (from an image's header) that is decoded:
    ``$TFBD_MAX_PIXELS`` or 40 million.  Raises ValueError for a bad value."""
    text = os.environ.get("TFBD_MAX_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise ValueError(f"TFBD_MAX_PIXELS must be a positive pixel count, got {text!r}")
    return value


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def one_line(exc: BaseException) -> str:
    """Return ``exc``'s message collapsed to a single line (its type name if empty)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------
# The screener contract (tfbackdoor's exporter and metrics import these)
# --------------------------------------------------------------------------

#: Sidecar fields this screener reads; the exporter writes them (and more, for
#: people: ``quantize``, ``source``, ``calibration``...), and nothing else is needed.
SIDECAR_FIELDS = ("threshold", "image_size", "sha256")
#: Optional sidecar fields this screener also reads: ``spectral`` (:func:`make_spectral_entry`).
OPTIONAL_SIDECAR_FIELDS = ("spectral",)
#: The model's input and output, as the sidecar's ``input`` / ``output`` fields say.
INPUT_DESCRIPTION = "uint8 [1, H, W, 3] RGB 0..255"
OUTPUT_DESCRIPTION = "P(poisoned) float32 [1, 1]"


def is_flagged(score: Any, threshold: float) -> Any:
    """The verdict rule: flagged (``"poisoned"``) when ``score > threshold``.

    Strictly above: a threshold is calibrated as a quantile of clean scores (the
    ``1 - FPR`` quantile, ``tfbackdoor.detector.calibrate_threshold``), so a score
    equal to it counts as clean and at most that share of the clean set is flagged.
    One definition for this screener and tfbackdoor's metrics, scans and defence;
    ``score`` may be a number (-> bool) or a numpy array (-> boolean array).
    """
    return np.greater(score, threshold)


def sidecar_candidates(model_path: Path) -> Tuple[Path, Path]:
    """Where a model's sidecar JSON is looked for, in order: ``<stem>.json`` (what the
    exporter writes), then ``<name>.json`` (``m.json``, then ``m.tflite.json``)."""
    model_path = Path(model_path)
    return model_path.with_suffix(".json"), model_path.with_name(model_path.name + ".json")


def make_sidecar(threshold: float, image_size: Sequence[int], sha256: str, **extra: Any) -> Dict[str, Any]:
    """The sidecar JSON object of a screener model: the fields :func:`read_sidecar`
    checks (:data:`SIDECAR_FIELDS`), then ``extra`` (descriptive fields), then the
    input and output descriptions."""
    side: Dict[str, Any] = {"threshold": float(threshold), "image_size": [int(v) for v in image_size],
                            "sha256": str(sha256)}
    side.update(extra)
    side.update({"input": INPUT_DESCRIPTION, "output": OUTPUT_DESCRIPTION})
    return side


# --------------------------------------------------------------------------
# The spectral part (a detector's clean-spectrum anomaly model, in numpy)
# --------------------------------------------------------------------------
#
# A tfbackdoor detector may hold, beside its CNN, a clean-spectrum anomaly part
# (``tfbackdoor.spectral.SpectralAnomaly`` + ``CombineScores``, Keras layers on the
# detector's DCT input). The exported ``.tflite`` is the CNN only; the sidecar's
# ``"spectral"`` entry carries that part's weights, and the code below recomputes it.
# It is hand-written numpy, a line-for-line twin of ``SpectralAnomaly.call`` and
# ``CombineScores.call``, because the device has no TensorFlow (and nothing from
# tfbackdoor): the DCT basis is built here, the JPEG router works on the pixels
# directly (the layer inverts the DCT it is given; same values), and everything runs
# in float64 (the layer: float32; ratios agree to ~1e-6 relative). tfbackdoor's tests
# check it against the Keras layers (tests/test_export.py).

SPECTRAL_VERSION = 2      # 2: the texture statistic (``texture_ref``, ``texture_thresholds``); 1: max-z only
BANDS_VERSION = 3         # 3: the band statistic (``bands``, ``ycbcr``, ``thresholds`` [2, 2 x bands])
GRID_VERSION = 4          # 4: the bands and the JPEG-grid statistic (``grid``, ``thresholds`` [2, 2 x bands + 1])
ISLAND_VERSION = 5        # 5: and the island statistic (``island``, ``thresholds`` [2, 2 x bands + 2])
SPECTRAL_VERSIONS = (1, 2, 3, 4, 5)
GRID_KEYS = ("tables", "big", "tol", "floor", "clipped")
ISLAND_KEYS = ("min_side", "max_area", "min_step", "near_tol", "near_max", "top")
UNUSED = 1.0e30           # the threshold of a statistic left out of the fit (``tfbackdoor.spectral.UNUSED``): skipped
ISLAND_MAX_SIDE = 64      # larger images are area-downsampled first (``tfbackdoor.spectral.island_factor``)
ISLAND_POOL_SIDE = 32     # by the smallest integer factor that brings the longer side to this or below


def island_factor(h: int, w: int) -> int:
    """As ``tfbackdoor.spectral.island_factor``: 1 up to 64 px, else ceil(longer side / 32)."""
    side = max(h, w)
    return 1 if side <= ISLAND_MAX_SIDE else -(-side // ISLAND_POOL_SIDE)


def dct_matrix(n: int) -> np.ndarray:
    """The ``(n, n)`` orthonormal DCT-II matrix ``D`` (``dct(x) = D @ x``), float64
    (the same as ``tfbackdoor.frequency.dct_matrix``)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def encode_float32(array: Any) -> Dict[str, Any]:
    """``{"dtype": "float32", "shape": [...], "base64": ...}``: little-endian float32 bytes."""
    a = np.ascontiguousarray(np.asarray(array, dtype="<f4"))
    return {"dtype": "float32", "shape": [int(v) for v in a.shape],
            "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_float32(obj: Any) -> np.ndarray:
    """The array of :func:`encode_float32`; ValueError if malformed."""
    if not isinstance(obj, dict) or obj.get("dtype") != "float32" or not isinstance(obj.get("shape"), list):
        raise ValueError("expected {dtype: float32, shape: [...], base64: ...}")
    shape = tuple(int(v) for v in obj["shape"])
    try:
        raw = base64.b64decode(str(obj.get("base64", "")), validate=True)
    except ValueError:
        raise ValueError("invalid base64") from None
    if len(raw) != 4 * int(np.prod(shape)):
        raise ValueError(f"{len(raw)} bytes do not hold float32 {list(shape)}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def make_spectral_entry(scale: Any, thresholds: Any, route_cut: float, near_zero: float, hf_min: int,
                        threshold: float, sharpness: float, texture_ref: Any = None,
                        texture_thresholds: Any = None) -> Dict[str, Any]:
    """The sidecar's ``"spectral"`` entry: the weights of ``SpectralAnomaly`` (``scale``
    ``(2, H, W, 3)``, ``thresholds`` ``(2,)``; row 0 lossless-like, row 1 JPEG-like; with its
    texture statistic also ``texture_ref`` and ``texture_thresholds``, ``(2,)`` each, and version
    2), its router constants (``route_cut``, ``near_zero``, ``hf_min``) and ``CombineScores``'
    ``threshold`` and ``sharpness``."""
    pair = lambda v: [float(x) for x in np.asarray(v, np.float32).reshape(-1)]
    entry = {"version": 1, "scale": encode_float32(scale), "thresholds": pair(thresholds),
             "route_cut": float(route_cut), "near_zero": float(near_zero), "hf_min": int(hf_min),
             "threshold": float(threshold), "sharpness": float(sharpness)}
    if texture_ref is not None:
        entry.update({"version": SPECTRAL_VERSION, "texture_ref": pair(texture_ref),
                      "texture_thresholds": pair(texture_thresholds)})
    return entry


def make_band_entry(scale: Any, thresholds: Any, bands: Sequence[Sequence[int]], ycbcr: Any, route_cut: float,
                    near_zero: float, hf_min: int, threshold: float, sharpness: float,
                    grid: Optional[Dict[str, Any]] = None, island: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The sidecar's ``"spectral"`` entry of ``BandAnomaly`` (version 3): ``scale`` ``(2, H, W, 3)``
    (YCbCr RMS), ``thresholds`` ``(2, 2 x bands)`` (luma bands, then chroma bands; row 0
    lossless-like, row 1 JPEG-like), the ``u + v`` ``bands`` and the ``ycbcr`` 3x3 matrix, plus the
    router constants and ``CombineScores``' ``threshold`` and ``sharpness``. With the JPEG-grid
    statistic (version 4) ``grid`` holds its quantisation ``tables`` ``(qualities, 8, 8)`` and its
    constants ``big``, ``tol``, ``floor``, ``clipped``, and ``thresholds`` has one more column; with
    the island statistic as well (version 5), ``island`` holds its constants (``ISLAND_KEYS``) and
    ``thresholds`` has one more column again."""
    entry = {"version": BANDS_VERSION, "statistic": "bands", "scale": encode_float32(scale),
             "thresholds": [[float(v) for v in row] for row in np.asarray(thresholds, np.float32)],
             "bands": [[int(lo), int(hi)] for lo, hi in bands],
             "ycbcr": [[float(v) for v in row] for row in np.asarray(ycbcr, np.float32)],
             "route_cut": float(route_cut), "near_zero": float(near_zero), "hf_min": int(hf_min),
             "threshold": float(threshold), "sharpness": float(sharpness)}
    if grid is not None:
        entry.update({"version": GRID_VERSION, "statistic": "grid",
                      "grid": {"tables": np.asarray(grid["tables"], np.float32).astype(int).tolist(),
                               **{k: float(grid[k]) for k in GRID_KEYS[1:]}}})
    if island is not None:
        if grid is None:
            raise ValueError("the island statistic comes with the grid statistic (version 5 holds both)")
        entry.update({"version": ISLAND_VERSION, "statistic": "island",
                      "island": {k: float(island[k]) for k in ISLAND_KEYS}})
    return entry


class SpectralPart:
    """A detector's spectral anomaly part from a sidecar ``"spectral"`` entry.

    :meth:`ratio` is ``SpectralAnomaly`` (> 1: anomalous), :meth:`combine` is ``CombineScores``.
    Raises ValueError for a malformed entry or one whose ``scale`` is not ``(2, H, W, 3)``.
    """

    def __init__(self, entry: Any, image_size: Optional[Sequence[int]] = None) -> None:
        if not isinstance(entry, dict):
            raise ValueError("must be an object")
        version = entry.get("version", 1)
        if version not in SPECTRAL_VERSIONS:
            raise ValueError(f"version {version!r} is not one of {list(SPECTRAL_VERSIONS)} (a newer screen.py is needed)")
        texture_keys = ("texture_ref", "texture_thresholds") if version == 2 else ()
        band_keys = ("bands", "ycbcr") + (("grid",) if version >= GRID_VERSION else ()) \
            + (("island",) if version == ISLAND_VERSION else ()) if version >= BANDS_VERSION else ()
        missing = [k for k in ("scale", "thresholds", "route_cut", "near_zero", "hf_min", "threshold", "sharpness")
                   + texture_keys + band_keys if k not in entry]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        try:
            scale = decode_float32(entry["scale"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"scale: {one_line(exc)}") from None
        if scale.ndim != 4 or scale.shape[0] != 2 or scale.shape[3] != 3:
            raise ValueError(f"scale shape {list(scale.shape)}, expected [2, H, W, 3]")
        if image_size is not None and tuple(scale.shape[1:3]) != tuple(image_size):
            raise ValueError(f"scale is for {list(scale.shape[1:3])} images, the model's input is {list(image_size)}")
        self.bands = self.ycbcr = None
        if band_keys:
            try:
                self.bands = [(int(lo), int(hi)) for lo, hi in entry["bands"]]
                self.ycbcr = np.asarray(entry["ycbcr"], np.float64)
                thresholds = np.asarray(entry["thresholds"], np.float64)
            except (TypeError, ValueError):
                raise ValueError("bands, ycbcr and thresholds must be lists of numbers") from None
            columns = 2 * len(self.bands) + int(version >= GRID_VERSION) + int(version == ISLAND_VERSION)
            if self.ycbcr.shape != (3, 3) or thresholds.shape != (2, columns) or not self.bands:
                raise ValueError(f"thresholds {list(thresholds.shape)} for {len(self.bands)} bands "
                                 f"(expected [2, {columns}]) or ycbcr not 3x3")
        else:
            thresholds = np.asarray(entry["thresholds"], np.float64)
        numbers = [entry[k] for k in ("route_cut", "near_zero", "hf_min", "threshold", "sharpness")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ValueError("route_cut, near_zero, hf_min, threshold and sharpness must be numbers")
        if (thresholds.shape != (2,) and not band_keys) or not np.all(np.isfinite(thresholds)) \
                or not np.all(thresholds > 0):
            raise ValueError("thresholds must be 2 positive numbers" if not band_keys else "thresholds must be positive")
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            raise ValueError("scale must be positive and finite")
        self.texture_ref = self.texture_thresholds = None
        for key in texture_keys:
            pair = np.asarray(entry[key], np.float64)
            if pair.shape != (2,) or not np.all(np.isfinite(pair)) or not np.all(pair > 0):
                raise ValueError(f"{key} must be 2 positive numbers")
            setattr(self, key, pair)
        self.grid = self._read_grid(entry["grid"]) if version >= GRID_VERSION else None
        self.island = self._read_island(entry["island"]) if version == ISLAND_VERSION else None
        self._island_cache: Dict[Tuple[int, int], list] = {}
        self.scale = scale.astype(np.float64)
        self.thresholds = thresholds
        self.route_cut = float(entry["route_cut"])
        self.near_zero = float(entry["near_zero"])
        self.hf_min = int(entry["hf_min"])
        self.threshold = float(entry["threshold"])
        self.sharpness = float(entry["sharpness"])
        h, w = scale.shape[1], scale.shape[2]
        self.image_size = (h, w)
        self._d_h, self._d_w = dct_matrix(h), dct_matrix(w)
        self._d8 = dct_matrix(8)
        p = np.arange(8)
        self._hf = np.add.outer(p, p) >= self.hf_min   # high-frequency positions of an 8x8 block
        uv = np.add.outer(np.arange(h), np.arange(w))
        self._band_masks = [(uv >= lo) & (uv <= hi) for lo, hi in self.bands] if self.bands else None
        # a statistic whose thresholds are UNUSED ("island-only") can never pass: it is not computed
        nb = len(self.bands) if self.bands else 0
        self._bands_used = bool(np.any(thresholds[:, :2 * nb] < UNUSED)) if self.bands else False
        self._grid_used = self.grid is not None and bool(np.any(thresholds[:, 2 * nb] < UNUSED))

    @staticmethod
    def _read_grid(grid: Any) -> Dict[str, Any]:
        """The checked ``grid`` entry: ``tables`` ``(Q, 8, 8)`` float64 steps >= 1, the constants, and
        the share of AC terms a random value fits at each quality (``chance``)."""
        if not isinstance(grid, dict) or any(k not in grid for k in GRID_KEYS):
            raise ValueError(f"grid must hold {', '.join(GRID_KEYS)}")
        try:
            tables = np.asarray(grid["tables"], np.float64)
            consts = {k: float(grid[k]) for k in GRID_KEYS[1:]}
        except (TypeError, ValueError):
            raise ValueError("grid tables and constants must be numbers") from None
        if tables.ndim != 3 or tables.shape[1:] != (8, 8) or not len(tables) or not np.all(tables >= 1) \
                or not all(math.isfinite(v) and v > 0 for v in consts.values()):
            raise ValueError(f"grid tables {list(tables.shape)} (expected [Q, 8, 8], steps >= 1) "
                             "or constants not positive")
        ac = np.ones((8, 8), bool)
        ac[0, 0] = False
        chance = np.minimum(1.0, 2.0 * consts["tol"] / tables[:, ac]).mean(axis=1)
        return {"tables": tables, "chance": chance, "ac": ac, **consts}

    @staticmethod
    def _read_island(island: Any) -> Dict[str, Any]:
        """The checked ``island`` entry: its constants (``ISLAND_KEYS``), numbers >= 0 (sizes > 0)."""
        if not isinstance(island, dict) or any(k not in island for k in ISLAND_KEYS):
            raise ValueError(f"island must hold {', '.join(ISLAND_KEYS)}")
        values = [island[k] for k in ISLAND_KEYS]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values) or min(island[k] for k in ("min_side", "max_area", "top")) <= 0:
            raise ValueError("island constants must be numbers >= 0 (min_side, max_area and top > 0)")
        return dict(zip(ISLAND_KEYS, (float(v) for v in values)))

    def _island_rectangles(self, h: int, w: int) -> List[Tuple[int, int, np.ndarray]]:
        """``[(rows, cols, ring), ...]`` the island statistic's rectangles for ``h x w`` images, in
        the layer's order, each with its one-pixel ring ``(R, 2)`` (row above and below, corners
        included, then the column left and right; relative to the top-left pixel). Built once
        per size (the downsampled size above ``ISLAND_MAX_SIDE``: :func:`island_factor`)."""
        if (h, w) not in self._island_cache:
            c, s = self.island, min(h, w) / 32.0
            lo, area = max(2, round(c["min_side"] * s)), round(c["max_area"] * s * s)
            self._island_cache[h, w] = [
                (rows, cols, np.array([(-1, dx) for dx in range(-1, cols + 1)] + [(rows, dx) for dx in range(-1, cols + 1)]
                                      + [(dy, -1) for dy in range(rows)] + [(dy, cols) for dy in range(rows)]))
                for rows in range(lo, h) for cols in range(lo, w) if rows * cols <= area]
        return self._island_cache[h, w]

    def island_statistic(self, pixels: np.ndarray) -> np.ndarray:
        """``(N,)`` the island statistic (``BandAnomaly.island_statistic``): the largest step of a
        flat rectangle (sides >= ``min_side``, area <= ``max_area`` at 32 px, scaled) whose ring
        holds no pixel of its colour, whose step (the lower median over the ring of the smallest
        channel difference) exceeds ``min_step``, and of whose colour at most ``near_max`` other
        pixels lie within ``near_tol`` (checked for the ``top`` largest steps); 0 without one.
        Images larger than 64 px are searched after an area-downsampling by :func:`island_factor`
        (rounded again). Rectangles are visited in the layer's order (by shape, then row-major)
        so that ties pick the same ones."""
        c = self.island
        p = np.clip(np.round(np.asarray(pixels, np.float64)), 0.0, 255.0)
        n, h, w = p.shape[:3]
        f = island_factor(h, w)
        if f > 1:
            h, w = h // f, w // f
            p = np.round(p[:, :h * f, :w * f].reshape(n, h, f, w, f, p.shape[3]).mean(axis=(2, 4)))
        out = np.zeros(n)
        found: List[Tuple[int, int, float, np.ndarray, int]] = []    # image, rectangle index, step, colour, area
        base = 0
        for rows, cols, ring in self._island_rectangles(h, w):
            p1, p2 = h - rows + 1, w - cols + 1
            # flat: the running max equals the running min over the rectangle, every channel
            hi, low = p[:, :p1], p[:, :p1]
            for k in range(1, rows):
                hi, low = np.maximum(hi, p[:, k:k + p1]), np.minimum(low, p[:, k:k + p1])
            hi2, low2 = hi[:, :, :p2], low[:, :, :p2]
            for k in range(1, cols):
                hi2, low2 = np.maximum(hi2, hi[:, :, k:k + p2]), np.minimum(low2, low[:, :, k:k + p2])
            ii, yy, xx = np.nonzero((hi2 == low2).all(axis=-1))
            if len(ii):
                ry, rx = yy[:, None] + ring[None, :, 0], xx[:, None] + ring[None, :, 1]
                inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
                colour = p[ii, yy, xx]
                diff = np.abs(p[ii[:, None], np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)] - colour[:, None])
                same = ((diff.max(axis=-1) == 0) & inside).any(axis=-1)
                dmin = np.sort(np.where(inside, diff.min(axis=-1), 1.0e9), axis=1)
                step = dmin[np.arange(len(ii)), (inside.sum(axis=1) - 1) // 2]
                keep = ~same & (step > c["min_step"])
                found += zip(ii[keep], base + (yy * p2 + xx)[keep], step[keep], colour[keep],
                             [rows * cols] * int(keep.sum()))
            base += p1 * p2
        per_image: Dict[int, list] = {}
        for f in found:
            per_image.setdefault(int(f[0]), []).append(f)
        for i, islands in per_image.items():
            islands.sort(key=lambda f: (-f[2], f[1]))       # largest step first, ties the lower index
            for _, _, step, colour, size in islands[:int(c["top"])]:
                alike = int((np.abs(p[i] - colour).max(axis=-1) <= c["near_tol"]).sum()) - size
                if alike <= c["near_max"]:
                    out[i] = max(out[i], step)
        return out

    def _luma_blocks(self, pixels: np.ndarray) -> Optional[np.ndarray]:
        """``(N, H/8, W/8, 8, 8)`` the 8x8 block DCT (JPEG grid) of the centred BT.601 luma, or
        None when H or W is not a multiple of 8."""
        n, h, w = pixels.shape[:3]
        if h % 8 or w % 8:
            return None
        luma = pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114 - 128.0
        return np.einsum("pi,nbicj,qj->nbcpq", self._d8, luma.reshape(n, h // 8, 8, w // 8, 8), self._d8,
                         optimize=True)

    def grid_statistic(self, pixels: np.ndarray, blocks: Optional[np.ndarray] = None) -> np.ndarray:
        """``(N,)`` the JPEG-grid statistic (``BandAnomaly.grid_statistic``): the quality whose
        lattice the luma 8x8 block DCT fits best, each block's RMS distance to it (AC terms), the
        largest (blocks with more than ``clipped`` pixels at 0 or 255 left out) over the mean of
        the quieter half (at least ``floor``); 0 without 2 whole blocks. ``blocks``: the pixels'
        :meth:`_luma_blocks`, when already computed."""
        g = self.grid
        n, h, w = pixels.shape[:3]
        nb = (h // 8) * (w // 8)
        if h % 8 or w % 8 or nb < 2:
            return np.zeros(n)
        c = self._luma_blocks(pixels) if blocks is None else blocks       # (N, H/8, W/8, 8, 8)
        ac = g["ac"]
        big = (np.abs(c) > g["big"]) & ac
        n_big = np.maximum(big.sum(axis=(1, 2, 3, 4)), 1)
        tables = g["tables"].reshape(1, -1, 1, 1, 8, 8)
        best_d2 = np.empty_like(c)
        # every quality at once, a few images at a time (about 4M values): one 32-px frame costs
        # ~1.9 ms on this CPU instead of ~7.5 with a loop over the qualities
        step = max(1, 2 ** 22 // (len(g["tables"]) * h * w))
        for i in range(0, n, step):
            ci = c[i:i + step, None]
            d = ci - np.round(ci / tables) * tables                  # (k, Q, H/8, W/8, 8, 8)
            fit = ((np.abs(d) < g["tol"]) & big[i:i + step, None]).sum(axis=(2, 3, 4, 5)) \
                / n_big[i:i + step, None] - g["chance"]
            q = np.argmax(fit, axis=1)     # the first best: ties keep the lower quality, as the layer does
            best_d2[i:i + step] = d[np.arange(len(q)), q] ** 2
        rms = np.sqrt((best_d2 * ac).sum(axis=(3, 4)) / 63.0).reshape(n, nb)
        clip = (pixels.max(axis=3) >= 254.5) | (pixels.min(axis=3) <= 0.5)
        clipped = clip.reshape(n, h // 8, 8, w // 8, 8).sum(axis=(2, 4)).reshape(n, nb)
        top = np.where(clipped > g["clipped"], 0.0, rms).max(axis=1)
        return top / np.maximum(np.sort(rms, axis=1)[:, :nb // 2].mean(axis=1), g["floor"])

    def route(self, pixels: np.ndarray, blocks: Optional[np.ndarray] = None) -> np.ndarray:
        """``(N,)`` branch per image: 1 JPEG-like, 0 lossless-like (``SpectralAnomaly.route``).

        The 8x8 block DCT (JPEG grid) of the centred BT.601 luma (``blocks``, when already
        computed: :meth:`_luma_blocks`); JPEG-like when the share of near-zero coefficients among
        the high-frequency block positions exceeds ``route_cut``. Sizes that are not multiples of
        8 are all lossless-like.
        """
        n, h, w = pixels.shape[:3]
        if h % 8 or w % 8:
            return np.zeros(n, np.int64)
        coef = self._luma_blocks(pixels) if blocks is None else blocks
        near = (np.abs(coef) < self.near_zero) & self._hf
        share = near.sum(axis=(1, 2, 3, 4)) / (self._hf.sum() * (h // 8) * (w // 8))
        return (share > self.route_cut).astype(np.int64)

    def ratio(self, pixels: Any) -> np.ndarray:
        """``(N,)`` anomaly ratios of RGB pixels ``(N, H, W, 3)`` or ``(H, W, 3)`` (0..255, the
        model's input size): ``max |X| / scale[branch]`` over every coefficient but the DC of
        each channel (``X = D x D^T`` per channel), divided by ``thresholds[branch]``; with the
        texture statistic, the larger of that and max-z / texture level / ``texture_thresholds``
        (level: the median ``|X| / scale``, DC's 0 included, over ``texture_ref``, at least 1)."""
        x = np.asarray(pixels, np.float64)
        if x.ndim == 3:
            x = x[None]
        if x.shape[1:] != self.scale.shape[1:]:
            raise ValueError(f"pixels {list(x.shape[1:])}, expected {list(self.scale.shape[1:])}")
        dct = lambda: np.einsum("uh,nhwc,vw->nuvc", self._d_h, x, self._d_w, optimize=True)
        blocks = self._luma_blocks(x)       # the router's and the grid statistic's
        branch = self.route(x, blocks)
        if self._band_masks is not None:   # BandAnomaly: per band, the largest luma and chroma |X_ycbcr| / scale
            nb = len(self._band_masks)
            if self._bands_used:
                z = np.abs(np.einsum("nuvc,dc->nuvd", dct(), self.ycbcr, optimize=True)) / self.scale[branch]
                in_band = [z[:, mask] for mask in self._band_masks]                # (N, coefficients, 3) each
                stats = [zb[..., 0].max(axis=1) for zb in in_band] + \
                        [zb[..., 1:].reshape(len(x), -1).max(axis=1) for zb in in_band]
            else:
                stats = [np.zeros(len(x))] * (2 * nb)
            if self.grid is not None:
                stats.append(self.grid_statistic(x, blocks) if self._grid_used else np.zeros(len(x)))
            if self.island is not None:
                stats.append(self.island_statistic(x))
            return (np.stack(stats, axis=1) / self.thresholds[branch]).max(axis=1)
        z = np.abs(dct()) / self.scale[branch]
        z[:, 0, 0, :] = 0.0   # the DC term (mean brightness) is never evidence
        z = z.reshape(len(x), -1)
        m = z.max(axis=1)
        ratio = m / self.thresholds[branch]
        if self.texture_ref is None:
            return ratio
        level = np.maximum(np.median(z, axis=1) / self.texture_ref[branch], 1.0)
        return np.maximum(ratio, m / level / self.texture_thresholds[branch])

    def combine(self, p_cnn: Any, ratio: Any) -> Any:
        """``max(p_cnn, t a^k / (t a^k + 1 - t))`` (``CombineScores``): above the detector's
        threshold ``t`` iff ``p_cnn`` is or the ratio ``a`` exceeds 1."""
        t = min(max(self.threshold, 1e-6), 1.0 - 1e-6)
        logit = np.log(t / (1.0 - t)) + self.sharpness * np.log(np.maximum(np.asarray(ratio, np.float64), 1e-6))
        with np.errstate(over="ignore"):
            p_spec = 1.0 / (1.0 + np.exp(-logit))   # = t a^k / (t a^k + 1 - t), no overflow
        return np.maximum(p_cnn, p_spec)


# --------------------------------------------------------------------------
# Model loading and the screener
# --------------------------------------------------------------------------


def default_model_path() -> Path:
    """The default model: ``<repo>/saved_models/screener_cifar10_int8.tflite``.

    Falls back to ``screener_cifar10_int8.tflite`` beside this file when only
    that one exists (e.g. when ``edge/`` was copied to a device on its own),
    then to the copy a non-editable ``pip install .`` puts in the installed
    ``tfbackdoor/saved_models/`` (found without importing tfbackdoor).
    """
    here = Path(__file__).resolve().parent
    in_repo = here.parent / "saved_models" / DEFAULT_MODEL_NAME
    beside = here / DEFAULT_MODEL_NAME
    installed = here.parent / "tfbackdoor" / "saved_models" / DEFAULT_MODEL_NAME
    if not in_repo.is_file():
        for other in (beside, installed):
            if other.is_file():
                return other
    return in_repo


def load_interpreter_class() -> type:
    """Return the LiteRT ``Interpreter`` class.

    Prefers ``ai_edge_litert``; falls back to the legacy ``tflite_runtime``.
    Raises :class:`ModelError` when neither package is installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise ModelError(
                "no LiteRT runtime: neither ai_edge_litert nor tflite_runtime is "
                "installed (pip install ai-edge-litert)"
            ) from None
    return Interpreter


def read_sidecar(model_path: Path) -> Tuple[Optional[Path], Dict[str, Any]]:
    """Find and parse the optional sidecar JSON next to ``model_path``.

    Looks for ``<stem>.json`` then ``<name>.json`` (e.g. ``m.json`` then
    ``m.tflite.json``).  Returns ``(path, data)``, or ``(None, {})`` when
    there is none.  Raises :class:`ModelError` for an unreadable or
    malformed sidecar (a wrong threshold must not be used silently).
    """
    for path in sidecar_candidates(model_path):
        if path == model_path or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(f"{path}: unreadable sidecar JSON ({one_line(exc)})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: sidecar JSON must be an object")
        threshold = data.get("threshold")
        if threshold is not None and not _is_probability(threshold):
            raise ModelError(f"{path}: sidecar threshold must be a number in [0, 1], got {threshold!r}")
        size = data.get("image_size")
        if size is not None and not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ModelError(f"{path}: sidecar image_size must be [H, W], got {size!r}")
        return path, data
    return None, {}


def _is_probability(value: Any) -> bool:
    """True when ``value`` is a real number (not a bool) within [0, 1]."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )


def encode_pixels(pixels: np.ndarray, dtype: Any, quantization: Tuple[float, int]) -> np.ndarray:
    """Convert uint8 RGB pixels (0..255) to the model's input dtype.

    uint8 inputs take the raw pixels.  int8 inputs with scale 1 and zero
    point -128 take ``p - 128``; other int8 inputs are quantized as
    ``round(p / scale) + zero_point`` clipped to -128..127.
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return pixels.astype(np.uint8, copy=False)
    if dtype != np.int8:
        raise ValueError(f"unsupported input dtype {dtype.name}")
    scale, zero_point = quantization
    if scale == 1.0 and zero_point == -128:
        return (pixels.astype(np.int16) - 128).astype(np.int8)
    quantized = np.round(pixels.astype(np.float32) / np.float32(scale)) + zero_point
    return np.clip(quantized, -128, 127).astype(np.int8)


def decode_score(output: np.ndarray, quantization: Tuple[float, int]) -> float:
    """P(poisoned) from a ``[1, 1]`` or ``[1, 2]`` output tensor.

    The last column is used (column 1 of a ``[clean, poisoned]`` softmax);
    integer outputs are dequantized as ``(q - zero_point) * scale``.
    """
    raw = output[0, -1]
    if np.issubdtype(output.dtype, np.integer):
        scale, zero_point = quantization
        return (float(raw) - zero_point) * scale
    return float(raw)


def to_rgb_array(img: Union[np.ndarray, Image.Image]) -> np.ndarray:
    """Return ``img`` as a C-contiguous ``H x W x 3`` uint8 RGB array.

    Accepts a Pillow image of any mode (16-bit greyscale is scaled down, not
    clipped; alpha is dropped) or a uint8 array that is ``H x W`` (grey),
    ``H x W x 1``, ``H x W x 3`` (RGB) or ``H x W x 4`` (RGBA).
    """
    if isinstance(img, Image.Image):
        if img.mode == "I" or img.mode.startswith("I;16"):
            grey = np.asarray(img).astype(np.int64) >> 8
            img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
        elif img.mode == "P":
            img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
        arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an H x W x 3 image array, got shape {arr.shape}")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = arr[:, :, :3]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def centre_crop_box(width: int, height: int, aspect: float) -> Tuple[float, float, float, float]:
    """The largest centred box of ``width x height`` whose width/height is ``aspect``."""
    if width / height > aspect:
        new_width = height * aspect
        left = (width - new_width) / 2.0
        return (left, 0.0, left + new_width, float(height))
    new_height = width / aspect
    top = (height - new_height) / 2.0
    return (0.0, top, float(width), top + new_height)


class Screener:
    """A loaded tfbackdoor screener model.

    Args:
        model_path: path to the ``.tflite`` file.
        threshold: score above which an image is ``"poisoned"`` (:func:`is_flagged`);
            ``None`` takes the sidecar's threshold (an error when there is
            no sidecar: no silent default).
        num_threads: LiteRT CPU threads (``None`` = runtime default).
        resize: ``"crop"`` (centre-crop to the model's aspect, then resize)
            or ``"stretch"`` (resize without cropping).

    Raises:
        ModelError: missing file, unloadable model, a model that does not
            fit the screener contract, a bad sidecar, a sidecar whose
            ``sha256`` does not match the model, or no threshold (no sidecar
            and ``threshold=None``).
        ValueError: a bad ``threshold``, ``num_threads`` or ``resize``.

    Attributes:
        model_path, threshold, resize, sidecar_path (or None),
        input_size ``(H, W)``, input_dtype, output_shape, spectral (the
        sidecar's :class:`SpectralPart`, or None).

    With a sidecar ``"spectral"`` entry the score is the model's P(poisoned)
    combined with the spectral anomaly ratio of the same resized pixels
    (:meth:`SpectralPart.combine`, at the detector's own threshold even when
    ``threshold`` overrides the verdict's).
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        threshold: Optional[float] = None,
        num_threads: Optional[int] = None,
        resize: str = "crop",
    ) -> None:
        if threshold is not None and not _is_probability(threshold):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.model_path = Path(model_path)
        self.resize = resize
        self._interpreter = self._load(num_threads)
        self._check_contract()
        self.sidecar_path, sidecar = read_sidecar(self.model_path)
        digest = sidecar.get("sha256")
        if digest is not None and str(digest).lower() != file_sha256(self.model_path):
            raise ModelError(
                f"{self.sidecar_path}: sha256 does not match {self.model_path} (the model was "
                "replaced, or the sidecar belongs to another model); use the sidecar exported "
                "with this model"
            )
        size = sidecar.get("image_size")
        if size is not None and tuple(size) != self.input_size:
            raise ModelError(
                f"{self.sidecar_path}: image_size {list(size)} does not match the model "
                f"input {list(self.input_size)}"
            )
        self.spectral: Optional[SpectralPart] = None
        if sidecar.get("spectral") is not None:
            try:
                self.spectral = SpectralPart(sidecar["spectral"], self.input_size)
            except ValueError as exc:
                raise ModelError(f"{self.sidecar_path}: bad spectral entry ({one_line(exc)})") from None
        if threshold is None:
            threshold = sidecar.get("threshold")
        if threshold is None:
            where = (f"its sidecar {self.sidecar_path} has no threshold" if self.sidecar_path
                     else f"no sidecar {self.model_path.with_suffix('.json').name} beside it")
            raise ModelError(
                f"{self.model_path}: no threshold: {where}; pass --threshold T "
                "(the threshold the model was calibrated for)"
            )
        self.threshold = float(threshold)
        self._warm_up()

    def _not_a_screener(self, reason: str) -> ModelError:
        return ModelError(f"{self.model_path}: not a tfbackdoor screener ({reason})")

    def _load(self, num_threads: Optional[int]) -> Any:
        """Create and allocate the interpreter, mapping failures to ModelError."""
        path = self.model_path
        if not path.exists():
            raise ModelError(f"{path}: model file not found")
        if path.is_dir():
            raise ModelError(f"{path}: is a directory, not a .tflite model file")
        interpreter_class = load_interpreter_class()
        try:
            interpreter = interpreter_class(model_path=str(path), num_threads=num_threads)
            interpreter.allocate_tensors()
        except Exception as exc:  # the runtime raises ValueError/RuntimeError
            raise self._not_a_screener(f"cannot load as a TFLite model: {one_line(exc)}") from None
        return interpreter

    def _check_contract(self) -> None:
        """Validate input/output tensors against the screener contract."""
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1:
            raise self._not_a_screener(f"expected 1 input tensor, found {len(inputs)}")
        if len(outputs) != 1:
            raise self._not_a_screener(f"expected 1 output tensor, found {len(outputs)}")
        inp, out = inputs[0], outputs[0]
        shape = [int(v) for v in inp["shape"]]
        signature = [int(v) for v in inp.get("shape_signature", inp["shape"])]
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
            raise self._not_a_screener(f"input shape {shape}, expected [1, H, W, 3]")
        if len(signature) == 4 and (signature[1] < 0 or signature[2] < 0):
            raise self._not_a_screener(f"input shape {signature} has a dynamic height/width")
        in_dtype = np.dtype(inp["dtype"])
        if in_dtype not in (np.uint8, np.int8):
            raise self._not_a_screener(f"input dtype {in_dtype.name}, expected uint8 or int8")
        if in_dtype == np.int8 and not inp["quantization"][0] > 0:
            raise self._not_a_screener("int8 input without quantization parameters")
        out_shape = [int(v) for v in out["shape"]]
        if out_shape not in ([1, 1], [1, 2]):
            raise self._not_a_screener(f"output shape {out_shape}, expected [1, 1] or [1, 2]")
        out_dtype = np.dtype(out["dtype"])
        if out_dtype in (np.int8, np.uint8):
            if not out["quantization"][0] > 0:
                raise self._not_a_screener(f"{out_dtype.name} output without quantization parameters")
        elif not np.issubdtype(out_dtype, np.floating):
            raise self._not_a_screener(f"output dtype {out_dtype.name}, expected float, int8 or uint8")

        self.input_size: Tuple[int, int] = (shape[1], shape[2])
        self.input_dtype = in_dtype
        self.output_shape = tuple(out_shape)
        self._input_index = inp["index"]
        self._input_quant = tuple(inp["quantization"])
        self._output_index = out["index"]
        self._output_quant = tuple(out["quantization"])

    def _warm_up(self) -> None:
        """Run one dummy inference so the first real latency is representative."""
        height, width = self.input_size
        blank = np.zeros((height, width, 3), np.uint8)
        try:
            self._interpreter.set_tensor(self._input_index, self.preprocess(blank))
            self._interpreter.invoke()
        except Exception as exc:
            raise self._not_a_screener(f"test inference failed: {one_line(exc)}") from None

    def preprocess(self, img: Union[np.ndarray, Image.Image]) -> np.ndarray:
        """Turn an RGB image into the model's input tensor ``[1, H, W, 3]``.

        ``img`` is anything :func:`to_rgb_array` accepts.  It is centre-cropped
        to the model's aspect (``resize="crop"``) or not (``"stretch"``), then
        resized to ``H x W`` with Pillow bilinear, then encoded for the input
        dtype with :func:`encode_pixels`.
        """
        return encode_pixels(self.resized(img)[None], self.input_dtype, self._input_quant)

    def resized(self, img: Union[np.ndarray, Image.Image]) -> np.ndarray:
        """The uint8 RGB ``H x W x 3`` pixels the model sees (crop or stretch, then bilinear)."""
        rgb = to_rgb_array(img)
        height, width = self.input_size
        if rgb.shape[:2] != (height, width):
            box = None
            if self.resize == "crop":
                box = centre_crop_box(rgb.shape[1], rgb.shape[0], width / height)
            resized = Image.fromarray(rgb).resize((width, height), Image.BILINEAR, box=box)
            rgb = np.asarray(resized)
        return rgb

    def score_timed(self, img: Union[np.ndarray, Image.Image]) -> Tuple[float, float]:
        """Return ``(P(poisoned), latency_ms)``; latency covers preprocess + invoke (+ the
        spectral part, when the sidecar has one).

        Raises ValueError when the model returns a non-finite score.
        """
        start = time.perf_counter()
        rgb = self.resized(img)
        self._interpreter.set_tensor(self._input_index,
                                     encode_pixels(rgb[None], self.input_dtype, self._input_quant))
        self._interpreter.invoke()
        output = self._interpreter.get_tensor(self._output_index)
        value = decode_score(output, self._output_quant)
        if self.spectral is not None:
            value = float(self.spectral.combine(value, self.spectral.ratio(rgb)[0]))
        latency_ms = (time.perf_counter() - start) * 1000.0
        if not math.isfinite(value):
            raise ValueError(f"model returned a non-finite score ({value})")
        return value, latency_ms

    def score(self, img: Union[np.ndarray, Image.Image]) -> float:
        """P(poisoned) for an RGB uint8 ``H x W x 3`` image (any size)."""
        return self.score_timed(img)[0]

    def verdict(self, score: float) -> str:
        """``"poisoned"`` when ``score > threshold`` (:func:`is_flagged`), else ``"clean"``."""
        return "poisoned" if is_flagged(score, self.threshold) else "clean"


# --------------------------------------------------------------------------
# Sources: images, folders, videos, camera
# --------------------------------------------------------------------------


def load_image(path: Union[str, os.PathLike], limit: Optional[int] = None) -> np.ndarray:
    """Decode an image file fully into an RGB uint8 array.

    EXIF orientation is applied; animated images give their first frame.
    Raises :class:`UnreadableInput` for missing, non-image or truncated files,
    and for an image whose header declares more than ``limit`` pixels
    (default :func:`max_pixels`), before decoding it.
    """
    limit = max_pixels() if limit is None else limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # lazy: reads the header only
        with img:
            width, height = img.size
            if width * height > limit:
                raise UnreadableInput(
                    f"image too large: its header declares {width}x{height} = "
                    f"{width * height / 1e6:.1f} megapixels, more than the limit of "
                    f"{limit / 1e6:g} (set TFBD_MAX_PIXELS to change it); not decoded"
                )
            img.load()
            return to_rgb_array(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UnreadableInput("no such file") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableInput(f"image too large ({one_line(exc)}); not decoded") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableInput(f"not a readable image: {one_line(exc)}") from None


def iter_image_files(folder: Union[str, os.PathLike]) -> Iterator[str]:
    """Image files under ``folder``, recursively, in sorted order.

    Matches :data:`IMAGE_EXTENSIONS` case-insensitively and skips hidden
    files and folders (names starting with ``.``, e.g. macOS ``._x.jpg``).
    """
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def _require_cv2() -> Any:
    """Import OpenCV lazily; raise UnreadableInput naming the extra to install if absent."""
    # OpenCV's and FFmpeg's own messages ("can't open camera by index", "moov atom not found") would
    # add lines to our one-line errors; set these before the first import to see them again.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2
    except ImportError:
        raise UnreadableInput(
            f"video and camera input need OpenCV: pip install '{VIDEO_EXTRA}' "
            "(or opencv-python-headless alone beside screen.py)"
        ) from None
    return cv2


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Point file descriptor 2 at the null device for the block (native libraries' prints)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def open_capture(target: Union[str, int], is_camera: bool = False) -> Any:
    """Open a ``cv2.VideoCapture`` for a video file, camera index, device or URL.

    A string containing ``!`` is taken as a GStreamer pipeline (e.g. a
    Jetson CSI camera).  Raises :class:`UnreadableInput` if it won't open.
    """
    cv2 = _require_cv2()
    with _quiet_stderr_fd():   # OpenCV's AVI parser prints to stderr directly on a corrupt file
        if isinstance(target, str) and "!" in target:
            capture = cv2.VideoCapture(target, cv2.CAP_GSTREAMER)
        else:
            capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        capture.release()
        if is_camera:
            raise UnreadableInput("cannot open camera (no such device, or it is busy)")
        raise UnreadableInput("cannot open video (unsupported codec or corrupt file)")
    return capture


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV BGR(A)/grey frame -> RGB array (grey stays 2-D for to_rgb_array)."""
    if frame.ndim == 3 and frame.shape[2] >= 3:
        return np.ascontiguousarray(frame[:, :, 2::-1])
    return frame


class FrameName(str):
    """The source name of a video or camera frame, ``"<prefix>#frame=<i>"``; a ``str`` whose
    ``frame`` attribute is the frame index ``i`` (so reports need not parse the name)."""

    frame: int

    def __new__(cls, prefix: str, frame: int) -> "FrameName":
        name = super().__new__(cls, f"{prefix}#frame={frame}")
        name.frame = int(frame)
        return name


def iter_frames(
    capture: Any, prefix: str, every: int = 1, max_frames: Optional[int] = None
) -> Iterator[Item]:
    """Yield ``(FrameName("<prefix>#frame=<i>"), rgb)`` for every ``every``-th frame.

    Frame indices count from 0 over all frames read; skipped frames are only
    grabbed, not decoded.  Stops at the end of the stream, after
    ``max_frames`` processed frames, or on a read failure (yielded as an
    error item).  Releases ``capture`` when done.  The generator's return
    value is the number of frames yielded.
    """
    processed = index = 0
    try:
        while max_frames is None or processed < max_frames:
            try:
                if index % every == 0:
                    ok, frame = capture.read()
                    if not ok or frame is None:
                        break
                    processed += 1
                    yield FrameName(prefix, index), _bgr_to_rgb(frame)
                elif not capture.grab():
                    break
            except Exception as exc:  # cv2.error from a broken stream
                yield FrameName(prefix, index), UnreadableInput(f"frame read failed: {one_line(exc)}")
                break
            index += 1
    finally:
        capture.release()
    return processed


def _iter_stream(
    target: Union[str, int], prefix: str, every: int, max_frames: Optional[int], is_camera: bool
) -> Iterator[Item]:
    """Frames of one video file or camera, with open/empty failures as error items."""
    try:
        capture = open_capture(target, is_camera)
    except UnreadableInput as exc:
        yield prefix, exc
        return
    delivered = yield from iter_frames(capture, prefix, every, max_frames)
    if delivered == 0:
        yield prefix, UnreadableInput("no frames could be read")
    elif is_camera and (max_frames is None or delivered < max_frames):
        print(f"{PROG}: {prefix}: camera stopped delivering frames", file=sys.stderr)


def _camera_target(camera: Union[str, int]) -> Union[str, int]:
    """``"0"`` -> camera index 0; anything else (device path, URL, pipeline) as is."""
    if isinstance(camera, str) and camera.strip().isdigit():
        return int(camera)
    return camera


def iter_sources(
    sources: Iterable[Union[str, os.PathLike]],
    every: int = 1,
    camera: Optional[Union[str, int]] = None,
    max_frames: Optional[int] = None,
) -> Iterator[Item]:
    """Yield ``(source_name, rgb_uint8_hxwx3 or Exception)`` for all inputs.

    Args:
        sources: image files, folders (searched recursively for
            :data:`IMAGE_EXTENSIONS`) and video files (:data:`VIDEO_EXTENSIONS`,
            read with OpenCV).  A file with any other extension is tried as
            an image.
        every: process every N-th frame of videos and the camera.
        camera: camera index (``0``), device path, URL or GStreamer
            pipeline, read after all ``sources``; ``None`` for no camera.
        max_frames: at most this many processed frames per video / camera.

    Names are the path for images, ``"path#frame=12"`` for video frames and
    ``"camera:0#frame=3"`` for camera frames.  Unreadable items are yielded
    with an exception instead of an array so the caller can report and skip.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    for source in sources:
        name = os.fspath(source)
        if os.path.isdir(name):
            found = False
            for path in iter_image_files(name):
                found = True
                yield _load_item(path)
            if not found:
                yield name, UnreadableInput("no image files in this folder")
        elif not os.path.exists(name):
            yield name, UnreadableInput("no such file or directory")
        elif os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
            yield from _iter_stream(name, name, every, max_frames, is_camera=False)
        else:
            yield _load_item(name)
    if camera is not None:
        yield from _iter_stream(_camera_target(camera), f"camera:{camera}", every, max_frames, is_camera=True)


def _load_item(path: str) -> Item:
    """One image file as an item: ``(path, decoded array or the error)``."""
    try:
        return path, load_image(path)
    except UnreadableInput as exc:
        return path, exc


# --------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------


def _emit(out: TextIO, record: Dict[str, Any]) -> None:
    """Write one JSON line and flush (so pipes and camera runs stream)."""
    out.write(json.dumps(record) + "\n")
    out.flush()


#: Columns of a ``--out`` file: one row per image or frame (``frame`` empty for images;
#: ``score``/``flagged``/``verdict``/``latency_ms`` empty and ``error`` set for unreadable items).
ROW_FIELDS = ("source", "frame", "score", "flagged", "verdict", "latency_ms", "error")
ROW_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


class RowFile:
    """The per-image/per-frame rows of a run, written atomically to ``path``.

    ``.csv``: a header and one row per item (:data:`ROW_FIELDS`); ``.jsonl`` (or ``.ndjson``,
    ``.json``): one JSON object per item with those keys, then ``{"summary": {...}}``. Rows are
    streamed to a temporary file beside ``path`` (``.NAME.tmpPID.XXXX.SUFFIX``, so a long camera
    run holds nothing in memory) that replaces ``path`` only when the run ends (also after Ctrl-C
    or SIGTERM, with the rows screened so far); on any other error it is removed and ``path`` is
    left as it was. Use as a context manager (commits when the block ends normally, discards when
    it raises). Raises ValueError for a bad ``path`` and OSError when the folder is not writable.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        self.format = ROW_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"{self.path}: --out must end in .csv or .jsonl")
        if self.path.is_dir():
            raise ValueError(f"{self.path}: --out is a directory")
        parent = self.path.parent
        if not parent.is_dir():
            raise ValueError(f"{self.path}: no such directory {parent}")
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{self.path.name}.tmp{os.getpid()}.",
                                   suffix=self.path.suffix)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._csv = None
        if self.format == "csv":
            self._csv = csv.writer(self._file)
            self._csv.writerow(ROW_FIELDS)
        self.summary: Optional[Dict[str, Any]] = None

    def write(self, row: Dict[str, Any]) -> None:
        """One item's row (keys from :data:`ROW_FIELDS`; missing ones are empty / null)."""
        if self._csv is not None:
            self._csv.writerow(["" if row.get(k) is None else row[k] for k in ROW_FIELDS])
        else:
            self._file.write(json.dumps({k: row.get(k) for k in ROW_FIELDS}) + "\n")

    def commit(self) -> None:
        """Finish the file (the summary line for JSON lines) and move it to ``path``."""
        if self.format == "jsonl" and self.summary is not None:
            self._file.write(json.dumps({"summary": self.summary}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` is untouched."""
        self._file.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()

    @property
    def closed(self) -> bool:
        """True once committed or discarded."""
        return self._file.closed

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()




def run(
    screener: Screener,
    items: Iterable[Item],
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    per_item: bool = True,
    rows: Optional[RowFile] = None,
) -> Dict[str, Any]:
    """Score ``items`` and print JSON lines; return the summary dict.

    For each ``(source, rgb or Exception)`` prints to ``out`` (default
    ``sys.stdout``) either ``{"source", "score", "verdict", "latency_ms"}``
    (with ``"frame"``, the frame index, after ``source`` for a video or
    camera frame) or ``{"source", "error"}`` (the error also goes to ``err``,
    default ``sys.stderr``, as one line), and writes the item's row to
    ``rows`` (a :class:`RowFile`) if given.  ``per_item=False`` prints only
    the summary.  Ctrl-C (KeyboardInterrupt) stops early; the summary line
    ``{"summary": {...}}`` is always printed and returned (without the
    ``"summary"`` wrapper): keys ``n`` (images/frames scored), ``poisoned``,
    ``clean``, ``errors``, ``mean_latency_ms`` (None if n == 0),
    ``frames_per_s`` (images/frames scored per second of the run's wall
    time, decoding included; None if n == 0), ``elapsed_s``, ``threshold``.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    counts = {"poisoned": 0, "clean": 0}
    errors = 0
    total_latency = 0.0
    start = time.perf_counter()
    try:
        for source, item in items:
            frame = getattr(source, "frame", None)
            if not isinstance(item, Exception):
                try:
                    score, latency_ms = screener.score_timed(item)
                except Exception as exc:
                    item = exc
            if isinstance(item, Exception):
                errors += 1
                reason = one_line(item)
                print(f"{PROG}: {source}: {reason}", file=err, flush=True)
                if per_item:
                    _emit(out, {"source": str(source), "error": reason})
                if rows is not None:
                    rows.write({"source": str(source), "frame": frame, "error": reason})
                continue
            verdict = screener.verdict(score)
            counts[verdict] += 1
            total_latency += latency_ms
            record = {"source": str(source)}
            if frame is not None:
                record["frame"] = frame
            record.update({"score": round(score, 6), "verdict": verdict, "latency_ms": round(latency_ms, 3)})
            if per_item:
                _emit(out, record)
            if rows is not None:
                rows.write({**record, "flagged": verdict == "poisoned"})
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted, stopping", file=err, flush=True)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # releases an open video/camera held by a generator
    elapsed = time.perf_counter() - start
    n = counts["poisoned"] + counts["clean"]
    summary = {
        "n": n,
        "poisoned": counts["poisoned"],
        "clean": counts["clean"],
        "errors": errors,
        "mean_latency_ms": round(total_latency / n, 3) if n else None,
        "frames_per_s": round(n / elapsed, 2) if n and elapsed > 0 else None,
        "elapsed_s": round(elapsed, 3),
        "threshold": screener.threshold,
    }
    if rows is not None:
        rows.summary = summary
    _emit(out, {"summary": summary})
    return summary


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: usage error: {message} (see --help)\n")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not _is_probability(value):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``screen.py`` argument parser."""
    parser = _Parser(
        prog="screen.py",
        description="Screen images, folders, videos or a camera for backdoor triggers "
        "with a tfbackdoor LiteRT model. Prints one JSON line per image/frame, then a summary.",
        epilog="Exit codes: 0 every input screened (poisoned verdicts included); "
        "1 done, but an input was missing or unreadable, or a folder had no images "
        "(the rest were screened); 2 usage or model error.",
    )
    parser.add_argument("sources", nargs="*", metavar="SOURCES",
                        help="image files, folders (recursive), video files (mp4/avi/mov/mkv/webm)")
    parser.add_argument("--model", type=Path, default=None, metavar="PATH",
                        help=f"screener .tflite (default: saved_models/{DEFAULT_MODEL_NAME} "
                        "in the repository, or beside screen.py)")
    parser.add_argument("--threshold", type=_probability, default=None, metavar="T",
                        help="poisoned if score > T (default: the model's sidecar JSON; "
                        "required when there is none)")
    parser.add_argument("--every", type=_positive_int, default=1, metavar="N",
                        help="process every N-th video/camera frame (default 1)")
    parser.add_argument("--camera", default=None, metavar="IDX",
                        help="also read a camera: index (0), device path, URL or GStreamer pipeline")
    parser.add_argument("--max-frames", type=_positive_int, default=None, metavar="N",
                        help="at most N processed frames per video/camera")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="crop: centre-crop to the model aspect then resize (default); "
                        "stretch: resize only")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="LiteRT CPU threads (default: runtime's choice)")
    parser.add_argument("--summary-only", action="store_true",
                        help="print only the summary line (errors still go to stderr)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="also write one row per image/frame (source, frame, score, flagged, verdict, "
                        "latency_ms, error) to FILE.csv or FILE.jsonl (+ the summary), atomically")
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (e.g. ``systemctl stop``) like Ctrl-C while running."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not in the main thread / unsupported
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (0 all screened, 1 some input
    missing/unreadable or a folder empty, 2 usage/model error)."""
    args = build_parser().parse_args(argv)
    try:
        limit = max_pixels()
    except ValueError as exc:
        print(f"{PROG}: usage error: {exc}", file=sys.stderr)
        return 2
    # Pillow's own bomb check (an error above twice its limit) must not refuse what ours allows.
    Image.MAX_IMAGE_PIXELS = max(limit, Image.MAX_IMAGE_PIXELS or 0)
    if not args.sources and args.camera is None:
        print(f"{PROG}: no sources given (pass image/video files, folders or --camera IDX)",
              file=sys.stderr)
        return 2
    rows = None
    if args.out is not None:
        try:
            rows = RowFile(args.out)
        except (ValueError, OSError) as exc:
            print(f"{PROG}: usage error: {one_line(exc)}", file=sys.stderr)
            return 2
    try:
        return _screen(args, rows)
    finally:
        if rows is not None and not rows.closed:
            rows.discard()   # ended before the run (a model error): nothing written


def _screen(args: argparse.Namespace, rows: Optional[RowFile]) -> int:
    """:func:`main` after the arguments and ``--out`` are checked."""
    model_path = args.model if args.model is not None else default_model_path()
    try:
        screener = Screener(model_path, threshold=args.threshold,
                            num_threads=args.threads, resize=args.resize)
    except ModelError as exc:
        hint = " (the default model; pass --model PATH)" if args.model is None else ""
        print(f"{PROG}: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted while loading the model", file=sys.stderr)
        return 130
    items = iter_sources(args.sources, every=args.every, camera=args.camera,
                         max_frames=args.max_frames)
    summary = None
    try:
        with _sigterm_as_interrupt(), (rows if rows is not None else contextlib.nullcontext()):
            summary = run(screener, items, per_item=not args.summary_only, rows=rows)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Python's docs advise.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    if summary is not None and summary["errors"]:
        print(f"{PROG}: {summary['errors']} input(s) missing, unreadable or empty (see above); "
              "the rest were screened", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
