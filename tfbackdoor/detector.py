"""The frequency-domain backdoor-data detector: data pipeline, training, fine-tuning, scoring,
evaluation and scanning (paper Section 4).

Training data (``training_dataset``): every epoch each clean image appears once as "clean" and
once with ONE random manipulation (:class:`tfbackdoor.perturb.RandomManipulation`) as "poisoned";
before the split every image goes through random benign processing
(:class:`tfbackdoor.perturb.BenignProcessing`: JPEG re-encoding, brightness/contrast, blur,
resizing), so both sides carry the same codec artifacts and only the manipulation separates
them. Inputs then go through :func:`tfbackdoor.frequency.dct2d` inside the pipeline.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from . import data as data_mod
from . import classifier, metrics, models, perturb, spectral, specs, triggers
from .errors import TfbdError
from .atomic import atomic_path, atomic_paths
from .frequency import dct2d

# saved_models/ of the source tree, or the copy installed in the package by `pip install .` (issue 15 item 13).
DEFAULT_DETECTOR = specs.shipped_model("detector_cifar10.keras")


# ----------------------------------------------------------------------------------- inputs

def to_inputs(images, domain="dct"):
    """uint8 ``(N, H, W, 3)`` images -> float model inputs (DCT of 0..255 values, or 0..255 pixels)."""
    x = tf.cast(images, tf.float32)
    return dct2d(x) if domain == "dct" else x


def training_dataset(x, batch_size=64, seed=0, domain="dct", benign=None, manipulation=None,
                     repeat=1, extra_poison=None, extra_share=0.5):
    """The balanced clean/manipulated ``tf.data`` pipeline for one epoch of detector training.

    Args:
      x: uint8 ``(N, H, W, 3)`` clean images (numpy).
      batch_size: clean images per batch; each batch holds ``2 * batch_size`` inputs.
      seed: base seed; the random draws differ per epoch and per batch but are reproducible.
      domain: ``"dct"`` or ``"image"``.
      benign: a :class:`~tfbackdoor.perturb.BenignProcessing` (``None``: the default one;
        ``False``: none).
      manipulation: a :class:`~tfbackdoor.perturb.RandomManipulation` (default: the paper's five).
      repeat: pass over ``x`` this many times per epoch (for tiny fine-tuning sets).
      extra_poison: optional trigger (callable on uint8 batches) that makes the poisoned sample
        instead of a random manipulation for a random ``extra_share`` of the pairs (the
        smooth-trigger defense upgrade, :func:`finetune`).
      extra_share: that share (1: every poisoned sample carries ``extra_poison``).

    Yields ``(inputs float32 (2B, H, W, 3), labels int32 (2B,))`` with label 1 = poisoned.
    """
    benign = perturb.BenignProcessing(seed=seed) if benign is None else benign
    manipulation = manipulation or perturb.RandomManipulation(seed=seed)
    n = len(x)
    ds = tf.data.Dataset.from_tensor_slices(x)
    if repeat > 1:
        ds = ds.repeat(repeat)
    ds = ds.shuffle(min(n * repeat, 50000), seed=seed, reshuffle_each_iteration=True)
    # Per-element random seeds that change every epoch (rerandomize_each_iteration).
    rnd = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, rnd))
    ds = ds.batch(batch_size, drop_remainder=False)
    if benign:   # on whole batches (per-image draws), its own map stage: pipelined with make_pairs
        ds = ds.map(lambda imgs, r: (benign(imgs, tf.stack([r[0], tf.constant(seed, tf.int64)])), r),
                    num_parallel_calls=tf.data.AUTOTUNE)

    def make_pairs(imgs, r):
        s = tf.stack([r[0], tf.constant(seed + 1, tf.int64)])
        poisoned = manipulation(imgs, s)
        if extra_poison is not None:
            trig = extra_poison(imgs)
            use = tf.random.stateless_uniform([tf.shape(imgs)[0], 1, 1, 1], s + 7) < extra_share
            poisoned = tf.where(use, trig, poisoned)
        both = tf.concat([imgs, poisoned], 0)
        labels = tf.concat([tf.zeros([tf.shape(imgs)[0]], tf.int32), tf.ones([tf.shape(imgs)[0]], tf.int32)], 0)
        return to_inputs(both, domain), labels

    return ds.map(make_pairs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------- the model

def build(arch="cnn6", image_size=32, domain="dct", threshold=0.5, info=None) -> keras.Model:
    """A fresh detector: the architecture's softmax output wrapped by a :class:`DetectorSpec`."""
    if arch not in models.ARCHS:
        raise TfbdError(f"unknown architecture '{arch}' (known: {', '.join(models.ARCHS)})")
    if domain not in ("dct", "image"):
        raise TfbdError(f"unknown domain '{domain}' (known: dct, image)")
    core = models.ARCHS[arch](image_size=image_size)
    out = models.DetectorSpec(domain, arch, image_size, threshold, info, name="detector_spec")(core.output)
    return keras.Model(core.input, out, name=f"tfbd_{arch}_{domain}")


def spec_of(model) -> models.DetectorSpec:
    for layer in model.layers:
        if isinstance(layer, models.DetectorSpec):
            return layer
    raise TfbdError(f"model '{model.name}' is not a tfbackdoor detector (no DetectorSpec layer)")


def load(path=None) -> keras.Model:
    """Load a detector ``.keras`` file in Keras safe mode (default: the shipped CIFAR-10 detector)."""
    path = Path(path) if path else DEFAULT_DETECTOR
    if not path.is_file():
        hint = " (the shipped detector is missing: pass --detector PATH)" if path == DEFAULT_DETECTOR else ""
        raise TfbdError(f"detector file not found: {path}{hint}")
    model = classifier.load_keras(path)
    try:
        spec_of(model)
    except TfbdError:
        raise TfbdError(f"{path}: not a tfbackdoor detector (no DetectorSpec layer; train one with tfbd train-detector)") from None
    model.__dict__["_tfbd_path"] = str(path)   # where its exclusion manifest is (plain attribute, not saved)
    return model


def _source_folder(part):
    """The folder a ``dir:``-type dataset part reads (its file ids start with it), else ``None``."""
    kind, rel = (specs.SHORT_NAMES.get(part) or (None, None))[:2]
    if kind == "dir":
        return str(specs.data_root() / rel)
    if part.startswith("dir:"):
        return part[4:]
    return None


def relative_id(part, ident):
    """A sample id of dataset ``part`` relative to its data source: a file under the part's folder
    becomes its path inside it (``automobile/3808.jpg``); other ids (``cifar10:lossless#5``) stay.
    Recorded exclusions and loaded ids are compared in this form, so a model trained on one machine
    leaves out the same images on another (and models that recorded absolute paths still work)."""
    folder = _source_folder(part)
    if folder:
        folder = folder.rstrip("/") + "/"
        if ident.startswith(folder):
            return ident[len(folder):]
    return ident


_ABS_PATH = re.compile(r"(?<![\w$/.])/(?:[^\s/\"',]+/)+([^\s/\"',]+)")


def portable_info(info):
    """``info`` without this machine's absolute paths, for saving inside a model.

    Exclusion ids become :func:`relative_id`; in every other string a path under the data root
    becomes ``$TFBD_DATA/...``, one under the repository becomes relative to it, and any other
    absolute path is reduced to its file name (e.g. a training command's ``--out /tmp/x/det.keras``).
    """
    roots = [(str(specs.data_root().resolve()).rstrip("/") + "/", "$TFBD_DATA/"),
             (str(specs.data_root()).rstrip("/") + "/", "$TFBD_DATA/"),
             (str(Path(__file__).resolve().parent.parent) + "/", "")]

    def text(v):
        for root, new in roots:
            v = v.replace(root, new)
        return _ABS_PATH.sub(lambda m: m.group(1), v)

    def walk(v, key=None):
        if key == "exclude" and isinstance(v, dict):
            return {part: list(dict.fromkeys(relative_id(part, i) for i in ids)) for part, ids in v.items()}
        if isinstance(v, dict):
            return {k: walk(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return text(v) if isinstance(v, str) else v

    return walk(dict(info or {}))


# Exclusion lists (the ids a detector was fine-tuned or calibrated on; 47,000 for the shipped one)
# of at least this many ids go to a manifest beside the model, not into its config (issue 15 item 16).
MANIFEST_MIN_IDS = 1000
MANIFEST_FORMAT = "tfbd-exclusions/1"


def manifest_path(path) -> Path:
    """The exclusion manifest beside detector ``path``: ``NAME.keras`` -> ``NAME.keras.manifest.json``."""
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def _split_manifest(info, model_name):
    """``(info, manifest bytes or None)``: each bulky ``exclude`` dict of ``info`` (the top level's, or
    a nested one such as ``init.info``'s) moves to the manifest's ``sections`` under its dotted place
    and is replaced by ``exclude_manifest = {file, sha256, section, counts}``; small ones stay inline.
    A nested ``exclude_manifest`` already there (an ``--init`` model's) is a record of that model's own
    manifest, beside the recorded ``init.path``, and is kept as it is."""
    sections, refs = {}, []

    def walk(d, place):
        out = {}
        for k, v in d.items():
            here = f"{place}.{k}" if place else k
            if (k == "exclude" and isinstance(v, dict) and all(isinstance(ids, list) for ids in v.values())
                    and sum(len(ids) for ids in v.values()) >= MANIFEST_MIN_IDS):
                sections[here] = v
                refs.append({"file": manifest_path(model_name).name, "sha256": None, "section": here,
                             "counts": {part: len(ids) for part, ids in v.items()}})
                out["exclude_manifest"] = refs[-1]
            else:
                out[k] = walk(v, here) if isinstance(v, dict) else v
        return out

    info = walk(info, "")
    if not sections:
        return info, None
    blob = (json.dumps({"format": MANIFEST_FORMAT, "model": Path(model_name).name, "sections": sections},
                       separators=(",", ":")) + "\n").encode()
    digest = hashlib.sha256(blob).hexdigest()
    for ref in refs:
        ref["sha256"] = digest
    return info, blob


def _read_manifest(model, ref) -> dict:
    """The ``exclude`` dict that ``ref`` (an ``exclude_manifest``) points to, checked against its sha256."""
    src = model.__dict__.get("_tfbd_path")
    if src is None:
        raise TfbdError(f"{model.name}: its exclusion list is in {ref.get('file')}, beside its .keras file, "
                        "which is not known here (load the model with detector.load)")
    path = Path(src).parent / str(ref.get("file"))
    if not path.is_file() and manifest_path(src).is_file():
        path = manifest_path(src)   # the model and its manifest renamed together
    n = sum((ref.get("counts") or {}).values())
    if not path.is_file():
        raise TfbdError(f"{path}: exclusion manifest not found: {Path(src).name} keeps the ids of its {n} "
                        "fine-tuning/calibration images there, so evaluations can leave them out; copy it "
                        "beside the model")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != ref.get("sha256"):
        raise TfbdError(f"{path}: sha256 does not match the one recorded in {Path(src).name} "
                        "(the manifest was changed or belongs to another model)")
    try:
        section = json.loads(blob)["sections"][ref["section"]]
    except (ValueError, KeyError, TypeError) as e:
        raise TfbdError(f"{path}: not a valid exclusion manifest ({type(e).__name__}: {e})") from None
    return section


def exclusions(model) -> dict:
    """``{dataset part: [ids]}`` the detector was fine-tuned or calibrated on (left out of evaluations):
    inline in its info (small lists, and models saved before manifests) or read from its manifest
    (:func:`manifest_path`; a missing or changed one is a one-line :class:`TfbdError` naming it)."""
    info = spec_of(model).info
    if "exclude" in info or "exclude_manifest" not in info:
        return dict(info.get("exclude", {}))
    ref = info["exclude_manifest"]
    cache = model.__dict__.setdefault("_tfbd_exclusions", {})   # plain attribute, as _tfbd_score_fns
    if ref.get("sha256") not in cache:
        cache[ref.get("sha256")] = _read_manifest(model, ref)
    return dict(cache[ref.get("sha256")])


def _set_exclusions(spec, excl):
    spec.info = {**{k: v for k, v in spec.info.items() if k != "exclude_manifest"}, "exclude": excl}


def save(model, path):
    """Save atomically (a temporary file beside ``path``, then rename), with the recorded info made
    portable (:func:`portable_info`: no absolute paths of this machine). Bulky exclusion lists go to
    :func:`manifest_path` beside it (renamed together with the model), the model keeping a reference
    with the manifest's sha256; the model in memory keeps them inline."""
    path = Path(path)
    try:
        spec = spec_of(model)
    except TfbdError:
        spec = None
    blob = None
    if spec is not None:
        if "exclude_manifest" in spec.info and "exclude" not in spec.info:
            _set_exclusions(spec, exclusions(model))   # loaded with a manifest: write one beside the new file
        spec.info = portable_info(spec.info)
        full = spec.info
        compact, blob = _split_manifest(full, path.name)
    targets = [(path, ".keras")] + ([(manifest_path(path), ".json")] if blob else [])
    try:
        if spec is not None:
            spec.info = compact
        with atomic_paths(*targets) as tmps:
            if blob:
                Path(tmps[1]).write_bytes(blob)
            model.save(tmps[0])
    finally:
        if spec is not None:
            spec.info = full
    model.__dict__["_tfbd_path"] = str(path)
    if not blob and manifest_path(path).is_file():
        manifest_path(path).unlink()   # an earlier save's, now stale: the lists are inline


def adapt_normalization(model, x, domain, n=4096, seed=0):
    """Set the input ``Normalization`` statistics from clean (benign-processed) training inputs."""
    try:
        norm = model.get_layer("input_norm")
    except ValueError:
        return
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), size=min(n, len(x)), replace=False)
    benign = perturb.BenignProcessing(seed=seed)
    ds = tf.data.Dataset.from_tensor_slices(x[idx]).batch(256).enumerate()
    ds = ds.map(lambda i, b: to_inputs(benign(b, tf.stack([i, tf.constant(seed, tf.int64)])), domain),
                num_parallel_calls=tf.data.AUTOTUNE)
    norm.adapt(ds)


def make_strategy(name="default"):
    """A ``tf.distribute`` strategy: ``default`` (one device), ``mirrored`` (all local devices:
    GPUs, or the logical CPUs set with ``$TFBD_LOGICAL_CPUS``), ``multiworker`` (``$TF_CONFIG``)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise TfbdError(f"unknown strategy '{name}' (known: default, mirrored, multiworker)")


def configure_logical_cpus(n: int | None = None):
    """Split the CPU into ``n`` logical devices (default ``$TFBD_LOGICAL_CPUS``); call before TF runs ops."""
    n = n or int(os.environ.get("TFBD_LOGICAL_CPUS", "0") or 0)
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError:
            pass  # already initialised


def _compile(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _sources(x) -> list:
    """Calibration images as a list of uint8 arrays, one per source (``x``: an array or a list)."""
    if x is None:
        return []
    return [np.asarray(v) for v in x] if isinstance(x, (list, tuple)) else [np.asarray(x)]


def calibrate_threshold(model, x, target_fpr=0.5, variants=None, rule="pooled") -> float:
    """The P(poisoned) threshold that flags ``target_fpr`` percent of held-out clean images.

    Scores ``x`` as is and after each benign variant (JPEG 50/75/90, brightness, contrast, blur,
    resize: :data:`tfbackdoor.perturb.BENIGN_VARIANTS`). ``x`` is one uint8 array or a list of
    them (one per source, e.g. JPEG and lossless images). ``rule="pooled"`` returns the
    ``1 - target_fpr/100`` quantile of all scores together; ``rule="worst"`` the highest such
    quantile over every (source, variant) set, so that *each* of them, not only their mix, flags
    at most ``target_fpr`` percent. At least 1e-3. The images must not be training images.
    """
    if rule not in ("pooled", "worst"):
        raise TfbdError(f"unknown calibration rule '{rule}' (known: pooled, worst)")
    names = list(perturb.BENIGN_VARIANTS) if variants is None else list(variants)
    sets = []
    for xs in _sources(x):
        if not len(xs):
            continue
        sets.append(score(model, xs))
        for name in names:
            sets.append(score(model, perturb.BENIGN_VARIANTS[name](xs).numpy()))
    q = 1.0 - target_fpr / 100.0
    thr = np.quantile(np.concatenate(sets), q) if rule == "pooled" else max(np.quantile(s, q) for s in sets)
    return float(max(thr, 1e-3))


# Keras 3's fit() without steps_per_epoch opens a fresh iterator of a tf.data pipeline at the start of every
# epoch and one more at the end of each epoch (unused); epoch e therefore draws with iterator 2e.
# tests/test_hardening.py checks that a resumed run reproduces the uninterrupted one (default strategy).
_ITERATORS_PER_EPOCH = 2


def _epochs_done(ckpt_dir) -> int:
    """Epochs finished by an interrupted ``train`` (its BackupAndRestore metadata), 0 if none."""
    try:
        return int(json.loads((Path(ckpt_dir) / "backup" / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _seed_generators(model):
    return [sg for layer in model._flatten_layers() for sg in getattr(layer, "_seed_generators", [])]


class _SeedStates(keras.callbacks.Callback):
    """Save the model's random seed states (dropout) after each epoch and restore them on resume,
    so a resumed run draws the same dropout masks as an uninterrupted one. Follows BackupAndRestore
    in the callback list (its epoch count is read after it restored the weights)."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    def on_train_begin(self, logs=None):
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        gens = _seed_generators(self.model)
        if saved.get("epoch") == getattr(self.model, "_initial_epoch", None) and len(saved["states"]) == len(gens):
            for sg, state in zip(gens, saved["states"]):
                sg.state.assign(np.asarray(state, dtype=sg.state.dtype))

    def on_epoch_end(self, epoch, logs=None):
        states = [np.asarray(sg.state.numpy()).tolist() for sg in _seed_generators(self.model)]
        with atomic_path(self.path, ".json") as tmp:
            Path(tmp).write_text(json.dumps({"epoch": epoch + 1, "states": states}))


def train(x, out, epochs=10, batch_size=64, arch="cnn6", domain="dct", image_size=None, strategy="default",
          log_dir=None, seed=0, lr=1e-3, benign=True, info=None, verbose="auto", model=None,
          extra_poison=None, calibration=0.04, target_fpr=0.5, init=None, calibration_rule="pooled",
          manipulation=None):
    """Train a detector on clean uint8 images ``x`` and save it to ``out`` (atomically).

    A seeded ``calibration`` share of ``x`` (at most 2,000 images) is held out of training and
    used to set the detector's threshold (:func:`calibrate_threshold`, ``target_fpr`` percent).
    The learning rate follows a cosine decay over all epochs. Checkpoints go to ``OUT.ckpt/``
    (resume: rerun the same command; Keras ``BackupAndRestore`` restores the last finished
    epoch, and the resumed run reproduces the uninterrupted one: same data order, random draws,
    learning-rate step and dropout masks; the checkpoints are removed only after ``out`` is saved, so
    a kill during calibration or saving resumes there). ``log_dir`` adds a TensorBoard log. ``init`` continues from the weights (and input
    normalization) of an existing detector ``.keras`` instead of a fresh model; its architecture,
    domain and input size must match. ``benign``: ``True`` (the default random benign processing
    before the clean/poisoned split), ``False`` (none) or a :class:`~tfbackdoor.perturb.BenignProcessing`.
    ``manipulation``: a :class:`~tfbackdoor.perturb.RandomManipulation` (default: the paper's five).
    Returns the model.
    """
    keras.utils.set_random_seed(seed)
    image_size = image_size or x.shape[1]
    out = Path(out)
    ckpt_dir = Path(str(out) + ".ckpt")
    n_cal = min(2000, int(len(x) * calibration)) if calibration else 0
    order = np.random.default_rng(seed + 17).permutation(len(x))
    x_cal, x_train = x[order[:n_cal]], x[order[n_cal:]]
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    strat = make_strategy(strategy)
    with strat.scope():
        if model is None and init is not None:
            model = spectral.strip(load(init))   # the CNN continues; refit the spectral part after (fit_spectral)
            spec = spec_of(model)
            if (spec.arch, spec.domain, spec.image_size) != (arch, domain, image_size):
                raise TfbdError(f"{init}: a {spec.arch}/{spec.domain} detector for {spec.image_size} px cannot "
                                f"continue as {arch}/{domain} at {image_size} px")
            spec.info = {**(info or {}), "init": {"path": str(init), "info": spec.info}}
        if model is None:
            model = build(arch, image_size, domain, info=info)
            adapt_normalization(model, x_train, domain, seed=seed)
        _compile(model, keras.optimizers.schedules.CosineDecay(lr, max(steps, 1), alpha=0.05))
    if benign is True or benign is None:
        benign = None
    elif benign is not False and not isinstance(benign, perturb.BenignProcessing):
        raise TfbdError(f"benign must be True, False or a BenignProcessing (got {benign!r})")
    train_ds = training_dataset(x_train, batch_size, seed, domain, benign, manipulation, extra_poison=extra_poison)
    # Resuming (issue 15, items 2 and 5): the backup is kept after fit() (deleted only once the model is
    # saved), so a kill during calibration or saving resumes straight there; and a resumed run draws what
    # the uninterrupted one would: each iterator opened on the pipeline advances its shuffle and random
    # seeds (reshuffle_each_iteration / rerandomize_each_iteration), so open as many as the finished epochs
    # did (_ITERATORS_PER_EPOCH); the dropout seed states are restored by _SeedStates (BackupAndRestore
    # restores the weights, the optimizer state and so the schedule's step, not these).
    done = min(_epochs_done(ckpt_dir), epochs)
    for _ in range(done * _ITERATORS_PER_EPOCH):
        iter(train_ds)
    callbacks = [keras.callbacks.BackupAndRestore(str(ckpt_dir / "backup"), delete_checkpoint=False),
                 _SeedStates(ckpt_dir / "seed_states.json")]
    if log_dir:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir)))
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    model.fit(train_ds, epochs=epochs, callbacks=callbacks, verbose=verbose)
    if n_cal:
        spec = spec_of(model)
        spec.threshold = calibrate_threshold(model, x_cal, target_fpr, rule=calibration_rule)
        spec.info = {**spec.info, "calibration": {"n": int(n_cal), "target_fpr": target_fpr, "rule": calibration_rule,
                                                   "threshold": spec.threshold}}
    save(model, out)
    # Only now, with the model saved, may the checkpoints go (a kill before this keeps them).
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return model


