"""Smooth triggers (paper Section 5): Algorithm 1 and the naive smooth triggers.

A *smooth trigger* is a universal perturbation ``r`` (float ``(H, W, 3)``) that has no
high-frequency content and is applied with the min-max rule ``M(x + lam * r)`` (each image
rescaled linearly to [0, 1], no clipping; :func:`minmax_apply`). It is found on a trained
classifier by :func:`smooth_trigger_search`; the label most samples drift to (the dominant
label) becomes the backdoor target, and the trigger then poisons a training set
(``smooth:PATH.npy`` in :mod:`tfbackdoor.triggers`).

The low-pass filter ``g`` is the paper's: a separable Gaussian of ``sigma = 6`` px and 30 taps,
with zero padding (output size == input size), applied per channel by depthwise convolution
(:func:`tfbackdoor.filters.low_pass`, or the Keras layer :class:`tfbackdoor.filters.LowPass`).

Algorithm 1, as implemented here (vectorised over a batch of samples):

1. ``r = 0``; the initial target ``y_tar`` is given, or the class that is most often the
   model's runner-up on the clean search set (the nearest wrong class).
2. One *pass* walks the shuffled search set in batches. For the samples of a batch that the
   model does not yet classify as ``y_tar`` after patching (only those contribute), a targeted
   DeepFool step ``dr_i`` is computed with ``tf.GradientTape`` (the linearised smallest change of
   the trigger that moves sample ``i`` onto the ``y_tar`` decision boundary, times
   ``1 + overshoot``). The batch update ``u = g(mean_i dr_i)`` is rescaled to a peak of
   ``step * bound`` (the averaged DeepFool steps give its shape and weigh the samples; their raw
   size, once low-passed, is far below the bound and would let the repeated filtering of ``r``
   shrink it to nothing); then ``r = g(r + u)`` and ``r`` is projected to the bounded range.
3. After a pass, ``y_tar = Domi``: the most frequent predicted label different from the true
   label over the patched search set (changed only when more than 5 % of it is mislabelled, as
   in the authors' code, so a few stray errors do not swap the target). ``Err`` (the fooling
   rate) is the share of held-out samples whose true label is not ``y_tar`` that the model
   classifies as ``y_tar`` once patched with the uint8 trigger rule. The best ``(r, y_tar)``
   by ``Err`` is kept; the search stops when ``Err >= fooling_rate`` or after ``max_passes``.

Bounded range: ``M`` is invariant to adding a constant to ``r``, so after every update ``r`` is
shifted to a minimum of 0 (which changes no patched image), and when its maximum exceeds
``bound`` (default 0.2, the range of the paper's trigger files) it is scaled down to
``bound``. ``r`` thus grows over the first batches and then keeps a peak-to-peak amplitude of
``bound``; ``lam`` scales it at application. The returned trigger is ``lam * r``, so that
``SmoothTrigger(trigger)`` (``smooth:PATH.npy``) applies exactly what was searched.

True labels: pass ``y``; without it the model's clean predictions are used (the authors' code).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from .atomic import save_figure
from .classifier import check_model_fits, check_target, num_classes as _num_classes
from .errors import TfbdError
from .filters import SIGMA, TAPS, low_pass, minmax_scale
from .frequency import dct2d, high_frequency_ratio
from .specs import data_root
from .triggers import SmoothTrigger

BOUND = 0.2


# ------------------------------------------------------------------------------ the rule M

def minmax_apply(x, r, lam: float = 1.0):
    """``M(x + lam * r)``: each image of float ``x`` ((N, H, W, C) in [0, 1]) plus the trigger,
    rescaled linearly so its minimum is 0 and maximum 1 (no clipping). ``r`` broadcasts."""
    x = tf.convert_to_tensor(x, tf.float32)
    single = x.shape.rank == 3
    if single:
        x = x[tf.newaxis]
    out = minmax_scale(x + lam * tf.convert_to_tensor(r, tf.float32))
    return out[0] if single else out


def project(r, bound: float = BOUND):
    """Shift ``r`` to a minimum of 0 (``M`` ignores constants) and scale it down to ``bound`` at most."""
    r = r - tf.reduce_min(r)
    hi = tf.reduce_max(r)
    return r * tf.minimum(1.0, bound / tf.maximum(hi, 1e-12))


# -------------------------------------------------------------------------------- Algorithm 1

@dataclass
class SmoothResult:
    """Output of :func:`smooth_trigger_search`.

    Attributes:
      trigger: float32 ``(H, W, 3)``, the best ``lam * r`` (use as ``SmoothTrigger(trigger)``).
      target: the backdoor target label ``y_tar`` that goes with it.
      fooling_rate: its ``Err`` on the held-out samples, as a fraction in [0, 1].
      history: one dict per pass (``pass, fooling_rate, target, dominant, active, seconds``).
      reached: whether ``fooling_rate`` reached the requested ``gamma``.
    """

    trigger: np.ndarray
    target: int
    fooling_rate: float
    history: list = field(default_factory=list)
    reached: bool = False


def _predict(model, x_float01, scale, batch_size):
    out = []
    for i in range(0, len(x_float01), batch_size):
        out.append(np.argmax(model(x_float01[i:i + batch_size] * scale, training=False), -1))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _predict_uint8(model, x_uint8, scale, batch_size):
    return _predict(model, x_uint8.astype(np.float32) / 255.0, scale, batch_size)


def _log_probs(model, z):
    p = model(z, training=False)
    return tf.math.log(tf.maximum(tf.cast(p, tf.float32), 1e-37))


def dominant_label(pred, labels, min_share=0.0):
    """``Domi``: the most frequent predicted label different from the true label, or ``None``
    when no more than ``min_share`` of the set is mislabelled."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    wrong = pred[pred != labels]
    if len(wrong) == 0 or len(wrong) <= min_share * len(pred):
        return None
    return int(np.argmax(np.bincount(wrong)))


