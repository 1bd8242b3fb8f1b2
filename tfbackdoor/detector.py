"""The frequency-domain backdoor-data detector: data pipeline, training, fine-tuning, calibration,
loading and saving (paper Section 4).

Training data (``training_dataset``): every epoch each clean image appears once as "clean" and
once with ONE random manipulation (:class:`tfbackdoor.perturb.RandomManipulation`) as "poisoned";
before the split every image goes through random benign processing
(:class:`tfbackdoor.perturb.BenignProcessing`: JPEG re-encoding, brightness/contrast, blur,
resizing), so both sides carry the same codec artifacts and only the manipulation separates
them. Inputs then go through :func:`tfbackdoor.frequency.dct2d` inside the pipeline.

Scoring, evaluation and scanning live in :mod:`tfbackdoor.scoring`, what a detector records about
its data (portable info, exclusion lists and their manifest) in :mod:`tfbackdoor.provenance`, the
paper's reference detector in :mod:`tfbackdoor.reference`; their public names are re-exported
here (``detector.score``, ``detector.scan``, ``detector.exclusions``...), as is
:func:`tfbackdoor.models.spec_of`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from . import data as data_mod
from . import classifier, models, perturb, spectral, specs
from .atomic import atomic_path, atomic_paths
from .errors import TfbdError
from .models import spec_of
from .provenance import _set_exclusions, _split_manifest, exclusions, manifest_path, portable_info, relative_id
# re-exported: the public API of detector.<name> used by the CLI, tests and benchmarks
from .provenance import MANIFEST_FORMAT, MANIFEST_MIN_IDS, excluded_ids  # noqa: F401
from .reference import load_reference  # noqa: F401
from .scoring import (_score_fn, evaluate_dataset, evaluate_images, evaluate_sets, load_eval_images,  # noqa: F401
                      scan, score, screen, to_inputs)

# saved_models/ of the source tree, or the copy installed in the package by `pip install .` (issue 15 item 13).
DEFAULT_DETECTOR = specs.shipped_model("detector_cifar10.keras")


# ----------------------------------------------------------------------------------- training data

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


# ----------------------------------------------------------------------- the spectral part

def fit_spectral(model, dataset, samples, calibration=500, target_fpr=0.5, seed=0, command=None, verbose=True,
                 statistic="bands", island_tolerance=None):
    """Add (or refit) the clean-spectrum anomaly part of a DCT detector (:mod:`tfbackdoor.spectral`).

    ``dataset``: clean images, ``A+B+...``; ``samples``: images of each part whose spectra give the
    statistics (an int, or one per part); ``calibration``: more images of each part, held out,
    that set the spectral thresholds at ``target_fpr`` percent of every (part, benign variant) set;
    ``statistic``: ``max``, ``texture``, ``bands``, ``grid`` or ``island`` (:func:`tfbackdoor.spectral.fit`);
    ``island_tolerance``: the island statistic's colour tolerance (default ``spectral.ISLAND_NEAR_TOL``).
    Both kinds of ids are recorded as exclusions (never evaluated on), merged with the model's.
    Returns the new model (the CNN, its threshold and its info unchanged, plus ``info["spectral"]``).
    """
    parts = [p.strip() for p in dataset.split("+") if p.strip()]
    counts = list(samples) if isinstance(samples, (list, tuple)) else [int(samples)] * len(parts)
    if len(counts) != len(parts):
        raise TfbdError(f"--samples has {len(counts)} counts for {len(parts)} dataset parts ({dataset})")
    if min(counts) < 1 or calibration < 1:
        raise TfbdError(f"--samples and --calibration must be positive (got {samples}, {calibration})")
    spectral.check_statistic(statistic, island_tolerance)   # before any image is loaded
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
    new, report = spectral.fit(model, fits, cals, target_fpr, statistic=statistic, island_near_tol=island_tolerance)
    new_spec = spec_of(new)
    report.update({"dataset": dataset, "samples": counts, "calibration": calibration, "seed": seed,
                   "command": command})
    new_spec.info = {**new_spec.info, "spectral": report}
    _set_exclusions(new_spec, excl)
    return new
