"""Detector targets side by side: our detector(s) and the paper's on the same images.

For each dataset and model: clean FPR, BDR/ACC/AUROC per attack, the mean and minimum BDR over
the paper's 7 detector triggers, and FPR on benign processing (JPEG 50/75/90, brightness,
contrast, blur, resize). Writes JSON and prints a markdown table.

    python benchmarks/detector_benchmark.py \
        --detector saved_models/detector_cifar10.keras \
        --reference "$TFBD_DATA/reference/cnn6_cifar10_paper.h5" \
        --datasets cifar10:test,cifar10:lossless --benign all \
        --out benchmarks/results/detector_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def summarize(rows):
    trig = [r for r in rows if r["attack"] not in ("clean",) and not r["attack"].startswith("benign:")]
    benign = {r["attack"][7:]: r["fpr"] for r in rows if r["attack"].startswith("benign:")}
    bdrs = [r["bdr"] for r in trig]
    return {
        "fpr": rows[0]["fpr"], "n": rows[0]["n"],
        "bdr": {r["attack"]: r["bdr"] for r in trig},
        "acc": {r["attack"]: r["acc"] for r in trig},
        "auroc": {r["attack"]: r["auroc"] for r in trig},
        "mean_bdr": round(sum(bdrs) / len(bdrs), 2) if bdrs else None,
        "min_bdr": min(bdrs) if bdrs else None,
        "benign_fpr": benign,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", action="append", default=[], help="Our detector .keras (repeatable).")
    ap.add_argument("--reference", action="append", default=[], help="The paper's HDF5 detector (repeatable).")
    ap.add_argument("--datasets", default="cifar10:test,cifar10:lossless")
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--benign", default="", help="'all' or comma-separated benign variants")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tfbackdoor import detector, perturb, triggers
    from tfbackdoor.analysis import write_json

    benign = list(perturb.BENIGN_VARIANTS) if args.benign == "all" else [b for b in args.benign.split(",") if b]
    models = [(p, detector.load(p)) for p in args.detector] + [(p, detector.load_reference(p)) for p in args.reference]
    results = []
    for ds in args.datasets.split(","):
        for name, model in models:
            size = detector.spec_of(model).image_size
            # Every model on the same images: none that any of them was fine-tuned or calibrated on.
            others = [m for _, m in models if m is not model and detector.spec_of(m).image_size == size]
            x = detector.load_eval_images(model, ds, args.limit, 0, also=others)
            rows = detector.evaluate_images(model, x, triggers.expand(args.attacks, size), None, benign)
            res = {"dataset": ds, "model": os.path.basename(name), "threshold": detector.spec_of(model).threshold,
                   **summarize(rows), "rows": rows}
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    if args.out:
        write_json({"command": "python " + " ".join(sys.argv), "results": results}, args.out)
    attacks = list(results[0]["bdr"]) if results else []
    print()
    print("| dataset | model | clean FPR | " + " | ".join(attacks) + " | mean BDR | min BDR |"
          + "".join(f" {b} FPR |" for b in benign))
    print("|" + "---|" * (5 + len(attacks) + len(benign)))
    for r in results:
        print(f"| {r['dataset']} | {r['model']} | {r['fpr']:.2f} | " + " | ".join(f"{r['bdr'][a]:.2f}" for a in attacks)
              + f" | {r['mean_bdr']:.2f} | {r['min_bdr']:.2f} |" + "".join(f" {r['benign_fpr'][b]:.2f} |" for b in benign))


if __name__ == "__main__":
    main()
