"""``tfbd demo``: spectra of built-in sample images, clean and with the built-in triggers, the verdicts
of the shipped int8 screener (:mod:`edge.screen`) on a few of them, and a figure of both. It lives
in ``cli/`` because it runs the standalone screener: only the command line imports ``edge/``."""

from __future__ import annotations

import numpy as np


def sample_images(n=64, size=32, seed=0) -> np.ndarray:
    """Built-in natural sample images: random crops of matplotlib's bundled ``grace_hopper.jpg``,
    downscaled to ``size`` (antialiased, which also removes the source's JPEG blocks)."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = photo.size
    out = []
    for _ in range(n):
        side = int(rng.integers(min(w, h) // 6, min(w, h) // 2))
        left, top = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        out.append(np.asarray(crop, np.uint8))
    return np.stack(out)


def demo(out, echo=print):
    """Spectra of built-in sample images, clean and with the built-in triggers, the verdicts of the
    shipped int8 screener on a few of them, and a figure of both (:func:`plot_demo`). Returns
    ``{"stats", "verdicts", "panels"}``."""
    from tfbackdoor import triggers
    from tfbackdoor.analysis import spectrum_stats
    from tfbackdoor.plots import plot_demo

    x = sample_images()
    trigs = triggers.expand("builtin")
    stats = spectrum_stats(x, trigs)
    echo("HF ratio = the share of the images' DCT energy (DC term left out) outside the lowest quarter of "
         "frequencies (u < H/2 and v < W/2); sharp-edged or noisy triggers raise it above the clean value")
    echo(f"{'set':<12} HF ratio")
    clean_hf = stats["clean"]["hf_ratio"] if "clean" in stats else None
    for k, v in stats.items():
        rel = f"  ({v['hf_ratio'] / clean_hf:.2f}x clean)" if clean_hf and k != "clean" else ""
        echo(f"{k:<12} {v['hf_ratio']:.4f}{rel}")
    verdicts = screen_samples(x, trigs, echo)
    panels = plot_demo(x, trigs, stats, verdicts, out)
    echo(f"wrote {out}: each set's first 4 sample images with the screener's verdicts, beside its mean DCT spectrum")
    return {"stats": stats, "verdicts": verdicts, "panels": panels}


def screen_samples(x, trigs, echo=print, n=4):
    """Screen ``n`` sample images, clean and with each trigger, with the shipped int8 screener."""
    from edge.screen import Screener, default_model_path

    model = default_model_path()
    if not model.is_file():
        echo(f"(no shipped screener at {model}: skipping the screening part of the demo)")
        return None
    screener = Screener(str(model))
    echo(f"screening with {model.name} (threshold {screener.threshold:.3f}):")
    echo(f"{'image':<16} {'P(poisoned)':>11}  verdict")
    verdicts = []
    for name, imgs in [("clean", x[:n])] + [(t.name, t(x[:n]).numpy()) for t in trigs]:
        for i, img in enumerate(imgs):
            sc = screener.score(img)
            verdicts.append((name, sc, screener.verdict(sc)))
            echo(f"{name + '_' + str(i):<16} {sc:>11.3f}  {screener.verdict(sc)}")
    for name in [t.name for t in trigs]:
        rows = [v for v in verdicts if v[0] == name]
        missed = sum(1 for v in rows if v[2] != "poisoned")
        if missed:
            echo(f"note: the screener let {missed} of its {len(rows)} {name} samples through (scores under the "
                 f"threshold): it is tuned for few false alarms on clean CIFAR-10-like images, and these crops of "
                 f"one large photo are not; a miss is a real limit, not a display error")
    clean_flagged = sum(1 for v in verdicts if v[0] == "clean" and v[2] == "poisoned")
    if clean_flagged:
        echo(f"note: {clean_flagged} clean sample(s) were flagged (false alarms)")
    return verdicts
