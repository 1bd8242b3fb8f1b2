"""Throughput at the machine's limit (issue 12): every ratio of the issue in one run.

Each group of configurations is timed ``--repeats`` times *interleaved* (A B C A B C ...), after
one untimed warm-up call each (tracing); the median rate is kept and the spread (min..max over
the repeats) printed beside it. A ratio is the quotient of two medians; ``[lo..hi]`` after it is
the range of the per-round quotients (A and B of the same round ran back to back, under the same
background load). Images are real CIFAR-10 training images (``cifar10:train``, seeded subset).

Groups:

* training: one epoch over ``--n`` clean images = ``2 n`` inputs, ``model.fit`` for a fixed
  number of steps (``n / batch``), weights and optimizer reset before every timing (a model fit
  again on inputs it has learned slows down: denormal gradients):
  ``full``: :func:`detector.training_dataset` (benign processing, one manipulation, DCT);
  ``ours``: the same model on cached ready inputs (the same epoch materialised once);
  ``plain``: a plain Keras cnn6 of the paper's layout (3 x [2 x (conv3x3 + ELU + BN), maxpool 2,
  dropout .2/.3/.4], flatten, dense softmax 2; L2 1e-4 as ours, no Normalization, no DetectorSpec)
  on the same cached inputs. Ratios (a) full/ours and (b) ours/plain.
* pipeline: clean images/s through :func:`detector.training_dataset` alone (with and without
  benign processing) vs the paper-style numpy/scipy per-image loop
  (:func:`benchmarks.pipeline_throughput.paper_style_loop`, reused as is). Ratio (c).
* scoring (the shipped detector): ``model.predict`` on ready DCT inputs (batch 256) vs
  :func:`detector.score` from uint8 images in memory, the previous eager ``tf.data`` path of
  ``score`` (for before/after), the evaluate path (:func:`detector.evaluate_images` with BadNets:
  ``2 n`` images scored), :func:`detector.scan` of an in-memory ``npz:`` and of a ``dir:`` of PNG
  files, and decode-only of that folder (``data.load``, batched, nothing scored). Ratios (d).
* startup: wall time of ``tfbd evaluate --dataset cifar1O:test`` (a typo: one error line) and
  ``tfbd --help`` as subprocesses, beside ``python -c "import tensorflow"``. (e): goal < 1.5 s.

    python benchmarks/throughput.py --n 4096 --repeats 3
    python benchmarks/throughput.py --quick            # 1,024 images, 2 repeats: a smoke run

Writes ``benchmarks/results/throughput.json`` (``--out``) with every rate, ratio and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def interleaved(configs: dict, repeats: int, warmup: bool = True, echo=print) -> dict:
    """Time every ``name -> fn`` (``fn()`` returns the number of items it processed) ``repeats``
    times, interleaved; returns ``name -> {"median", "min", "max", "runs"}`` in items/s."""
    if warmup:
        for fn in configs.values():
            fn()
    runs = {k: [] for k in configs}
    for r in range(repeats):
        for name, fn in configs.items():
            t = time.perf_counter()
            count = fn()
            dt = time.perf_counter() - t
            runs[name].append(count / dt)
            echo(f"  round {r + 1}/{repeats} {name:<22} {count / dt:10.1f} /s  ({count} in {dt:.2f} s)")
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in runs.items()}


def ratio(res: dict, a: str, b: str) -> dict:
    per_round = [x / y for x, y in zip(res[a]["runs"], res[b]["runs"])]
    return {"ratio": res[a]["median"] / res[b]["median"], "min": min(per_round), "max": max(per_round),
            "of": f"{a} / {b}"}


def show(title: str, res: dict, unit: str = "/s"):
    print(f"\n{title}")
    for k, v in res.items():
        print(f"  {k:<24} median {v['median']:10.1f} {unit}   spread {v['min']:.1f} .. {v['max']:.1f}")


def show_ratio(label: str, r: dict, goal: str = ""):
    print(f"  RATIO {label:<44} {r['ratio']:6.2f}x  [{r['min']:.2f}..{r['max']:.2f}]  ({r['of']}){'  goal ' + goal if goal else ''}")


# ------------------------------------------------------------------------------------ training

def plain_cnn6(image_size=32, l2=1e-4):
    """A plain Keras cnn6 of the paper's layout (no input normalization, no metadata layer)."""
    import keras
    from keras import layers, regularizers

    inp = keras.Input((image_size, image_size, 3))
    x = inp
    for filters, drop in ((32, 0.2), (64, 0.3), (128, 0.4)):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", kernel_regularizer=regularizers.l2(l2))(x)
            x = layers.Activation("elu")(x)
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(drop)(x)
    x = layers.Flatten()(x)
    out = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inp, out, name="plain_cnn6")


