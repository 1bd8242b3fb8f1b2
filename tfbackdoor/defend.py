"""The defence end to end: poison a training set, screen it with a detector, train a victim on
what is left, and measure the backdoor that survived (paper Section 5.4, Table 7).

For each attack :func:`defend` runs

1. :func:`tfbackdoor.victim.poison` (dirty label, ``rate`` of the set -> ``target``);
2. the screen: :func:`tfbackdoor.detector.score` of every training sample, flagged when above the
   threshold (the detector's own, or ``threshold``); ``remove_top`` additionally drops that share
   of the highest-scoring samples (a stricter operating point for training-set screening, where
   losing a few percent of clean images costs little), and ``suspect_top`` drops that share of
   the highest-scoring samples of each label whose flag rate stands out (the dirty-label target),
   ranked by the label's signature with ``use_signature`` (:func:`tfbackdoor.signature.screen`); the scan's recall and precision on the
   known poisoned samples and the share of clean samples removed;
3. :func:`tfbackdoor.victim.train_victim` on the kept samples;
4. :func:`tfbackdoor.victim.attack_eval` on the test set: clean ACC and ASR, plain and behind
   the detector as an input screener (``asr_screened``).

A victim trained on the clean set with the same budget gives the reference ACC. The rows have
the keys ``attack, recall, precision, clean_removed, n_poisoned_kept, suspect_labels, signature,
n_kept, acc, asr, asr_screened, acc_drop, asr_clean_victim`` (percentages but for the counts,
``suspect_labels`` and ``signature``: each label's signature strength and method, or ``None``
without ``use_signature``; ``asr_clean_victim`` is the reference victim's ASR with the same
trigger: the floor a perfect screen would leave), and with
``undefended`` also ``acc_undefended, asr_undefended``: a victim trained on the whole poisoned
set, no screen (the backdoor the screen has to remove).

Victims are saved in ``out_dir`` with the set they trained on fingerprinted in their sidecar
(:func:`tfbackdoor.victim.reusable`): rerunning the same command after an interruption reuses the
finished victims instead of training them again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import detector as detector_mod
from . import metrics, signature, victim


# The scan's figures each row carries (with or without a victim).
ROW_SCAN_KEYS = ("recall", "precision", "clean_removed", "n_poisoned_kept", "suspect_labels", "signature")


def screen_flags(scores, threshold, remove_top=0.0, labels=None, suspect_top=0.0, feats=None) -> np.ndarray:
    """Boolean flags of the training-set screen (:func:`tfbackdoor.signature.screen`, the rule ``tfbd scan``
    uses): ``scores > threshold``, plus the top ``remove_top`` percent of the scores, plus the top
    ``suspect_top`` percent of each suspect label's samples (ranked by the label signature with
    ``feats``, else by score)."""
    return signature.screen(scores, labels, threshold, remove_top, suspect_top, feats)[0]


def poison_and_screen(x, y, trigger, detector, threshold, rate=0.1, target=0, seed=0, remove_top=0.0,
                      suspect_top=0.0, use_signature=False):
    """The poisoned set of one attack and its screen, as :func:`defend` makes them:
    ``(x_p, y_p, poisoned_idx, flags, info)`` (:func:`tfbackdoor.victim.poison`, then
    :func:`tfbackdoor.signature.screen` of the detector's scores at ``threshold``). The sanitised
    set a victim trains on is ``x_p[~flags], y_p[~flags]``."""
    x_p, y_p, idx = victim.poison(x, y, trigger, rate, target, seed)
    scores = np.asarray(detector_mod.score(detector, x_p))
    feats = signature.features(x_p) if use_signature and suspect_top else None
    flags, info = signature.screen(scores, y_p, threshold, remove_top, suspect_top, feats)
    return x_p, y_p, idx, flags, info


def scan_report(flags, poisoned_idx) -> dict:
    """Recall / precision of ``flags`` on the known poisoned indices, and the clean share removed (percent)."""
    flags = np.asarray(flags, bool)
    is_p = np.zeros(len(flags), bool)
    is_p[np.asarray(poisoned_idx, np.int64)] = True
    tp = int((flags & is_p).sum())
    return {"recall": round(100.0 * tp / max(int(is_p.sum()), 1), 2),
            "precision": round(100.0 * tp / max(int(flags.sum()), 1), 2),
            "clean_removed": round(100.0 * float((flags & ~is_p).sum()) / max(int((~is_p).sum()), 1), 2),
            "n_flagged": int(flags.sum()), "n_poisoned": int(is_p.sum()), "n_poisoned_kept": int((is_p & ~flags).sum())}


def defend(x, y, test, attacks, detector, out_dir, rate=0.1, target=0, threshold=None, remove_top=0.0,
           suspect_top=0.0, use_signature=False, scan_only=False, epochs=10, width=32, batch_size=128, seed=0, echo=print,
           clean_reference=True, undefended=False, arch="vgg") -> list:
    """Run poison -> screen -> train -> attack-eval for each attack; returns one row per attack.

    Args:
      x, y: the clean uint8 training set ``(N, S, S, 3)`` and labels.
      test: ``(x_test, y_test)`` for clean ACC and ASR.
      attacks: triggers (objects or names for :func:`tfbackdoor.victim.resolve_trigger`).
      detector: a loaded detector (:func:`tfbackdoor.detector.load`).
      out_dir: folder for the victims (``victim_<attack>.keras`` + JSON) and ``victim_clean.keras``.
      rate, target: the poisoning.
      threshold: the screen's threshold (default: the detector's).
      remove_top: also remove this percentage of the highest-scoring samples.
      suspect_top: in each label whose flag rate stands out (a dirty-label target), also remove
        this percentage of that label's highest-scoring samples.
      use_signature: find suspect labels and rank their samples with label signatures
        (:mod:`tfbackdoor.signature`) as well as with the detector.
      scan_only: stop after the screen (rows without victims: recall, precision, clean removed).
      epochs, width, batch_size, arch: the victims' training budget and architecture (the same for
        every victim; :func:`tfbackdoor.victim.build_victim`).
      clean_reference: also train a victim on the clean set (its ACC is the reference).
      undefended: also train a victim on each whole poisoned set (no screen): its ACC and ASR.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thr = detector_mod.spec_of(detector).threshold if threshold is None else float(threshold)
    x_test, y_test = test
    size = x.shape[1]
    trigs = [victim.resolve_trigger(a, size) for a in attacks]
    det_screen = detector_mod.screen(detector)
    common = dict(epochs=epochs, batch_size=batch_size, seed=seed, width=width, arch=arch)

    def train(xs, ys, path, info=None):
        model = victim.reusable(path, xs, ys, **common)
        if model is not None:
            echo(f"  reusing {path} (trained on this very set with this budget)")
            return model
        return victim.train_victim(xs, ys, path, info=info, echo=None, **common)[0]

    ref_acc = ref_model = None
    if clean_reference and not scan_only:
        path = out_dir / "victim_clean.keras"
        echo(f"clean reference victim -> {path}")
        ref_model = train(x, y, path)
        ref_acc = round(metrics.accuracy(victim.predict(ref_model, x_test), y_test), 2)
        echo(f"  clean ACC {ref_acc:.2f}%")
    rows = []
    for trig in trigs:
        x_p, y_p, idx, flags, info = poison_and_screen(x, y, trig, detector, thr, rate, target, seed, remove_top,
                                                       suspect_top, use_signature)
        report = scan_report(flags, idx)
        report["suspect_labels"] = info["suspect_labels"]
        # each label's signature strength and method (with use_signature), to see how far a label stood out
        report["signature"] = info["signature"]
        keep = ~flags
        figures = (f"(recall {report['recall']:.2f}%, precision {report['precision']:.2f}%, "
                   f"clean removed {report['clean_removed']:.2f}%")
        if scan_only:
            echo(f"{trig.name}: scan flagged {report['n_flagged']} of {len(x_p)} {figures}, "
                 f"suspect labels {report['suspect_labels']})")
            rows.append({"attack": trig.name, "target": int(target), "n_kept": int(keep.sum()),
                         **{k: report[k] for k in ROW_SCAN_KEYS}})
            continue
        safe = trig.name.replace("/", "_").replace(":", "_")
        path = out_dir / f"victim_{safe}.keras"
        echo(f"{trig.name}: scan removed {report['n_flagged']} of {len(x_p)} {figures}); "
             f"training on {int(keep.sum())} -> {path}")
        model = train(x_p[keep], y_p[keep], path,
                      info={"sanitised": {"attack": trig.name, "target": int(target), "rate": rate,
                                          "threshold": thr, "remove_top": remove_top,
                                          "suspect_top": suspect_top, "signature": bool(use_signature), **report}})
        ev = victim.attack_eval(model, x_test, y_test, trig, target, screen=det_screen)
        row = {"attack": trig.name, **{k: report[k] for k in ROW_SCAN_KEYS},
               "n_kept": int(keep.sum()), "acc": ev["acc"], "asr": ev["asr"], "asr_screened": ev["asr_screened"],
               "acc_drop": None if ref_acc is None else round(ref_acc - ev["acc"], 2), "target": int(target),
               # the floor no screen can go below: the clean victim's own "ASR" with this trigger (its
               # errors that land on the target, and what a trigger that is also an adversarial
               # perturbation, like the smooth one, does to a model that never saw a poison)
               "asr_clean_victim": None if ref_model is None else
               victim.attack_eval(ref_model, x_test, y_test, trig, target)["asr"],
               "victim": str(path)}
        echo(f"  ACC {row['acc']:.2f}%  ASR {row['asr']:.2f}%  behind the screener {row['asr_screened']:.2f}%")
        if undefended:
            path_u = out_dir / f"victim_{safe}_undefended.keras"
            echo(f"  undefended: training on all {len(x_p)} (no screen) -> {path_u}")
            model_u = train(x_p, y_p, path_u, info={"undefended": {"attack": trig.name, "target": int(target),
                                                                   "rate": rate, "n_poisoned": len(idx)}})
            ev_u = victim.attack_eval(model_u, x_test, y_test, trig, target)
            row.update(acc_undefended=ev_u["acc"], asr_undefended=ev_u["asr"], victim_undefended=str(path_u))
            echo(f"  undefended: ACC {ev_u['acc']:.2f}%  ASR {ev_u['asr']:.2f}%")
        rows.append(row)
    if ref_acc is not None:
        rows.insert(0, {"attack": "clean", "acc": ref_acc, "victim": str(out_dir / "victim_clean.keras")})
    return rows
