"""A detector's clean-spectrum anomaly part (:mod:`tfbackdoor.spectral`) in the screener's sidecar.

The ``.tflite`` holds the CNN only (:func:`~tfbackdoor.export.graph.build_screener` stops at the
``probs`` layer); the :class:`~tfbackdoor.spectral.SpectralAnomaly` weights and router constants
and the :class:`~tfbackdoor.spectral.CombineScores` threshold and sharpness go into the sidecar's
``"spectral"`` entry (:func:`edge.screen.make_spectral_entry`), from which ``edge/screen.py``
recomputes the ratio in numpy (:class:`edge.screen.SpectralPart`) and combines it with the CNN's
P(poisoned) exactly as the detector does.
"""

from __future__ import annotations

import keras
import numpy as np

from edge.screen import make_band_entry, make_spectral_entry

from .. import spectral


def sidecar_entry(model):
    """The sidecar ``"spectral"`` entry of a detector with a spectral part, else ``None``."""
    if not spectral.has_spectral(model):
        return None
    layer = next(l for l in model.layers if isinstance(l, spectral.SpectralAnomaly))
    combine = next(l for l in model.layers if isinstance(l, spectral.CombineScores))
    arr = lambda w: keras.ops.convert_to_numpy(w).astype(np.float32)
    if isinstance(layer, spectral.BandAnomaly):
        size = layer.scale.shape
        grid = {**spectral.grid_settings(), "tables": spectral.jpeg_tables()} if layer.grid else None
        island = spectral.island_settings(layer.island_near_tol) if layer.island else None
        return make_band_entry(arr(layer.scale), arr(layer.thresholds), spectral.band_edges(size[1], size[2]),
                               spectral.YCBCR, layer.route_cut, layer.near_zero, spectral.HF_MIN,
                               combine.threshold, combine.sharpness, grid, island)
    texture = (arr(layer.texture_ref), arr(layer.texture_thresholds)) if layer.texture else (None, None)
    return make_spectral_entry(arr(layer.scale), arr(layer.thresholds), layer.route_cut, layer.near_zero,
                               spectral.HF_MIN, combine.threshold, combine.sharpness, *texture)


def describe_entry(entry) -> dict:
    """The entry for people (the command's report): the scale's shape instead of its bytes."""
    brief = {"scale": lambda v: {"dtype": v["dtype"], "shape": v["shape"]},
             "grid": lambda v: {**v, "tables": f"{len(v['tables'])} quantisation tables"}}
    return {k: brief[k](v) if k in brief else v for k, v in entry.items()}
