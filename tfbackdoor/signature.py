"""Label signatures: a training-set screen that looks at all the samples of a label together.

A per-image detector judges each image alone, and triggers that only shift an image's low
frequencies (SIG, low-frequency, smooth triggers) look natural one at a time. In a dirty-label
poisoned training set they are not alone: every poisoned sample carries the same pattern and
the target label, so inside that label the poisons form a second cluster, apart from the clean
samples along one direction (the spectral-signature idea of Tran et al., NeurIPS 2018, here on
the inputs' DCT coefficients rather than on a victim's features, so no victim is needed).

:func:`label_signatures` finds, for each label,

* the **direction**: where the detector's flags single the label out, the linear
  discriminant between its flagged and unflagged samples, ``w = C^-1 (mean_flagged -
  mean_unflagged)`` (the detector's confident catches teach what the trigger adds, and the
  poisons it missed share it); elsewhere the label's top principal direction after whitening
  by ``C``, pointed away from the other labels' samples (poisons carry a pattern the rest of the
  set does not);
* the **strength**: the variance along the label's top whitened direction, ``lambda``, in units of
  the largest variance pure noise would reach with that many samples and features (the
  Marchenko-Pastur edge); a label whose ``lambda`` is at least ``FACTOR`` times the median label's
  and ``GAP`` times the runner-up's is suspect on its own. On 20,000 CIFAR-10 training images
  (``k = 16``, 10% poisoned, the setting of ``tests/test_signature.py``) the clean labels lie at
  1.1-4.8 (median ~2.2), the target label at 42 with SIG and 11 with LF; the smooth trigger's
  label stays at 3.0, and is found through the detector's flags instead. Where labels differ in
  their own structure far more than CIFAR-10's do (GTSRB: rigid sign shapes), the strengths of
  clean labels spread over 1.3-85 and this rule finds no label: the signature then adds nothing
  to the detector's flags (measured: SIG and LF at 10% on GTSRB are missed).

``C`` is the pooled within-label covariance of the DCT coefficients of the unflagged samples of
the *other* labels (each label centred on its own mean), with a small ridge. The DCT is orthonormal, so with all
coefficients this equals the same analysis on pixels; ``k`` keeps the ``k x k`` lowest
frequencies of each channel (``3 k^2`` features). ``k = 16`` by default: on 20,000 CIFAR-10
images all 32 x 32 coefficients (``k = 32``) hid the LF trigger's label (its strength is spread
over 4x the features, and the noise edge grows with them) and cost ~8x more; ``k = 16`` finds it
(BENCHMARKS "Issue 14, round 1").

Everything here is numpy linear algebra on ``(N, 3 k^2)`` features, written by hand because no
library offers a supervised/unsupervised per-group projection like this; it costs one pass
over the features and one ``3k^2 x 3k^2`` solve per examined label.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import svds
from scipy.stats import rankdata

from . import metrics
from .errors import TfbdError

# A label is suspect on its own when its top whitened variance is >= FACTOR x the median label's.
FACTOR = 4.0
# ... and at least GAP x the runner-up label's (one target: suspect_by_signature).
GAP = 2.0
# The discriminant needs this many flagged (and unflagged) samples in the label; fewer: the principal direction.
MIN_FLAGGED = 20
RIDGE = 1e-3


def features(images, k: int = 16) -> np.ndarray:
    """``(N, 3 k^2)`` float32: the ``k x k`` lowest orthonormal DCT coefficients of each channel (pixels 0..1)."""
    from .frequency import dct2d

    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise TfbdError(f"signature features need (N, H, W, 3) images, got {x.shape}")
    k = min(int(k), x.shape[1], x.shape[2])
    f = dct2d(x.astype(np.float32) / 255.0).numpy()[:, :k, :k, :]
    return f.reshape(len(f), -1)


def _scatters(feats, labels, use):
    """Per-label scatter matrices ``{label: (S, n)}`` of the ``use`` samples, each centred on its label's mean."""
    out = {}
    for lab in np.unique(labels[use]):
        z = feats[use & (labels == lab)].astype(np.float64)
        z -= z.mean(0)
        out[int(lab)] = (z.T @ z, len(z))
    return out


