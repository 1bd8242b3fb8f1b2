"""Metrics, one definition each. Rates are returned as percentages (0..100).

* ``fpr``: share of clean inputs flagged (score > threshold).
* ``bdr``: backdoor detection rate, share of triggered inputs flagged.
* ``acc``: accuracy on the 50/50 set of the clean inputs and their triggered copies.
* ``bdr_at_fpr``: BDR at the threshold that flags a given share of *these* clean inputs (its
  ``1 - fpr/100`` quantile): compares detectors at equal FPR whatever their own thresholds.
* ``auroc``: area under the ROC curve of the scores (threshold-free), in percent.
* ``asr``: attack success rate, share of inputs whose true label is not the target that the
  model labels as the target once triggered.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from .errors import TfbdError

# The verdict rule (score strictly above the threshold), defined once with the screener contract in edge/.
from edge.screen import is_flagged as flagged


def flag_rate(scores, threshold=0.5) -> float:
    scores = np.asarray(scores, np.float64)
    return float(100.0 * np.mean(flagged(scores, threshold))) if scores.size else float("nan")


def top_threshold(scores, threshold, remove_top=0.0) -> float:
    """A threshold that also flags the ``remove_top`` percent highest ``scores`` (a stricter operating point).

    Returns ``min(threshold, t)`` with ``t`` just below the k-th highest score, ``k =
    round(len(scores) * remove_top / 100)``, so that ``score > result`` flags everything the
    plain threshold flags plus at least the top k (ties with the k-th score included: scores
    saturated at 1.0 must not hide a whole block of suspects).
    """
    if not 0 <= remove_top < 100:
        raise TfbdError(f"--remove-top must be in [0, 100) percent (got {remove_top})")
    s = np.asarray(scores).ravel()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    k = int(round(s.size * remove_top / 100.0))
    if not k:
        return float(threshold)
    kth = np.partition(s, s.size - k)[s.size - k]
    # The step below the k-th score is taken in the scores' own precision: float32 scores compared
    # with a float64 step would round it back up to the k-th score and lose it.
    return float(min(float(threshold), np.nextafter(kth, s.dtype.type(-np.inf))))


# A label is a dirty-label target suspect when its flag rate is at least SUSPECT_FACTOR times the
# median label's and at least SUSPECT_MIN_RATE percent: on the 10%-poisoned CIFAR-10 sets of
# BENCHMARKS "Issue 14, round 1" this singles out the target label for the four attacks the
# detector sees and no other label (the detector's ordinary false positives are ~1% per label).
SUSPECT_FACTOR = 5.0
SUSPECT_MIN_RATE = 5.0


def suspect_labels(flags, labels) -> list:
    """Labels whose flag rate stands out (see ``SUSPECT_FACTOR``, ``SUSPECT_MIN_RATE``), sorted."""
    flags = np.asarray(flags, bool)
    labels = np.asarray(labels)
    uniq = [v for v in np.unique(labels) if v >= 0]          # -1: unlabelled folder images
    if len(uniq) < 2:
        return []
    rates = {v: 100.0 * float(flags[labels == v].mean()) for v in uniq}
    med = float(np.median(list(rates.values())))
    return sorted(int(v) for v, r in rates.items() if r >= max(SUSPECT_MIN_RATE, SUSPECT_FACTOR * med))


def auroc(clean_scores, poisoned_scores) -> float:
    """AUROC (percent) via the Mann-Whitney U statistic, ties counted half."""
    c = np.asarray(clean_scores, np.float64)
    p = np.asarray(poisoned_scores, np.float64)
    if not c.size or not p.size:
        return float("nan")
    ranks = rankdata(np.concatenate([c, p]))
    u = ranks[len(c):].sum() - len(p) * (len(p) + 1) / 2.0
    return float(100.0 * u / (len(c) * len(p)))


def threshold_at_fpr(clean_scores, fpr=1.0) -> float:
    """The threshold above which ``fpr`` percent of ``clean_scores`` lie (their ``1 - fpr/100`` quantile)."""
    return float(np.quantile(np.asarray(clean_scores, np.float64), 1.0 - fpr / 100.0))


def bdr_at_fpr(clean_scores, poisoned_scores, fpr=1.0) -> float:
    """BDR (percent) at the threshold that flags ``fpr`` percent of ``clean_scores``."""
    return flag_rate(poisoned_scores, threshold_at_fpr(clean_scores, fpr))


def detection_report(attack, clean_scores, poisoned_scores, threshold=0.5, at_fpr=None) -> dict:
    """The JSON object for one attack: ``attack, acc, bdr, fpr, auroc, n`` (n = triggered inputs).

    With ``at_fpr`` (a percentage) also ``bdr_at_fpr``: the BDR at equal clean FPR (:func:`bdr_at_fpr`).
    """
    fpr = flag_rate(clean_scores, threshold)
    bdr = flag_rate(poisoned_scores, threshold)
    nc, npz = len(clean_scores), len(poisoned_scores)
    acc = (nc * (100.0 - fpr) + npz * bdr) / max(nc + npz, 1)
    row = {"attack": attack, "acc": round(acc, 2), "bdr": round(bdr, 2), "fpr": round(fpr, 2),
           "auroc": round(auroc(clean_scores, poisoned_scores), 2), "n": int(npz)}
    if at_fpr is not None:
        row["bdr_at_fpr"] = round(bdr_at_fpr(clean_scores, poisoned_scores, at_fpr), 2)
    return row


def attack_success_rate(pred_triggered, labels, target) -> float:
    """ASR (percent) over inputs whose true label is not ``target``."""
    pred = np.asarray(pred_triggered)
    labels = np.asarray(labels)
    keep = labels != target
    return float(100.0 * np.mean(pred[keep] == target)) if keep.any() else float("nan")


def accuracy(pred, labels) -> float:
    return float(100.0 * np.mean(np.asarray(pred) == np.asarray(labels)))
