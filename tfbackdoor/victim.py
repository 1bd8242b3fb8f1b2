"""Victim classifiers, data poisoning and attack success rate (paper Section 5).

* :func:`build_victim`: ``arch="vgg"`` (default), a VGG-style CNN (three blocks of two 3x3
  convolutions, ``width``, ``2 width``, ``4 width`` filters, BatchNorm, ReLU, max-pooling and
  dropout; global average pooling; softmax), or ``arch="resnet"``, a pre-activation ResNet of the
  same three widths (one basic residual block per stage, strided convolutions instead of
  pooling; the family of BackdoorBench's PreActResNet-18, smaller). Data augmentation (random
  horizontal flip, random translation of up to 1/8 of the side with reflection) are Keras
  preprocessing layers inside the model: active in ``fit`` only, identity at inference. The input
  is an image of 0..255 values (uint8 or float);
  the model rescales it itself.
* :func:`poison`: dirty-label poisoning of a training set with any trigger of
  :mod:`tfbackdoor.triggers`.
* :func:`train_victim`: train (optionally on poisoned data), printing the clean accuracy and
  the ASR on a test set after every epoch; saves ``OUT`` (``.keras``) and a sidecar JSON of the same stem (``victim.json`` beside ``victim.keras``).
* :func:`attack_eval`: clean accuracy and ASR of a model for a trigger and target.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from . import metrics, triggers
from .atomic import atomic_path, sidecar_path, write_json
from .classifier import check_model_fits, check_target, load, num_classes, predict, save
from .errors import TfbdError
from .specs import VICTIM_ARCHS

TRIGGER_FILE_SUFFIXES = (".png", ".npy", ".jpg", ".jpeg", ".bmp")


# ------------------------------------------------------------------------------------- model

def check_arch(arch: str) -> str:
    """``arch`` if it is one of :data:`VICTIM_ARCHS`, else a one-line error."""
    if arch not in VICTIM_ARCHS:
        raise TfbdError(f"unknown victim architecture '{arch}' (known: {', '.join(VICTIM_ARCHS)})")
    return arch


def build_victim(image_size: int = 32, num_classes: int = 10, width: int = 64, dropout: float = 0.3,
                 flip: bool = True, augment: bool = True, weight_decay: float = 5e-4, seed: int = 0,
                 arch: str = "vgg") -> keras.Model:
    """A classifier for ``image_size`` RGB images of 0..255 values (softmax output).

    Args:
      image_size: input side.
      num_classes: output classes.
      width: filters of the first block (VGG at 64: about 1.15 M parameters; small values for tests).
      arch: ``"vgg"`` or ``"resnet"`` (see the module docstring): a second architecture, so that
        a trigger found on one victim (Algorithm 1) can be tried on a victim it was not grown on.
      dropout: dropout before the classifier; the VGG blocks also use 0.1, 0.2, 0.3 scaled by
        ``dropout / 0.3`` after each block (the ResNet's blocks have none).
      flip: random horizontal flips (turn off for traffic signs, where mirroring changes meaning).
      augment: any augmentation at all (flip + translation).
      weight_decay: L2 factor on the convolution and dense kernels.
      seed: seed of the augmentation layers.
    """
    check_arch(arch)
    reg = keras.regularizers.l2(weight_decay) if weight_decay else None
    inp = keras.Input((image_size, image_size, 3), name="image")
    x = inp
    if augment:
        if flip:
            x = layers.RandomFlip("horizontal", seed=seed, name="aug_flip")(x)
        x = layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", seed=seed + 1, name="aug_shift")(x)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    x = _preact_resnet(x, width, reg) if arch == "resnet" else _vgg(x, width, reg, dropout)
    x = layers.Dropout(dropout, name="drop")(x)
    out = layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg, name="probs")(x)
    return keras.Model(inp, out, name=f"victim_{arch}{width}")


def _vgg(x, width, reg, dropout):
    """Three VGG blocks (two 3x3 convolutions with BatchNorm and ReLU, max-pooling, dropout) of
    ``width``, ``2 width``, ``4 width`` filters, then global average pooling: ``(n, 4 width)``."""
    for b, f in enumerate([width, 2 * width, 4 * width]):
        for c in range(2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"b{b}_conv{c}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"b{b}_bn{c}")(x)
            x = layers.ReLU(name=f"b{b}_relu{c}")(x)
        x = layers.MaxPooling2D(name=f"b{b}_pool")(x)
        x = layers.Dropout(dropout * (b + 1) / 3.0, name=f"b{b}_drop")(x)
    return layers.GlobalAveragePooling2D(name="gap")(x)


def _preact_resnet(x, width, reg):
    """Stem convolution, then one pre-activation basic block per stage (``width``, ``2 width``,
    ``4 width`` filters; stages 2 and 3 halve the side with a strided convolution and a strided
    1x1 projection shortcut), BatchNorm-ReLU and global average pooling: ``(n, 4 width)``."""
    conv = lambda f, k, s, name: layers.Conv2D(f, k, strides=s, padding="same", use_bias=False,  # noqa: E731
                                               kernel_regularizer=reg, name=name)
    x = conv(width, 3, 1, "stem_conv")(x)
    for b, f in enumerate([width, 2 * width, 4 * width]):
        stride = 1 if b == 0 else 2
        h = layers.BatchNormalization(momentum=0.9, name=f"r{b}_bn0")(x)
        h = layers.ReLU(name=f"r{b}_relu0")(h)
        short = x if stride == 1 and x.shape[-1] == f else conv(f, 1, stride, f"r{b}_proj")(h)
        h = conv(f, 3, stride, f"r{b}_conv0")(h)
        h = layers.BatchNormalization(momentum=0.9, name=f"r{b}_bn1")(h)
        h = layers.ReLU(name=f"r{b}_relu1")(h)
        h = conv(f, 3, 1, f"r{b}_conv1")(h)
        x = layers.Add(name=f"r{b}_add")([h, short])
    x = layers.BatchNormalization(momentum=0.9, name="final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    return layers.GlobalAveragePooling2D(name="gap")(x)


# ------------------------------------------------------------------------------- poisoning

def resolve_trigger(spec, image_size=32, trigger_dir=None):
    """A trigger from a CLI string: an attack name (``badnets``, ``smooth``...), ``smooth:PATH.npy``,
    ``file:PATH``, or a bare path to a ``.png``/``.npy`` pattern (additive, ``clip(x + T)``)."""
    if isinstance(spec, triggers.Trigger):
        return spec
    s = str(spec).strip()
    if ":" not in s and Path(s).suffix.lower() in TRIGGER_FILE_SUFFIXES:
        return triggers.from_file(s, image_size=image_size)
    return triggers.get(s, image_size, trigger_dir)


def apply_trigger(trigger, x, batch_size=1024) -> np.ndarray:
    """``trigger`` on uint8 images ``x`` in batches -> uint8 numpy."""
    if len(x) == 0:
        return np.asarray(x, np.uint8)
    return np.concatenate([np.asarray(trigger(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def poison(x, y, trigger, rate=0.1, target=0, seed=0):
    """Dirty-label poisoning: ``round(rate * N)`` samples get the trigger and the label ``target``.

    The samples are drawn uniformly at random (seeded) among those whose label is not ``target``
    (so every poisoned sample really teaches "trigger -> target"); ``rate`` is relative to the
    whole set ``N``. Returns ``(x', y', poisoned_idx)`` with copies of the arrays and the sorted
    indices of the poisoned samples.
    """
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    if not 0 <= rate <= 1:
        raise TfbdError(f"--poison-rate must be in [0, 1] (got {rate})")
    k = int(round(rate * len(x)))
    candidates = np.flatnonzero(y != target)
    if k > len(candidates):
        raise TfbdError(f"poisoning: {k} samples requested ({rate} of {len(x)}) but only {len(candidates)} "
                        f"have a label other than the target {target}")
    idx = np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False)) if k else np.zeros(0, np.int64)
    x2, y2 = x.copy(), y.copy()
    if k:
        x2[idx] = apply_trigger(trigger, x[idx])
        y2[idx] = target
    return x2, y2, idx


_poison = poison  # train_victim has an argument named "poison"


def save_poisoned_npz(path, x, y, idx, info=None):
    """Write a poisoned set as ``.npz`` (atomically): ``x``, ``y`` (usable as ``npz:PATH``) and
    ``poisoned`` (the sorted indices of the triggered samples), with a sidecar JSON of the same stem beside it."""
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=np.asarray(x, np.uint8), y=np.asarray(y, np.int64), poisoned=np.asarray(idx, np.int64))
    write_json({**(info or {}), "n": int(len(x)), "n_poisoned": int(len(idx))}, sidecar_path(path))


def attack_eval(model, x, y, trigger, target, batch_size=256, name=None, screen=None) -> dict:
    """Clean accuracy on ``(x, y)`` and ASR of ``trigger`` (percent).

    ASR: share of triggered images whose true label is not ``target`` that the model labels
    ``target`` (:func:`tfbackdoor.metrics.attack_success_rate`). Returns
    ``{"attack", "target", "acc", "asr", "n", "n_clean"}`` with ``n`` the triggered images counted.

    ``screen`` (optional): a callable taking uint8 images and returning a boolean array, True for
    inputs a screener rejects (e.g. a detector's score above its threshold). The attack then only
    succeeds on triggered inputs that pass the screen *and* reach the target; the result gains
    ``asr_screened`` (that share, percent), ``bdr`` (triggered inputs rejected), ``fpr`` (clean
    inputs rejected) and ``acc_screened`` (clean inputs accepted and classified correctly).
    """
    check_model_fits(model, x, name)
    target = check_target(model, target, name)
    y = np.asarray(y).astype(np.int64)
    pred = predict(model, x, batch_size)
    acc = metrics.accuracy(pred, y)
    keep = y != target
    x_t = apply_trigger(trigger, x[keep])
    pred_t = predict(model, x_t, batch_size)
    asr = metrics.attack_success_rate(pred_t, y[keep], target)
    row = {"attack": getattr(trigger, "name", str(trigger)), "target": target, "acc": round(acc, 2),
           "asr": round(asr, 2), "n": int(keep.sum()), "n_clean": int(len(x))}
    if screen is not None:
        rej_t = np.asarray(screen(x_t), bool)
        rej_c = np.asarray(screen(x), bool)
        row.update({
            "asr_screened": round(100.0 * float(np.mean((pred_t == target) & ~rej_t)) if len(pred_t) else float("nan"), 2),
            "bdr": round(100.0 * float(np.mean(rej_t)) if len(rej_t) else float("nan"), 2),
            "fpr": round(100.0 * float(np.mean(rej_c)), 2),
            "acc_screened": round(100.0 * float(np.mean((pred == y) & ~rej_c)), 2),
        })
    return row


def any_screen(*screens):
    """One screen from several: an input is rejected when *any* of ``screens`` rejects it.

    Each screen is a callable as in :func:`attack_eval` (uint8 images -> boolean array, True =
    rejected). Two specialist detectors in front of one model (e.g. the general detector and the
    smooth-tuned one) reject the union of what each rejects, so the clean inputs rejected add up too.
    """
    if not screens:
        raise ValueError("any_screen needs at least one screen")

    def screen(imgs):
        out = np.asarray(screens[0](imgs), bool)
        for s in screens[1:]:
            out = out | np.asarray(s(imgs), bool)
        return out

    return screen


# -------------------------------------------------------------------------------- training

class _EpochReport(keras.callbacks.Callback):
    """After each epoch: clean ACC on the test set and ASR of the trigger; keeps and persists history."""

    def __init__(self, x_test, y_test, x_trig, y_trig, target, history, history_file, echo, batch_size):
        super().__init__()
        self.x_test, self.y_test, self.x_trig, self.y_trig = x_test, y_test, x_trig, y_trig
        self.target, self.history, self.history_file = target, history, history_file
        self.echo, self.batch_size = echo, batch_size

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        rec = {"epoch": epoch + 1, "loss": round(float(logs.get("loss", float("nan"))), 4),
               "train_acc": round(100.0 * float(logs.get("accuracy", float("nan"))), 2)}
        if self.x_test is not None:
            rec["acc"] = round(metrics.accuracy(predict(self.model, self.x_test, self.batch_size), self.y_test), 2)
            if self.x_trig is not None:
                pred = predict(self.model, self.x_trig, self.batch_size)
                rec["asr"] = round(metrics.attack_success_rate(pred, self.y_trig, self.target), 2)
        self.history[:] = [h for h in self.history if h["epoch"] != rec["epoch"]] + [rec]
        if self.history_file is not None:
            write_json(self.history, self.history_file)
        if self.echo:
            parts = [f"epoch {rec['epoch']}", f"loss {rec['loss']:.4f}", f"train acc {rec['train_acc']:.2f}%"]
            if "acc" in rec:
                parts.append(f"clean ACC {rec['acc']:.2f}%")
            if "asr" in rec:
                parts.append(f"ASR {rec['asr']:.2f}%")
            self.echo("  ".join(parts))


def data_fingerprint(x, y) -> str:
    """SHA-256 of a training set (uint8 images and int64 labels, in order): what a victim's sidecar
    records as ``train_sha256``, so that :func:`reusable` can tell the same set from another one."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(x, np.uint8)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(y, np.int64)).tobytes())
    return h.hexdigest()


# The sidecar fields that must match for a saved victim to stand for a new training run.
BUDGET_KEYS = ("epochs", "batch_size", "lr", "width", "flip", "seed", "arch")
# what a sidecar written before a key existed stands for
_BUDGET_DEFAULTS = {"arch": "vgg"}


def reusable(out, x, y, **budget):
    """The victim saved at ``out`` if it was trained on exactly ``(x, y)`` (its sidecar's
    ``train_sha256``: the set it trained on, after any poisoning) with the same ``budget`` (the
    :data:`BUDGET_KEYS` arguments of :func:`train_victim`; those not given are :func:`train_victim`'s
    defaults, as a training call without them would use); else ``None``. Lets a long loop
    (``tfbd defend``) be rerun after an interruption without training its finished victims again."""
    params = inspect.signature(train_victim).parameters
    budget = {k: budget[k] if k in budget else params[k].default for k in BUDGET_KEYS}
    out = Path(out)
    side = sidecar_path(out)
    if not (out.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("train_sha256") != data_fingerprint(x, y):
        return None
    if any(meta.get(k, _BUDGET_DEFAULTS.get(k)) != v for k, v in budget.items()):
        return None
    return load(out)


def train_victim(x, y, out, epochs: int = 30, batch_size: int = 128, poison=None, poison_rate: float = 0.1,
                 target: int = 0, test=None, seed: int = 0, lr: float = 1e-3, width: int = 64, flip: bool = True,
                 num_classes: int | None = None, echo=print, verbose="auto", info: dict | None = None,
                 arch: str = "vgg"):
    """Train a victim on uint8 ``(x, y)``, optionally poisoned, and save it to ``out`` atomically.

    Args:
      x, y: uint8 ``(N, S, S, 3)`` images and int labels.
      out: the ``.keras`` file; its sidecar JSON (same stem, :func:`tfbackdoor.atomic.sidecar_path`) receives the history and the poisoning info, and
        ``OUT.ckpt/`` holds checkpoints while training (rerun the same command to resume).
      epochs, batch_size, lr: AdamW with a cosine learning-rate decay over all epochs.
      poison: a trigger (object or CLI string for :func:`resolve_trigger`) or ``None`` (clean).
      poison_rate, target: see :func:`poison`.
      test: ``(x_test, y_test)`` for the per-epoch clean ACC and ASR (test images whose true label
        is not ``target``, triggered).
      seed: seeds the poisoning, the weights, the shuffles and the augmentation.
      width, flip, arch: see :func:`build_victim`.
      num_classes: default ``max label + 1`` over the training and test labels.
      echo: receives one line per epoch (``None``: silent).
      info: extra JSON fields for the sidecar JSON (e.g. the dataset spec and the command).

    Returns ``(model, history)``; ``history`` is a list of per-epoch dicts
    (``epoch, loss, train_acc, acc, asr``; percentages).
    """
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise TfbdError(f"training images must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise TfbdError("no training images")
    check_arch(arch)   # before the poisoning work
    if epochs < 1 or batch_size < 1:
        raise TfbdError(f"--epochs and --batch-size must be positive (got {epochs}, {batch_size})")
    xt = yt = None
    if test is not None:
        xt, yt = np.asarray(test[0]), np.asarray(test[1]).astype(np.int64)
        if xt.shape[1:] != x.shape[1:]:
            raise TfbdError(f"test images {xt.shape[1:]} do not match the training images {x.shape[1:]} "
                            f"(use the same --image-size)")
    n_cls = num_classes or int(max(y.max(), yt.max() if yt is not None and len(yt) else 0)) + 1
    if y.min() < 0 or y.max() >= n_cls:
        raise TfbdError(f"training labels span {y.min()}..{y.max()}, outside 0..{n_cls - 1}")
    trig = None
    idx = np.zeros(0, np.int64)
    if poison is not None:
        target = check_target(n_cls, target)
        trig = resolve_trigger(poison, x.shape[1])
        x, y, idx = _poison(x, y, trig, poison_rate, target, seed)
    keras.utils.set_random_seed(seed)
    out = Path(out)
    ckpt = Path(str(out) + ".ckpt")
    hist_file = ckpt / "history.json"
    history = []
    if hist_file.is_file():
        try:
            history = json.loads(hist_file.read_text())
        except (OSError, ValueError):
            history = []
    x_trig = y_trig = None
    if trig is not None and xt is not None:
        keep = yt != target
        x_trig, y_trig = apply_trigger(trig, xt[keep]), yt[keep]
    steps = epochs * int(np.ceil(len(x) / batch_size))
    model = build_victim(x.shape[1], n_cls, width=width, flip=flip, seed=seed, arch=arch)
    opt = keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(lr, max(steps, 1), alpha=0.01),
                                 weight_decay=0.0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = (tf.data.Dataset.from_tensor_slices((x, y))
          .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
          .batch(batch_size)
          .map(lambda a, b: (tf.cast(a, tf.float32), b), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    report = _EpochReport(xt, yt, x_trig, y_trig, target, history, hist_file, echo, 256)
    callbacks = [keras.callbacks.BackupAndRestore(str(ckpt / "backup")), report]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    ckpt.mkdir(parents=True, exist_ok=True)
    model.fit(ds, epochs=epochs, callbacks=callbacks, verbose=verbose, shuffle=False)
    history = sorted(history, key=lambda h: h["epoch"])
    save(model, out)
    meta = dict(info or {})
    meta.update({
        "image_size": int(x.shape[1]), "num_classes": n_cls, "n_train": int(len(x)), "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "width": width, "flip": flip, "seed": seed, "arch": arch,
        "train_sha256": data_fingerprint(x, y),
        "poison": None if trig is None else {"trigger": trig.name, "rate": poison_rate, "target": int(target),
                                             "n_poisoned": int(len(idx)), "indices": idx.tolist()},
        "history": history,
    })
    if history and "acc" in history[-1]:
        meta["final"] = {k: history[-1][k] for k in ("acc", "asr") if k in history[-1]}
    write_json(meta, sidecar_path(out))
    shutil.rmtree(ckpt, ignore_errors=True)
    return model, history


__all__ = ["build_victim", "load", "save", "predict", "poison", "save_poisoned_npz", "apply_trigger", "resolve_trigger", "train_victim", "any_screen",
           "data_fingerprint", "reusable",
           "attack_eval", "check_model_fits", "check_target", "num_classes"]
