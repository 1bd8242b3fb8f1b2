"""Spectrum analysis (paper Section 3, Figure 1), figures, JSON output and the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import save_figure
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


def plot_spectra(stats: dict, out, title=""):
    """Heatmaps of the mean log10 |DCT| spectra on one shared colour scale, labelled with HF ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    cols = min(len(names), 5)
    rows = (len(names) + cols - 1) // cols
    vmin = min(float(stats[k]["mean_log_spectrum"].min()) for k in names)
    vmax = max(float(stats[k]["mean_log_spectrum"].max()) for k in names)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.1 * rows + 0.4), squeeze=False, layout="constrained")
    im = None
    for ax, k in zip(axes.flat, names):
        im = ax.imshow(stats[k]["mean_log_spectrum"], cmap="viridis", vmin=vmin, vmax=vmax)
        kind, sep, path = k.partition(":")                # file triggers: "smooth:DIR/x.npy" -> "smooth:x.npy"
        label = f"{kind}:{Path(path).name}" if sep and "/" in path else k
        ax.set_title(f"{label}\nHF ratio {stats[k]['hf_ratio']:.4f}", fontsize=9)
        ax.set_xlabel("horizontal freq v", fontsize=7)
        ax.set_ylabel("vertical freq u", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="mean log10(|DCT| + 1)")
    if title:
        fig.suptitle(f"Mean DCT spectrum: {title}", fontsize=11)
    save_figure(fig, out)
    plt.close(fig)


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


def plot_demo(x, trigs, stats, verdicts, out, n=4):
    """The demo figure: one row per set (clean, then each trigger): its first ``n`` sample images, each
    titled with the screener's P(poisoned) and verdict (``verdicts``: what :func:`screen_samples`
    returns; ``None`` without a screener), beside the set's mean DCT spectrum and HF ratio (constrained
    layout, so no label overlaps). Returns the panels drawn: ``{"images": [(set, i), ...], "spectra": [set, ...]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [("clean", x[:n])] + [(t.name, t(x[:n]).numpy()) for t in trigs]
    by_set = {}
    for name, sc, verdict in verdicts or []:
        by_set.setdefault(name, []).append((sc, verdict))
    vmin = min(float(stats[k]["mean_log_spectrum"].min()) for k, _ in sets)
    vmax = max(float(stats[k]["mean_log_spectrum"].max()) for k, _ in sets)
    fig, axes = plt.subplots(len(sets), n + 1, figsize=(1.9 * (n + 1) + 0.8, 2.1 * len(sets) + 0.7),
                             squeeze=False, layout="constrained")
    panels = {"images": [], "spectra": []}
    clean_hf = stats["clean"]["hf_ratio"]
    im = None
    for row, (name, imgs) in zip(axes, sets):
        for i, (ax, img) in enumerate(zip(row[:n], imgs)):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=10)
            if i < len(by_set.get(name, [])):
                sc, verdict = by_set[name][i]
                wrong = (verdict == "poisoned") == (name == "clean")
                note = ("\n(false alarm)" if name == "clean" else "\n(missed)") if wrong else ""
                ax.set_title(f"{sc:.2f} {verdict}{note}", fontsize=8, color="tab:red" if wrong else "black")
            panels["images"].append((name, i))
        ax = row[n]
        im = ax.imshow(stats[name]["mean_log_spectrum"], cmap="viridis", vmin=vmin, vmax=vmax)
        rel = "" if name == "clean" else f"\n({stats[name]['hf_ratio'] / clean_hf:.2f}x clean)"
        ax.set_title(f"HF ratio {stats[name]['hf_ratio']:.4f}{rel}", fontsize=8)
        if name == sets[-1][0]:
            ax.set_xlabel("horizontal freq v", fontsize=7)
        ax.set_ylabel("vertical freq u", fontsize=7)
        ax.tick_params(labelsize=6)
        panels["spectra"].append(name)
    fig.colorbar(im, ax=axes[:, n].tolist(), shrink=0.8, label="mean log10(|DCT| + 1)")
    what = "the int8 screener's P(poisoned) and verdict (red: wrong)" if verdicts else "no screener found"
    fig.suptitle(f"Built-in samples, clean and with each built-in trigger: {what};\n"
                 f"right: the set's mean DCT spectrum ({len(x)} images) and HF ratio", fontsize=10)
    save_figure(fig, out)
    plt.close(fig)
    return panels


def demo(out, echo=print):
    """Spectra of built-in sample images, clean and with the built-in triggers, the verdicts of the
    shipped int8 screener on a few of them, and a figure of both (:func:`plot_demo`). Returns
    ``{"stats", "verdicts", "panels"}``."""
    from . import triggers

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
