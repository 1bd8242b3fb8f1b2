"""Fine-tuning a detector on a dataset spec: the bookkeeping around :func:`tfbackdoor.detector.finetune`.

:func:`finetune_dataset` (what ``tfbd finetune`` runs) reads a seeded subset of clean samples of
each part of a spec plus held-out calibration images, balances the parts (a smaller part is
repeated to the largest's size), records every image it used as excluded from evaluation,
resolves the optional trigger(s) of the defence upgrade, then fine-tunes and saves.
"""

from __future__ import annotations

import numpy as np

from . import data, detector, triggers, victim
from .errors import TfbdError


def sample_counts(samples, parts) -> list:
    """Samples per dataset part from ``samples``: one count for every part, or one count per part
    (``"8000,100"``)."""
    try:
        counts = [int(c) for c in str(samples).split(",")]
    except ValueError:
        raise TfbdError(f"--samples must be a count or one count per dataset part (got '{samples}')") from None
    if len(counts) == 1:
        counts = counts * len(parts)
    if len(counts) != len(parts):
        raise TfbdError(f"--samples has {len(counts)} counts for {len(parts)} dataset parts ({'+'.join(parts)})")
    return counts


def resolve_triggers(spec, image_size, seed=0):
    """One trigger, or :class:`~tfbackdoor.triggers.OneOf` a comma-separated list (each image gets one of
    them); ``None`` for no trigger."""
    if not spec:
        return None
    trigs = [victim.resolve_trigger(t, image_size) for t in spec.split(",") if t.strip()]
    return trigs[0] if len(trigs) == 1 else triggers.OneOf(trigs, seed=seed)


def finetune_dataset(model, dataset, out, samples="100", epochs=10, repeat=10, lr=1e-4, batch_size=32, trigger=None,
                     trigger_share=0.5, calibration=0, target_fpr=0.5, benign=None, manipulation=None,
                     calibration_rule="pooled", seed=0, command=None, echo=None) -> dict:
    """Fine-tune detector ``model`` on clean samples of ``dataset`` and save it to ``out``.

    Args:
      samples: clean images per part (one count, or one per part: ``"8000,100"``); parts of
        unequal size are balanced by repeating the smaller ones.
      trigger: ``None`` (the poisoned side keeps random manipulations), a trigger name or file, or a
        comma-separated list of them (:func:`resolve_triggers`), used on ``trigger_share`` of the pairs.
      calibration: hold out this many more clean images of each part and set the threshold on them
        (flagging ``target_fpr`` percent, ``calibration_rule``); 0 keeps the threshold.
      benign, manipulation: see :func:`tfbackdoor.detector.finetune`.
      echo: receives one line before the training starts (``None``: silent).

    Every image used (trained on, or calibrating) is recorded in the model as excluded from
    evaluation on its part. Returns ``{"model", "n", "excluded", "threshold"}`` (``n``: the
    clean inputs after balancing).
    """
    parts = [p.strip() for p in dataset.split("+") if p.strip()]
    counts = sample_counts(samples, parts)
    if min(counts) < 1 or calibration < 0 or repeat < 1 or epochs < 1 or batch_size < 1:
        raise TfbdError(f"--samples, --epochs, --repeat, --batch-size must be positive and --calibration >= 0 "
                        f"(got {samples}, {epochs}, {repeat}, {batch_size}, {calibration})")
    spec = detector.spec_of(model)
    trig = resolve_triggers(trigger, spec.image_size, seed)
    xs, cals, exclude = [], [], {}
    for part, n in zip(parts, counts):   # A+B: n samples of each part
        ds = data.load(part, image_size=spec.image_size, with_ids=True, limit=n + calibration, seed=seed)
        x_all, _, ids_all = data.materialize(ds, part)
        xs.append(x_all[:n])
        cals.append(x_all[n:])
        exclude[part] = list(ids_all[:n + calibration])   # trained on, or set the threshold
    largest = max(len(v) for v in xs)
    # Balance the parts: a part of 100 beside one of 8,000 is repeated 80 times per epoch.
    xs = [np.concatenate([v] * max(1, round(largest / len(v)))) for v in xs]
    x, n_ids = np.concatenate(xs), sum(len(v) for v in exclude.values())
    x_cal = cals if calibration else None   # one array per part (the "worst" rule treats each separately)
    if echo:
        poisoned = (f"{trig.name} on {trigger_share:.0%} of them, random manipulations on the rest" if trig
                    else "random manipulations")
        echo(f"fine-tuning on {len(x)} clean samples of {dataset} x {repeat} + as many poisoned ({poisoned}), "
             f"{epochs} epochs" + (f"; threshold from {sum(len(v) for v in x_cal)} held-out images" if calibration else ""))
    model = detector.finetune(model, x, out, len(x), epochs=epochs, repeat=repeat, lr=lr, batch_size=batch_size,
                              seed=seed, exclude=exclude, source_spec=dataset, trigger=trig,
                              trigger_share=trigger_share, x_calibration=x_cal,
                              target_fpr=target_fpr if calibration else None, command=command, benign=benign,
                              calibration_rule=calibration_rule, manipulation=manipulation)
    return {"model": model, "n": int(len(x)), "excluded": int(n_ids), "threshold": float(detector.spec_of(model).threshold)}


__all__ = ["finetune_dataset", "sample_counts", "resolve_triggers"]