def finetune(model, x, out, samples=100, epochs=10, repeat=10, batch_size=32, lr=1e-4, seed=0,
             source_spec=None, sample_ids=None, verbose="auto", trigger=None, trigger_share=0.5,
             x_calibration=None, target_fpr=None, exclude=None, command=None, benign=None,
             calibration_rule="pooled", manipulation=None):
    """Fine-tune ``model`` on clean images ``x`` and save it to ``out`` (atomically).

    Two uses:

    * a new distribution (paper Tables 2-4): ``samples`` (e.g. 100) clean images, doubled with
      random manipulations (the training pipeline with ``repeat`` passes per epoch);
    * the smooth-trigger defense upgrade (paper Section 5.4): ``trigger`` (any
      :class:`tfbackdoor.triggers.Trigger`, e.g. ``SmoothTrigger``) makes the poisoned side of a
      ``trigger_share`` of the pairs (the rest keep a random manipulation, so the detector does not
      forget them); e.g. 10,000 clean images, ``repeat=1``, one epoch = 20,000 inputs.

    The ids of the samples used (``sample_ids`` of ``source_spec``, and/or ``exclude``: a dict
    spec -> ids) are stored in the model's :class:`DetectorSpec` (``info["exclude"]``; from
    :data:`MANIFEST_MIN_IDS` ids on, in a manifest beside the saved model: :func:`exclusions`) so
    :func:`evaluate_dataset` leaves them out. With ``x_calibration``
    (held-out clean images, not in ``x``; an array or a list of arrays, one per source) and
    ``target_fpr``, the threshold is set again (:func:`calibrate_threshold` with
    ``calibration_rule``); otherwise it is kept. ``benign``: a
    :class:`~tfbackdoor.perturb.BenignProcessing` (``None``: the default one). ``manipulation``: a
    :class:`~tfbackdoor.perturb.RandomManipulation` (``None``: the paper's five).
    """
    spec = spec_of(model)
    if spectral.has_spectral(model):   # the CNN is fine-tuned; the spectral part is refit after (fit_spectral)
        name = getattr(model, "_tfbd_path", None)
        model = spectral.strip(model)
        if name:
            model.__dict__["_tfbd_path"] = name
    spec = spec_of(model)
    if trigger is not None and not 0 < trigger_share <= 1:
        raise TfbdError(f"--trigger-share must be in (0, 1] (got {trigger_share})")
    exclusions(model)   # a missing or changed manifest fails now, not after the training
    keras.utils.set_random_seed(seed)
    _compile(model, lr)
    ds = training_dataset(x, batch_size, seed, spec.domain, benign, manipulation, repeat=repeat, extra_poison=trigger,
                          extra_share=trigger_share)
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2   # no progress-bar redraws in logs
    model.fit(ds, epochs=epochs, verbose=verbose, shuffle=False)   # the pipeline shuffles
    exclude = dict(exclude or {})
    if source_spec and sample_ids is not None:
        exclude[source_spec] = list(sample_ids)
    if exclude:
        excl = exclusions(model)
        for part, ids in exclude.items():
            excl[part] = sorted(set(excl.get(part, [])) | set(ids))
        _set_exclusions(spec, excl)
    record = {"n": int(len(x)), "epochs": epochs, "repeat": repeat, "lr": lr, "source": source_spec, "command": command,
              "manipulations": list((manipulation or perturb.RandomManipulation()).kinds)}
    if trigger is not None:
        record.update({"trigger": getattr(trigger, "name", str(trigger)), "trigger_share": trigger_share})
    n_cal = sum(len(v) for v in _sources(x_calibration))
    if n_cal and target_fpr is not None:
        spec.threshold = calibrate_threshold(model, x_calibration, target_fpr, rule=calibration_rule)
        record["calibration"] = {"n": int(n_cal), "target_fpr": target_fpr, "rule": calibration_rule,
                                 "threshold": spec.threshold}
    spec.info = {**spec.info, "finetune": spec.info.get("finetune", []) + [record]}
    save(model, out)
    return model


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


