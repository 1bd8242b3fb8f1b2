"""Scan at scale: ``tfbd scan --runner ...`` as an Apache Beam pipeline (``pip install 'tfbackdoor[beam]'``).

The pipeline (one Beam job; the same code runs on the DirectRunner, Dataflow, Flink and Spark):

1. work units are listed by the launcher, without decoding: one per file of a ``tfrecord:GLOB`` /
   ``tar:GLOB`` spec (:mod:`tfbackdoor.shards`), chunks of indices of an ``npz:`` array source and
   chunks of files of a ``dir:`` tree (short names too; ``A+B`` joins parts), then redistributed
   (``Reshuffle``) so that workers share them;
2. workers read and decode them with the single-machine rules (``dir:`` decoding and resize,
   :func:`tfbackdoor.shards.decoder`); an item that cannot be used goes to the dead-letter output
   with its reason and is counted (Beam counters ``tfbd:bad_items`` and ``tfbd:bad_<kind>``), it
   never fails the job;
3. ``BatchElements`` groups the images into batches of ``batch_size`` inside each worker and
   :class:`ScoreBatches` scores them with the detector, loaded once per worker in ``DoFn.setup``
   (the ``.keras`` bytes travel with the pipeline, so workers need no shared file system for it),
   with the scoring function of :func:`tfbackdoor.detector.scan` (``detector._score_fn``);
4. outputs: the report ``PREFIX-SSSSS-of-NNNNN.csv`` (columns ``id,label,score,flagged`` as the
   single-machine scan), the dead letters ``PREFIX.dead-letter-SSSSS-of-NNNNN.csv`` (``id,reason``)
   and, with ``write_clean="tfrecord:CLEAN"``, the unflagged images as lossless PNG in
   ``CLEAN-SSSSS-of-NNNNN.tfrecord`` (the :mod:`tfbackdoor.shards` schema). Beam writes each shard
   to a temporary folder and renames it when the job succeeds.

Scores equal those of :func:`tfbackdoor.detector.scan` on the same data (same decoding, resize,
DCT and model call). apache_beam is imported only in this module.
"""

from __future__ import annotations

import csv
import io
import os
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from . import metrics, shards
from .errors import TfbdError

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
NAMESPACE = "tfbd"
REPORT_HEADER = "id,label,score,flagged"
DEAD_LETTER_HEADER = "id,reason"
CHUNK = 512   # images per work unit of an npz: or dir: source


# ------------------------------------------------------------------------------ options

def pipeline_options(runner="direct", num_workers=None, options=()) -> PipelineOptions:
    """Beam options for ``runner`` (direct, dataflow, flink, spark) with ``num_workers`` and ``KEY=VAL`` extras.

    direct: multi-process DirectRunner (``direct_running_mode=multi_processing``,
    ``direct_num_workers=N``, default: the CPU count); dataflow: ``num_workers=N``; flink:
    ``parallelism=N``; spark: N is left to the cluster. ``options`` (``KEY=VAL`` or ``KEY``) are
    passed as ``--KEY=VAL`` and win over these defaults (e.g. ``direct_running_mode=in_memory``,
    ``project=...``, ``region=...``, ``temp_location=gs://...``, ``flink_master=host:8081``).
    """
    if runner not in RUNNERS:
        raise TfbdError(f"unknown runner '{runner}' (known: {', '.join(RUNNERS)})")
    if num_workers is not None and num_workers <= 0:
        raise TfbdError(f"--num-workers must be positive (got {num_workers})")
    flags = {"runner": RUNNERS[runner]}
    if runner == "direct":
        flags.update(direct_running_mode="multi_processing", direct_num_workers=str(num_workers or os.cpu_count() or 1))
    elif runner == "dataflow" and num_workers:
        flags["num_workers"] = str(num_workers)
    elif runner == "flink" and num_workers:
        flags["parallelism"] = str(num_workers)
    extra = []
    for opt in options:
        key, eq, val = str(opt).partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise TfbdError(f"--beam-option must be KEY=VAL (got '{opt}')")
        if eq and key in flags:
            flags[key] = val
        else:
            extra.append(f"--{key}={val}" if eq else f"--{key}")
    return PipelineOptions([f"--{k}={v}" for k, v in flags.items()] + extra)


