"""The ``tfbd`` command: a thin click layer over :mod:`tfbackdoor` (parse, call, print).

Long (~880 lines) by design: every command in one place, each a parse-call-print whose click
options are its manual; the shared checks, option helpers and error handling are at the top.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from tfbackdoor.specs import ARCH_NAMES, EXPORT_FOLDS, QUANTIZE_MODES, VICTIM_ARCHS   # TF-free

_TF_LOG_PRESET = "TF_CPP_MIN_LOG_LEVEL" in os.environ   # a user's own setting wins over --verbose
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_VERBOSE = False


def _quiet_tf():
    """Import TensorFlow lazily and quietly (keeps ``tfbd --help`` fast)."""
    import logging

    import tensorflow as tf

    if not _VERBOSE:
        tf.get_logger().setLevel(logging.ERROR)
    from tfbackdoor.detector import configure_logical_cpus

    configure_logical_cpus()
    return tf


def _check(datasets=(), attacks=None, triggers=(), files=(), limits=(), outs=()):
    """Cheap checks before TensorFlow is imported, so typos fail in well under a second.

    ``datasets``: specs (``None`` skipped); ``attacks``: an ``--attacks`` list; ``triggers``:
    ``--trigger``-style strings; ``files``: ``(path, what)`` pairs (``None`` paths skipped);
    ``limits``: ``(value, option)`` pairs that must be positive when given; ``outs``: ``(path, option)``
    or ``(path, option, "dir")`` outputs that must be writable (:func:`tfbackdoor.specs.check_out`,
    ``None`` skipped), so a bad ``--out`` fails before the work, not after it. Raises the same
    ``TfbdError`` the loaders would (see :mod:`tfbackdoor.specs`).
    """
    from tfbackdoor import specs
    from tfbackdoor.errors import TfbdError

    for value, option in limits:
        if value is not None and value <= 0:
            raise TfbdError(f"{option} must be positive (got {value})")
    for path, what in files:
        specs.check_file(path, what)
    for path, option, *kind in outs:
        specs.check_out(path, option, *kind)
    for d in datasets:
        if d is not None:
            specs.check_dataset(d)
    if attacks:
        specs.check_attacks(attacks)
    for t in triggers:
        if t and str(t).strip():
            specs.check_trigger(t)


def keras_load(path):
    from tfbackdoor import detector

    return detector.load(path)


def _warning_printer():
    """A ``warnings.showwarning`` that prints each warning once, on one line, without Python's
    source-line quote: ``tfbd: warning: ...``; skipped dataset items one line each with the reason."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        items = getattr(message, "items", None)
        lines = ([f"tfbd: skipped {ident}: {reason}" for ident, reason in items] if items
                 else [f"tfbd: warning: {' '.join(str(message).split())}"])
        for text in lines:
            if text not in shown:
                shown.add(text)
                click.echo(text, err=True)

    return show


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the atomic writers remove their temporary files on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_signal_handlers():
    """SIGTERM (kill, systemd, docker stop, a batch scheduler) -> the same clean exit as Ctrl-C (exit 143)."""
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:   # not the main thread (e.g. an embedding test runner): keep the default
        pass