def _others_covariance(scatters, lab):
    """The pooled within-label covariance of every label but ``lab`` (with a small ridge): the poisons of
    ``lab`` must not whiten away their own pattern."""
    dim = next(iter(scatters.values()))[0].shape[0]
    cov = np.zeros((dim, dim))
    n = 0
    for other, (sc, m) in scatters.items():
        if other != lab:
            cov += sc
            n += m
    cov /= max(n - 1, 1)
    return cov + RIDGE * np.trace(cov) / dim * np.eye(dim)


def label_signatures(feats, labels, flags=None, discriminant_for=None) -> dict:
    """Per-label signature: ``{label: {"lambda", "direction", "projection", "method"}}``.

    Args:
      feats: ``(N, D)`` features (:func:`features`).
      labels: ``(N,)`` int labels (``-1``: unlabelled, ignored).
      flags: ``(N,)`` bool, the detector's verdicts (``None``: none).
      discriminant_for: the labels where the flags are trusted to teach the discriminant (default:
        those the flags single out, :func:`tfbackdoor.metrics.suspect_labels`). Elsewhere the
        flagged samples are mostly the detector's ordinary false positives, and a discriminant
        learnt from them points nowhere useful (measured: SIG's poisons ranked at 41% recall
        that way, the principal direction ranks them first).

    ``projection`` is the ``(n_label,)`` score of the label's samples along its direction, larger
    = more like the poisons; ``lambda`` the top whitened variance of the label.
    """
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels)
    flags = np.zeros(len(labels), bool) if flags is None else np.asarray(flags, bool)
    if len(feats) != len(labels) or len(flags) != len(labels):
        raise TfbdError(f"features ({len(feats)}), labels ({len(labels)}) and flags ({len(flags)}) differ in length")
    known = labels >= 0
    trusted = set(metrics.suspect_labels(flags, labels) if discriminant_for is None else discriminant_for)
    scatters = _scatters(feats, labels, known & ~flags)
    out = {}
    for lab in np.unique(labels[known]):
        cov = _others_covariance(scatters, int(lab))
        evals, evecs = np.linalg.eigh(cov)
        whiten = evecs / np.sqrt(np.maximum(evals, 1e-12))   # z = (x - m) @ whiten: identity covariance for clean data
        sel = labels == lab
        f = feats[sel].astype(np.float64)
        fl = flags[sel]
        z = (f - f.mean(0)) @ whiten
        if min(z.shape) > 1:
            _u, s, vt = svds(z, k=1, random_state=0)           # the top singular pair only (Lanczos)
        else:
            _u, s, vt = np.linalg.svd(z, full_matrices=False)
        # relative to the top eigenvalue pure noise would reach with this many samples and features
        # (the Marchenko-Pastur edge (1 + sqrt(D / n))^2), so that labels of different sizes compare
        lam = float(s[0] ** 2 / max(len(z) - 1, 1)) / (1.0 + np.sqrt(z.shape[1] / len(z))) ** 2
        if int(lab) in trusted and fl.sum() >= MIN_FLAGGED and (~fl).sum() >= MIN_FLAGGED:
            w = np.linalg.solve(cov, f[fl].mean(0) - f[~fl].mean(0))
            proj, method = (f - f[~fl].mean(0)) @ w, "discriminant"
        else:
            w = whiten @ vt[0]
            proj = (f - f.mean(0)) @ w
            others = (feats[known & ~sel].astype(np.float64) - f.mean(0)) @ w
            # the label's mean sits between its clean and poisoned clusters; the other labels' samples,
            # without the pattern, sit on the clean side: point the projection away from them
            if others.size and np.mean(others) > 0:
                proj = -proj
            method = "principal"
        out[int(lab)] = {"lambda": lam, "direction": w, "projection": proj, "method": method}
    return out