# ------------------------------------------------------------------------------ work units

def work_units(dataset: str, limit=None, seed=0) -> list:
    """The launcher's list of work units for ``dataset`` (nothing decoded; see the module doc)."""
    from . import data as data_mod
    from .decode import file_id, subset

    units = []
    for part in [p.strip() for p in dataset.split("+") if p.strip()]:
        if shards.is_shard_spec(part):
            if limit is not None:
                raise TfbdError(f"{part}: --limit is not supported with --runner for tfrecord:/tar: inputs")
            units.extend(("shard", part, f) for f in shards.expand(part))
            continue
        kind = part.partition(":")[0]
        if kind in ("tfds", "crops") or part in data_mod.CROP_SOURCES:
            raise TfbdError(f"{part}: generated or downloaded datasets are not read by --runner; "
                            f"write them as shards first (tfbd shard --dataset {part} --out tfrecord:PREFIX)")
        src = data_mod.resolve(part)
        idx = subset(len(src), limit, seed, None)
        for s in range(0, len(idx), CHUNK):
            chunk = idx[s:s + CHUNK]
            if src.x is not None:
                units.append(("array", part, [int(i) for i in chunk]))
            else:
                units.append(("files", part, [(src.files[i], int(src.labels[i]), file_id(src.files[i])) for i in chunk]))
    if not units:
        raise TfbdError(f"{dataset}: nothing to scan")
    return units


def _bad_kind(reason: str) -> str:
    r = reason.lower()
    if "too large" in r or "size" in r:
        return "bad_size"
    if "truncated" in r or "corrupt" in r or "unreadable" in r:
        return "bad_corrupt"
    return "bad_record"


