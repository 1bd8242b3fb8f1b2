"""Why a detector flags what it flags: threshold sweep, clipping under brightness/contrast, BadNets misses.

    python benchmarks/detector_diagnostics.py --detector saved_models/detector_cifar10.keras \
        --datasets cifar10:test,cifar10:lossless --limit 2000 \
        --out benchmarks/results/detector_diagnostics.json

For each dataset (the evaluation images: a fine-tune's own samples are left out):

* ``sweep``: at the detector's threshold and at fixed thresholds, the clean FPR, the worst FPR
  over the brightness/contrast/JPEG-90 variants, and BDR per trigger (what a lower or higher
  threshold would cost or buy; the shipped threshold comes from held-out calibration images, not
  from this sweep);
* ``clipping``: for each colour variant, the mean share of pixels newly saturated (0 or 255) in
  the images the detector flags vs the ones it passes;
* ``badnets``: share of images whose BadNets patch area is already near white (the trigger barely
  changes them), and the mean change of the patch area for missed vs detected images.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

VARIANTS = ("brighter", "darker", "contrast", "jpeg90")


def diagnose(model, x, thresholds):
    from tfbackdoor import detector, metrics, perturb, triggers

    thr0 = detector.spec_of(model).threshold
    clean = detector.score(model, x)
    variants = {v: perturb.BENIGN_VARIANTS[v](x).numpy() for v in VARIANTS}
    vscores = {v: detector.score(model, xv) for v, xv in variants.items()}
    triggered = {t.name: t(x).numpy() for t in triggers.expand("all")}
    tscores = {k: detector.score(model, xt) for k, xt in triggered.items()}

    def rate(s, thr):
        return round(metrics.flag_rate(s, thr), 2)

    sweep = []
    for thr in [thr0] + sorted(thresholds, reverse=True):
        bdr = {k: rate(s, thr) for k, s in tscores.items()}
        sweep.append({"threshold": round(float(thr), 4), "shipped": thr == thr0, "fpr": rate(clean, thr),
                      "worst_benign_fpr": max(rate(s, thr) for s in vscores.values()), "bdr": bdr,
                      "mean_bdr": round(float(np.mean(list(bdr.values()))), 2), "min_bdr": min(bdr.values())})
    sat0 = ((x == 0) | (x == 255)).mean(axis=(1, 2, 3))
    clipping = {}
    for v in ("brighter", "darker", "contrast"):
        new_sat = ((variants[v] == 0) | (variants[v] == 255)).mean(axis=(1, 2, 3)) - sat0
        flagged = vscores[v] > thr0
        clipping[v] = {"flagged": int(flagged.sum()),
                       "new_saturated_flagged": round(float(new_sat[flagged].mean()), 3) if flagged.any() else None,
                       "new_saturated_passed": round(float(new_sat[~flagged].mean()), 3)}
    # Mean change over the BadNets square (it only raises pixels to white), from the trigger itself.
    square = triggers.badnets(x.shape[1]).patch.size
    change = (triggered["badnets"].astype(np.float64) - x).sum(axis=(1, 2, 3)) / square
    missed = tscores["badnets"] <= thr0
    badnets = {"near_white_share": round(100.0 * float((change < 10).mean()), 2),
               "mean_patch_change_missed": round(float(change[missed].mean()), 1) if missed.any() else None,
               "mean_patch_change_detected": round(float(change[~missed].mean()), 1) if (~missed).any() else None,
               "missed": int(missed.sum())}
    return {"threshold": thr0, "n": int(len(x)), "sweep": sweep, "clipping": clipping, "badnets": badnets}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", required=True)
    ap.add_argument("--datasets", default="cifar10:test,cifar10:lossless")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--thresholds", default="0.7,0.5,0.3,0.2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tfbackdoor import detector
    from tfbackdoor.atomic import write_json

    model = detector.load(args.detector)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    results = []
    for ds in args.datasets.split(","):
        x = detector.load_eval_images(model, ds, args.limit, 0)
        res = {"dataset": ds, "model": args.detector, **diagnose(model, x, thresholds)}
        results.append(res)
        for row in res["sweep"]:
            print(f"{ds} thr {row['threshold']:.3f}{' (shipped)' if row['shipped'] else ''}: FPR {row['fpr']:.2f}, "
                  f"worst benign {row['worst_benign_fpr']:.2f}, mean BDR {row['mean_bdr']:.2f}, "
                  f"BadNets {row['bdr']['badnets']:.2f}, Blend {row['bdr']['blend']:.2f}")
        print(f"{ds} clipping: {res['clipping']}")
        print(f"{ds} badnets: {res['badnets']}")
    if args.out:
        write_json({"command": "python " + " ".join(sys.argv), "results": results}, args.out)


if __name__ == "__main__":
    main()