def _exclusions(model, spec_str):
    return {relative_id(spec_str, i) for i in exclusions(model).get(spec_str, [])}


def load_eval_images(model, dataset, limit=None, seed=0, also=()):
    """``limit`` seeded images of ``dataset`` at the detector's size that it was not fine-tuned or
    calibrated on (numpy; fewer only when the dataset has fewer left). ``also``: more detectors
    whose fine-tune samples are left out too, so several models are compared on the same images."""
    spec = spec_of(model)
    excluded = set(_exclusions(model, dataset)).union(*[_exclusions(m, dataset) for m in also])
    # The seeded subset is prefix-stable, so asking for len(excluded) more and dropping the
    # excluded ones keeps the same images a model without exclusions is evaluated on, plus more.
    more = None if limit is None else limit + len(excluded)
    ds = data_mod.load(dataset, image_size=spec.image_size, with_ids=True, limit=more, seed=seed)
    x, _, ids = data_mod.materialize(ds, dataset)
    if excluded:
        keep = np.asarray([relative_id(dataset, i) not in excluded for i in ids])
        x = x[keep]
    return x if limit is None else x[:limit]


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
         progress=None) -> dict:
    """Score every sample of ``dataset`` (streamed), write a CSV report and optionally the sanitised set.

    CSV columns: ``id, label, score, flagged``. Unreadable items are listed in the summary's
    ``skipped`` and as CSV rows with an empty score. Returns a summary dict.
    """
    spec = spec_of(model)
    thr = spec.threshold if threshold is None else threshold
    if write_clean is not None and not str(write_clean).startswith("npz:"):
        raise TfbdError(f"--write-clean must be npz:PATH (got '{write_clean}')")
    ds = data_mod.load(dataset, image_size=spec.image_size, with_ids=True, limit=limit, seed=seed)
    score_fn = _score_fn(model)
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
            s = score_fn(bx).numpy()
            flags = metrics.flagged(s, thr)
            ids = [i.decode() for i in bi]
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
            "clean_written": int(n - flagged) if write_clean else None}