class ReadDecode(beam.DoFn):
    """Work unit -> ``(id, label, uint8 (S, S, 3))``; unusable items -> tagged output ``bad``: ``(id, reason)``."""

    BAD = "bad"

    def __init__(self, image_size: int):
        self.size = int(image_size)
        self.read = Metrics.counter(NAMESPACE, "decoded")
        self.bad = Metrics.counter(NAMESPACE, "bad_items")
        self.bad_kinds = {k: Metrics.counter(NAMESPACE, k) for k in ("bad_size", "bad_corrupt", "bad_record")}

    def setup(self):
        import tensorflow as tf

        from . import data as data_mod
        from . import decode as dec

        self._tf, self._data, self._dec = tf, data_mod, dec
        self._decode_bytes = shards.decoder(self.size)
        size = self.size
        self._decode_file = tf.function(lambda p: dec.decode_file(p, size), autograph=False,
                                        input_signature=[tf.TensorSpec([], tf.string)])
        self._resize = tf.function(lambda x: dec.resize_uint8(x, size), autograph=False,
                                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        self._arrays = {}

    def _bad(self, ident, reason):
        self.bad.inc()
        self.bad_kinds[_bad_kind(reason)].inc()
        return beam.pvalue.TaggedOutput(self.BAD, (ident, reason))

    def process(self, unit):
        kind, part, what = unit
        if kind == "shard":
            for ident, label, data, reason in shards.iter_items(part, [what]):
                if reason is None:
                    try:
                        img = self._decode_bytes(data)
                    except shards.BadItem as e:
                        reason = e.reason
                if reason is not None:
                    yield self._bad(ident, reason)
                    continue
                self.read.inc()
                yield ident, int(label), img
        elif kind == "array":
            if part not in self._arrays:
                src = self._data.resolve(part)
                self._arrays = {part: (src.x, src.y)}   # one array source held at a time
            x, y = self._arrays[part]
            for i in what:
                img = x[i]
                if img.shape[:2] != (self.size, self.size):
                    img = self._resize(img).numpy()
                self.read.inc()
                yield f"{part}#{i}", int(y[i]), img
        else:
            for path, label, ident in what:
                try:
                    if path.lower().endswith(self._dec.TF_DECODABLE):
                        img = self._decode_file(self._tf.constant(os.fsencode(path))).numpy()
                    else:
                        img = self._dec.decode_with_pil(path, self.size)
                except Exception:
                    yield self._bad(ident, self._dec.diagnose(path))
                    continue
                self.read.inc()
                yield ident, label, img


def score_batch(model, images) -> np.ndarray:
    """P(poisoned) of a uint8 batch: the scoring function of :func:`tfbackdoor.detector.scan`
    (``detector._score_fn``, one graph traced once per worker)."""
    from . import detector

    if not hasattr(detector, "_score_fn"):   # before the cached scoring graph (issue 12) landed
        return model(detector.to_inputs(images, detector.spec_of(model).domain), training=False).numpy()[:, 1]
    return detector._score_fn(model)(images).numpy()


class ScoreBatches(beam.DoFn):
    """Batch of ``(id, label, image)`` -> ``(id, label, score, flagged, image or None)``; the detector is
    loaded once per worker in :meth:`setup` from the bytes given to the constructor, or from a path
    or URL that every worker can read (``detector_url``: a local path for the DirectRunner)."""

    def __init__(self, detector_bytes=None, detector_url=None, threshold=None, keep_images=False):
        self.detector_bytes = detector_bytes
        self.detector_url = detector_url
        self.threshold = threshold
        self.keep_images = keep_images
        self.scored = Metrics.counter(NAMESPACE, "scored")
        self.flagged = Metrics.counter(NAMESPACE, "flagged")
        self.batches = Metrics.distribution(NAMESPACE, "batch_size")

    def setup(self):
        import tempfile

        from . import detector

        blob = self.detector_bytes
        if blob is None and "://" not in self.detector_url:   # a local file (DirectRunner)
            self.model = detector.load(self.detector_url)
        elif blob is None:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(self.detector_url) as f:
                blob = f.read()
        if blob is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "detector.keras")
                with open(path, "wb") as f:
                    f.write(blob)
                self.model = detector.load(path)
        spec = detector.spec_of(self.model)
        self.thr = spec.threshold if self.threshold is None else self.threshold

    def process(self, batch):
        ids, labels, images = zip(*batch)
        s = score_batch(self.model, np.stack(images))
        flags = metrics.flagged(s, self.thr)
        self.scored.inc(len(s))
        self.flagged.inc(int(flags.sum()))
        self.batches.update(len(s))
        for i, lab, sc, fl, img in zip(ids, labels, s, flags, images):
            yield i, lab, float(sc), int(fl), (img if self.keep_images and not fl else None)