def handle_errors(fn):
    """Print user errors (``TfbdError``) on one line and exit 2; let bugs show a traceback.
    Warnings are printed once each, on one line (see :func:`_warning_printer`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        from tfbackdoor.errors import TfbdError

        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_printer()
                return fn(*args, **kwargs)
        except TfbdError as e:
            click.echo(f"tfbd: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            click.echo(f"tfbd: {what} (outputs are written atomically: nothing partial was left)", err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)

    return wrapper


def _print_rows(rows, as_json):
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ["attack", "acc", "bdr", "fpr", "auroc"] + (["bdr_at_fpr"] if any("bdr_at_fpr" in r for r in rows) else []) + ["n"]
    width = max(12, *(len(str(r["attack"])) for r in rows))
    click.echo(f"{'attack':<{width}} " + " ".join(f"{c:>7}" for c in cols[1:]))
    for r in rows:
        vals = ["-" if r.get(c) is None else (f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])) for c in cols[1:]]
        click.echo(f"{r['attack']:<{width}} " + " ".join(f"{v:>7}" for v in vals))


def _attack_option(f):
    f = click.option("--trigger-dir", type=click.Path(), default=None,
                     help="Directory of the paper's trigger files (default $TFBD_DATA/triggers).")(f)
    f = click.option("--alpha", type=float, default=None, help="Strength of --trigger-file (default 1.0).")(f)
    f = click.option("--mask", type=click.Path(), default=None, help="Mask for --trigger-file (1 = replace).")(f)
    f = click.option("--trigger-file", type=click.Path(), default=None,
                     help="Your own trigger: an additive pattern PATH.png|npy (with --mask/--alpha).")(f)
    return f


def _resolve_attacks(names, trigger_file, mask, alpha, trigger_dir, image_size):
    from tfbackdoor import triggers

    out = triggers.expand(names, image_size, trigger_dir) if names else []
    if trigger_file:
        out.append(triggers.from_file(trigger_file, mask=mask, alpha=alpha, image_size=image_size))
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tfbackdoor", prog_name="tfbd")
@click.option("--verbose", "-v", is_flag=True, help="Show TensorFlow's start-up and runtime log lines (hidden by default).")
def main(verbose=False):
    """tfbackdoor: find and make backdoor triggers through the frequency domain."""
    global _VERBOSE
    _VERBOSE = verbose
    install_signal_handlers()
    if verbose and not _TF_LOG_PRESET:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


# --------------------------------------------------------------------------------- spectrum

@main.command()
@click.option("--dataset", default="cifar10:test", show_default=True, help="Dataset spec (see `tfbd datasets`).")
@click.option("--attacks", default="paper", show_default=True,
              help="Comma-separated attacks; all = the paper's 7 detector triggers, paper = those + smooth.")
@_attack_option
@click.option("--limit", type=int, default=2000, show_default=True, help="Images to use (seeded subset).")
@click.option("--image-size", type=int, default=None, help="Resize images to this side.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Figure (.png).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the statistics as JSON.")
@handle_errors
def spectrum(dataset, attacks, trigger_file, mask, alpha, trigger_dir, limit, image_size, seed, out, json_out):
    """Mean DCT spectrum of clean vs triggered images, and high-frequency energy ratios."""
    _check([dataset], attacks, files=[(trigger_file, "trigger file"), (mask, "trigger file")], limits=[(limit, "--limit")],
           outs=[(out, "--out"), (json_out, "--json")])
    _quiet_tf()
    from tfbackdoor import analysis, atomic, data, plots

    x, _ = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    trigs = _resolve_attacks(attacks, trigger_file, mask, alpha, trigger_dir, x.shape[1])
    stats = analysis.spectrum_stats(x, trigs)
    plots.plot_spectra(stats, out, title=f"{dataset} (n={len(x)})")
    rows = [{"set": k, "hf_ratio": round(v["hf_ratio"], 5), "hf_ratio_mean": round(v["hf_ratio_mean"], 5), "n": v["n"]}
            for k, v in stats.items()]
    if json_out:
        atomic.write_json({"dataset": dataset, "sets": rows}, json_out)
    for r in rows:
        click.echo(f"{r['set']:<12} hf_ratio={r['hf_ratio']:.5f}  (mean per image {r['hf_ratio_mean']:.5f}, n={r['n']})")
    click.echo(f"wrote {out}" + (f" and {json_out}" if json_out else ""))


# --------------------------------------------------------------------------------- detector

# Options shared by train-detector and finetune.
_benign_option = click.option(
    "--benign", "benign_spec", default="", metavar="KEY=VAL,...",
    help="Override the random benign processing applied before the clean/poisoned split, e.g. "
         "p_color=0.6,brightness=40,contrast=0.6:1.4 (keys: p_jpeg jpeg_quality p_color brightness contrast "
         "p_blur blur_sigma p_resize resize).")
_calibration_rule_option = click.option(
    "--calibration-rule", type=click.Choice(["pooled", "worst"]), default="pooled", show_default=True,
    help="pooled: --target-fpr of all held-out clean images and their benign variants together; worst: of "
         "each set (every dataset part, as is and after each benign variant) separately.")


_manipulations_option = click.option(
    "--manipulations", "manipulations", default="paper", show_default=True, metavar="KINDS",
    help="Random manipulations of the poisoned side: paper (the paper's five), generic (those + mix, small_patch, "
         "smooth_field, chroma_bump, warp) or comma-separated kinds (repeat a kind to weight it).")


def _manipulation(text, seed):
    """``--manipulations`` -> RandomManipulation, as a one-line error on an unknown kind."""
    from tfbackdoor import perturb
    from tfbackdoor.errors import TfbdError
    try:
        return perturb.RandomManipulation(kinds=perturb.parse_kinds(text), seed=seed)
    except ValueError as e:
        raise TfbdError(f"--manipulations: {e}") from None


def _benign(text, seed):
    """``--benign KEY=VAL,...`` -> BenignProcessing, as a one-line error on a bad setting."""
    from tfbackdoor import perturb
    from tfbackdoor.errors import TfbdError
    try:
        return perturb.parse_benign(text, seed)
    except ValueError as e:
        raise TfbdError(f"--benign: {e}") from None


@main.command("train-detector")
@click.option("--dataset", default="cifar10:train", show_default=True,
              help="Clean training images; A+B concatenates specs (e.g. cifar10:train+gtsrb:train).")
@click.option("--out", type=click.Path(), required=True, help="Output .keras file.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Clean images per batch (x2 inputs).")
@click.option("--domain", type=click.Choice(["dct", "image"]), default="dct", show_default=True)
@click.option("--arch", type=click.Choice(list(ARCH_NAMES)), default="cnn6", show_default=True,
              help="cnn6: the paper's 32-px detector; large: >= 128 px; edge: 224-px camera frames "
                   "on an edge CPU (4x4 patchify stem).")
@click.option("--image-size", type=int, default=None, help="Input side (default: the dataset's).")
@click.option("--limit", type=int, default=None, help="Use a seeded subset of N images (per spec for A+B).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--no-benign", is_flag=True, help="Skip the benign codec/colour processing of training images.")
@_benign_option
@_manipulations_option
@click.option("--strategy", type=click.Choice(["default", "mirrored", "multiworker"]), default="default", show_default=True)
@click.option("--log-dir", type=click.Path(), default=None, help="TensorBoard log directory.")
@click.option("--target-fpr", type=float, default=0.5, show_default=True,
              help="Set the threshold to flag this % of held-out clean (and benign-processed) images.")
@_calibration_rule_option
@click.option("--init", type=click.Path(), default=None,
              help="Continue from this detector's weights (same arch, domain and size) instead of a fresh model.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def train_detector(dataset, out, epochs, batch_size, domain, arch, image_size, limit, lr, no_benign, benign_spec,
                   manipulations, strategy, log_dir, target_fpr, calibration_rule, init, seed):
    """Train a detector on clean images vs random manipulations (never a real trigger)."""
    _check([dataset], files=[(init, "detector file")], limits=[(limit, "--limit")],
           outs=[(out, "--out"), (log_dir, "--log-dir", "dir")])
    _quiet_tf()
    from tfbackdoor import data, detector

    benign = False if no_benign else (_benign(benign_spec, seed) if benign_spec else True)
    manipulation = _manipulation(manipulations, seed)
    x, _ = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    info = {"dataset": dataset, "limit": limit, "epochs": epochs, "seed": seed,
            "benign": benign.settings() if not isinstance(benign, bool) else benign,
            "manipulations": list(manipulation.kinds), "command": "tfbd " + " ".join(sys.argv[1:])}
    click.echo(f"training {arch}/{domain} on {len(x)} clean images of {dataset} ({x.shape[1]}px), "
               f"{epochs} epochs; checkpoints in {out}.ckpt/ (rerun to resume)")
    detector.train(x, out, epochs=epochs, batch_size=batch_size, arch=arch, domain=domain, strategy=strategy,
                   log_dir=log_dir, seed=seed, lr=lr, benign=benign, info=info, target_fpr=target_fpr,
                   calibration_rule=calibration_rule, init=init, manipulation=manipulation)
    click.echo(f"wrote {out} (threshold {detector.spec_of(keras_load(out)).threshold:.4f})")


@main.command()
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--dataset", required=True, help="Clean images of the new distribution.")
@click.option("--samples", default="100", show_default=True,
              help="Clean images fine-tuned on (seeded subset; for A+B, of each part, or one count per part: "
                   "8000,100). Parts of unequal size are balanced: a smaller part is repeated to the largest's size.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--repeat", type=int, default=10, show_default=True,
              help="Passes over the samples per epoch (1 for large sets).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Clean images per batch (x2 inputs).")
@click.option("--trigger", default=None,
              help="Make the poisoned side with this trigger (e.g. smooth:PATH.npy; a comma-separated list gives each "
                   "image one of them; smooth:random draws a new low-passed pattern per image) for --trigger-share of "
                   "the pairs (the defense upgrade, paper 5.4); the rest keep random manipulations.")
@click.option("--trigger-share", type=float, default=0.5, show_default=True)
@click.option("--calibration", type=int, default=0, show_default=True,
              help="Hold out N more clean images of --dataset (of each part) and set the threshold on them "
                   "(with --target-fpr).")
@click.option("--target-fpr", type=float, default=0.5, show_default=True,
              help="With --calibration: flag this % of the held-out clean (and benign-processed) images.")
@_benign_option
@_manipulations_option
@_calibration_rule_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True)
@handle_errors
def finetune(detector_path, dataset, samples, epochs, repeat, lr, batch_size, trigger, trigger_share, calibration, target_fpr,
             benign_spec, manipulations, calibration_rule, seed, out):
    """Fine-tune a detector on clean samples of a new dataset (they are excluded from evaluation),
    or on clean vs trigger-patched samples (--trigger)."""
    _check([dataset], triggers=(trigger or "").split(","), files=[(detector_path, "detector file")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import detector
    from tfbackdoor.finetune import finetune_dataset

    benign = _benign(benign_spec, seed) if benign_spec else None
    manipulation = _manipulation(manipulations, seed)
    res = finetune_dataset(detector.load(detector_path), dataset, out, samples, epochs=epochs, repeat=repeat, lr=lr,
                           batch_size=batch_size, trigger=trigger, trigger_share=trigger_share, calibration=calibration,
                           target_fpr=target_fpr, benign=benign, manipulation=manipulation,
                           calibration_rule=calibration_rule, seed=seed, command="tfbd " + " ".join(sys.argv[1:]),
                           echo=click.echo)
    click.echo(f"wrote {out} (threshold {res['threshold']:.4f}; {res['excluded']} samples "
               f"recorded as excluded from evaluation on {dataset})")


@main.command("fit-spectral")
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--dataset", required=True,
              help="Clean images whose spectra the anomaly part learns (A+B: several sources, e.g. lossless and JPEG).")
@click.option("--samples", default="4000", show_default=True,
              help="Images of each part for the statistics (one count, or one per part: 8000,6000).")
@click.option("--calibration", type=int, default=500, show_default=True,
              help="More held-out images of each part that set the spectral thresholds (with their benign variants).")
@click.option("--target-fpr", type=float, default=0.5, show_default=True,
              help="The spectral part flags at most about this % of each calibration set and benign variant.")
@click.option("--statistic", type=click.Choice(["bands", "grid", "island", "island-only", "texture", "max"]), default="bands",
              show_default=True,
              help="bands: the largest luma and chroma coefficient of each of 5 frequency bands, each with its own "
                   "threshold; grid: the bands and the JPEG-grid statistic (a local edit made after JPEG decoding "
                   "moves its 8x8 blocks off the quantisation lattice); island: those and the island statistic "
                   "(a small rectangle of exactly one colour that stands out and whose colour appears nowhere "
                   "else: a pasted patch; above 64 px searched on the frame area-downsampled to <= 32 px); island-only: "
                   "the island statistic alone (for large camera frames); texture: the largest coefficient, and it "
                   "over the image's median one; max: the largest coefficient alone (round 5).")
@click.option("--island-tolerance", type=float, default=None,
              help="island, island-only: pixels within this many levels (every channel) of an island's colour count as its "
                   "colour found elsewhere (default 4; round 8 used 8).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True)
@handle_errors
def fit_spectral(detector_path, dataset, samples, calibration, target_fpr, statistic, island_tolerance, seed, out):
    """Add a clean-spectrum anomaly part to a DCT detector (one file; images used are excluded from evaluation).

    It learns each DCT coefficient's RMS on clean images (separately for JPEG-like and lossless-like
    images, told apart by a JPEG-grid router) and flags an image whose largest coefficient, in those
    units, passes a threshold set on held-out clean images: SIG, FTrojan/CTRL-style chroma bumps and
    watermarks stand out there. The CNN, its threshold and recorded info are kept; an image is
    flagged when either part flags it.
    """
    _check([dataset], files=[(detector_path, "detector file")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import detector
    from tfbackdoor.errors import TfbdError

    try:
        counts = [int(c) for c in str(samples).split(",")]
    except ValueError:
        raise TfbdError(f"--samples must be a count or one count per dataset part (got '{samples}')") from None
    parts = [p for p in dataset.split("+") if p.strip()]
    counts = counts * len(parts) if len(counts) == 1 else counts
    if not 0 < target_fpr < 100:
        raise TfbdError(f"--target-fpr must be in (0, 100) (got {target_fpr})")
    model = detector.load(detector_path)
    new = detector.fit_spectral(model, dataset, counts, calibration, target_fpr, seed,
                                command="tfbd " + " ".join(sys.argv[1:]), statistic=statistic,
                                island_tolerance=island_tolerance)
    detector.save(new, out)
    rep = detector.spec_of(new).info["spectral"]
    thr = lambda row: _threshold_text(row, ".2f")
    click.echo(f"wrote {out} (CNN threshold {detector.spec_of(new).threshold:.4f} kept; spectral '{statistic}' "
               f"thresholds lossless {thr(rep['thresholds'][0])}, JPEG {thr(rep['thresholds'][1])}"
               + (f", over texture {rep['texture_thresholds'][0]:.2f} / {rep['texture_thresholds'][1]:.2f}"
                  if statistic == "texture" else "") + f" at {target_fpr}% FPR; "
               f"{rep['fit_images']} + {rep['calibration_images']} images recorded as excluded from evaluation)")


def _threshold_text(row, fmt):
    """Spectral thresholds (a number or a list) as ``a/b/...``; ``-`` for a statistic left out of
    the fit (``spectral.UNUSED``, e.g. ``--statistic island-only``). Imports TensorFlow."""
    from tfbackdoor.spectral import UNUSED

    return "/".join("-" if v >= UNUSED else format(v, fmt) for v in (row if isinstance(row, list) else [row]))


@main.command()
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--reference", type=click.Path(), default=None, help="Evaluate the paper's HDF5 detector instead.")
@click.option("--dataset", default=None, help="Clean images; triggered copies are made with --attacks.")
@click.option("--attacks", default="all", show_default=True,
              help="Comma-separated attacks: all = the paper's 7, zoo = 11 attacks of other papers, zoo+jpeg = five saved as JPEG 75/90; NAME+jpegQ for any.")
@_attack_option
@click.option("--benign", default="", help="Comma-separated benign variants to measure FPR on, or 'all'.")
@click.option("--clean", "clean_spec", default=None, help="A clean set made elsewhere (with --poisoned).")
@click.option("--poisoned", "poisoned_spec", default=None, help="A poisoned set made elsewhere (with --clean).")
@click.option("--limit", type=int, default=None, help="Seeded subset of the dataset.")
@click.option("--threshold", type=float, default=None, help="Override the detector's threshold.")
@click.option("--at-fpr", type=float, default=None, metavar="PCT",
              help="Also report bdr_at_fpr: the BDR at the threshold that flags PCT % of the clean images (equal-FPR comparison).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (attack, acc, bdr, fpr, auroc, n).")
@click.option("--out", type=click.Path(), default=None, help="Also write the JSON to this file.")
@handle_errors
def evaluate(detector_path, reference, dataset, attacks, trigger_file, mask, alpha, trigger_dir, benign, clean_spec,
             poisoned_spec, limit, threshold, at_fpr, seed, as_json, out):
    """ACC / BDR / FPR / AUROC per attack on a clean set and its triggered copies."""
    pair = bool(clean_spec or poisoned_spec)
    _check([clean_spec, poisoned_spec] if pair else [dataset], None if pair else attacks,
           files=[(reference, "reference detector"), (None if reference else detector_path, "detector file"),
                  (trigger_file, "trigger file"), (mask, "trigger file")], limits=[(limit, "--limit")],
           outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import atomic, detector, perturb
    from tfbackdoor.errors import TfbdError

    model = detector.load_reference(reference) if reference else detector.load(detector_path)
    if clean_spec or poisoned_spec:
        if not (clean_spec and poisoned_spec):
            raise TfbdError("--clean and --poisoned go together")
        rows = detector.evaluate_sets(model, clean_spec, poisoned_spec, threshold)
    else:
        if not dataset:
            raise TfbdError("give --dataset (or --clean and --poisoned)")
        size = detector.spec_of(model).image_size
        trigs = _resolve_attacks(attacks, trigger_file, mask, alpha, trigger_dir, size)
        variants = list(perturb.BENIGN_VARIANTS) if benign == "all" else [b for b in benign.split(",") if b]
        rows = detector.evaluate_dataset(model, dataset, trigs, limit, seed, threshold, benign_variants=variants,
                                         at_fpr=at_fpr)
    if out:
        atomic.write_json(rows, out)
    _print_rows(rows, as_json)


def _screen_options(verb, remove_note=""):
    """The training-set screen's operating points, shared by ``scan`` (verb "flag") and ``defend``
    ("remove"): --remove-top, --suspect-top, --signature (:func:`tfbackdoor.signature.screen`)."""
    opts = [
        click.option("--remove-top", type=float, default=0.0, show_default=True, metavar="PCT",
                     help=f"Also {verb} the PCT % highest-scoring samples (a stricter operating point for "
                          f"training sets{remove_note})."),
        click.option("--suspect-top", type=float, default=0.0, show_default=True, metavar="PCT",
                     help=f"In each label whose flag rate stands out (a dirty-label target), also {verb} the PCT % "
                          "of its samples that score highest."),
        click.option("--signature", "use_signature", is_flag=True,
                     help="With --suspect-top: also find suspect labels by their label signature (the samples of a "
                          "label that share one pattern, in the DCT domain) and rank their samples by it "
                          "(tfbackdoor.signature)."),
    ]

    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def _check_screen(remove_top, suspect_top, use_signature, runner=None):
    """One-line errors for the screen's options (before any work)."""
    from tfbackdoor.errors import TfbdError

    for name, pct in (("--remove-top", remove_top), ("--suspect-top", suspect_top)):
        if not 0 <= pct < 100:
            raise TfbdError(f"{name} must be in [0, 100) percent (got {pct})")
        if runner is not None and pct:
            raise TfbdError(f"{name} needs every score before the first verdict: run it without --runner "
                            "(or pass --threshold from a first scan's report)")
    if use_signature and not suspect_top:
        raise TfbdError("--signature ranks the samples of suspect labels: give --suspect-top PCT too")