def fooled_share(pred, labels, target) -> float:
    """``Err``: share (fraction) of samples whose true label is not ``target`` predicted as ``target``."""
    keep = np.asarray(labels) != target
    return float(np.mean(np.asarray(pred)[keep] == target)) if keep.any() else 0.0


def _runner_up_target(model, x, scale, batch_size):
    votes = []
    for i in range(0, len(x), batch_size):
        p = model(x[i:i + batch_size] * scale, training=False).numpy()
        votes.append(np.argsort(p, -1)[:, -2])
    return int(np.argmax(np.bincount(np.concatenate(votes))))


def _split(n, holdout, seed):
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(holdout * n)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if n < 2:
        raise TfbdError(f"smooth trigger search: need at least 2 samples (got {n})")
    k = min(max(k, 1), n - 1)
    return order[k:], order[:k]


def _prepare(model, x_uint8, y, target, holdout, seed, scale, batch_size, name):
    x_uint8 = np.asarray(x_uint8)
    if x_uint8.dtype != np.uint8 or x_uint8.ndim != 4 or x_uint8.shape[-1] != 3:
        raise TfbdError(f"smooth trigger search: images must be uint8 (N, H, W, 3), got {x_uint8.dtype} {x_uint8.shape}")
    check_model_fits(model, x_uint8, name)
    n_cls = _num_classes(model)
    if target is not None:
        target = check_target(n_cls, target, name)
    x = x_uint8.astype(np.float32) / 255.0
    if y is None:
        y = _predict(model, x, scale, batch_size)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise TfbdError(f"smooth trigger search: {len(x)} images but {len(y)} labels")
    search, hold = _split(len(x), holdout, seed)
    return x, y, search, hold, target, n_cls


def _evaluate(model, x_uint8_hold, y_hold, trig, target, scale, batch_size):
    patched = SmoothTrigger(trig)(x_uint8_hold).numpy()
    pred = _predict_uint8(model, patched, scale, batch_size)
    return fooled_share(pred, y_hold, target)


def _domi_err(model, x, y, search, hold, x_hold_u8, r, lam, y_tar, fixed, min_switch, scale, batch_size):
    """End of a pass of Algorithm 1: Domi over the patched search set (it becomes the target unless
    one was fixed), then Err on the held-out samples. Returns ``(y_tar, dom, trigger, err)``."""
    patched = minmax_apply(x[search], r, lam).numpy()
    dom = dominant_label(_predict(model, patched, scale, batch_size), y[search], min_share=min_switch)
    if fixed is None and dom is not None:
        y_tar = dom
    trig = (float(lam) * r).numpy().astype(np.float32)
    return y_tar, dom, trig, _evaluate(model, x_hold_u8, y[hold], trig, y_tar, scale, batch_size)