# ----------------------------------------------------------------------- the paper's detector

def load_reference(path) -> keras.Model:
    """The paper authors' Keras 2.2.4 HDF5 detector as a tfbackdoor detector (for comparison).

    Builds our cnn6 without input normalization (their model takes raw DCT of 0..255 pixels) and
    copies the weights layer by layer in order.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise TfbdError(f"reference detector not found: {path}")
    core = models.cnn6(32, normalize=False)
    try:
        with h5py.File(path, "r") as h:
            g = h["model_weights"]

            def order(prefix):
                names = [k for k in g.keys() if k.startswith(prefix) or (prefix == "conv2d_" and k == "last_conv")]
                return sorted(names, key=lambda k: (k == "last_conv", int(k.split("_")[-1]) if k != "last_conv" else 0))

            def weights(name, keys):
                grp = g[name]
                sub = grp[list(grp.keys())[0]]
                return [np.asarray(sub[k + ":0"]) for k in keys]

            convs = [layer for layer in core.layers if isinstance(layer, keras.layers.Conv2D)]
            bns = [layer for layer in core.layers if isinstance(layer, keras.layers.BatchNormalization)]
            for layer, name in zip(convs, order("conv2d_")):
                layer.set_weights(weights(name, ["kernel", "bias"]))
            for layer, name in zip(bns, order("batch_normalization_")):
                layer.set_weights(weights(name, ["gamma", "beta", "moving_mean", "moving_variance"]))
            core.get_layer("probs").set_weights(weights("dense", ["kernel", "bias"]))
    except Exception as e:
        raise TfbdError(f"{path}: cannot read the reference weights ({type(e).__name__}: {e})") from None
    out = models.DetectorSpec("dct", "cnn6", 32, 0.5, {"source": str(path)}, name="detector_spec")(core.output)
    return keras.Model(core.input, out, name="paper_cnn6")


# ----------------------------------------------------------------------- the spectral part

def fit_spectral(model, dataset, samples, calibration=500, target_fpr=0.5, seed=0, command=None, verbose=True):
    """Add (or refit) the clean-spectrum anomaly part of a DCT detector (:mod:`tfbackdoor.spectral`).

    ``dataset``: clean images, ``A+B+...``; ``samples``: images of each part whose spectra give the
    statistics (an int, or one per part); ``calibration``: more images of each part, held out,
    that set the spectral thresholds at ``target_fpr`` percent of every (part, benign variant) set.
    Both kinds of ids are recorded as exclusions (never evaluated on), merged with the model's.
    Returns the new model (the CNN, its threshold and its info unchanged, plus ``info["spectral"]``).
    """
    parts = [p.strip() for p in dataset.split("+") if p.strip()]
    counts = list(samples) if isinstance(samples, (list, tuple)) else [int(samples)] * len(parts)
    if len(counts) != len(parts):
        raise TfbdError(f"--samples has {len(counts)} counts for {len(parts)} dataset parts ({dataset})")
    if min(counts) < 1 or calibration < 1:
        raise TfbdError(f"--samples and --calibration must be positive (got {samples}, {calibration})")
    spec = spec_of(model)
    excl = exclusions(model)   # a missing or changed manifest fails now
    fits, cals = [], []
    for part, n in zip(parts, counts):
        ds = data_mod.load(part, image_size=spec.image_size, with_ids=True, limit=n + calibration, seed=seed)
        x, _, ids = data_mod.materialize(ds, part)
        if len(x) <= calibration:
            raise TfbdError(f"{part}: {len(x)} images, not enough for {calibration} calibration images and a fit")
        fits.append(x[:len(x) - calibration])
        cals.append(x[len(x) - calibration:])
        excl[part] = sorted(set(excl.get(part, [])) | {relative_id(part, i) for i in ids})
        if verbose:
            print(f"{part}: spectra of {len(fits[-1])} images, thresholds from {len(cals[-1])} more", flush=True)
    new, report = spectral.fit(model, fits, cals, target_fpr)
    new_spec = spec_of(new)
    report.update({"dataset": dataset, "samples": counts, "calibration": calibration, "seed": seed,
                   "command": command})
    new_spec.info = {**new_spec.info, "spectral": report}
    _set_exclusions(new_spec, excl)
    return new