@main.command()
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--dataset", required=True,
              help="The training set to screen; dir:FOLDER may also be a flat folder of images (label -1 in the report).")
@click.option("--out", type=click.Path(), required=True, help="CSV report (id, label, score, flagged).")
@click.option("--threshold", type=float, default=None, help="Override the detector's threshold.")
@click.option("--write-clean", default=None,
              help="npz:PATH to write the unflagged samples to (with --runner: tfrecord:PREFIX, sharded).")
@_screen_options("flag", "; the set is read twice")
@click.option("--limit", type=int, default=None, help="Scan only a seeded random subset of N samples (with --seed).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--runner", type=click.Choice(["direct", "dataflow", "flink", "spark"]), default=None,
              help="Run as an Apache Beam pipeline (needs the [beam] extra): --out is then a prefix of sharded CSV "
                   "reports (PREFIX-SSSSS-of-NNNNN.csv) and PREFIX.dead-letter-*.csv lists unusable items.")
@click.option("--num-workers", type=int, default=None,
              help="With --runner: workers (direct: processes, default the CPU count; dataflow: VMs; flink: parallelism).")
@click.option("--beam-option", "beam_options", multiple=True, metavar="KEY=VAL",
              help="With --runner: a Beam pipeline option, e.g. project=P, region=R, temp_location=gs://B/tmp, "
                   "flink_master=HOST:8081 (repeatable).")