def bench_training(x, batch_size, repeats, seed=0):
    import keras
    import numpy as np
    import tensorflow as tf

    from tfbackdoor import detector

    n = (len(x) // batch_size) * batch_size
    x = x[:n]
    steps = n // batch_size
    keras.utils.set_random_seed(seed)
    ours = detector.build("cnn6", x.shape[1], "dct")
    detector.adapt_normalization(ours, x, "dct", n=min(n, 2048), seed=seed)
    plain = plain_cnn6(x.shape[1])
    for m in (ours, plain):
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        m.build((None,) + x.shape[1:])
        m.optimizer.build(m.trainable_variables)
    init = {id(m): m.get_weights() for m in (ours, plain)}

    def reset(m):
        m.set_weights(init[id(m)])
        for v in m.optimizer.variables:
            v.assign(tf.zeros_like(v))

    # One epoch of the training pipeline, materialised once: the "ready inputs".
    xs, ys = [], []
    for bx, by in detector.training_dataset(x, batch_size, seed):
        xs.append(bx.numpy())
        ys.append(by.numpy())
    ready_x, ready_y = np.concatenate(xs), np.concatenate(ys)
    print(f"training: {n} clean images -> {len(ready_x)} inputs per epoch, {steps} steps of {2 * batch_size}")

    def ready_ds():
        return tf.data.Dataset.from_tensor_slices((ready_x, ready_y)).batch(2 * batch_size).prefetch(tf.data.AUTOTUNE)

    def fit(model, ds_fn):
        def run():
            reset(model)
            model.fit(ds_fn(), epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
            return 2 * n
        return run

    # Each dataset is built (and its maps traced) once, as model.fit(ds, epochs=E) does; every fit
    # call iterates it again: a new epoch with new random draws.
    full, ready = detector.training_dataset(x, batch_size, seed), ready_ds()
    configs = {
        "full_pipeline": fit(ours, lambda: full),
        "ours_ready": fit(ours, lambda: ready),
        "plain_ready": fit(plain, lambda: ready),
    }
    res = interleaved(configs, repeats)
    show("training (inputs/s, model.fit, fresh weights per timing)", res)
    ratios = {"a_training_full_vs_model_only": ratio(res, "full_pipeline", "ours_ready"),
              "b_ours_vs_plain_cnn6": ratio(res, "ours_ready", "plain_ready")}
    show_ratio("(a) training full pipeline / model only", ratios["a_training_full_vs_model_only"], ">= 0.9")
    show_ratio("(b) our cnn6 / plain Keras cnn6", ratios["b_ours_vs_plain_cnn6"], ">= 0.95")
    return {"inputs_per_timing": 2 * n, "batch_inputs": 2 * batch_size, "rates": res, "ratios": ratios}


# ------------------------------------------------------------------------------------ pipeline

def bench_pipeline(x, batch_size, repeats, seed=0):
    from pipeline_throughput import paper_style_loop

    from tfbackdoor import detector

    def ours(benign):
        ds = detector.training_dataset(x, batch_size, seed, benign=None if benign else False)   # traced once

        def run():   # one epoch (new random draws each time)
            for _ in ds:
                pass
            return len(x)
        return run

    def loop():
        paper_style_loop(x, seed)
        return len(x)

    res = interleaved({"tfdata_pipeline": ours(True), "tfdata_no_benign": ours(False), "numpy_scipy_loop": loop},
                      repeats)
    show("training-data pipeline alone (clean images/s; each gives a clean and a manipulated DCT input)", res)
    ratios = {"c_pipeline_vs_numpy_loop": ratio(res, "tfdata_pipeline", "numpy_scipy_loop"),
              "c_pipeline_no_benign_vs_numpy_loop": ratio(res, "tfdata_no_benign", "numpy_scipy_loop")}
    show_ratio("(c) tf.data pipeline / numpy-scipy loop", ratios["c_pipeline_vs_numpy_loop"], "> 1")
    show_ratio("(c) same without benign processing / loop", ratios["c_pipeline_no_benign_vs_numpy_loop"])
    return {"rates": res, "ratios": ratios}


# ------------------------------------------------------------------------------------ scoring

def _eager_score(model, images, batch_size=256):
    """The previous detector.score (before issue 12): a tf.data map, an eager model call per batch."""
    import numpy as np
    import tensorflow as tf

    from tfbackdoor import detector

    domain = detector.spec_of(model).domain
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(lambda b: detector.to_inputs(b, domain))
    return np.concatenate([model(b, training=False).numpy()[:, 1] for b in ds])


def bench_scoring(x, y, repeats, workdir: Path):
    import numpy as np
    from PIL import Image

    from tfbackdoor import data, detector, triggers

    model = detector.load()
    ready = detector.to_inputs(x).numpy()
    n = len(x)
    npz = workdir / "scan.npz"
    np.savez(npz, x=x, y=y)
    png_dir = workdir / "png"
    for i, (img, lab) in enumerate(zip(x, y)):
        d = png_dir / f"c{int(lab)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    badnets = triggers.expand("badnets", x.shape[1])

    def predict():
        model.predict(ready, batch_size=256, verbose=0)
        return n

    def score():
        detector.score(model, x)
        return n

    def eager():
        _eager_score(model, x)
        return n

    def evaluate():
        detector.evaluate_images(model, x, badnets)
        return 2 * n

    def scan(spec):
        def run():
            return detector.scan(model, spec, workdir / "scan.csv")["n"]
        return run

    def decode_only():
        count = 0
        for bx, _ in data.load(f"dir:{png_dir}", image_size=x.shape[1]).batch(256).prefetch(2).as_numpy_iterator():
            count += len(bx)
        return count

    configs = {"predict_ready": predict, "score": score, "score_eager_before": eager, "evaluate": evaluate,
               "scan_npz": scan(f"npz:{npz}"), "scan_dir_png": scan(f"dir:{png_dir}"), "decode_dir_png": decode_only}
    res = interleaved(configs, repeats)
    show(f"scoring with the shipped detector (images/s, {n} images, batch 256)", res)
    ratios = {"d_score_vs_predict": ratio(res, "score", "predict_ready"),
              "d_score_before_vs_predict": ratio(res, "score_eager_before", "predict_ready"),
              "d_evaluate_vs_predict": ratio(res, "evaluate", "predict_ready"),
              "d_scan_npz_vs_predict": ratio(res, "scan_npz", "predict_ready"),
              "d_scan_dir_vs_predict": ratio(res, "scan_dir_png", "predict_ready"),
              "d_scan_dir_vs_decode_only": ratio(res, "scan_dir_png", "decode_dir_png")}
    # On shared cores decoding and scoring take turns: the folder scan's ceiling is the slower of the
    # two alone, and 1 / (1/decode + 1/score) if they cannot overlap at all.
    bound = [min(d, s) for d, s in zip(res["decode_dir_png"]["runs"], res["score"]["runs"])]
    serial = [1 / (1 / d + 1 / s) for d, s in zip(res["decode_dir_png"]["runs"], res["score"]["runs"])]
    res["bound_min_decode_score"] = {"median": statistics.median(bound), "min": min(bound), "max": max(bound), "runs": bound}
    res["bound_serial_decode_score"] = {"median": statistics.median(serial), "min": min(serial), "max": max(serial),
                                        "runs": serial}
    ratios["d_scan_dir_vs_min_decode_score"] = ratio(res, "scan_dir_png", "bound_min_decode_score")
    ratios["d_scan_dir_vs_serial_decode_score"] = ratio(res, "scan_dir_png", "bound_serial_decode_score")
    show_ratio("(d) detector.score / model.predict", ratios["d_score_vs_predict"], ">= 0.8")
    show_ratio("(d) previous score (eager) / model.predict", ratios["d_score_before_vs_predict"])
    show_ratio("(d) evaluate path / model.predict", ratios["d_evaluate_vs_predict"], ">= 0.8")
    show_ratio("(d) scan npz: / model.predict", ratios["d_scan_npz_vs_predict"], ">= 0.8")
    show_ratio("(d) scan dir: PNG / model.predict", ratios["d_scan_dir_vs_predict"])
    show_ratio("(d) scan dir: PNG / decode only", ratios["d_scan_dir_vs_decode_only"], "~1 when decode-bound")
    show_ratio("(d) scan dir: PNG / min(decode, score)", ratios["d_scan_dir_vs_min_decode_score"], "~1")
    show_ratio("(d) scan dir: PNG / 1/(1/decode+1/score)", ratios["d_scan_dir_vs_serial_decode_score"], ">= 1")
    return {"images": n, "rates": res, "ratios": ratios}


# ------------------------------------------------------------------------------------ start-up

def bench_startup(repeats):
    exe = shutil.which("tfbd")
    base = [exe] if exe else [sys.executable, "-m", "cli.main"]

    def run(args, expect):
        def fn():
            r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
            assert r.returncode == expect, (args, r.returncode, r.stderr[-500:])
            return 1
        return fn

    configs = {"typo_error": run(base + ["evaluate", "--dataset", "cifar1O:test"], 2),
               "help": run(base + ["--help"], 0),
               "import_tensorflow": run([sys.executable, "-c", "import tensorflow"], 0)}
    res = interleaved(configs, repeats, warmup=True, echo=lambda m: None)
    secs = {k: {"median": 1 / v["median"], "min": 1 / v["max"], "max": 1 / v["min"]} for k, v in res.items()}
    print("\nstart-up (wall seconds per run, subprocess)")
    for k, v in secs.items():
        print(f"  {k:<24} median {v['median']:6.2f} s   spread {v['min']:.2f} .. {v['max']:.2f}"
              + ("   goal < 1.5 s" if k == "typo_error" else ""))
    return {"command": " ".join(base), "seconds": secs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="CIFAR-10 training images (seeded subset).")
    ap.add_argument("--repeats", type=int, default=3, help="Timings per configuration (interleaved).")
    ap.add_argument("--batch-size", type=int, default=128, help="Clean images per training batch (x2 inputs).")
    ap.add_argument("--quick", action="store_true", help="1,024 images, 2 repeats (a smoke run).")
    ap.add_argument("--only", default="training,pipeline,scoring,startup",
                    help="Comma-separated groups to run (training, pipeline, scoring, startup).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = min(args.n, 1024), min(args.repeats, 2)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "n": args.n, "repeats": args.repeats, "batch_size": args.batch_size,
              "cpu_cores": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "python": platform.python_version()}
    if "startup" in groups:   # first: nothing of TensorFlow is loaded in this process yet (it does not matter)
        result["startup"] = bench_startup(max(args.repeats, 3))
    if set(groups) - {"startup"}:
        import tensorflow as tf

        from tfbackdoor import data

        result["tensorflow"] = tf.__version__
        x, y = data.load_arrays("cifar10:train", limit=args.n, seed=0)
        print(f"\n{len(x)} CIFAR-10 training images, {args.repeats} interleaved repeats per configuration")
        if "pipeline" in groups:
            result["pipeline"] = bench_pipeline(x, args.batch_size, args.repeats)
        if "scoring" in groups:
            with tempfile.TemporaryDirectory(prefix="tfbd_bench_") as d:
                result["scoring"] = bench_scoring(x, y, args.repeats, Path(d))
        if "training" in groups:
            result["training"] = bench_training(x, args.batch_size, args.repeats)
    result["loadavg_end"] = list(os.getloadavg())
    print("\nall ratios (median of medians; [per-round min..max]):")
    for g in ("training", "pipeline", "scoring"):
        for k, r in result.get(g, {}).get("ratios", {}).items():
            print(f"  {k:<38} {r['ratio']:6.2f}x  [{r['min']:.2f}..{r['max']:.2f}]")
    if "startup" in result:
        s = result["startup"]["seconds"]
        print(f"  {'e_startup_typo_error_s':<38} {s['typo_error']['median']:6.2f} s  "
              f"[{s['typo_error']['min']:.2f}..{s['typo_error']['max']:.2f}]  (--help {s['help']['median']:.2f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
