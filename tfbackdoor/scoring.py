"""Scoring, evaluation and scanning with a detector: P(poisoned) of uint8 images as one cached graph,
ACC/BDR/FPR/AUROC reports per attack and benign variant, and the streamed scan of a dataset spec
(CSV report, optional sanitised ``.npz``). :mod:`tfbackdoor.detector` re-exports these names."""

from __future__ import annotations

import csv
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import data as data_mod
from . import metrics, perturb, signature, triggers
from .atomic import atomic_path, atomic_paths
from .errors import TfbdError
from .frequency import dct2d
from .models import spec_of
from .provenance import excluded_ids, relative_id


# ----------------------------------------------------------------------------------- inputs

def to_inputs(images, domain="dct"):
    """uint8 ``(N, H, W, 3)`` images -> float model inputs (DCT of 0..255 values, or 0..255 pixels)."""
    x = tf.cast(images, tf.float32)
    return dct2d(x) if domain == "dct" else x


# ------------------------------------------------------------------------------- scoring

def _score_fn(model, dtype=tf.uint8):
    """``images (B, S, S, 3) -> P(poisoned) (B,)`` as one graph (input transform + model), cached on the model.

    One ``tf.function`` per model and input dtype, traced once for any batch size: a graph call
    runs at ``model.predict`` speed, while an eager Keras call (or a ``tf.data`` map feeding it)
    pays Python dispatch per layer and misses Grappler's fused kernels (issue 12: 0.37-0.75x).
    The model's variables are read at each call, so later weight changes (fine-tuning) apply.
    """
    cache = model.__dict__.setdefault("_tfbd_score_fns", {})   # plain attribute: not tracked or saved by Keras
    key = tf.as_dtype(dtype).name
    if key not in cache:
        spec = spec_of(model)
        domain, size = spec.domain, spec.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], dtype)])
        def fn(images):
            return model(to_inputs(images, domain), training=False)[:, 1]

        cache[key] = fn
    return cache[key]