@handle_errors
def scan(detector_path, dataset, out, threshold, write_clean, remove_top, suspect_top, use_signature, limit, seed, runner,
         num_workers, beam_options):
    """Score every sample of a dataset, flag suspects, optionally write the sanitised set."""
    from tfbackdoor.errors import TfbdError

    _check_screen(remove_top, suspect_top, use_signature, runner)
    if runner is None and (num_workers is not None or beam_options):
        raise TfbdError("--num-workers and --beam-option need --runner")
    if runner is None and write_clean is not None and not str(write_clean).startswith("npz:"):
        raise TfbdError(f"--write-clean must be npz:PATH (got '{write_clean}')")
    if runner is not None and write_clean is not None and not str(write_clean).startswith("tfrecord:"):
        raise TfbdError(f"--write-clean with --runner must be tfrecord:PREFIX (got '{write_clean}')")
    remote = detector_path is not None and "://" in str(detector_path)
    clean_out = str(write_clean).split(":", 1)[1] if write_clean and ":" in str(write_clean) else None
    _check([dataset], files=[] if remote else [(detector_path, "detector file")], limits=[(limit, "--limit")],
           outs=[(out, "--out"), (clean_out, "--write-clean")])
    if runner is not None:
        try:
            import apache_beam  # noqa: F401
        except ImportError:
            raise TfbdError("--runner needs Apache Beam: pip install 'tfbackdoor[beam]'") from None
        _quiet_tf()
        from tfbackdoor import beam_scan

        summary = beam_scan.run(dataset, out, detector_path, threshold, write_clean, runner, num_workers,
                                beam_options, limit=limit, seed=seed)
        if summary["bad_items"]:
            click.echo(f"tfbd: {summary['bad_items']} unusable item(s) listed in {summary['dead_letter']}", err=True)
        click.echo(json.dumps(summary))
        return
    _quiet_tf()
    from tfbackdoor import detector

    model = detector.load(detector_path)
    # Skipped items are printed as they are met, one line each with the reason (handle_errors).
    summary = detector.scan(model, dataset, out, threshold, write_clean, limit=limit, seed=seed, remove_top=remove_top,
                           suspect_top=suspect_top, use_signature=use_signature)
    click.echo(json.dumps(summary))


