"""Spectrum analysis (paper Section 3, Figure 1): streaming mean DCT spectra and HF ratios of image
sets, clean and triggered. Figures are in :mod:`tfbackdoor.plots`; the demo is ``cli/demo.py``."""

from __future__ import annotations

from .frequency import SpectrumStats


def spectrum_stats(x, trigs, batch_size=500) -> dict:
    """Streaming spectrum statistics of clean ``x`` (uint8 N,H,W,3) and of each triggered copy.

    Returns ``{"clean": stats, trigger.name: stats, ...}`` with the dict of
    :meth:`tfbackdoor.frequency.SpectrumStats.result`.
    """
    sets = {"clean": (SpectrumStats(), None)}
    for t in trigs:
        sets[t.name] = (SpectrumStats(), t)
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size]
        for acc, t in sets.values():
            acc.update(batch if t is None else t(batch))
    return {k: acc.result() for k, (acc, _) in sets.items()}
