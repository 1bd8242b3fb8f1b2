"""The ``tfbd`` command: a thin click layer over :mod:`tfbackdoor` (parse, call, print)."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _quiet_tf():
    """Import TensorFlow lazily and quietly (keeps ``tfbd --help`` fast)."""
    import logging

    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    from tfbackdoor.detector import configure_logical_cpus

    configure_logical_cpus()
    return tf


def keras_load(path):
    from tfbackdoor import detector

    return detector.load(path)


def handle_errors(fn):
    """Print user errors (``TfbdError``) on one line and exit 2; let bugs show a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from tfbackdoor.errors import TfbdError

        try:
            return fn(*args, **kwargs)
        except TfbdError as e:
            click.echo(f"tfbd: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("tfbd: interrupted (outputs are written atomically: nothing partial was left)", err=True)
            sys.exit(130)

    return wrapper


def _print_rows(rows, as_json):
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ["attack", "acc", "bdr", "fpr", "auroc", "n"]
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
def main():
    """tfbackdoor: find and make backdoor triggers through the frequency domain."""


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
    _quiet_tf()
    from tfbackdoor import analysis, data

    x, _ = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    trigs = _resolve_attacks(attacks, trigger_file, mask, alpha, trigger_dir, x.shape[1])
    stats = analysis.spectrum_stats(x, trigs)
    analysis.plot_spectra(stats, out, title=f"{dataset} (n={len(x)})")
    rows = [{"set": k, "hf_ratio": round(v["hf_ratio"], 5), "hf_ratio_mean": round(v["hf_ratio_mean"], 5), "n": v["n"]}
            for k, v in stats.items()]
    if json_out:
        analysis.write_json({"dataset": dataset, "sets": rows}, json_out)
    for r in rows:
        click.echo(f"{r['set']:<12} hf_ratio={r['hf_ratio']:.5f}  (mean per image {r['hf_ratio_mean']:.5f}, n={r['n']})")
    click.echo(f"wrote {out}" + (f" and {json_out}" if json_out else ""))


# --------------------------------------------------------------------------------- detector

@main.command("train-detector")
@click.option("--dataset", default="cifar10:train", show_default=True,
              help="Clean training images; A+B concatenates specs (e.g. cifar10:train+gtsrb:train).")
@click.option("--out", type=click.Path(), required=True, help="Output .keras file.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Clean images per batch (x2 inputs).")
@click.option("--domain", type=click.Choice(["dct", "image"]), default="dct", show_default=True)
@click.option("--arch", type=click.Choice(["cnn6", "large"]), default="cnn6", show_default=True)
@click.option("--image-size", type=int, default=None, help="Input side (default: the dataset's).")
@click.option("--limit", type=int, default=None, help="Use a seeded subset of N images (per spec for A+B).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--no-benign", is_flag=True, help="Skip the benign codec/colour processing of training images.")
@click.option("--strategy", type=click.Choice(["default", "mirrored", "multiworker"]), default="default", show_default=True)
@click.option("--log-dir", type=click.Path(), default=None, help="TensorBoard log directory.")
@click.option("--target-fpr", type=float, default=0.5, show_default=True,
              help="Set the threshold to flag this %% of held-out clean (and benign-processed) images.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def train_detector(dataset, out, epochs, batch_size, domain, arch, image_size, limit, lr, no_benign, strategy, log_dir,
                   target_fpr, seed):
    """Train a detector on clean images vs random manipulations (never a real trigger)."""
    _quiet_tf()
    from tfbackdoor import data, detector

    x, _ = data.load_arrays(dataset, image_size=image_size, limit=limit, seed=seed)
    info = {"dataset": dataset, "limit": limit, "epochs": epochs, "seed": seed, "benign": not no_benign,
            "command": "tfbd " + " ".join(sys.argv[1:])}
    click.echo(f"training {arch}/{domain} on {len(x)} clean images of {dataset} ({x.shape[1]}px), "
               f"{epochs} epochs; checkpoints in {out}.ckpt/ (rerun to resume)")
    detector.train(x, out, epochs=epochs, batch_size=batch_size, arch=arch, domain=domain, strategy=strategy,
                   log_dir=log_dir, seed=seed, lr=lr, benign=not no_benign, info=info, target_fpr=target_fpr)
    click.echo(f"wrote {out} (threshold {detector.spec_of(keras_load(out)).threshold:.4f})")


@main.command()
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--dataset", required=True, help="Clean images of the new distribution.")
@click.option("--samples", type=int, default=100, show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True)
@handle_errors
def finetune(detector_path, dataset, samples, epochs, lr, seed, out):
    """Fine-tune a detector on a few clean samples of a new dataset (they are excluded from evaluation)."""
    _quiet_tf()
    import numpy as np

    from tfbackdoor import data, detector

    model = detector.load(detector_path)
    spec = detector.spec_of(model)
    ds = data.load(dataset, image_size=spec.image_size, with_ids=True, limit=samples, seed=seed)
    xs, ids = [], []
    for bx, _, bi in ds.batch(1024).as_numpy_iterator():
        xs.append(bx)
        ids.extend(i.decode() for i in bi)
    x = np.concatenate(xs)
    click.echo(f"fine-tuning on {len(x)} clean samples of {dataset} (+ as many manipulated), {epochs} epochs")
    detector.finetune(model, x, out, samples, epochs=epochs, lr=lr, seed=seed, source_spec=dataset, sample_ids=ids)
    click.echo(f"wrote {out} ({len(ids)} samples recorded as excluded from evaluation on {dataset})")


@main.command()
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--reference", type=click.Path(), default=None, help="Evaluate the paper's HDF5 detector instead.")
@click.option("--dataset", default=None, help="Clean images; triggered copies are made with --attacks.")
@click.option("--attacks", default="all", show_default=True, help="Comma-separated attacks (all = the paper's 7).")
@_attack_option
@click.option("--benign", default="", help="Comma-separated benign variants to measure FPR on, or 'all'.")
@click.option("--clean", "clean_spec", default=None, help="A clean set made elsewhere (with --poisoned).")
@click.option("--poisoned", "poisoned_spec", default=None, help="A poisoned set made elsewhere (with --clean).")
@click.option("--limit", type=int, default=None, help="Seeded subset of the dataset.")
@click.option("--threshold", type=float, default=None, help="Override the detector's threshold.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (attack, acc, bdr, fpr, auroc, n).")
@click.option("--out", type=click.Path(), default=None, help="Also write the JSON to this file.")
@handle_errors
def evaluate(detector_path, reference, dataset, attacks, trigger_file, mask, alpha, trigger_dir, benign, clean_spec,
             poisoned_spec, limit, threshold, seed, as_json, out):
    """ACC / BDR / FPR / AUROC per attack on a clean set and its triggered copies."""
    _quiet_tf()
    from tfbackdoor import analysis, detector, perturb
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
        x = detector.load_eval_images(model, dataset, limit, seed)
        rows = detector.evaluate_images(model, x, trigs, threshold, variants)
    if out:
        analysis.write_json(rows, out)
    _print_rows(rows, as_json)


@main.command()
@click.option("--detector", "detector_path", type=click.Path(), default=None, help="Detector .keras (default: shipped).")
@click.option("--dataset", required=True, help="The training set to screen.")
@click.option("--out", type=click.Path(), required=True, help="CSV report (id, label, score, flagged).")
@click.option("--threshold", type=float, default=None, help="Override the detector's threshold.")
@click.option("--write-clean", default=None, help="npz:PATH to write the unflagged samples to.")
@click.option("--limit", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def scan(detector_path, dataset, out, threshold, write_clean, limit, seed):
    """Score every sample of a dataset, flag suspects, optionally write the sanitised set."""
    _quiet_tf()
    from tfbackdoor import detector

    model = detector.load(detector_path)
    summary = detector.scan(model, dataset, out, threshold, write_clean, limit=limit, seed=seed)
    for item in summary["skipped"]:
        click.echo(f"tfbd: skipped unreadable item: {item}", err=True)
    click.echo(json.dumps(summary))


@main.command()
@click.option("--out", type=click.Path(), default="tfbd_demo.png", show_default=True, help="Heatmap PNG.")
@handle_errors
def demo(out):
    """Show the frequency artifacts of the built-in triggers on built-in sample images (no download)."""
    _quiet_tf()
    from tfbackdoor import analysis

    analysis.demo(out, echo=click.echo)


@main.command()
def datasets():
    """List the dataset specs and the short names found under $TFBD_DATA."""
    from tfbackdoor import data

    click.echo("specs: npz:PATH  dir:PATH  tfds:NAME[:SPLIT]  A+B (concatenate)")
    click.echo(f"short names (under {data.data_root()}):")
    for name, (_, rel, _) in data.SHORT_NAMES.items():
        ok = (data.data_root() / rel).exists()
        click.echo(f"  {name:<18} {'found' if ok else 'missing'}")


if __name__ == "__main__":
    main()