def _csv_line(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def report_line(row) -> str:
    ident, label, score, flagged, _ = row
    return _csv_line([ident, label, f"{score:.6f}", flagged])


def clean_record(row) -> bytes:
    ident, label, _score, _flag, img = row
    return shards.example(ident, label, shards.encode_png(img))


def output_prefix(out: str) -> str:
    """``report.csv`` -> ``report`` (shards ``report-00000-of-00002.csv``); any other path is the prefix."""
    out = str(out)
    return out[:-4] if out.lower().endswith(".csv") else out


def build(p, dataset, out, detector_bytes=None, detector_url=None, image_size=32, threshold=None,
          write_clean=None, batch_size=256, limit=None, seed=0, num_shards=0):
    """Add the scan to pipeline ``p``; returns the scored and dead-letter PCollections."""
    prefix = output_prefix(out)
    units = work_units(dataset, limit, seed)
    items = (p | "Units" >> beam.Create(units, reshuffle=False)
               | "Distribute" >> beam.Reshuffle()
               | "ReadDecode" >> beam.ParDo(ReadDecode(image_size)).with_outputs(ReadDecode.BAD, main="ok"))
    scored = (items.ok
              | "Batch" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
              | "Score" >> beam.ParDo(ScoreBatches(detector_bytes, detector_url, threshold, bool(write_clean))))
    (scored | "ReportLines" >> beam.Map(report_line)
            | "WriteReport" >> beam.io.WriteToText(prefix, file_name_suffix=".csv", header=REPORT_HEADER,
                                                   num_shards=num_shards))
    dead = items[ReadDecode.BAD]
    (dead | "DeadLetterLines" >> beam.Map(lambda r: _csv_line(list(r)))
          | "WriteDeadLetter" >> beam.io.WriteToText(prefix + ".dead-letter", file_name_suffix=".csv",
                                                     header=DEAD_LETTER_HEADER, num_shards=num_shards))
    if write_clean:
        (scored | "Unflagged" >> beam.Filter(lambda r: r[4] is not None)
                | "CleanRecords" >> beam.Map(clean_record)
                | "WriteClean" >> beam.io.WriteToTFRecord(str(write_clean)[9:], file_name_suffix=".tfrecord",
                                                          num_shards=num_shards))
    return scored, dead


def _counter(result, name) -> int:
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name(name))["counters"]
    total = 0
    for c in found:
        try:
            total += c.committed if c.committed is not None else c.attempted
        except Exception:
            total += c.attempted or 0
    return int(total)


def run(dataset, out, detector_path=None, threshold=None, write_clean=None, runner="direct", num_workers=None,
        options=(), batch_size=256, limit=None, seed=0, num_shards=0) -> dict:
    """Run the Beam scan and wait for it; returns a summary like :func:`tfbackdoor.detector.scan`'s."""
    from . import detector

    if write_clean is not None and (not str(write_clean).startswith("tfrecord:") or not str(write_clean)[9:]):
        raise TfbdError(f"--write-clean with --runner must be tfrecord:PREFIX (got '{write_clean}')")
    if batch_size <= 0:
        raise TfbdError(f"--batch-size must be positive (got {batch_size})")
    opts = pipeline_options(runner, num_workers, options)
    url = str(detector_path) if detector_path and "://" in str(detector_path) else None
    blob = None
    if url:
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(url) as f:
            blob = f.read()
    else:
        model = detector.load(detector_path)   # checks it is a detector; its spec sets the decode size
        path = os.path.abspath(detector_path or detector.DEFAULT_DETECTOR)
        if runner == "direct":
            url = path                # same machine: workers read the file (no 6 MB in the pipeline)
        else:
            with open(path, "rb") as f:
                blob = f.read()
    if blob is not None and url and "://" in url:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "detector.keras")
            with open(local, "wb") as f:
                f.write(blob)
            model = detector.load(local)
    spec = detector.spec_of(model)
    thr = spec.threshold if threshold is None else threshold
    t0 = time.perf_counter()
    p = beam.Pipeline(options=opts)
    build(p, dataset, out, None if url else blob, url, spec.image_size, thr, write_clean, batch_size, limit, seed,
          num_shards)
    result = p.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - t0
    n, flagged, bad = (_counter(result, k) for k in ("scored", "flagged", "bad_items"))
    prefix = output_prefix(out)
    return {"dataset": dataset, "n": n, "flagged": flagged, "flagged_pct": round(100.0 * flagged / max(n, 1), 2),
            "threshold": thr, "bad_items": bad, "report": f"{prefix}-*-of-*.csv",
            "dead_letter": f"{prefix}.dead-letter-*-of-*.csv",
            "clean": f"{str(write_clean)[9:]}-*-of-*.tfrecord" if write_clean else None,
            "clean_written": n - flagged if write_clean else None, "runner": RUNNERS[runner],
            "options": opts.get_all_options(drop_default=True), "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 1) if seconds else None}
