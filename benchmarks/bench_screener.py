"""Edge screener targets: int8 vs Keras verdicts, and size/latency of every variant, in one run.

Target 1 (fidelity): on ``--dataset`` (default cifar10:test) clean images and their copies with
each of the paper's 7 detector triggers, the agreement of the int8 screener's verdicts with the
Keras detector's (same threshold, the detector's), and BDR / FPR of both side by side (also for
the float32 and float16 screeners in the JSON).

Target 2 (cost): Keras float32 (DCT + model in one ``tf.function``), TFLite float32, float16 and
int8: ms per image at batch 1 (set_tensor + invoke + get_tensor; median over ``--latency-images``
images, best of three interleaved rounds), Keras images/s at its best batch size, and file sizes;
and, when the int8 screener's sidecar has a spectral part, what its numpy twin in
``edge/screen.py`` adds per frame at batch 1 (the whole ratio, and its JPEG-grid and island
statistics alone; median over the same images, best of three rounds).

    python benchmarks/bench_screener.py --detector saved_models/detector_cifar10.keras \
        --limit 2000 --out benchmarks/results/screener.json

The screeners are exported into a temporary folder with ``tfbackdoor.export.export`` (the same
code as ``tfbd export``), unless ``--int8 PATH`` names an existing int8 screener to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="saved_models/detector_cifar10.keras")
    ap.add_argument("--int8", default=None,
                    help="The int8 screener to measure (default: saved_models/screener_cifar10_int8.tflite when its "
                         "sidecar names --detector as its source, else one exported by this run).")
    ap.add_argument("--dataset", default="cifar10:test")
    ap.add_argument("--limit", type=int, default=2000, help="Clean images (seeded subset); each trigger gets as many.")
    ap.add_argument("--calibration", default="cifar10:train+gtsrb:train")
    ap.add_argument("--calibration-size", type=int, default=300)
    ap.add_argument("--latency-images", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for LiteRT and TensorFlow (default 1).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON results.")
    return ap.parse_args()


def main():
    args = parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import numpy as np

    from tfbackdoor import detector, export, metrics, triggers
    from tfbackdoor.atomic import write_json

    model = detector.load(args.detector)
    spec = detector.spec_of(model)
    thr = spec.threshold
    x = detector.load_eval_images(model, args.dataset, args.limit, args.seed)
    sets = {"clean": x}
    for t in triggers.expand("all", spec.image_size):
        sets[t.name] = np.concatenate([t(x[i:i + 1024]).numpy() for i in range(0, len(x), 1024)])
    print(f"{args.dataset}: {len(x)} clean images + 7 triggered copies; threshold {thr:.6g}", file=sys.stderr)

    # -------------------------------------------------------------- the screeners
    if args.int8 is None:
        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "saved_models", "screener_cifar10_int8.tflite")
        side = os.path.splitext(shipped)[0] + ".json"
        if os.path.isfile(shipped) and os.path.isfile(side):
            with open(side) as f:
                source = json.load(f).get("source", "")
            if os.path.realpath(source) == os.path.realpath(args.detector):
                args.int8 = shipped
    print(f"int8 screener: {args.int8 or '(exported by this run)'}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="tfbd_bench_")
    paths = {}
    for q in ("float32", "float16", "int8"):
        if q == "int8" and args.int8:
            paths[q] = args.int8
            continue
        out = os.path.join(tmp, f"screener_{q}.tflite")
        t0 = time.time()
        export.export(args.detector, out, q, args.calibration, args.calibration_size, seed=args.seed)
        print(f"exported {q} in {time.time() - t0:.0f}s", file=sys.stderr)
        paths[q] = out

    # -------------------------------------------------------------- target 1: fidelity
    keras_scores = {k: detector.score(model, v) for k, v in sets.items()}
    fidelity = {}
    for q, path in paths.items():
        rows = []
        for name, imgs in sets.items():
            ts = export.tflite_scores(path, imgs, num_threads=args.threads)
            ks = keras_scores[name]
            rows.append({"set": name, "n": int(len(imgs)),
                         "agree": round(100.0 * float(np.mean((ts > thr) == (ks > thr))), 2),
                         "keras_flagged": round(metrics.flag_rate(ks, thr), 2),
                         "tflite_flagged": round(metrics.flag_rate(ts, thr), 2),
                         "mean_abs_score_diff": round(float(np.mean(np.abs(ts - ks))), 5),
                         "max_abs_score_diff": round(float(np.max(np.abs(ts - ks))), 5)})
        n_all = sum(r["n"] for r in rows)
        fidelity[q] = {"rows": rows,
                       "agree_overall": round(sum(r["agree"] * r["n"] for r in rows) / n_all, 2),
                       "agree_min": min(r["agree"] for r in rows)}
        print(f"{q}: agreement {fidelity[q]['agree_overall']:.2f}% (min {fidelity[q]['agree_min']:.2f}%)", file=sys.stderr)

    # -------------------------------------------------------------- target 2: cost
    lat_imgs = x[:args.latency_images]
    from tfbackdoor.detector import to_inputs

    @tf.function(reduce_retracing=True)
    def keras_fn(b):
        return model(to_inputs(b, spec.domain), training=False)

    one = tf.constant(lat_imgs[:1])
    for _ in range(10):
        keras_fn(one)
    interpreters = {q: export.interpreter(path, args.threads) for q, path in paths.items()}

    def median_ms(fn, inputs):
        """Median ms of ``fn(one input)`` over ``inputs`` (each built beforehand, outside the timing)."""
        times = []
        for b in inputs:
            t0 = time.perf_counter()
            fn(b)
            times.append((time.perf_counter() - t0) * 1000)
        return float(np.median(times))

    def keras_round():
        return median_ms(lambda b: keras_fn(b).numpy(), [tf.constant(lat_imgs[i:i + 1]) for i in range(len(lat_imgs))])

    def tflite_round(it):
        return float(np.median(export.tflite_scores(it, lat_imgs, return_latency=True)[1]))

    # Three interleaved rounds, best median of each: other load on the machine hits all variants alike.
    rounds = {"keras": [], **{q: [] for q in interpreters}}
    for _ in range(3):
        rounds["keras"].append(keras_round())
        for q, it in interpreters.items():
            rounds[q].append(tflite_round(it))
    keras_ms = min(rounds["keras"])
    best = (0.0, 1)
    for bs in (1, 32, 128, 512, 1024):
        xb = tf.constant(np.resize(x, (bs,) + x.shape[1:]))
        keras_fn(xb).numpy()
        reps = max(1, 2048 // bs)
        t0 = time.perf_counter()
        for _ in range(reps):
            keras_fn(xb).numpy()
        ips = bs * reps / (time.perf_counter() - t0)
        if ips > best[0]:
            best = (ips, bs)
    keras_size = os.path.getsize(args.detector)
    cost = [{"variant": "Keras float32 (.keras)", "bytes": keras_size, "ms_per_image_b1": round(keras_ms, 3),
             "images_per_s": round(best[0], 1), "best_batch": best[1]}]
    for q, path in paths.items():
        ms = min(rounds[q])
        cost.append({"variant": f"TFLite {q}", "bytes": os.path.getsize(path), "ms_per_image_b1": round(ms, 3),
                     "images_per_s": round(1000.0 / ms, 1), "best_batch": 1,
                     "ops": export.describe(path)["ops"]})

    # the numpy spectral part a device runs beside the .tflite (edge/screen.py), per frame
    from tfbackdoor.export.runtime import spectral_part

    part = spectral_part(paths["int8"])
    spectral_cost = None
    if part is not None:
        frames = [f[None].astype(np.float64) for f in lat_imgs]
        parts = {"ratio": part.ratio}
        if part.grid is not None:
            parts["grid"] = part.grid_statistic
        if part.island is not None:
            parts["island"] = part.island_statistic
        spectral_cost = {f"{k}_ms_per_frame": round(min(median_ms(fn, frames) for _ in range(3)), 3) for k, fn in parts.items()}

    del interpreters
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"command": "python " + " ".join(sys.argv), "detector": args.detector, "threshold": thr,
              "dataset": args.dataset, "limit": args.limit, "threads": args.threads,
              "int8_model": args.int8 or "(exported by this run)",
              "fidelity": fidelity, "cost": cost, "spectral_cost": spectral_cost}
    if args.out:
        write_json(result, args.out)

    # -------------------------------------------------------------- tables
    f8 = {r["set"]: r for r in fidelity["int8"]["rows"]}
    print(f"\n### int8 screener vs Keras detector ({args.dataset}, n={len(x)} per set, threshold {thr:.6g})\n")
    print("| set | agreement % | Keras BDR/FPR % | int8 BDR/FPR % | mean abs score diff |")
    print("|---|---|---|---|---|")
    for name, r in f8.items():
        print(f"| {name}{' (FPR)' if name == 'clean' else ''} | {r['agree']:.2f} | {r['keras_flagged']:.2f} | "
              f"{r['tflite_flagged']:.2f} | {r['mean_abs_score_diff']:.4f} |")
    print(f"| **all** | **{fidelity['int8']['agree_overall']:.2f}** | | | |")
    print(f"\nagreement overall: float32 {fidelity['float32']['agree_overall']:.2f}%, "
          f"float16 {fidelity['float16']['agree_overall']:.2f}%, int8 {fidelity['int8']['agree_overall']:.2f}%")
    print(f"\n### size and latency (this CPU, {args.threads} thread(s))\n")
    print("| variant | file size | ms / image (batch 1, median) | images / s |")
    print("|---|---|---|---|")
    for c in cost:
        extra = f" (batch {c['best_batch']})" if c["variant"].startswith("Keras") else ""
        print(f"| {c['variant']} | {c['bytes'] / 1e6:.2f} MB | {c['ms_per_image_b1']:.3f} | {c['images_per_s']:.0f}{extra} |")
    if spectral_cost:
        print("\nnumpy spectral part (edge/screen.py) per frame, batch 1, median: "
              + ", ".join(f"{k.replace('_ms_per_frame', '')} {v:.2f} ms" for k, v in spectral_cost.items()))


if __name__ == "__main__":
    main()
