"""Would a victim-side defence find the poisons our training-set screen leaves? (issue 14, round 6)

    python benchmarks/defend_probes.py --victim V.keras --attack ATTACK --target T \
        [--dataset cifar10:train --limit 20000 --seed 0 --rate 0.1] \
        [--detector D.keras --suspect-top 70 --signature] --out probes.json

``V.keras`` must be a victim ``tfbd defend`` trained on the sanitised set of exactly these options:
the script rebuilds that set the way ``defend`` does (the same poisoning, scan and kept samples),
checks it against the victim's recorded ``train_sha256`` and refuses another set. Then, on the
victim's penultimate features (``gap``, no augmentation) of every kept sample, per label:

* **spectral signature** (Tran et al., NeurIPS 2018): the top singular direction of the label's
  centred features, each sample scored by its squared projection; the share of the label's
  poisons among its top ``1.5 x rate`` scores (the share their method removes), and the ratio
  of the top two singular values squared;
* **our label signature** (:func:`tfbackdoor.signature.label_signatures`) on those features instead of
  the DCT coefficients: ``lambda`` and whether :func:`~tfbackdoor.signature.suspect_by_signature`
  names a label;
* **activation clustering** (Chen et al., 2018): 2-means on the label's top 10 principal
  components (best of 5 seeds); the smaller cluster's share of the label, and the poisons' recall
  and precision in it;
* **loss**: the AUROC, within the target label, of the victim's training loss telling poisons
  (lower) from clean samples (the premise of anti-backdoor learning, Li et al., 2021).

These are the standard victim-side screens; the numbers say whether one of them would have removed
what the input screen kept. Prints a table, writes ``--out`` (JSON). Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _clusters(z, seeds=5):
    """2-means labels of ``z`` (rows), the best of ``seeds`` restarts by inertia (scipy's kmeans2)."""
    import numpy as np
    from scipy.cluster.vq import kmeans2

    best = None
    for s in range(seeds):
        centres, lab = kmeans2(z, 2, seed=s, minit="++")
        inertia = sum(float(((z[lab == j] - centres[j]) ** 2).sum()) for j in range(2))
        if best is None or inertia < best[0]:
            best = (inertia, lab)
    return best[1]


def probe(feats, labels, is_poison, losses, target, rate):
    """Per-label rows of the four probes (see the module docstring)."""
    import numpy as np

    from tfbackdoor import metrics, signature

    sigs = signature.label_signatures(feats, labels)
    rows = []
    for lab in sorted(int(v) for v in np.unique(labels)):
        sel = labels == lab
        f = feats[sel].astype(np.float64)
        p = is_poison[sel]
        z = f - f.mean(0)
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        order = np.argsort(-((z @ vt[0]) ** 2))
        top = order[:int(round(1.5 * rate * len(z)))]
        cl = _clusters(z @ vt[:10].T)
        small = int(np.argmin(np.bincount(cl, minlength=2)))
        in_small = cl == small
        rows.append({
            "label": lab, "n": int(sel.sum()), "poisons": int(p.sum()),
            "tran_recall": round(100.0 * p[top].sum() / max(int(p.sum()), 1), 2),
            "tran_s1_s2": round(float(s[0] ** 2 / s[1] ** 2), 3),
            "signature_lambda": round(float(sigs[lab]["lambda"]), 3),
            "ac_small_share": round(100.0 * in_small.mean(), 2),
            "ac_recall": round(100.0 * p[in_small].sum() / max(int(p.sum()), 1), 2),
            "ac_precision": round(100.0 * p[in_small].mean(), 2) if in_small.any() else None,
        })
    t = labels == target
    loss_auroc = metrics.auroc(-losses[t & ~is_poison], -losses[t & is_poison]) if (t & is_poison).any() else None
    return rows, {"signature_suspect": signature.suspect_by_signature(sigs),
                  "loss_auroc_target": None if loss_auroc is None else round(float(loss_auroc), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victim", required=True, help="The sanitised victim tfbd defend trained (.keras + its .json).")
    ap.add_argument("--attack", required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--dataset", default="cifar10:train")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--detector", default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--remove-top", type=float, default=0.0)
    ap.add_argument("--suspect-top", type=float, default=0.0)
    ap.add_argument("--signature", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import keras
    import numpy as np

    from tfbackdoor import atomic, defend, detector, victim

    det = detector.load(a.detector)
    thr = detector.spec_of(det).threshold if a.threshold is None else a.threshold
    x, y = detector.load_eval_images(det, a.dataset, limit=a.limit, seed=a.seed, with_labels=True)
    trig = victim.resolve_trigger(a.attack, x.shape[1])
    x_p, y_p, idx, flags, _ = defend.poison_and_screen(x, y, trig, det, thr, a.rate, a.target, a.seed, a.remove_top,
                                                       a.suspect_top, a.signature)
    keep = ~flags
    side = json.loads(victim.sidecar_path(a.victim).read_text())
    if side.get("train_sha256") != victim.data_fingerprint(x_p[keep], y_p[keep]):
        sys.exit(f"{a.victim}: was not trained on the set these options make (train_sha256 differs)")
    is_p = np.zeros(len(x_p), bool)
    is_p[idx] = True
    xk, yk, pk = x_p[keep], y_p[keep], is_p[keep]
    model = victim.load(a.victim)
    feats = keras.Model(model.input, model.get_layer("gap").output).predict(xk, batch_size=512, verbose=0)
    probs = model.predict(xk, batch_size=512, verbose=0)
    losses = -np.log(probs[np.arange(len(yk)), yk] + 1e-12)
    rows, summary = probe(feats, yk, pk, losses, a.target, a.rate)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    print(json.dumps(summary))
    atomic.write_json({"command": "python " + " ".join(sys.argv), "n_kept": int(keep.sum()),
                       "n_poisoned_kept": int(pk.sum()), "rows": rows, **summary}, a.out)


if __name__ == "__main__":
    main()
