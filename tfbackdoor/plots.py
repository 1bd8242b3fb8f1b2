"""Figures: the mean DCT spectra of image sets (:func:`plot_spectra`) and the demo's figure of sample
images with the screener's verdicts beside their sets' spectra (:func:`plot_demo`). Matplotlib is
imported inside each function (Agg backend), so importing this module stays cheap."""

from __future__ import annotations

from pathlib import Path

from .atomic import save_figure


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


def plot_demo(x, trigs, stats, verdicts, out, n=4):
    """The demo figure: one row per set (clean, then each trigger): its first ``n`` sample images, each
    titled with the screener's P(poisoned) and verdict (``verdicts``: what
    :func:`cli.demo.screen_samples` returns; ``None`` without a screener), beside the set's mean DCT spectrum and HF ratio (constrained
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