def suspect_by_signature(signatures) -> list:
    """The label whose top whitened variance is at least ``FACTOR`` times the median label's and
    ``GAP`` times the runner-up's (``[label]``), else ``[]``.

    At most one label: a dirty-label attack has one target, and where several labels stand out
    it is the dataset's own class structure that does. On 20,000 clean GTSRB training images
    (43 classes of rigid sign shapes, 101-1,159 samples per label) five labels reach 4-9.5x the
    median, the strongest 1.8x the runner-up; on CIFAR-10 the clean runner-up gap is 1.2x and a
    10%-poisoned target's 2.4x (LF) to 9.8x (SIG) (BENCHMARKS "Issue 14, round 2")."""
    lams = sorted(((s["lambda"], lab) for lab, s in signatures.items()), reverse=True)
    if len(lams) < 2:
        return []
    med = float(np.median([v for v, _ in lams]))
    (top, lab), (second, _) = lams[0], lams[1]
    return [lab] if top >= FACTOR * med and top >= GAP * second else []


def screen(scores, labels, threshold, remove_top=0.0, suspect_top=0.0, feats=None):
    """The training-set screen: ``(flags, info)`` for every sample.

    1. ``scores > threshold``, plus the top ``remove_top`` percent of all scores;
    2. suspect labels: those whose flag rate stands out (:func:`tfbackdoor.metrics.suspect_labels`)
       and, with ``feats`` (:func:`features`), those whose signature does (:func:`suspect_by_signature`);
    3. in each suspect label, also the ``suspect_top`` percent of its samples ranked highest: by the
       detector's score; with ``feats``, by the label's signature projection, and in labels the
       flags single out (where the projection is the discriminant the flags teach) by the higher
       of a sample's two ranks.

    ``info``: ``{"threshold", "suspect_labels", "signature": {label: {"lambda", "method"}} | None}``.
    """
    scores = np.asarray(scores)
    labels = None if labels is None else np.asarray(labels)
    thr = metrics.top_threshold(scores, threshold, remove_top)
    flags = metrics.flagged(scores, thr)
    info = {"threshold": thr, "suspect_labels": [], "signature": None}
    if not suspect_top or labels is None:
        return flags, info
    suspects = set(metrics.suspect_labels(flags, labels))
    sigs = None
    if feats is not None:
        sigs = label_signatures(feats, labels, flags, discriminant_for=suspects)
        suspects |= set(suspect_by_signature(sigs))
        info["signature"] = {lab: {"lambda": round(v["lambda"], 3), "method": v["method"]} for lab, v in sigs.items()}
    out = flags.copy()
    for lab in sorted(suspects):
        idx = np.flatnonzero(labels == lab)
        rank = scores[idx] if sigs is None else sigs[lab]["projection"]
        if sigs is not None and sigs[lab]["method"] == "discriminant":
            # Both rankings know the trigger in a label the flags single out: a sample goes when either
            # ranks it high (the higher of its two ranks). Measured on 20,000 CIFAR-10 images at
            # suspect_top 70 (poisons left of 2,000, detector / discriminant / this): smooth 7 / 13 / 5,
            # BadNets 3x3 97 / 32 / 36, Blended 1 / 0 / 0 (BENCHMARKS "Issue 14, round 2").
            rank = np.maximum(rankdata(scores[idx]), rankdata(rank))
        cut = metrics.top_threshold(rank, np.inf, suspect_top)
        out[idx[metrics.flagged(np.asarray(rank), cut)]] = True
    info["suspect_labels"] = sorted(int(v) for v in suspects)
    return out, info


__all__ = ["features", "label_signatures", "suspect_by_signature", "screen", "FACTOR", "GAP", "MIN_FLAGGED"]