def smooth_trigger_search(model, x_uint8, y=None, fooling_rate: float = 0.9, lam: float = 1.0,
                          max_passes: int = 10, batch_size: int = 64, step: float = 0.5,
                          holdout: float | int = 0.2, seed: int = 0, progress=None, target: int | None = None,
                          overshoot: float = 0.02, bound: float = BOUND, sigma: float = SIGMA, taps: int = TAPS,
                          input_scale: float = 255.0, min_switch: float = 0.05, name: str | None = None) -> SmoothResult:
    """Algorithm 1 of the paper (see the module docstring), batched over samples.

    Args:
      model: a Keras classifier with softmax output taking images of ``input_scale`` range
        (255: 0..255 pixels, our victims; 1: [0, 1]).
      x_uint8: uint8 ``(N, H, W, 3)`` samples (the paper uses a few hundred training images).
      y: their true labels (default: the model's clean predictions).
      fooling_rate: the goal ``gamma`` on ``Err`` (fraction in (0, 1]).
      lam: strength of the trigger in ``M(x + lam * r)``.
      max_passes: stop after this many passes over the search set.
      batch_size: samples per gradient step (the vectorised unit).
      step: peak of each batch update relative to ``bound`` (the averaged, low-passed DeepFool
        step gives the update's shape; it is rescaled to a peak of ``step * bound``).
      holdout: fraction (float < 1) or number of samples held out to measure ``Err``.
      seed: seeds the holdout split and the shuffles of every pass.
      progress: optional callable receiving each pass's history dict.
      target: fix ``y_tar`` (a targeted search); default: the dominant label, updated each pass.
      overshoot: DeepFool's overshoot (``dr *= 1 + overshoot``).
      bound: the maximum of ``r`` after the shift to a minimum of 0 (paper files: 0.2).
      sigma, taps: the low-pass filter ``g``.
      min_switch: ``Domi`` replaces ``y_tar`` only when more than this share is mislabelled.
      name: how errors name the model (e.g. its file).

    Returns: :class:`SmoothResult`.
    """
    if not 0 < fooling_rate <= 1:
        raise TfbdError(f"--fooling-rate must be in (0, 1] (got {fooling_rate})")
    if lam <= 0 or step <= 0 or max_passes < 1 or batch_size < 1:
        raise TfbdError(f"smooth trigger search: need lam > 0, step > 0, max_passes >= 1, batch_size >= 1 "
                        f"(got lam={lam}, step={step}, max_passes={max_passes}, batch_size={batch_size})")
    x, y, search, hold, fixed, _ = _prepare(model, x_uint8, y, target, holdout, seed, input_scale, batch_size, name)
    x_hold_u8 = np.asarray(x_uint8)[hold]
    h, w, c = x.shape[1:]
    scale = float(input_scale)
    lam_t = tf.constant(float(lam))

    def g(t):
        return low_pass(t, sigma, taps)

    @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32), tf.TensorSpec([h, w, c], tf.float32),
                                  tf.TensorSpec([], tf.int64)], reduce_retracing=True)
    def batch_step(xb, r, tar):
        delta = tf.zeros_like(xb)
        with tf.GradientTape() as tape:
            tape.watch(delta)
            z = minmax_apply(xb, r[tf.newaxis] + delta, lam_t) * scale
            logp = _log_probs(model, z)
            pred = tf.argmax(logp, -1)
            active = tf.not_equal(pred, tar)
            f_tar = tf.gather(logp, tf.fill(tf.shape(pred), tar), batch_dims=1)
            f_pred = tf.gather(logp, pred, batch_dims=1)
            diff = f_tar - f_pred                        # <= 0; 0 once classified as the target
            objective = tf.reduce_sum(diff * tf.cast(active, tf.float32))
        wgrad = tape.gradient(objective, delta)          # per-sample gradients (samples independent)
        norm2 = tf.reduce_sum(tf.square(wgrad), axis=[1, 2, 3])
        coef = (1.0 + overshoot) * (tf.abs(diff) + 1e-4) / (norm2 + 1e-12)
        coef = tf.where(active & (norm2 > 0), coef, 0.0)
        dr = coef[:, None, None, None] * wgrad           # linearised step onto the target boundary
        n_active = tf.reduce_sum(tf.cast(active, tf.int32))
        mean_dr = tf.reduce_sum(dr, 0) / tf.maximum(tf.cast(n_active, tf.float32), 1.0)
        u = g(mean_dr[tf.newaxis])[0]
        # The update's peak is step * bound: the DeepFool steps give the direction and weigh the
        # samples; their raw size (often far below the bound once low-passed) does not matter.
        u = u * (step * bound / tf.maximum(tf.reduce_max(tf.abs(u)), 1e-12))
        r_new = project(g((r + u)[tf.newaxis])[0], bound)
        r_new = tf.where(n_active > 0, r_new, r)
        return r_new, n_active

    y_tar = fixed if fixed is not None else _runner_up_target(model, x[search], scale, batch_size)
    r = tf.zeros([h, w, c], tf.float32)
    best = SmoothResult(np.zeros((h, w, c), np.float32), int(y_tar), -1.0)
    rng = np.random.default_rng(seed + 1)
    # Pass 0: Err of the min-max rule alone (r = 0), the level the search starts from.
    history = [{"pass": 0, "fooling_rate": round(_evaluate(model, x_hold_u8, y[hold], np.zeros((h, w, c), np.float32),
                                                          y_tar, scale, batch_size), 4),
                "target": int(y_tar), "dominant": None, "active": None, "amplitude": 0.0, "seconds": 0.0}]
    if progress:
        progress(history[0])
    for p in range(1, max_passes + 1):
        t0 = time.perf_counter()
        order = rng.permutation(search)
        active = 0
        for i in range(0, len(order), batch_size):
            r, n_act = batch_step(x[order[i:i + batch_size]], r, tf.constant(y_tar, tf.int64))
            active += int(n_act)
        y_tar, dom, trig, err = _domi_err(model, x, y, search, hold, x_hold_u8, r, lam, y_tar, fixed, min_switch,
                                          scale, batch_size)
        rec = {"pass": p, "fooling_rate": round(err, 4), "target": int(y_tar), "dominant": dom,
               "active": int(active), "amplitude": round(float(np.ptp(trig)), 4),
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(rec)
        if progress:
            progress(rec)
        if err >= best.fooling_rate:
            best = SmoothResult(trig, int(y_tar), err)
        if err >= fooling_rate:
            break
    best.history = history
    best.reached = best.fooling_rate >= fooling_rate
    best.fooling_rate = max(best.fooling_rate, 0.0)
    return best


def paper_loop_baseline(model, x_uint8, y=None, fooling_rate: float = 0.9, lam: float = 1.0, max_passes: int = 1,
                        holdout: float | int = 0.2, seed: int = 0, target: int | None = None, overshoot: float = 0.02,
                        max_iter: int = 50, bound: float = BOUND, sigma: float = SIGMA, taps: int = TAPS,
                        input_scale: float = 255.0, min_switch: float = 0.05, batch_size: int = 256,
                        progress=None) -> SmoothResult:
    """The authors' per-sample loop (for timing comparisons only; no batching).

    For one sample at a time, if the model does not classify its patched copy as ``y_tar``:
    iterate targeted DeepFool steps on that sample alone (up to ``max_iter``) until it is
    fooled, then ``r = g(r + g(dr))`` rescaled to exactly [0, ``bound``] (the authors' code:
    raw DeepFool step, ``r`` always renormalised). ``Domi``, ``Err`` and the best-keeping are as
    in :func:`smooth_trigger_search`.
    """
    x, y, search, hold, fixed, _ = _prepare(model, x_uint8, y, target, holdout, seed, input_scale, batch_size, None)
    x_hold_u8 = np.asarray(x_uint8)[hold]
    scale = float(input_scale)
    y_tar = fixed if fixed is not None else _runner_up_target(model, x[search], scale, batch_size)
    r = tf.zeros(x.shape[1:], tf.float32)
    best = SmoothResult(np.zeros(x.shape[1:], np.float32), int(y_tar), -1.0)
    rng = np.random.default_rng(seed + 1)
    history = []

    def grad_at(xi, pert, tar):
        with tf.GradientTape() as tape:
            tape.watch(pert)
            logp = _log_probs(model, minmax_apply(xi, pert, lam) * scale)[0]
            k = int(tf.argmax(logp))
            diff = logp[tar] - logp[k]
        return k, float(diff), tape.gradient(diff, pert)

    for p in range(1, max_passes + 1):
        t0 = time.perf_counter()
        for i in rng.permutation(search):
            xi = x[i:i + 1]
            k, diff, wgrad = grad_at(xi, r, y_tar)
            if k == y_tar:
                continue
            r_tot = tf.zeros_like(r)
            it = 0
            while k != y_tar and it < max_iter:
                n2 = float(tf.reduce_sum(tf.square(wgrad)))
                if n2 == 0:
                    break
                r_tot = r_tot + (abs(diff) + 1e-4) / n2 * wgrad
                k, diff, wgrad = grad_at(xi, r + (1 + overshoot) * r_tot, y_tar)
                it += 1
            r = low_pass(r + low_pass((1 + overshoot) * r_tot, sigma, taps), sigma, taps)
            r = tf.constant(scale_to_bound(r.numpy(), bound))
        y_tar, dom, trig, err = _domi_err(model, x, y, search, hold, x_hold_u8, r, lam, y_tar, fixed, min_switch,
                                          scale, batch_size)
        rec = {"pass": p, "fooling_rate": round(err, 4), "target": int(y_tar), "dominant": dom,
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(rec)
        if progress:
            progress(rec)
        if err >= best.fooling_rate:
            best = SmoothResult(trig, int(y_tar), err)
        if err >= fooling_rate:
            break
    best.history = history
    best.reached = best.fooling_rate >= fooling_rate
    return best


# ------------------------------------------------------------------------- naive smooth triggers

def scale_to_bound(p, bound: float = BOUND) -> np.ndarray:
    """Min-max scale a pattern to [0, ``bound``] (over all pixels and channels)."""
    p = np.asarray(p, np.float32)
    span = float(p.max() - p.min())
    return ((p - p.min()) / (span if span > 0 else 1.0) * bound).astype(np.float32)


def naive_smooth_triggers(image_size: int = 32, seed: int = 0, bound: float = BOUND, photo_dir=None) -> list:
    """Five naive smooth triggers (the paper's baselines): low-passed random patterns and photos.

    ``naive_smooth_0`` and ``_1`` are Gaussian noise patterns; ``_2`` to ``_4`` are random
    square crops of three different photos from ``$TFBD_DATA/photos`` (resized to
    ``image_size``). Each pattern has its per-channel mean removed (otherwise the zero padding
    of ``g`` turns every pattern into the same centred blob), goes through the same low-pass
    filter ``g`` as Algorithm 1 and is scaled to [0, ``bound``]. Returns
    :class:`~tfbackdoor.triggers.SmoothTrigger` objects (apply with ``M(x + S)``).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    pats = [rng.standard_normal((image_size, image_size, 3)).astype(np.float32) for _ in range(2)]
    pdir = Path(photo_dir) if photo_dir else data_root() / "photos"
    photos = sorted(f for f in pdir.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg")) if pdir.is_dir() else []
    if len(photos) < 3:
        raise TfbdError(f"naive smooth triggers: need 3 photos in {pdir} (found {len(photos)}; set $TFBD_DATA)")
    for k in rng.choice(len(photos), 3, replace=False):
        try:
            with Image.open(photos[k]) as im:
                im = im.convert("RGB")
                wd, ht = im.size
                side = int(rng.integers(min(wd, ht) // 3, min(wd, ht) + 1))
                left, top = int(rng.integers(0, wd - side + 1)), int(rng.integers(0, ht - side + 1))
                crop = im.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.LANCZOS)
        except OSError as e:
            raise TfbdError(f"{photos[k]}: cannot read photo ({e})") from None
        pats.append(np.asarray(crop, np.float32) / 255.0)
    out = []
    for i, p in enumerate(pats):
        p = p - p.mean(axis=(0, 1), keepdims=True)
        out.append(SmoothTrigger(scale_to_bound(low_pass(p, SIGMA, TAPS).numpy(), bound), name=f"naive_smooth_{i}"))
    return out


# ------------------------------------------------------------------------------------ outputs

def save_preview(trigger, x_clean_uint8, out, stats=None, title=""):
    """PNG: the trigger (x5 amplitude), a clean example, its patched copy, and (with ``stats``
    from :func:`tfbackdoor.analysis.spectrum_stats`) the mean DCT spectra with their HF ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trig = np.asarray(trigger, np.float32)
    clean = np.asarray(x_clean_uint8[0])
    patched = SmoothTrigger(trig)(clean).numpy()
    panels = [("trigger x5", np.clip(trig * 5.0, 0, 1)), ("clean", clean), ("patched", patched)]
    spectra = list(stats.items()) if stats else []
    fig, axes = plt.subplots(1, len(panels) + len(spectra), figsize=(3.0 * (len(panels) + len(spectra)), 3.3))
    for ax, (t, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    if spectra:
        vmin = min(float(s["mean_log_spectrum"].min()) for _, s in spectra)
        vmax = max(float(s["mean_log_spectrum"].max()) for _, s in spectra)
        for ax, (k, s) in zip(axes[len(panels):], spectra):
            ax.imshow(s["mean_log_spectrum"], cmap="viridis", vmin=vmin, vmax=vmax)
            ax.set_title(f"{k} DCT (n={s['n']})\nHF ratio {s['hf_ratio']:.4f}", fontsize=9)
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, out)
    plt.close(fig)


def trigger_hf_ratio(trigger) -> float:
    """High-frequency energy ratio of the trigger pattern itself (0..255 scale DCT)."""
    t = tf.convert_to_tensor(np.asarray(trigger, np.float32)[None] * 255.0)
    return float(high_frequency_ratio(dct2d(t))[0])


__all__ = ["minmax_apply", "project", "smooth_trigger_search",
           "paper_loop_baseline", "naive_smooth_triggers", "SmoothResult", "dominant_label", "fooled_share",
           "save_preview", "trigger_hf_ratio", "scale_to_bound"]