@main.command()
@click.option("--dataset", required=True, help="Any dataset spec (see `tfbd datasets`).")
@click.option("--out", required=True, help="tfrecord:PREFIX: writes PREFIX-SSSSS-of-NNNNN.tfrecord.")
@click.option("--shards", type=int, default=8, show_default=True, help="Number of TFRecord files.")
@click.option("--image-size", type=int, default=None, help="Resize images to this side (default: the source's).")
@click.option("--limit", type=int, default=None, help="A seeded subset of N images.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def shard(dataset, out, shards, image_size, limit, seed):
    """Write a dataset as TFRecord shards (lossless PNG, ids, labels) to move it to a cluster (`tfbd scan --runner`)."""
    from tfbackdoor.errors import TfbdError

    if not str(out).startswith("tfrecord:") or not str(out)[9:]:
        raise TfbdError(f"--out must be tfrecord:PREFIX (got '{out}')")
    _check([dataset], limits=[(limit, "--limit"), (shards, "--shards"), (image_size, "--image-size")],
           outs=[(str(out)[9:], "--out")])
    _quiet_tf()
    from tfbackdoor import data

    summary = data.write_shards(dataset, out, shards, image_size=image_size, limit=limit, seed=seed)
    for item in summary["skipped"]:
        click.echo(f"tfbd: skipped unreadable item: {item}", err=True)
    click.echo(json.dumps(summary))


# ----------------------------------------------------------------------- edge screener (export, screen)

@main.command("export")
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--out", type=click.Path(), required=True, help="Screener .tflite (a sidecar OUT.json is written beside it).")
@click.option("--quantize", type=click.Choice(list(QUANTIZE_MODES)), default="int8", show_default=True,
              help="int8: full-integer (uint8 input, calibrated); float16: float16 weights; float32: no quantization; "
                   "int16x8: int16 activations (most faithful, but reference kernels: ~30x slower).")
@click.option("--calibration", default="cifar10:train+gtsrb:train", show_default=True,
              help="Clean images for int8 calibration (manipulated and triggered copies are added).")
@click.option("--calibration-size", type=int, default=300, show_default=True, help="Clean calibration images per spec part.")
@click.option("--fold", type=click.Choice(list(EXPORT_FOLDS)), default="auto", show_default=True,
              help="How the DCT and input normalization become TFLite ops (auto: fc for int8 up to 32x32 px, "
                   "basis above: small DCT basis matmuls in both orders + per-frequency scales; none for float).")
@click.option("--clip", type=float, default=None,
              help="int8: clip normalized DCT values to +-CLIP before quantizing (default 8 with --fold fc or basis; 0 = off).")
@click.option("--calibration-tail", "tail", type=float, default=None,
              help="int8: share of each activation's calibration values left outside its int8 range "
                   "(default 0.001; 0 = TFLite's min..max).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def export_cmd(detector_path, out, quantize, calibration, calibration_size, fold, clip, tail, seed, as_json):
    """Export a detector as a LiteRT screener: uint8 [1,H,W,3] in, P(poisoned) [1,1] out, builtin ops only."""
    _check(files=[(detector_path, "detector file")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import export

    summary = export.export(detector_path or None, out, quantize, calibration, calibration_size, seed=seed, fold=fold,
                            clip=clip, tail=tail, echo=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "op_list"}, indent=2))
        return
    ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in summary["ops"].items())
    click.echo(f"ops (builtin only): {ops}")
    if summary["float_ops_between"]:
        click.echo(f"float ops inside the quantized graph: {', '.join(summary['float_ops_between'])}")
    click.echo(f"input uint8 [1, {summary['image_size'][0]}, {summary['image_size'][1]}, 3] -> output P(poisoned) float32 [1, 1]; "
               f"threshold {summary['threshold']:.6g}")
    if summary.get("spectral"):
        rows = summary["spectral"]["thresholds"]
        shown = "; ".join(_threshold_text(row, ".4g") for row in rows) if isinstance(rows[0], list) \
            else _threshold_text(rows, ".4g")
        click.echo(f"spectral part: the .tflite is the CNN; the sidecar's 'spectral' entry (thresholds {shown}) is "
                   "recomputed in numpy by edge/screen.py and combined with it")
    click.echo(f"wrote {summary['out']} ({summary['bytes'] / 1e6:.2f} MB, {quantize}, fold={summary['fold']}) "
               f"and {summary['sidecar']}")


@main.command("screen", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", type=click.Path(), default=None,
              help="Screener .tflite (default: the shipped saved_models/screener_cifar10_int8.tflite).")
@click.option("--threshold", type=float, default=None, help="Poisoned if score > T (default: the sidecar's; required without one).")
@click.option("--every", type=int, default=None, help="Process every N-th video/camera frame.")
@click.argument("sources", nargs=-1, type=click.UNPROCESSED)
def screen_cmd(model, threshold, every, sources):
    """Screen images, folders, videos or a camera with a .tflite screener (runs edge/screen.py).

    One JSON line per image/frame, then a summary (with frames/s). Other edge/screen.py options pass
    through (--camera IDX, --max-frames N, --resize crop|stretch, --threads N, --summary-only,
    --out FILE.csv|FILE.jsonl for per-frame rows written atomically); see edge/README.md. Videos and
    cameras need the [video] extra (OpenCV). Exit 0 when every input was screened, 1 when the run finished but an input was missing,
    unreadable or too large or a folder had no images, 2 on a usage or model error.
    """
    from edge.screen import main as edge_main

    argv = []
    if model is not None:
        argv += ["--model", model]
    if threshold is not None:
        argv += ["--threshold", repr(threshold)]
    if every is not None:
        argv += ["--every", str(every)]
    sys.exit(edge_main(argv + list(sources)))


@main.command()
@click.option("--out", type=click.Path(), default="tfbd_demo.png", show_default=True, help="Heatmap PNG.")
@handle_errors
def demo(out):
    """Show the frequency artifacts of the built-in triggers on built-in sample images (no download)."""
    _check(outs=[(out, "--out")])
    _quiet_tf()
    from cli.demo import demo as run_demo

    run_demo(out, echo=click.echo)


@main.command()
def datasets():
    """List the dataset specs and the short names found under $TFBD_DATA."""
    from tfbackdoor import specs as data   # TF-free: the same table and data_root as tfbackdoor.data

    click.echo("specs: " + "  ".join(data.SPEC_FORMS) + "  tfrecord:GLOB  tar:GLOB  A+B (concatenate)")
    click.echo(f"short names (under {data.data_root()}; `tfbd data prepare NAME` writes the missing ones):")
    for name, (_, rel, _) in data.SHORT_NAMES.items():
        ok = (data.data_root() / rel).exists()
        click.echo(f"  {name:<18} {'found' if ok else 'missing'}")
    for name, rel in data.CROP_SOURCES.items():
        ok = (data.data_root() / rel).is_dir()
        click.echo(f"  {name:<18} {'found' if ok else 'missing'}  ({data.DEFAULT_CROPS} crops of the photos in {rel}/)")


@main.group("data")
def data_group():
    """Get public datasets into the layout $TFBD_DATA expects."""


@data_group.command("prepare")
@click.argument("name")
@click.option("--data-dir", type=click.Path(), default=None, help="Where to write (default: $TFBD_DATA).")
@click.option("--force", is_flag=True, help="Write again even when the files exist.")
@handle_errors
def data_prepare(name, data_dir, force):
    """Download NAME (cifar10, or tfds:NAME for any TFDS image dataset) into $TFBD_DATA (needs internet)."""
    from tfbackdoor import specs

    root = Path(data_dir) if data_dir else specs.data_root()
    _check(outs=[(root, "--data-dir", "dir")])
    from tfbackdoor import prepare

    prepare.prepare(name, root, force=force, echo=click.echo)


# ------------------------------------------------------------ smooth triggers and victims (Section 5)

def _class_name(spec, label):
    """The class folder name of ``label`` for ``dir``-based specs (e.g. cifar10), else ''."""
    try:
        from tfbackdoor import data

        names = data.resolve(spec.split("+")[0]).class_names
        return f" ({names[label]})" if names and 0 <= label < len(names) else ""
    except Exception:
        return ""


@main.command("train-victim")
@click.option("--dataset", default="cifar10:train", show_default=True, help="Training images (dataset spec).")
@click.option("--test-dataset", default="cifar10:test", show_default=True,
              help="Test images for the per-epoch clean ACC and ASR ('none' to skip).")
@click.option("--out", type=click.Path(), required=True, help="Output .keras (history and poisoning in a .json of the same stem).")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (cosine decay).")
@click.option("--width", type=int, default=64, show_default=True, help="Filters of the first block (64/128/256).")
@click.option("--arch", type=click.Choice(VICTIM_ARCHS), default="vgg", show_default=True,
              help="vgg: three VGG blocks; resnet: a pre-activation ResNet of the same widths.")
@click.option("--no-flip", is_flag=True, help="No random horizontal flips (use for traffic signs).")
@click.option("--poison", "poison_trigger", default=None,
              help="Poison with this trigger: an attack name, a .png/.npy pattern file, or smooth:PATH.npy.")
@click.option("--poison-rate", type=float, default=0.1, show_default=True, help="Share of the training set poisoned.")
@click.option("--target", type=int, default=0, show_default=True, help="Backdoor target label.")
@click.option("--limit", type=int, default=None, help="Seeded subset of the training set.")
@click.option("--test-limit", type=int, default=None, help="Seeded subset of the test set.")
@click.option("--image-size", type=int, default=None, help="Resize images to this side.")
@click.option("--num-classes", type=int, default=None, help="Output classes (default: max label + 1).")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def train_victim_cmd(dataset, test_dataset, out, epochs, batch_size, lr, width, arch, no_flip, poison_trigger, poison_rate,
                     target, limit, test_limit, image_size, num_classes, seed):
    """Train a victim classifier, optionally poisoned; prints clean ACC and ASR every epoch."""
    _check([dataset, None if (test_dataset or "none").lower() == "none" else test_dataset], triggers=[poison_trigger],
           limits=[(limit, "--limit"), (test_limit, "--test-limit")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import data, victim
    from tfbackdoor.atomic import sidecar_path

    x, y = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    test = None
    if test_dataset and test_dataset.lower() != "none":
        test = data.load_arrays(test_dataset, image_size=image_size or x.shape[1], limit=test_limit, seed=seed)
    what = f"poisoned with {poison_trigger} ({poison_rate:g} of the set -> label {target})" if poison_trigger else "clean"
    click.echo(f"training a {arch} victim on {len(x)} images of {dataset} ({x.shape[1]}px), {what}, {epochs} epochs; "
               f"checkpoints in {out}.ckpt/ (rerun to resume)")
    info = {"dataset": dataset, "test_dataset": test_dataset, "limit": limit, "command": "tfbd " + " ".join(sys.argv[1:])}
    _, history = victim.train_victim(x, y, out, epochs=epochs, batch_size=batch_size, poison=poison_trigger,
                                     poison_rate=poison_rate, target=target, test=test, seed=seed, lr=lr, width=width,
                                     flip=not no_flip, num_classes=num_classes, echo=click.echo, info=info, arch=arch)
    last = history[-1] if history else {}
    summary = "  ".join(f"{k} {last[k]:.2f}%" for k in ("acc", "asr") if k in last)
    click.echo(f"wrote {out} and {sidecar_path(out)}" + (f"  (final: {summary})" if summary else ""))


@main.command("poison")
@click.option("--dataset", default="cifar10:train", show_default=True, help="Labelled training images (dataset spec).")
@click.option("--trigger", required=True, help="An attack name, a .png/.npy pattern file, or smooth:PATH.npy.")
@click.option("--rate", type=float, default=0.1, show_default=True, help="Share of the set poisoned.")
@click.option("--target", type=int, required=True, help="Backdoor target label.")
@click.option("--out", type=click.Path(), required=True, help="Output .npz (x, y, poisoned indices); use as npz:OUT.")
@click.option("--limit", type=int, default=None, help="Seeded subset.")
@click.option("--image-size", type=int, default=None, help="Resize images to this side.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def poison_cmd(dataset, trigger, rate, target, out, limit, image_size, seed):
    """Write a poisoned copy of a training set (dirty-label, as train-victim --poison does it)."""
    _check([dataset], triggers=[trigger], limits=[(limit, "--limit")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import data, victim
    from tfbackdoor.atomic import sidecar_path

    x, y = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    n_cls = int(y.max()) + 1 if len(y) else 0
    victim.check_target(max(n_cls, 1), target, dataset)
    trig = victim.resolve_trigger(trigger, x.shape[1])
    x2, y2, idx = victim.poison(x, y, trig, rate, target, seed)
    victim.save_poisoned_npz(out, x2, y2, idx, {"dataset": dataset, "trigger": trig.name, "rate": rate, "target": target,
                                                "seed": seed, "command": "tfbd " + " ".join(sys.argv[1:])})
    click.echo(f"wrote {out} ({len(x2)} images, {len(idx)} poisoned with {trig.name} -> label {target}; "
               f"indices in its 'poisoned' array and {sidecar_path(out)})")


@main.command("attack-eval")
@click.option("--model", "model_path", type=click.Path(), required=True, help="Victim .keras file.")
@click.option("--trigger", required=True, help="An attack name, a .png/.npy pattern file, or smooth:PATH.npy.")
@click.option("--target", type=int, required=True, help="Backdoor target label.")
@click.option("--dataset", default="cifar10:test", show_default=True, help="Labelled test images.")
@click.option("--limit", type=int, default=None, help="Seeded subset.")
@click.option("--image-size", type=int, default=None, help="Resize images to this side.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--detector", "detector_paths", type=click.Path(), multiple=True,
              help="Screen inputs with this detector first: also report the ASR on inputs it lets through. "
                   "Repeatable: an input is then rejected when any of the detectors flags it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (attack, target, acc, asr, n, n_clean).")
@click.option("--out", type=click.Path(), default=None, help="Also write the JSON to this file.")
@handle_errors
def attack_eval_cmd(model_path, trigger, target, dataset, limit, image_size, seed, detector_paths, as_json, out):
    """Clean accuracy and attack success rate (ASR) of a victim for a trigger and target."""
    _check([dataset], triggers=[trigger],
           files=[(model_path, "model file")] + [(p, "detector file") for p in detector_paths],
           limits=[(limit, "--limit")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import atomic, data, victim

    model = victim.load(model_path)
    victim.check_target(model, target, model_path)
    x, y = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    trig = victim.resolve_trigger(trigger, x.shape[1])
    screen = None
    if detector_paths:
        from tfbackdoor import detector

        screen = victim.any_screen(*[detector.screen(detector.load(p)) for p in detector_paths])
    row = victim.attack_eval(model, x, y, trig, target, name=model_path, screen=screen)
    row = {"model": str(model_path), "dataset": dataset, **row}
    detector_path = ",".join(str(p) for p in detector_paths)
    if detector_paths:
        row["detector"] = detector_path
    if out:
        atomic.write_json(row, out)
    if as_json:
        click.echo(json.dumps(row, indent=2))
    else:
        click.echo(f"{row['attack']}: clean ACC {row['acc']:.2f}% (n={row['n_clean']})  "
                   f"ASR {row['asr']:.2f}% -> label {row['target']} (n={row['n']})")
        if "asr_screened" in row:
            click.echo(f"behind the screener ({detector_path}): ASR {row['asr_screened']:.2f}%  "
                       f"(triggered inputs rejected {row['bdr']:.2f}%, clean inputs rejected {row['fpr']:.2f}%, "
                       f"clean accepted and correct {row['acc_screened']:.2f}%)")


@main.command("defend")
@click.option("--dataset", default="cifar10:train", show_default=True, help="The clean training set to poison.")
@click.option("--test-dataset", default="cifar10:test", show_default=True, help="Labelled test images (ACC and ASR).")
@click.option("--attacks", required=True, help="Comma-separated attacks (names, smooth:PATH.npy, pattern files).")
@click.option("--rate", type=float, default=0.1, show_default=True, help="Share of the training set poisoned.")
@click.option("--target", type=int, default=0, show_default=True, help="Backdoor target label.")
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--threshold", type=float, default=None, help="Screen threshold (default: the detector's).")
@_screen_options("remove")
@click.option("--scan-only", is_flag=True,
              help="Only poison and screen: the scan's recall, precision and clean images removed per attack, no victims.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Victim epochs (the same for every victim).")
@click.option("--width", type=int, default=32, show_default=True, help="Victim width.")
@click.option("--victim-arch", type=click.Choice(VICTIM_ARCHS), default="vgg", show_default=True,
              help="Victim architecture (tfbd train-victim --arch).")
@click.option("--limit", type=int, default=None, help="Seeded subset of the training set.")
@click.option("--test-limit", type=int, default=None, help="Seeded subset of the test set.")
@click.option("--no-clean-reference", is_flag=True, help="Skip the victim trained on the clean set (reference ACC).")
@click.option("--undefended", is_flag=True,
              help="Also train a victim on each whole poisoned set (no screen): the backdoor the screen must remove.")
@click.option("--out-dir", type=click.Path(), required=True,
              help="Folder for the victims (one .keras + .json each). Rerunning the same command reuses the "
                   "victims already trained there on the same set with the same budget.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--out", type=click.Path(), default=None, help="Also write the JSON rows to this file.")
@handle_errors
def defend_cmd(dataset, test_dataset, attacks, rate, target, detector_path, threshold, remove_top, suspect_top, use_signature,
               scan_only, epochs, width, victim_arch, limit, test_limit, no_clean_reference, undefended, out_dir, seed, as_json,
               out):
    """Poison -> scan -> train on what is left -> attack-eval, for each attack; one table."""
    _check([dataset, test_dataset], triggers=attacks.split(","), files=[(detector_path, "detector file")],
           limits=[(limit, "--limit"), (test_limit, "--test-limit"), (epochs, "--epochs")],
           outs=[(out_dir, "--out-dir", "dir"), (out, "--out")])
    _check_screen(remove_top, suspect_top, use_signature)
    if scan_only and undefended:
        from tfbackdoor.errors import TfbdError

        raise TfbdError("--undefended trains victims: it cannot go with --scan-only")
    _quiet_tf()
    from tfbackdoor import atomic, defend, detector

    det = detector.load(detector_path)
    size = detector.spec_of(det).image_size
    # The screen is an evaluation of the detector: the images it was fine-tuned or calibrated on are left out.
    x, y = detector.load_eval_images(det, dataset, limit=limit, seed=seed, with_labels=True)
    test = detector.load_eval_images(det, test_dataset, limit=test_limit, seed=seed, with_labels=True)
    rows = defend.defend(x, y, test, [a for a in attacks.split(",") if a.strip()], det, out_dir, rate=rate,
                         target=target, threshold=threshold, remove_top=remove_top, suspect_top=suspect_top,
                         use_signature=use_signature, scan_only=scan_only, epochs=epochs, width=width,
                         seed=seed, echo=click.echo, clean_reference=not no_clean_reference, undefended=undefended,
                         arch=victim_arch)
    if out:
        atomic.write_json({"command": "tfbd " + " ".join(sys.argv[1:]), "rows": rows}, out)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ["recall", "precision", "clean_removed", "n_poisoned_kept", "suspect_labels", "acc", "acc_drop", "asr",
            "asr_clean_victim", "asr_screened"] + (["acc_undefended", "asr_undefended"] if undefended else [])
    click.echo("| attack | " + " | ".join(cols) + " |")
    click.echo("|---|" + "---|" * len(cols))
    for r in rows:
        click.echo(f"| {r['attack']} | " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |")


@main.command("smooth")
@click.option("--model", "model_path", type=click.Path(), required=True, help="Trained (clean) victim .keras.")
@click.option("--dataset", default="cifar10:train", show_default=True, help="Labelled images to search on.")
@click.option("--samples", type=int, default=500, show_default=True, help="Images used (seeded subset).")
@click.option("--fooling-rate", type=float, default=0.9, show_default=True, help="Stop when Err reaches this (0..1).")
@click.option("--out", type=click.Path(), required=True, help="Trigger .npy (float32 HxWx3); also a .json and a .png of the same stem.")
@click.option("--lam", type=float, default=1.0, show_default=True, help="Strength: patched = minmax(x + lam * r), r in [0, 0.2].")
@click.option("--step", type=float, default=0.5, show_default=True, help="Peak of each batch update, relative to 0.2.")
@click.option("--max-passes", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--holdout", type=float, default=0.2, show_default=True, help="Share of samples held out to measure Err.")
@click.option("--target", type=int, default=None, help="Fix the target label (default: the dominant label).")
@click.option("--image-size", type=int, default=None, help="Resize images to this side.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def smooth_cmd(model_path, dataset, samples, fooling_rate, out, lam, step, max_passes, batch_size, holdout, target,
               image_size, seed):
    """Search a smooth (low-frequency) trigger on a victim: paper Algorithm 1."""
    _check([dataset], files=[(model_path, "model file")], limits=[(samples, "--samples")], outs=[(out, "--out")])
    _quiet_tf()
    from tfbackdoor import analysis, atomic, data, smooth, triggers, victim
    from tfbackdoor.atomic import sidecar_path

    model = victim.load(model_path)
    x, y = data.load_arrays(dataset, image_size=image_size, limit=samples, seed=seed)
    victim.check_model_fits(model, x, model_path)
    click.echo(f"searching a smooth trigger on {len(x)} images of {dataset} (lam={lam:g}, goal Err >= {fooling_rate:g}, "
               f"at most {max_passes} passes)")

    def show(rec):
        dom = "-" if rec["dominant"] is None else rec["dominant"]
        click.echo(f"pass {rec['pass']:>3}  fooling rate {100 * rec['fooling_rate']:6.2f}%  target {rec['target']}  "
                   f"dominant {dom}  not yet fooled {rec['active'] if rec['active'] is not None else '-'}  "
                   f"{rec['seconds']:.1f}s")

    res = smooth.smooth_trigger_search(model, x, y, fooling_rate=fooling_rate, lam=lam, max_passes=max_passes,
                                       batch_size=batch_size, step=step, holdout=holdout, seed=seed, progress=show,
                                       target=target, name=model_path)
    trig = triggers.SmoothTrigger(res.trigger, name="smooth_found")
    stats = analysis.spectrum_stats(x, [trig])
    atomic.save_npy(res.trigger, out)
    meta = {"target": res.target, "fooling_rate": round(res.fooling_rate, 4), "reached": res.reached,
            "samples": int(len(x)), "dataset": dataset, "lam": lam, "step": step, "holdout": holdout, "seed": seed,
            "hf_ratio": round(stats["smooth_found"]["hf_ratio"], 5), "clean_hf_ratio": round(stats["clean"]["hf_ratio"], 5),
            "trigger_hf_ratio": round(smooth.trigger_hf_ratio(res.trigger), 6),
            "range": [float(res.trigger.min()), float(res.trigger.max())], "model": str(model_path),
            "history": res.history, "command": "tfbd " + " ".join(sys.argv[1:])}
    meta_path, png_path = sidecar_path(out), Path(out).with_suffix(".png")
    atomic.write_json(meta, meta_path)
    smooth.save_preview(res.trigger, x[:1], png_path, stats,
                        title=f"smooth trigger -> label {res.target}, fooling rate {100 * res.fooling_rate:.1f}%")
    click.echo(f"HF ratio: clean {meta['clean_hf_ratio']:.5f}  patched {meta['hf_ratio']:.5f}")
    if not res.reached:
        click.echo(f"note: the goal {fooling_rate:g} was not reached in {max_passes} passes; kept the best trigger")
    click.echo(f"target label: {res.target}{_class_name(dataset, res.target)}  "
               f"(fooling rate {100 * res.fooling_rate:.2f}% on held-out samples)")
    click.echo(f"wrote {out}, {meta_path}, {png_path} (use it as --poison smooth:{out} --target {res.target})")


@main.command("naive-smooth")
@click.option("--out-dir", type=click.Path(), required=True, help="Folder for naive_smooth_0..4.npy.")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def naive_smooth_cmd(out_dir, image_size, seed):
    """Write the five naive smooth triggers (low-passed noise and photo crops, in [0, 0.2])."""
    _check(outs=[(out_dir, "--out-dir", "dir")])
    _quiet_tf()

    from tfbackdoor import atomic, smooth

    for t in smooth.naive_smooth_triggers(image_size, seed):
        path = Path(out_dir) / f"{t.name}.npy"
        atomic.save_npy(t.pattern, path)
        click.echo(f"wrote {path}  (HF ratio of the pattern {smooth.trigger_hf_ratio(t.pattern):.6f}; "
                   f"use as smooth:{path})")


if __name__ == "__main__":
    main()