def score(model, images, batch_size=256) -> np.ndarray:
    """P(poisoned) for uint8 images ``(N, H, W, 3)`` (numpy or tensor) -> float ``(N,)``."""
    spec = spec_of(model)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (spec.image_size, spec.image_size, 3):
        raise TfbdError(f"detector expects images of shape (N, {spec.image_size}, {spec.image_size}, 3), got {images.shape}")
    fn = _score_fn(model, images.dtype)
    out = [fn(images[i:i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def screen(model, threshold=None):
    """A screen for :func:`tfbackdoor.victim.attack_eval`: a callable taking uint8 images and
    returning True for those the detector flags (:func:`score` above ``threshold``, default the
    detector's own)."""
    thr = spec_of(model).threshold if threshold is None else float(threshold)
    return lambda images: metrics.flagged(score(model, images), thr)


def load_eval_images(model, dataset, limit=None, seed=0, also=(), with_labels=False):
    """``limit`` seeded images of ``dataset`` at the detector's size that it was not fine-tuned or
    calibrated on (numpy; fewer only when the dataset has fewer left). ``also``: more detectors
    whose fine-tune samples are left out too, so several models are compared on the same images.
    ``with_labels``: return ``(x, y)``."""
    spec = spec_of(model)
    excluded = set(excluded_ids(model, dataset)).union(*[excluded_ids(m, dataset) for m in also])
    # The seeded subset is prefix-stable, so asking for len(excluded) more and dropping the
    # excluded ones keeps the same images a model without exclusions is evaluated on, plus more.
    more = None if limit is None else limit + len(excluded)
    ds = data_mod.load(dataset, image_size=spec.image_size, with_ids=True, limit=more, seed=seed)
    x, y, ids = data_mod.materialize(ds, dataset)
    if excluded:
        keep = np.asarray([relative_id(dataset, i) not in excluded for i in ids])
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return (x, y) if with_labels else x


def evaluate_images(model, x, attacks, threshold=None, benign_variants=(), at_fpr=None) -> list:
    """One report per attack (see :func:`tfbackdoor.metrics.detection_report`) on clean ``x``.

    ``benign_variants`` (names from :data:`tfbackdoor.perturb.BENIGN_VARIANTS`) add rows whose
    "poisoned" side is benign processing: their ``fpr`` is the clean flag rate and their ``bdr``
    the flag rate of the processed images (a false-positive rate too, lower is better).

    A trigger with a ``clean_transform`` (uint8 batch -> uint8 batch, e.g. the JPEG round trip of
    :class:`tfbackdoor.triggers.zoo.JpegTrigger`) is compared against ``clean_transform(x)``: that row's
    ``fpr`` and ``auroc`` use the clean images processed the same way (scored once per distinct
    transform). For ``clean+jpegQ`` both sides are the round trip, so its ``bdr`` = ``fpr`` is
    the flag rate of JPEG-saved clean images.

    ``at_fpr`` (a percentage, e.g. 1.0) adds ``bdr_at_fpr`` to each attack row: the BDR at the
    threshold that flags that share of the row's clean images, to compare detectors at equal FPR.
    """
    spec = spec_of(model)
    thr = spec.threshold if threshold is None else threshold
    clean = score(model, x)
    rows = [{"attack": "clean", "acc": round(100 - metrics.flag_rate(clean, thr), 2), "bdr": None,
             "fpr": round(metrics.flag_rate(clean, thr), 2), "auroc": None, "n": int(len(x))}]
    clean_by_transform = {}
    for t in attacks:
        trig = np.concatenate([t(x[i:i + 1024]).numpy() for i in range(0, len(x), 1024)])
        ct = getattr(t, "clean_transform", None)
        if ct is not None and ct not in clean_by_transform:
            proc = np.concatenate([np.asarray(ct(x[i:i + 1024])) for i in range(0, len(x), 1024)])
            clean_by_transform[ct] = score(model, proc)
        rows.append(metrics.detection_report(t.name, clean if ct is None else clean_by_transform[ct],
                                             score(model, trig), thr, at_fpr))
    for name in benign_variants:
        fn = perturb.BENIGN_VARIANTS.get(name)
        if fn is None:
            raise TfbdError(f"unknown benign variant '{name}' (known: {', '.join(perturb.BENIGN_VARIANTS)})")
        proc = np.concatenate([fn(x[i:i + 1024]).numpy() for i in range(0, len(x), 1024)])
        s = score(model, proc)
        rows.append({"attack": f"benign:{name}", "acc": None, "bdr": None, "fpr": round(metrics.flag_rate(s, thr), 2),
                     "auroc": None, "n": int(len(x))})
    return rows


def evaluate_dataset(model, dataset, attacks="all", limit=None, seed=0, threshold=None, trigger_dir=None,
                     benign_variants=(), at_fpr=None) -> list:
    spec = spec_of(model)
    x = load_eval_images(model, dataset, limit, seed)
    trigs = triggers.expand(attacks, spec.image_size, trigger_dir) if isinstance(attacks, str) else attacks
    return evaluate_images(model, x, trigs, threshold, benign_variants, at_fpr)


def evaluate_sets(model, clean_spec, poisoned_spec, threshold=None) -> list:
    spec = spec_of(model)
    thr = spec.threshold if threshold is None else threshold
    c, _ = data_mod.load_arrays(clean_spec, image_size=spec.image_size)
    p, _ = data_mod.load_arrays(poisoned_spec, image_size=spec.image_size)
    return [metrics.detection_report(poisoned_spec, score(model, c), score(model, p), thr)]


# ------------------------------------------------------------------------------- scanning

class _NpzStreamWriter:
    """Write arrays ``x`` (uint8 images) and ``y`` to a ``.npz`` without holding them in memory.

    Images are appended to temporary raw files; ``close`` writes the zip entries with proper
    ``.npy`` headers and renames the result into place (atomic).
    """

    def __init__(self, path, image_shape):
        self.path = Path(path)
        self.shape = tuple(image_shape)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._x = tempfile.TemporaryFile()
        self._y = []
        self.n = 0

    def add(self, images, labels):
        self._x.write(np.ascontiguousarray(images, np.uint8).tobytes())
        self._y.extend(int(v) for v in labels)
        self.n += len(images)

    def close(self):
        with atomic_path(self.path, ".npz") as tmp:
            self.write_to(tmp)

    def write_to(self, tmp):
        """Write the ``.npz`` to ``tmp`` (the caller renames it into place) and free the buffer."""
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("x.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                                             "shape": (self.n,) + self.shape})
                    self._x.seek(0)
                    while chunk := self._x.read(1 << 22):
                        f.write(chunk)
                with zf.open("y.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(self._y, np.int64))
        finally:
            self._x.close()


def scan(model, dataset, out_csv, threshold=None, write_clean=None, batch_size=256, limit=None, seed=0,
         progress=None, remove_top=0.0, suspect_top=0.0, use_signature=False) -> dict:
    """Score every sample of ``dataset`` (streamed), write a CSV report and optionally the sanitised set.

    CSV columns: ``id, label, score, flagged``. Unreadable items are listed in the summary's
    ``skipped`` and as CSV rows with an empty score. Returns a summary dict.

    ``remove_top`` (percent): also flag that share of the highest-scoring samples, a stricter
    operating point for training sets, where losing a few percent of clean images costs little
    (:func:`tfbackdoor.metrics.top_threshold`). It needs every score before the first verdict, so
    the set is read twice (a first pass scores it and keeps the scores, the second writes the
    report and the sanitised set with them); the summary's ``threshold`` is
    then the effective one and ``detector_threshold`` the model's. ``suspect_top`` (percent): in
    each label whose flag rate stands out (a dirty-label target), also flag that share of its
    highest-scoring samples; ``use_signature`` also finds suspect labels by their label signature and
    ranks their samples by it (:func:`tfbackdoor.signature.screen`); the summary lists the labels
    in ``suspect_labels`` (and the signatures' strengths in ``signature``).
    """
    spec = spec_of(model)
    thr = spec.threshold if threshold is None else threshold
    if write_clean is not None and not str(write_clean).startswith("npz:"):
        raise TfbdError(f"--write-clean must be npz:PATH (got '{write_clean}')")
    ds = data_mod.load(dataset, image_size=spec.image_size, with_ids=True, limit=limit, seed=seed)
    score_fn = _score_fn(model)
    base_thr, preset, info = thr, None, None
    if remove_top or suspect_top:
        # A first pass keeps the scores (and, for label signatures, the DCT features), then the screen
        # decides every verdict at once; the second pass writes them in the same (seeded) order.
        parts = []
        for bx, by, bi in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
            parts.append((score_fn(bx).numpy(), by, [i.decode() for i in bi],
                          signature.features(bx) if use_signature and suspect_top else None))
        s_all = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.float32)
        y_all = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        ids_all = [i for p in parts for i in p[2]]
        feats = np.concatenate([p[3] for p in parts]) if parts and parts[0][3] is not None else None
        preset, info = signature.screen(s_all, y_all, thr, remove_top, suspect_top, feats)
        thr = info["threshold"]
    writer_npz = _NpzStreamWriter(str(write_clean)[4:], (spec.image_size, spec.image_size, 3)) if write_clean else None
    n = flagged = 0
    seen, skipped = [], []
    # The report and the sanitised set are committed together (issue 15 item 4): both are written to
    # temporary files and renamed at the end, so an interrupt never pairs a new report with an old set.
    targets = [(out_csv, ".csv")] + ([(writer_npz.path, ".npz")] if writer_npz is not None else [])
    with atomic_paths(*targets) as tmps, open(tmps[0], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "score", "flagged"])
        for bx, by, bi in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
            ids = [i.decode() for i in bi]
            if preset is None:
                s = score_fn(bx).numpy()
                flags = metrics.flagged(s, thr)
            else:
                # the first pass's scores and verdicts: this pass only reads the images again to write them
                if ids != ids_all[n:n + len(ids)]:
                    raise TfbdError(f"{dataset}: the samples came in a different order on the second pass; "
                                    "--remove-top/--suspect-top need a stable order")
                s, flags = s_all[n:n + len(ids)], preset[n:n + len(ids)]
            seen.extend(ids)
            for i, lab, sc, fl in zip(ids, by, s, flags):
                w.writerow([i, int(lab), f"{sc:.6f}", int(fl)])
            if writer_npz is not None:
                writer_npz.add(bx[~flags], by[~flags])
            n += len(bx)
            flagged += int(flags.sum())
            if progress:
                progress(len(bx))
        data_mod.report_missing(dataset, seen, limit, seed, None, skipped)
        for item, _reason in skipped:
            w.writerow([item, "", "", ""])
        f.flush()
        if writer_npz is not None:
            writer_npz.write_to(tmps[1])
    return {"dataset": dataset, "n": n, "flagged": flagged, "flagged_pct": round(100.0 * flagged / max(n, 1), 2),
            "threshold": thr, "skipped": [s[0] for s in skipped], "report": str(out_csv),
            "clean_written": int(n - flagged) if write_clean else None,
            **({"remove_top": remove_top, "detector_threshold": base_thr} if remove_top or suspect_top else {}),
            **({"suspect_top": suspect_top, "suspect_labels": info["suspect_labels"], "signature": info["signature"]}
               if suspect_top else {})}
