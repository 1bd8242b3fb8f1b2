"""Calibration images for integer quantization: clean, manipulated and triggered copies of real images."""

from __future__ import annotations

import warnings

import numpy as np

from .. import data as data_mod
from .. import perturb, triggers
from ..errors import TfbdError

DEFAULT_CALIBRATION = "cifar10:train+gtsrb:train"


def representative_images(spec=DEFAULT_CALIBRATION, n=300, image_size=32, seed=0, trigger_dir=None,
                          echo=None) -> np.ndarray:
    """uint8 calibration images: clean, manipulated and triggered copies of real images.

    ``n`` clean images per part of ``spec`` (seeded subset), plus one
    :class:`~tfbackdoor.perturb.RandomManipulation` copy of each, plus the paper's 7 detector
    triggers applied to disjoint slices of the clean images (triggers whose files are missing are
    skipped with a warning). The first image has a black and a white block so that the input
    range is exactly 0..255 (input scale 1).
    """
    parts = [p for p in spec.split("+") if p.strip()]
    if not parts:
        raise TfbdError(f"empty calibration spec '{spec}'")
    xs = []
    for part in parts:
        x, _ = data_mod.load_arrays(part, image_size=image_size, limit=n, seed=seed)
        xs.append(x)
    clean = np.concatenate(xs)
    rng = np.random.default_rng(seed)
    clean = clean[rng.permutation(len(clean))]
    manip = perturb.RandomManipulation(seed=seed)(clean).numpy()
    trigs = []
    for name in triggers.PAPER_DETECTOR_ATTACKS:
        try:
            trigs.append(triggers.get(name, image_size, trigger_dir))
        except TfbdError as e:
            warnings.warn(f"calibration: skipping trigger {name}: {e}", stacklevel=2)
    triggered = []
    if trigs:
        for t, chunk in zip(trigs, np.array_split(clean, len(trigs))):
            if len(chunk):
                triggered.append(t(chunk).numpy())
    first = clean[:1].copy()
    b = max(1, image_size // 8)
    first[0, :b, :b] = 0
    first[0, -b:, -b:] = 255
    out = np.concatenate([first, clean, manip] + triggered)
    if echo:
        echo(f"calibration: {len(clean)} clean ({spec}), {len(manip)} manipulated, "
             f"{sum(len(t) for t in triggered)} triggered ({len(trigs)} triggers)")
    return out
