"""Metrics, one definition each. Rates are returned as percentages (0..100).

* ``fpr``: share of clean inputs flagged (score > threshold).
* ``bdr``: backdoor detection rate, share of triggered inputs flagged.
* ``acc``: accuracy on the 50/50 set of the clean inputs and their triggered copies.
* ``auroc``: area under the ROC curve of the scores (threshold-free), in percent.
* ``asr``: attack success rate, share of inputs whose true label is not the target that the
  model labels as the target once triggered.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def flag_rate(scores, threshold=0.5) -> float:
    scores = np.asarray(scores, np.float64)
    return float(100.0 * np.mean(scores > threshold)) if scores.size else float("nan")


def auroc(clean_scores, poisoned_scores) -> float:
    """AUROC (percent) via the Mann-Whitney U statistic, ties counted half."""
    c = np.asarray(clean_scores, np.float64)
    p = np.asarray(poisoned_scores, np.float64)
    if not c.size or not p.size:
        return float("nan")
    ranks = rankdata(np.concatenate([c, p]))
    u = ranks[len(c):].sum() - len(p) * (len(p) + 1) / 2.0
    return float(100.0 * u / (len(c) * len(p)))


def detection_report(attack, clean_scores, poisoned_scores, threshold=0.5) -> dict:
    """The JSON object for one attack: ``attack, acc, bdr, fpr, auroc, n`` (n = triggered inputs)."""
    fpr = flag_rate(clean_scores, threshold)
    bdr = flag_rate(poisoned_scores, threshold)
    nc, npz = len(clean_scores), len(poisoned_scores)
    acc = (nc * (100.0 - fpr) + npz * bdr) / max(nc + npz, 1)
    return {"attack": attack, "acc": round(acc, 2), "bdr": round(bdr, 2), "fpr": round(fpr, 2),
            "auroc": round(auroc(clean_scores, poisoned_scores), 2), "n": int(npz)}


def attack_success_rate(pred_triggered, labels, target) -> float:
    """ASR (percent) over inputs whose true label is not ``target``."""
    pred = np.asarray(pred_triggered)
    labels = np.asarray(labels)
    keep = labels != target
    return float(100.0 * np.mean(pred[keep] == target)) if keep.any() else float("nan")


def accuracy(pred, labels) -> float:
    return float(100.0 * np.mean(np.asarray(pred) == np.asarray(labels)))
