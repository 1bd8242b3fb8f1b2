"""Compare ways of quantizing the screener: verdict agreement with the Keras detector, size, speed.

Each option builds the screener graph with ``tfbackdoor.export.build_screener`` and converts it
with ``tfbackdoor.export.convert`` (the code ``tfbd export`` runs), calibrated on the same
representative set (``--calibration``: clean + manipulated + triggered images), then scores
``--dataset`` clean images and their copies with the paper's 7 detector triggers.

    python benchmarks/quantization_options.py --detector saved_models/detector_cifar10.keras \
        --limit 1000 --out benchmarks/results/quantization_options.json

Options (``--options`` takes a comma-separated subset of the names):

  naive           int8, DCT2D + Normalization as in Keras (one int8 scale for the DCT), softmax
                  head, ELU left float as the converter makes it
  fc              int8, DCT + normalization folded into one FULLY_CONNECTED per channel
  fc_logit        fc + logit head (int8 logit, float sigmoid)
  clip8           fc_logit + normalized DCT clipped at +-8
  clip8_bnlast    clip8 + the last BatchNorm folded into the head
  clip8_bnall     clip8 + every BatchNorm folded into the next conv/dense
  default         clip8_bnlast + activation ranges from the 0.1 % tails (``tfbd export`` int8)
  default_bnall   default with every BatchNorm folded
  default_clip12  default with clip 12
  unfused         default with the converter's float ELU sandwiches left as they are
  separable       int8, separable fold (1xW conv + depthwise Hx1), logit head, tail ranges
  cleancal        default calibrated on clean images only
  int16x8         int16 activations / int8 weights, fc fold (ELU and input cast stay float)
  int16x8_none    int16 activations, no fold
  float16         float16 weights, DCT2D + Normalization
  float32         no quantization
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

OPTIONS = {
    "naive": dict(quantize="int8", fold="none", head="softmax", fuse_elu=False, fold_bn="none"),
    "fc": dict(quantize="int8", fold="fc", head="softmax", fold_bn="none"),
    "fc_logit": dict(quantize="int8", fold="fc", head="logit", fold_bn="none"),
    "clip8": dict(quantize="int8", fold="fc", head="logit", fold_bn="none", clip=8.0),
    "clip8_bnlast": dict(quantize="int8", fold="fc", head="logit", fold_bn="last", clip=8.0),
    "clip8_bnall": dict(quantize="int8", fold="fc", head="logit", fold_bn="all", clip=8.0),
    "default": dict(quantize="int8", fold="fc", head="logit", fold_bn="last", clip=8.0, tail=1e-3),
    "default_bnall": dict(quantize="int8", fold="fc", head="logit", fold_bn="all", clip=8.0, tail=1e-3),
    "default_clip12": dict(quantize="int8", fold="fc", head="logit", fold_bn="last", clip=12.0, tail=1e-3),
    "unfused": dict(quantize="int8", fold="fc", head="logit", fold_bn="last", clip=8.0, tail=1e-3, fuse_elu=False),
    "separable": dict(quantize="int8", fold="separable", head="logit", fold_bn="last", tail=1e-3),
    "cleancal": dict(quantize="int8", fold="fc", head="logit", fold_bn="last", clip=8.0, tail=1e-3,
                     calibration="clean"),
    "int16x8": dict(quantize="int16x8", fold="fc", head="softmax", fold_bn="last"),
    "int16x8_none": dict(quantize="int16x8", fold="none", head="softmax", fold_bn="none"),
    "float16": dict(quantize="float16", fold="none", head="softmax", fold_bn="none"),
    "float32": dict(quantize="float32", fold="none", head="softmax", fold_bn="none"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="saved_models/detector_cifar10.keras")
    ap.add_argument("--dataset", default="cifar10:test")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--slow-limit", type=int, default=300, help="Images per set for int16x8 (reference kernels, slow).")
    ap.add_argument("--calibration", default="cifar10:train+gtsrb:train")
    ap.add_argument("--calibration-size", type=int, default=300)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np

    from tfbackdoor import data, detector, export, metrics, triggers
    from tfbackdoor.atomic import write_json

    model = detector.load(args.detector)
    spec = detector.spec_of(model)
    thr = spec.threshold
    x = detector.load_eval_images(model, args.dataset, args.limit, 0)
    sets = {"clean": x}
    for t in triggers.expand("all", spec.image_size):
        sets[t.name] = t(x).numpy()
    keras_scores = {k: detector.score(model, v) for k, v in sets.items()}
    reps_full = export.representative_images(args.calibration, args.calibration_size, spec.image_size, 0)
    clean_parts = [data.load_arrays(p, image_size=spec.image_size, limit=args.calibration_size, seed=0)[0]
                   for p in args.calibration.split("+")]
    reps_clean = np.concatenate([reps_full[:1]] + clean_parts)  # first image: 0 and 255 pixels (input scale 1)

    rows = []
    for name in args.options.split(","):
        o = dict(OPTIONS[name])
        q = o.pop("quantize")
        cal = o.pop("calibration", "full")
        fuse = o.pop("fuse_elu", True)
        screener = export.build_screener(model, o["fold"], o["head"], clip=o.get("clip"), fold_bn=o["fold_bn"])
        t0 = time.time()
        b = export.convert(screener, q, (reps_clean if cal == "clean" else reps_full) if q.startswith("int") else None,
                           fuse_elu=fuse, tail=o.get("tail"))
        conv_s = time.time() - t0
        n = args.slow_limit if q == "int16x8" else args.limit
        per, lat = {}, []
        for k, v in sets.items():
            ts, l = export.tflite_scores(b, v[:n], num_threads=args.threads, return_latency=True)
            ks = keras_scores[k][:n]
            lat.append(l)
            per[k] = {"agree": round(100 * float(np.mean((ts > thr) == (ks > thr))), 2),
                      "keras": round(metrics.flag_rate(ks, thr), 2), "tflite": round(metrics.flag_rate(ts, thr), 2),
                      "mad": float(np.mean(np.abs(ts - ks)))}
        trig = [k for k in sets if k != "clean"]
        row = {"option": name, "quantize": q, **o, "calibration": cal, "n_per_set": int(min(n, len(x))),
               "agree": round(float(np.mean([p["agree"] for p in per.values()])), 2),
               "min_agree": min(p["agree"] for p in per.values()),
               "fpr_keras": per["clean"]["keras"], "fpr_tflite": per["clean"]["tflite"],
               "mean_bdr_keras": round(float(np.mean([per[k]["keras"] for k in trig])), 2),
               "mean_bdr_tflite": round(float(np.mean([per[k]["tflite"] for k in trig])), 2),
               "mean_abs_diff": round(float(np.mean([p["mad"] for p in per.values()])), 4),
               "bytes": len(b), "ms": round(float(np.median(np.concatenate(lat))), 3),
               "float_ops_between": export.float_islands(b), "convert_s": round(conv_s, 1), "per_set": per}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_set"}), flush=True)
    if args.out:
        write_json({"command": "python " + " ".join(sys.argv), "detector": args.detector, "threshold": thr,
                    "dataset": args.dataset, "rows": rows}, args.out)
    print(f"\n{args.dataset}, n={len(x)} per set (int16x8: {min(args.slow_limit, len(x))}), threshold {thr:.6g}\n")
    print("| option | agreement % (mean / min over 8 sets) | FPR Keras -> TFLite | mean BDR Keras -> TFLite "
          "| mean abs score diff | size | ms/img | float ops inside |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fl = ", ".join(sorted(set(r["float_ops_between"]))) or "-"
        print(f"| {r['option']} | {r['agree']:.2f} / {r['min_agree']:.2f} | {r['fpr_keras']:.2f} -> {r['fpr_tflite']:.2f} "
              f"| {r['mean_bdr_keras']:.2f} -> {r['mean_bdr_tflite']:.2f} | {r['mean_abs_diff']:.4f} "
              f"| {r['bytes'] / 1e6:.2f} MB | {r['ms']:.2f} | {fl} |")


if __name__ == "__main__":
    main()
