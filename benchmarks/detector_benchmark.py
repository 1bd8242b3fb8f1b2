"""Detector targets side by side: our detector(s) and the paper's on the same images.

For each dataset and model: clean FPR; per attack the BDR at the model's own threshold, the BDR
at equal clean FPR (``--at-fpr``, default 1%: each model's threshold set on the row's own clean
images, so detectors with different thresholds compare fairly) and the AUROC; the mean and
minimum BDR over the paper's 7 detector triggers; FPR on benign processing (JPEG 50/75/90,
brightness, contrast, blur, resize). Attacks default to the paper's 7 (``all``), the zoo of
other papers' attacks (``zoo``) and triggers saved as JPEG (``zoo+jpeg``, compared with clean
images saved the same way). Writes JSON and prints markdown tables.

    python benchmarks/detector_benchmark.py \\
        --detector saved_models/detector_cifar10.keras \\
        --reference "$TFBD_DATA/reference/cnn6_cifar10_paper.h5" \\
        --datasets cifar10:test,cifar10:lossless --benign all --limit 2000 \\
        --out benchmarks/results/detector_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAPER7 = ("badnets", "trojan_wm", "trojan_sq", "blend", "nature", "l2_inv", "l0_inv")


def summarize(rows):
    trig = [r for r in rows if r["attack"] not in ("clean",) and not r["attack"].startswith("benign:")]
    benign = {r["attack"][7:]: r["fpr"] for r in rows if r["attack"].startswith("benign:")}
    paper = [r["bdr"] for r in trig if r["attack"] in PAPER7]
    return {
        "fpr": rows[0]["fpr"], "n": rows[0]["n"],
        "bdr": {r["attack"]: r["bdr"] for r in trig},
        "bdr_at_fpr": {r["attack"]: r.get("bdr_at_fpr") for r in trig},
        "acc": {r["attack"]: r["acc"] for r in trig},
        "auroc": {r["attack"]: r["auroc"] for r in trig},
        "row_fpr": {r["attack"]: r["fpr"] for r in trig},
        "mean_bdr": round(sum(paper) / len(paper), 2) if paper else None,
        "min_bdr": min(paper) if paper else None,
        "benign_fpr": benign,
    }


def _fmt(v):
    return "-" if v is None else f"{v:.1f}"


def print_tables(results, at_fpr, benign):
    for ds in dict.fromkeys(r["dataset"] for r in results):
        res = [r for r in results if r["dataset"] == ds]
        attacks = list(res[0]["bdr"])
        print(f"\n### {ds} ({res[0]['n']} clean images)\n")
        print("| attack | " + " | ".join(f"{r['model']} (thr {r['threshold']:.3f}) | at {at_fpr:g}% FPR | AUROC"
                                        for r in res) + " |")
        print("|---|" + "---|---|---|" * len(res))
        print("| clean FPR | " + " | ".join(f"{r['fpr']:.2f} | {at_fpr:g} | -" for r in res) + " |")
        for a in attacks:
            print(f"| {a} | " + " | ".join(f"{_fmt(r['bdr'][a])} | {_fmt(r['bdr_at_fpr'][a])} | {_fmt(r['auroc'][a])}"
                                         for r in res) + " |")
        print("| paper 7: mean / min BDR | " + " | ".join(f"{_fmt(r['mean_bdr'])} / {_fmt(r['min_bdr'])} | | "
                                                        for r in res) + " |")
        for b in benign:
            print(f"| benign {b} FPR | " + " | ".join(f"{r['benign_fpr'][b]:.2f} | | " for r in res) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", action="append", default=[], help="Our detector .keras (repeatable).")
    ap.add_argument("--reference", action="append", default=[], help="The paper's HDF5 detector (repeatable).")
    ap.add_argument("--datasets", default="cifar10:test,cifar10:lossless")
    ap.add_argument("--attacks", default="all,zoo,zoo+jpeg")
    ap.add_argument("--benign", default="", help="'all' or comma-separated benign variants")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--at-fpr", type=float, default=1.0, help="Equal-FPR comparison point, in percent.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tfbackdoor import detector, perturb, triggers
    from tfbackdoor.atomic import write_json

    benign = list(perturb.BENIGN_VARIANTS) if args.benign == "all" else [b for b in args.benign.split(",") if b]
    models = [(p, detector.load(p)) for p in args.detector] + [(p, detector.load_reference(p)) for p in args.reference]
    results = []
    for ds in args.datasets.split(","):
        for name, model in models:
            size = detector.spec_of(model).image_size
            # Every model on the same images: none that any of them was trained, fine-tuned or calibrated on.
            others = [m for _, m in models if m is not model and detector.spec_of(m).image_size == size]
            x = detector.load_eval_images(model, ds, args.limit, 0, also=others)
            rows = detector.evaluate_images(model, x, triggers.expand(args.attacks, size), None, benign, args.at_fpr)
            res = {"dataset": ds, "model": os.path.basename(name), "threshold": detector.spec_of(model).threshold,
                   **summarize(rows), "rows": rows}
            results.append(res)
            print(json.dumps({k: res[k] for k in ("dataset", "model", "threshold", "fpr", "n", "mean_bdr", "min_bdr")}),
                  flush=True)
    if args.out:
        write_json({"command": "python " + " ".join(sys.argv), "at_fpr": args.at_fpr, "results": results}, args.out)
    print_tables(results, args.at_fpr, benign)


if __name__ == "__main__":
    main()
