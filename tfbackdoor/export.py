"""Export a detector as a LiteRT (``.tflite``) screener: raw uint8 pixels in, P(poisoned) out.

The screener runs the whole detector on a device without TensorFlow (see ``edge/screen.py``):

* input: ONE uint8 tensor ``[1, H, W, 3]`` of RGB pixels 0..255 (static batch 1: an int8 model
  with a dynamic batch dimension does not load in LiteRT);
* output: ONE float32 tensor ``[1, 1]`` = P(poisoned);
* TFLite builtin ops only (never Flex/Select-TF ops; :func:`check_builtin_only`);
* a sidecar ``OUT.json`` (same stem) with ``threshold``, ``image_size``, ``quantize``, ``source``
  and ``sha256`` of the ``.tflite``.

That contract (the sidecar's fields, the verdict ``score > threshold``) is defined once in
``edge/screen.py`` (:func:`edge.screen.make_sidecar`, :func:`edge.screen.is_flagged`), which must run
without this package; the exporter imports it from there.

Why the first layer is folded (int8). A detector's input is the 2-D DCT of 0..255 pixels, whose
DC term is in the thousands while high-frequency coefficients are single digits. One per-tensor
int8 scale over that range (step ~30..60) rounds nearly every high-frequency coefficient to zero
-- the very signal the detector uses. Our detectors normalise per frequency first
(``Normalization(axis=(1, 2, 3), name="input_norm")``), so the DCT and the normalisation are one
affine map per channel, ``z_c = x_c @ (K / std_c) - mean_c / std_c`` with ``K = kron(D_H, D_W)^T``:
:class:`FoldedDCTNormalization`. The converter turns it into one ``FULLY_CONNECTED`` per channel
with per-output-column int8 weight scales, fed by the exactly-quantized uint8 pixels, so the first
quantized activation is already normalised (all frequencies share one scale fairly). That needs
an ``(H*W)^2`` matrix, so it is used up to 32x32 px; ``fold="separable"`` (a ``1 x W``
convolution with per-column scaling, then a depthwise ``H x 1`` convolution holding a
``D_H / (s * std)`` matrix per column and channel) is exact too and small, but less precise in
int8 and, from 64 px on, TFLite's generic depthwise kernel makes calibration take many minutes;
integer exports of larger detectors are therefore refused (float16 works at any size).

Ranges. TFLite sets each int8 activation range to the min..max seen in calibration, so a few
extreme values (strong triggers, white blocks) set a coarse step for every value of a tensor. Two
fixes: ``clip`` (default 8 for int8) saturates the normalised DCT at +-8 inside the
``FULLY_CONNECTED`` (a fused ``RELU_N1_TO_1`` on ``z / 8``; the factor 8 goes into the first
convolution) -- clean images stay within about +-8, and a coefficient beyond still reads as
"very large"; and ``tail`` (default 0.1 %) calibrates every other activation range to the
0.1 % / 99.9 % quantiles of its calibration values instead of min..max
(:func:`_quantize_int8_tail`: the converter only calibrates, the ranges are replaced, then the
MLIR quantizer quantizes).

BatchNorm. In cnn6 every BatchNorm follows an ELU, so the converter cannot fold it into a
convolution and keeps an int8 ``MUL`` + ``ADD`` per block. :func:`fold_batchnorm` can fold it
exactly into the next convolution (kernel times gamma, and a per-channel shift before it so
that SAME zero-padding stays exact), behind max-pooling when all scales are positive, and into
the dense head after the last block. Folding gamma into a convolution's *input* channels is not
free either (per-output-channel weight scales cannot follow it), so int8 exports fold only the
last BatchNorm into the head (``fold_bn="last"``); ``benchmarks/quantization_options.md`` has
the measurements.

ELU. The TFLite quantizer leaves ``ELU`` in float (``DEQUANTIZE -> ELU -> QUANTIZE``), so the
converter's int8 model is not full-integer. LiteRT has an int8 ``ELU`` kernel (a 256-entry lookup
table computing exactly ``quantize(elu(dequantize(q)))``), so :func:`fuse_int8_elu` rewires each
such sandwich into one int8 ``ELU`` -- bit-identical results, no float ops left between the
input ``QUANTIZE`` and the output ``DEQUANTIZE``.

Head. ``P(poisoned) = softmax(z)[1] = sigmoid(z1 - z0)``. An int8 softmax or logistic output has
a fixed step of 1/256, which cannot resolve thresholds near 1 (a calibrated 0.5 %-FPR threshold
is often > 0.99), so the int8 screener computes the logit difference in int8 and ends with a
float ``LOGISTIC`` on that one value (``head="logit"``; see :func:`add_float_logistic`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from edge.screen import make_sidecar

from . import data as data_mod
from . import detector as detector_mod
from . import perturb, triggers
from .atomic import atomic_path, sidecar_path
from .errors import TfbdError
from .frequency import DCT2D, dct_matrix

QUANTIZE_MODES = ("int8", "int16x8", "float16", "float32")
FOLDS = ("auto", "fc", "separable", "none")
HEADS = ("auto", "logit", "softmax")
DEFAULT_CALIBRATION = "cifar10:train+gtsrb:train"
FC_FOLD_MAX_PIXELS = 1024  # 32x32: one 1024x1024 matrix per channel (1 MB as int8, shared)
DEFAULT_CLIP = 8.0       # int8: normalised DCT values saturate at +-8 (clean images stay within ~+-8)
DEFAULT_TAIL = 1e-3      # int8: share of each activation's calibration values left outside its range
DEFAULT_FOLD_BN = "last"  # int8: fold only the BatchNorm after the last convolution (into the head)


# ------------------------------------------------------------------------ the folded layer

def _norm_stats(norm_layer, shape):
    """``(mean, std)`` float64 arrays of shape ``(H, W, C)`` from a Keras ``Normalization``."""
    mean = np.asarray(keras.ops.convert_to_numpy(norm_layer.mean), np.float64)
    var = np.asarray(keras.ops.convert_to_numpy(norm_layer.variance), np.float64)
    mean = np.broadcast_to(mean.reshape(mean.shape[-3:]) if mean.ndim >= 3 else mean, shape).copy()
    var = np.broadcast_to(var.reshape(var.shape[-3:]) if var.ndim >= 3 else var, shape).copy()
    return mean, np.maximum(np.sqrt(var), keras.backend.epsilon())


@keras.saving.register_keras_serializable(package="tfbackdoor")
class FoldedDCTNormalization(keras.layers.Layer):
    """:class:`~tfbackdoor.frequency.DCT2D` followed by per-frequency normalisation, as one map.

    ``out[n, u, v, c] = (DCT(x)[n, u, v, c] - mean[u, v, c]) / std[u, v, c]``, computed as

    * ``fold="fc"``: for each channel ``c`` one dense map of the flattened image,
      ``x_c (H*W) @ W_c (H*W, H*W) + b_c`` with ``W_c = kron(D_H, D_W)^T / std_c`` (column-wise)
      and ``b_c = -mean_c / std_c`` (converts to one ``FULLY_CONNECTED`` per channel);
    * ``fold="separable"``: a ``1 x W`` convolution ``T = X D_W^T`` whose output columns are
      scaled to unit RMS, then a depthwise ``H x 1`` convolution applying, for each column ``v``
      and channel ``c``, ``D_H`` rescaled by ``1 / (s_vc * std[:, v, c])`` (converts to
      ``CONV_2D`` + ``DEPTHWISE_CONV_2D``; used for inputs larger than 32x32).

    Args:
      mean, variance: ``(H, W, C)`` per-frequency statistics of the DCT (a detector's
        ``input_norm`` layer); ``std = max(sqrt(variance), 1e-7)`` as in ``Normalization``.
      fold: ``"fc"`` or ``"separable"``.
      clip: if set, normalised values are clipped to ``[-clip, clip]`` (computed as
        ``clip * min(max(z / clip, -1), 1)`` so that the converter fuses a ``RELU_N1_TO_1`` into
        the ``FULLY_CONNECTED`` and the int8 scale of that tensor covers exactly ``+-clip``
        instead of the largest value met in calibration).
      scaled_output: with ``clip`` and ``fold="fc"``, return ``z / clip`` (in ``[-1, 1]``) and
        leave the factor ``clip`` to the next (linear) layer; the exporter multiplies it into
        the detector's first convolution, so no extra int8 ``MUL`` re-quantizes the tensor.

    Input shape: ``(batch, H, W, C)`` pixels 0..255 (any numeric dtype).
    Output shape: the same, float: normalised DCT coefficients.
    """

    def __init__(self, mean, variance, fold="fc", clip=None, scaled_output=False, **kwargs):
        super().__init__(**kwargs)
        self.clip = None if clip is None else float(clip)
        self.scaled_output = bool(scaled_output)
        self.mean = np.asarray(mean, np.float64)
        self.variance = np.asarray(variance, np.float64)
        if self.mean.ndim != 3 or self.mean.shape != self.variance.shape:
            raise ValueError(f"mean and variance must both be (H, W, C), got {self.mean.shape} and {self.variance.shape}")
        if fold not in ("fc", "separable"):
            raise ValueError(f"fold must be 'fc' or 'separable', got {fold!r}")
        self.fold = fold

    @classmethod
    def from_normalization(cls, norm_layer, image_shape, fold="fc", **kwargs):
        mean, std = _norm_stats(norm_layer, tuple(image_shape))
        return cls(mean, std ** 2, fold=fold, **kwargs)

    def build(self, input_shape):
        h, w, c = self.mean.shape
        if tuple(input_shape[1:]) != (h, w, c):
            raise ValueError(f"input shape {tuple(input_shape[1:])} does not match the statistics' {(h, w, c)}")
        std = np.maximum(np.sqrt(self.variance), keras.backend.epsilon())
        dh, dw = dct_matrix(h), dct_matrix(w)
        if self.fold == "fc":
            k = np.kron(dh, dw).T                                   # (h*w pixels, h*w freqs)
            r = self.clip or 1.0
            kern = np.stack([k / std[..., i].reshape(1, -1) / r for i in range(c)])
            bias = np.stack([-self.mean[..., i].reshape(-1) / std[..., i].reshape(-1) / r for i in range(c)])
            self._kernel = [ops.convert_to_tensor(kern[i].astype("float32")) for i in range(c)]
            self._bias = [ops.convert_to_tensor(bias[i].astype("float32")) for i in range(c)]
        else:
            # Stage 1: T[h, v, c] = sum_w X[h, w, c] D_W[v, w], scaled to unit RMS per (v, c).
            ey2 = self.variance + self.mean ** 2                    # E[Y^2] per (u, v, c)
            mean_t = np.einsum("uh,uvc->hvc", dh, self.mean)       # E[T] exactly (T = D_H^T Y)
            var_t = np.maximum(ey2.mean(axis=0) - (mean_t ** 2).mean(axis=0), 1e-6)   # (v, c)
            offset = mean_t.mean(axis=0)                            # (v, c)
            s = 1.0 / np.sqrt(var_t)
            k1 = np.zeros((1, w, c, w * c))
            b1 = np.zeros((w * c,))
            for v in range(w):
                for ch in range(c):
                    k1[0, :, ch, v * c + ch] = dw[v] * s[v, ch]
                    b1[v * c + ch] = -offset[v, ch] * s[v, ch]
            # Stage 2: Y[u, v, c] = sum_h D_H[u, h] (T'[h, v, c] - b1) / s, then normalise.
            k2 = np.zeros((h, 1, w * c, h))
            b2 = np.zeros((w * c * h,))
            for v in range(w):
                for ch in range(c):
                    j = v * c + ch
                    k2[:, 0, j, :] = dh.T / (s[v, ch] * std[:, v, ch][None, :])
                    y_off = -(b1[j] / s[v, ch]) * dh.sum(axis=1)                  # (u,)
                    b2[j * h:(j + 1) * h] = (y_off - self.mean[:, v, ch]) / std[:, v, ch]
            self._k1 = ops.convert_to_tensor(k1.astype("float32"))
            self._b1 = ops.convert_to_tensor(b1.astype("float32"))
            self._k2 = ops.convert_to_tensor(k2.astype("float32"))
            self._b2 = ops.convert_to_tensor(b2.astype("float32"))
        self.built = True

    def call(self, inputs):
        h, w, c = self.mean.shape
        x = ops.cast(inputs, self.compute_dtype)
        if self.fold == "fc":
            outs = []
            for i in range(c):
                xc = ops.reshape(x[..., i], (-1, h * w))
                y = ops.matmul(xc, self._kernel[i]) + self._bias[i]
                y = ops.clip(y, -1.0, 1.0) if self.clip else y
                outs.append(ops.reshape(y, (-1, h * w, 1)))
            # CONCATENATION (not PACK): XNNPACK delegates it, so the graph stays one partition.
            y = ops.reshape(ops.concatenate(outs, axis=-1), (-1, h, w, c))
            return y if self.scaled_output or not self.clip else y * self.clip
        t = ops.conv(x, self._k1, strides=1, padding="valid") + self._b1            # (N, H, 1, W*C)
        y = ops.depthwise_conv(t, self._k2, strides=1, padding="valid") + self._b2  # (N, 1, 1, W*C*H)
        y = ops.reshape(y, (-1, w, c, h))                                          # v, c, u
        y = ops.transpose(y, (0, 3, 1, 2))                                         # u, v, c
        return ops.clip(y, -self.clip, self.clip) if self.clip else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"mean": self.mean.tolist(), "variance": self.variance.tolist(), "fold": self.fold,
                       "clip": self.clip, "scaled_output": self.scaled_output})
        return config


# ---------------------------------------------------------------------- the screener graph

def _resolve_fold(fold, quantize, image_size):
    if fold not in FOLDS:
        raise TfbdError(f"unknown fold '{fold}' (known: {', '.join(FOLDS)})")
    if fold != "auto":
        return fold
    if quantize in ("float32", "float16"):
        return "none"  # float keeps the small separable DCT2D + Normalization, exact
    if image_size * image_size <= FC_FOLD_MAX_PIXELS:
        return "fc"
    raise TfbdError(f"--quantize {quantize}: detectors larger than 32x32 px (this one: {image_size}) have no "
                    "integer export yet; use --quantize float16 (or --fold separable: correct but its depthwise "
                    "layer makes TFLite's calibration very slow)")


def _resolve_head(head, quantize):
    if head not in HEADS:
        raise TfbdError(f"unknown head '{head}' (known: {', '.join(HEADS)})")
    if head != "auto":
        return head
    return "logit" if quantize == "int8" else "softmax"


class _ChannelAffine(keras.layers.Layer):
    """``x * scale + offset`` with per-channel constants (export-time helper, not saved)."""

    def __init__(self, scale, offset, **kwargs):
        super().__init__(**kwargs)
        self.scale = np.asarray(scale, np.float32)
        self.offset = np.asarray(offset, np.float32)

    def call(self, inputs):
        x = inputs
        if not np.all(self.scale == 1.0):
            x = x * ops.convert_to_tensor(self.scale)
        if np.any(self.offset != 0.0):
            x = x + ops.convert_to_tensor(self.offset)
        return x


def _bn_affine(layer):
    """``(g, b)`` with ``BN(x) = g * x + b`` for an inference-mode BatchNormalization."""
    w = [keras.ops.convert_to_numpy(v).astype(np.float64) for v in layer.weights]
    names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
    d = dict(zip(names, w))
    n = len(d["moving_mean"])
    gamma = d.get("gamma", np.ones(n))
    beta = d.get("beta", np.zeros(n))
    g = gamma / np.sqrt(d["moving_variance"] + layer.epsilon)
    return g, beta - d["moving_mean"] * g


def _chain_layers(tail):
    """The layers of ``tail`` if it is a simple chain (each layer feeds only the next), else None."""
    layers = [layer for layer in tail.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        return None
    try:
        for prev, layer in zip(layers, layers[1:]):
            if layer.input is not prev.output:
                return None
    except (AttributeError, ValueError):  # a layer used more than once, or with several inputs
        return None
    return layers


def fold_batchnorm(tail, input_scale=1.0, which="all"):
    """Rebuild a chain-shaped detector body with its BatchNorms folded into the next linear layer.

    ``conv -> ELU -> BN -> conv`` becomes ``conv -> ELU -> (+ beta/gamma per channel) -> conv'``
    (kernel scaled by gamma; the shift keeps SAME zero-padding exact), a BN before a max-pool
    with all-positive scales moves behind the pool, and a BN before ``Flatten`` is left pending
    for the dense head (exact). Each int8 BN ``MUL`` + ``ADD`` pair (two re-quantizations)
    becomes at most one ``ADD``. ``input_scale`` multiplies the input (folded into the first
    conv: see ``FoldedDCTNormalization(scaled_output=True)``). ``which``: ``"all"`` folds every
    BatchNorm, ``"last"`` only those after the last convolution (into the dense head), ``"none"``
    keeps them (then only ``input_scale`` is folded).

    Returns ``(model, pending)`` where ``pending`` is ``None`` or ``(g, b)`` per output feature
    still to apply (``features = g * out + b``); or ``(None, None)`` when ``tail`` is not a
    chain of supported layers (the caller keeps the original).
    """
    layers = _chain_layers(tail)
    if layers is None:
        return None, None
    x0 = keras.Input(tuple(tail.input.shape[1:]), batch_size=1)
    x = x0
    c_in = tail.input.shape[-1]
    pending = None if input_scale == 1.0 else (np.full(c_in, float(input_scale)), np.zeros(c_in))

    def materialize(x, pending):
        return (_ChannelAffine(*pending)(x), None) if pending is not None else (x, None)

    last_conv = max((i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Conv2D)), default=-1)
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Dropout):
            continue
        if isinstance(layer, keras.layers.BatchNormalization) and (which == "none" or (which == "last" and i < last_conv)):
            x, pending = materialize(x, pending)
            x = layer(x)
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            if tuple(np.atleast_1d(layer.axis)) not in ((-1,), (3,), (len(layer.input.shape) - 1,)):
                return None, None
            g, b = _bn_affine(layer)
            if pending is not None:
                g, b = g * pending[0], g * pending[1] + b
            pending = (g, b)
            continue
        if isinstance(layer, keras.layers.MaxPooling2D):
            if pending is not None and not np.all(pending[0] > 0):
                x, pending = materialize(x, pending)
            x = layer(x)
            continue
        if isinstance(layer, keras.layers.Flatten):
            shape = x.shape[1:]
            x = layer(x)
            if pending is not None:
                reps = int(np.prod(shape[:-1]))
                pending = (np.tile(pending[0], reps), np.tile(pending[1], reps))
            continue
        if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D and pending is not None \
                and layer.get_config().get("activation") == "linear" and layer.get_config().get("groups", 1) == 1 \
                and np.all(pending[0] != 0):
            g, b = pending
            kernel, *bias = [keras.ops.convert_to_numpy(v).astype(np.float64) for v in layer.weights]
            bias = bias[0] if bias else np.zeros(kernel.shape[-1])
            if layer.padding == "valid":
                new_bias = bias + np.einsum("hwio,i->o", kernel, b)
            else:
                if np.any(b != 0):
                    x = _ChannelAffine(np.ones_like(b), b / g)(x)
                new_bias = bias
            cfg = layer.get_config()
            cfg.update({"name": layer.name + "_folded", "use_bias": True, "kernel_regularizer": None,
                        "bias_regularizer": None, "activity_regularizer": None})
            conv = keras.layers.Conv2D.from_config(cfg)
            x = conv(x)
            conv.set_weights([(kernel * g[None, None, :, None]).astype("float32"), new_bias.astype("float32")])
            pending = None
            continue
        x, pending = materialize(x, pending)
        x = layer(x)
    folded = keras.Model(x0, x)
    # Check the rewrite on random inputs (float): the chain test above is structural only.
    probe = np.random.default_rng(0).standard_normal((2,) + tuple(tail.input.shape[1:])).astype("float32")
    ref = keras.ops.convert_to_numpy(tail(probe * np.float32(input_scale), training=False)).astype(np.float64)
    got = keras.ops.convert_to_numpy(folded(probe, training=False)).astype(np.float64)
    if pending is not None:
        got = got * pending[0] + pending[1]
    if ref.shape != got.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-3 * (np.abs(ref).max() + 1)):
        return None, None
    return folded, pending


def build_screener(model, fold="fc", head="softmax", clip=None, fold_bn=True) -> keras.Model:
    """A Keras model ``pixels (1, H, W, 3) float 0..255 -> P(poisoned) (1, 1)`` from a DCT detector.

    Args:
      model: a tfbackdoor detector (``DetectorSpec``, domain ``dct``, with an ``input_norm``
        Normalization layer unless ``fold="none"``).
      fold: ``"fc"``/``"separable"``: :class:`FoldedDCTNormalization` replaces
        ``DCT2D`` + ``input_norm``; ``"none"``: ``DCT2D`` then the detector as it is.
      head: ``"softmax"``: column 1 of the softmax; ``"logit"``: the logit difference
        ``z1 - z0`` (:func:`convert` appends a float sigmoid to the converted model).
      clip: saturate normalised coefficients at ``+-clip`` (see :class:`FoldedDCTNormalization`).
      fold_bn: fold BatchNorms into the following linear layers (:func:`fold_batchnorm`):
        ``"all"`` (or True), ``"last"`` (only into the dense head) or ``"none"`` (or False).

    All choices compute the same function as the detector in float (up to ``clip``). The
    returned model has attribute ``returns_logit`` (True for ``head="logit"``: its output is the
    logit ``z1 - z0`` and P = sigmoid of it).
    """
    spec = detector_mod.spec_of(model)
    if spec.domain != "dct":
        raise TfbdError(f"model '{model.name}': only DCT-domain detectors can be exported (domain is '{spec.domain}')")
    size = spec.image_size
    pending = None
    inp = keras.Input((size, size, 3), batch_size=1, name="pixels")
    try:
        probs = model.get_layer("probs")
    except ValueError:
        raise TfbdError(f"model '{model.name}': no 'probs' output layer") from None
    if fold == "none":
        feats_model = keras.Model(model.input, probs.input)
        feats = feats_model(DCT2D(name="dct")(inp))
    else:
        try:
            norm = model.get_layer("input_norm")
        except ValueError:
            raise TfbdError(f"model '{model.name}': no 'input_norm' layer to fold into the DCT (use --fold none)") from None
        tail = keras.Model(norm.output, probs.input)
        scaled = bool(clip) and fold == "fc"
        which = {True: "all", False: "none"}.get(fold_bn, fold_bn)
        if which != "none" or scaled:
            new_tail, pending = fold_batchnorm(tail, clip if scaled else 1.0, which)
            if new_tail is None:
                scaled = False
            else:
                tail = new_tail
        folded = FoldedDCTNormalization.from_normalization(norm, (size, size, 3), fold=fold, clip=clip,
                                                          scaled_output=scaled, name="dct_norm")
        feats = tail(folded(inp))
    kernel, bias = (keras.ops.convert_to_numpy(v).astype(np.float64) for v in probs.weights[:2])
    if pending is not None:  # BN affine left over in front of the head: fold it into the dense weights
        bias = bias + pending[1] @ kernel
        kernel = kernel * pending[0][:, None]
    if head == "logit":
        dense = keras.layers.Dense(1, name="logit")
        out = dense(feats)
        dense.set_weights([kernel[:, 1:2] - kernel[:, 0:1], bias[1:2] - bias[0:1]])
    else:
        dense = keras.layers.Dense(2, activation="softmax", name="probs")
        sm = dense(feats)
        dense.set_weights([kernel, bias])
        out = keras.layers.Lambda(lambda t: t[:, 1:2], name="p_poisoned")(sm)
    screener = keras.Model(inp, out, name="tfbd_screener")
    screener.returns_logit = head == "logit"
    return screener


def screener_scores(screener, images) -> np.ndarray:
    """P(poisoned) of uint8 images through a :func:`build_screener` model in float (numpy)."""
    fn = tf.function(lambda t: screener(t, training=False))
    out = [fn(tf.constant(np.asarray(images[i:i + 1], np.float32))).numpy()[0, 0] for i in range(len(images))]
    s = np.asarray(out, np.float64)
    return 1.0 / (1.0 + np.exp(-s)) if getattr(screener, "returns_logit", False) else s


# ------------------------------------------------------------------ calibration (int8 data)

def representative_images(spec=DEFAULT_CALIBRATION, n=300, image_size=32, seed=0, trigger_dir=None,
                          echo=None) -> np.ndarray:
    """uint8 calibration images: clean, manipulated and triggered copies of real images.

    ``n`` clean images per part of ``spec`` (seeded subset), plus one
    :class:`~tfbackdoor.perturb.RandomManipulation` copy of each, plus the paper's 7 detector
    triggers applied to disjoint slices of the clean images (triggers whose files are missing are
    skipped with a warning). The first image has a black and a white block so that the input
    range is exactly 0..255 (input scale 1).
    """
    parts = [p for p in spec.split("+") if p.strip()]
    if not parts:
        raise TfbdError(f"empty calibration spec '{spec}'")
    xs = []
    for part in parts:
        x, _ = data_mod.load_arrays(part, image_size=image_size, limit=n, seed=seed)
        xs.append(x)
    clean = np.concatenate(xs)
    rng = np.random.default_rng(seed)
    clean = clean[rng.permutation(len(clean))]
    manip = perturb.RandomManipulation(seed=seed)(clean).numpy()
    trigs = []
    for name in triggers.PAPER_DETECTOR_ATTACKS:
        try:
            trigs.append(triggers.get(name, image_size, trigger_dir))
        except TfbdError as e:
            warnings.warn(f"calibration: skipping trigger {name}: {e}", stacklevel=2)
    triggered = []
    if trigs:
        for t, chunk in zip(trigs, np.array_split(clean, len(trigs))):
            if len(chunk):
                triggered.append(t(chunk).numpy())
    first = clean[:1].copy()
    b = max(1, image_size // 8)
    first[0, :b, :b] = 0
    first[0, -b:, -b:] = 255
    out = np.concatenate([first, clean, manip] + triggered)
    if echo:
        echo(f"calibration: {len(clean)} clean ({spec}), {len(manip)} manipulated, "
             f"{sum(len(t) for t in triggered)} triggered ({len(trigs)} triggers)")
    return out


# ------------------------------------------------------------------------- flatbuffer tools

def _schema():
    from tensorflow.lite.python import schema_py_generated as fb
    from tensorflow.lite.python import schema_util
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    return fb, schema_util, fbu


def _builtin_names():
    fb, _, _ = _schema()
    return {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}


def list_ops(tflite_bytes) -> list:
    """The operators of a ``.tflite`` (main subgraph, in execution order) by name.

    Builtin ops by their builtin name (``FULLY_CONNECTED``...), custom ops as ``CUSTOM:<code>``
    (Flex/Select-TF ops are custom ops named ``Flex...``).
    """
    fb, schema_util, fbu = _schema()
    m = fbu.convert_bytearray_to_object(bytearray(tflite_bytes))
    names = _builtin_names()
    codes = []
    for oc in m.operatorCodes:
        code = schema_util.get_builtin_code_from_operator_code(oc)
        if code == fb.BuiltinOperator.CUSTOM:
            cc = oc.customCode.decode() if isinstance(oc.customCode, bytes) else str(oc.customCode)
            codes.append(f"CUSTOM:{cc}")
        else:
            codes.append(names.get(code, f"BUILTIN_{code}"))
    out = []
    for sg in m.subgraphs:
        out.extend(codes[op.opcodeIndex] for op in sg.operators)
    return out


def check_builtin_only(tflite_bytes, name="model") -> list:
    """Raise :class:`TfbdError` if the model has custom or Flex ops; return its op list."""
    op_list = list_ops(tflite_bytes)
    bad = sorted({o for o in op_list if o.startswith("CUSTOM")})
    if bad:
        raise TfbdError(f"{name}: not builtin-only, has {', '.join(bad)}")
    return op_list


def _rewire(tflite_bytes, fn):
    fb, schema_util, fbu = _schema()
    m = fbu.convert_bytearray_to_object(bytearray(tflite_bytes))
    names = _builtin_names()
    opname = [names.get(schema_util.get_builtin_code_from_operator_code(oc)) for oc in m.operatorCodes]
    n = fn(m, opname, fb)
    return bytes(fbu.convert_object_to_bytearray(m)), n


def fuse_int8_elu(tflite_bytes):
    """Replace every ``DEQUANTIZE(int8) -> ELU(float) -> QUANTIZE(int8)`` by one int8 ``ELU``.

    LiteRT's int8 ELU is a lookup table of ``quantize_out(elu(dequantize_in(q)))`` over the 256
    input values: exactly what the float sandwich computes, so the results are bit-identical.
    Returns ``(new_bytes, number_of_sandwiches_fused)``.
    """

    def fn(m, opname, fb):
        fused = 0
        for sg in m.subgraphs:
            producer, consumers = {}, {}
            for i, op in enumerate(sg.operators):
                for t in op.outputs:
                    producer[int(t)] = i
                for t in op.inputs:
                    consumers.setdefault(int(t), []).append(i)
            drop = set()
            outputs = {int(t) for t in sg.outputs}
            for op in sg.operators:
                if opname[op.opcodeIndex] != "ELU":
                    continue
                t_in, t_out = int(op.inputs[0]), int(op.outputs[0])
                p, cs = producer.get(t_in), consumers.get(t_out, [])
                if p is None or opname[sg.operators[p].opcodeIndex] != "DEQUANTIZE" or len(consumers[t_in]) != 1:
                    continue
                if len(cs) != 1 or opname[sg.operators[cs[0]].opcodeIndex] != "QUANTIZE" or t_out in outputs:
                    continue
                q_in, q_out = int(sg.operators[p].inputs[0]), int(sg.operators[cs[0]].outputs[0])
                if sg.tensors[q_in].type != fb.TensorType.INT8 or sg.tensors[q_out].type != fb.TensorType.INT8:
                    continue
                op.inputs = np.array([q_in], np.int32)
                op.outputs = np.array([q_out], np.int32)
                drop |= {p, cs[0]}
                fused += 1
            sg.operators = [op for i, op in enumerate(sg.operators) if i not in drop]
        return fused

    return _rewire(tflite_bytes, fn)


def add_float_logistic(tflite_bytes):
    """Append a float32 ``LOGISTIC`` to the model's single float output (logit -> probability).

    The quantized model ends with ``DEQUANTIZE`` of the int8 logit ``z1 - z0``; one float sigmoid
    on that value gives P(poisoned) with full float resolution (an int8 sigmoid/softmax output
    moves in steps of 1/256 and saturates above 0.996).
    """

    def fn(m, opname, fb):
        sg = m.subgraphs[0]
        (out_idx,) = [int(t) for t in sg.outputs]
        src = sg.tensors[out_idx]
        if src.type != fb.TensorType.FLOAT32:
            raise RuntimeError("add_float_logistic: the model output is not float32")
        code = None
        for i, oc in enumerate(m.operatorCodes):
            if opname[i] == "LOGISTIC":
                code = i
        if code is None:
            oc = fb.OperatorCodeT()
            oc.builtinCode = fb.BuiltinOperator.LOGISTIC
            oc.deprecatedBuiltinCode = fb.BuiltinOperator.LOGISTIC
            oc.version = 1
            m.operatorCodes.append(oc)
            opname.append("LOGISTIC")
            code = len(m.operatorCodes) - 1
        buf = fb.BufferT()
        m.buffers.append(buf)
        t = fb.TensorT()
        t.shape = np.array(src.shape, np.int32)
        t.shapeSignature = None if src.shapeSignature is None else np.array(src.shapeSignature, np.int32)
        t.type = fb.TensorType.FLOAT32
        t.buffer = len(m.buffers) - 1
        t.name = b"p_poisoned"
        sg.tensors.append(t)
        new_idx = len(sg.tensors) - 1
        src.name = b"logit"
        op = fb.OperatorT()
        op.opcodeIndex = code
        op.inputs = np.array([out_idx], np.int32)
        op.outputs = np.array([new_idx], np.int32)
        sg.operators.append(op)
        sg.outputs = np.array([new_idx], np.int32)
        for sig in m.signatureDefs or []:
            for tm in sig.outputs or []:
                if tm.tensorIndex == out_idx:
                    tm.tensorIndex = new_idx
        return 1

    return _rewire(tflite_bytes, fn)


# ----------------------------------------------------------------------------- conversion

def _frozen_concrete(screener, input_dtype):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    h, w = screener.input.shape[1], screener.input.shape[2]

    @tf.function(input_signature=[tf.TensorSpec([1, h, w, 3], input_dtype, name="pixels")])
    def serve(pixels):
        return screener(tf.cast(pixels, tf.float32), training=False)

    return convert_variables_to_constants_v2(serve.get_concrete_function())


def _tail_ranges(calibrated, reps, tail, in_dtype):
    """Per-tensor ``(lo, hi)`` that leave a ``tail`` share of each activation's values outside.

    Runs the calibrated float model (``_experimental_calibrate_only``) on the calibration images,
    keeping every intermediate tensor, and tracks the ``tail * N`` largest and smallest values
    of each (exact order statistics). The range always includes 0.
    """
    from ai_edge_litert.interpreter import Interpreter

    _, _, fbu = _schema()
    obj = fbu.convert_bytearray_to_object(bytearray(calibrated))
    sg = obj.subgraphs[0]
    skip = {int(i) for i in sg.inputs} | {int(i) for i in sg.outputs}
    idx = [i for i, t in enumerate(sg.tensors) if i not in skip and t.quantization is not None
           and t.quantization.min is not None and len(t.quantization.min) == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = Interpreter(model_content=bytes(calibrated), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    inp = it.get_input_details()[0]["index"]
    n = len(reps)
    tops, bots, ks = {}, {}, {}
    for i in idx:
        size = int(np.prod(sg.tensors[i].shape))
        ks[i] = max(1, int(np.ceil(size * n * tail)))
        tops[i] = np.empty(0, np.float32)
        bots[i] = np.empty(0, np.float32)
    for j in range(n):
        it.set_tensor(inp, reps[j:j + 1].astype(in_dtype))
        it.invoke()
        for i in idx:
            v = it.get_tensor(i).ravel()
            k = ks[i]
            cand = np.concatenate([tops[i], v if v.size <= k else np.partition(v, -k)[-k:]])
            tops[i] = cand if cand.size <= k else np.partition(cand, -k)[-k:]
            cand = np.concatenate([bots[i], v if v.size <= k else np.partition(v, k - 1)[:k]])
            bots[i] = cand if cand.size <= k else np.partition(cand, k - 1)[:k]
    return obj, {i: (min(float(bots[i].max()), 0.0), max(float(tops[i].min()), 0.0)) for i in idx}


def _quantize_int8_tail(conv, reps, tail, in_dtype):
    """Full-integer int8 conversion whose activation ranges cut a ``tail`` share at each end.

    TFLite calibrates each activation's range as its min..max over the representative set, so a
    few extreme values (strong triggers, white blocks) set a coarse step for every value of that
    tensor. Here the converter only calibrates; the recorded ranges are replaced by the tail
    quantiles (:func:`_tail_ranges`) and the MLIR quantizer then quantizes with them (the rare
    values beyond saturate).
    """
    from tensorflow.lite.python.convert import deduplicate_readonly_buffers, mlir_quantize

    _, _, fbu = _schema()
    conv._experimental_calibrate_only = True
    calibrated = bytes(conv.convert())
    obj, ranges = _tail_ranges(calibrated, reps, tail, in_dtype)
    for i, (lo, hi) in ranges.items():
        q = obj.subgraphs[0].tensors[i].quantization
        q.min = np.array([lo], np.float32)
        q.max = np.array([hi], np.float32)
    edited = bytes(fbu.convert_object_to_bytearray(obj))
    out = mlir_quantize(edited, input_data_type=tf.uint8, output_data_type=tf.float32)
    return bytes(deduplicate_readonly_buffers(out))


def convert(screener, quantize="int8", representative=None, fuse_elu=True, tail=None) -> bytes:
    """Convert a :func:`build_screener` model to ``.tflite`` bytes (builtin ops only).

    Args:
      quantize: ``int8`` (full-integer: uint8 input, int8 weights and activations, calibrated on
        ``representative``), ``int16x8`` (int16 activations, int8 weights; ELU and the input cast
        stay float), ``float16`` (float16 weights) or ``float32``.
      representative: uint8 ``(N, H, W, 3)`` calibration images (int8/int16x8 only).
      fuse_elu: rewire the float ELU sandwiches of an int8 model into int8 ELU ops.
      tail: int8 only: cut this share of each activation's calibration values at each end
        when setting its range (:func:`_quantize_int8_tail`); ``None``/0: TFLite's min..max.
    """
    if quantize not in QUANTIZE_MODES:
        raise TfbdError(f"unknown quantization '{quantize}' (known: {', '.join(QUANTIZE_MODES)})")
    integer = quantize in ("int8", "int16x8")
    if integer and (representative is None or not len(representative)):
        raise TfbdError(f"--quantize {quantize} needs calibration images")
    # int8 takes float pixels in the graph and quantizes the input to uint8 (scale 1); the others
    # take uint8 and CAST inside the graph (16x8 models cannot have a uint8 input type).
    in_dtype = tf.float32 if quantize == "int8" else tf.uint8
    conc = _frozen_concrete(screener, in_dtype)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([conc])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif integer:
        reps = np.asarray(representative)

        def gen():
            for i in range(len(reps)):
                yield [reps[i:i + 1].astype(in_dtype.as_numpy_dtype)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = gen
        if quantize == "int8":
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.uint8
            conv.inference_output_type = tf.float32
        else:
            # ELU and the uint8->float CAST have no 16x8 kernels: let them stay float.
            conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                                              tf.lite.OpsSet.TFLITE_BUILTINS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if quantize == "int8" and tail:
                out = _quantize_int8_tail(conv, reps, tail, np.float32)
            else:
                out = conv.convert()
        except Exception as e:
            raise RuntimeError(f"TFLite conversion failed: {str(e).splitlines()[0][:300]}") from e
    out = bytes(out)
    if quantize == "int8" and fuse_elu:
        out, _ = fuse_int8_elu(out)
    if getattr(screener, "returns_logit", False):
        out, _ = add_float_logistic(out)
    return out


# ---------------------------------------------------------------------------- running

def interpreter(tflite, num_threads=None):
    """A LiteRT interpreter (``ai_edge_litert``) for a path or bytes, tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(tflite, (bytes, bytearray)):
        it = Interpreter(model_content=bytes(tflite), num_threads=num_threads)
    else:
        it = Interpreter(model_path=str(tflite), num_threads=num_threads)
    it.allocate_tensors()
    return it


def tflite_scores(tflite, images, num_threads=None, return_latency=False):
    """P(poisoned) of uint8 images ``(N, H, W, 3)`` through a screener ``.tflite`` (batch 1).

    ``tflite`` is a path, bytes, or an already allocated interpreter (reused as is, e.g. for
    repeated timing rounds). With ``return_latency`` also returns per-image
    set_tensor + invoke + get_tensor times in ms.
    """
    import time

    it = tflite if hasattr(tflite, "invoke") else interpreter(tflite, num_threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    images = np.asarray(images)
    dtype = np.dtype(inp["dtype"])
    scores = np.empty(len(images), np.float64)
    lat = np.empty(len(images), np.float64)
    oscale, ozp = out["quantization"]
    for i in range(len(images)):
        x = images[i:i + 1]
        if dtype == np.int8:
            x = (x.astype(np.int16) - 128).astype(np.int8)
        else:
            x = x.astype(dtype)
        t0 = time.perf_counter()
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])
        lat[i] = (time.perf_counter() - t0) * 1000.0
        v = y.reshape(-1)[-1]
        scores[i] = (float(v) - ozp) * oscale if np.issubdtype(y.dtype, np.integer) else float(v)
    return (scores, lat) if return_latency else scores


def describe(tflite) -> dict:
    """Input/output details and op counts of a ``.tflite`` (for the command's report)."""
    b = Path(tflite).read_bytes() if not isinstance(tflite, (bytes, bytearray)) else bytes(tflite)
    it = interpreter(b)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    op_list = list_ops(b)
    counts = {}
    for name in op_list:
        counts[name] = counts.get(name, 0) + 1
    return {"input": {"shape": [int(v) for v in i["shape"]], "dtype": np.dtype(i["dtype"]).name,
                      "quantization": [float(i["quantization"][0]), int(i["quantization"][1])]},
            "output": {"shape": [int(v) for v in o["shape"]], "dtype": np.dtype(o["dtype"]).name},
            "ops": counts, "float_ops_between": _float_islands(b), "bytes": len(b)}


def _float_islands(tflite_bytes) -> list:
    """Ops computing in float between the first QUANTIZE and the last DEQUANTIZE (int models)."""
    fb, schema_util, fbu = _schema()
    m = fbu.convert_bytearray_to_object(bytearray(tflite_bytes))
    names = _builtin_names()
    sg = m.subgraphs[0]
    opn = [names.get(schema_util.get_builtin_code_from_operator_code(m.operatorCodes[op.opcodeIndex]))
           for op in sg.operators]
    if "QUANTIZE" not in opn:
        return []
    first = opn.index("QUANTIZE")
    last = len(opn) - 1 - opn[::-1].index("DEQUANTIZE") if "DEQUANTIZE" in opn else len(opn)
    out = []
    for op, name in zip(sg.operators[first + 1:last], opn[first + 1:last]):
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if any(sg.tensors[int(t)].type == fb.TensorType.FLOAT32 for t in op.outputs):
            out.append(name)
    return out


# ------------------------------------------------------------------------------ export

def _write_atomic(path: Path, payload: bytes):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(payload)


def export(detector_path, out, quantize="int8", calibration=DEFAULT_CALIBRATION, calibration_size=300,
           seed=0, fold="auto", head="auto", clip=None, tail=None, fold_bn=None, trigger_dir=None,
           echo=None) -> dict:
    """Export the detector at ``detector_path`` to a screener ``.tflite`` at ``out`` (+ sidecar).

    Checks builtin-only ops, the uint8 ``[1, H, W, 3]`` input (scale 1 for int8) and the
    ``[1, 1]`` float output, and that the ``.tflite`` runs; both files are written atomically.
    Returns a summary dict (also the sidecar's content plus ``ops``).
    """
    echo = echo or (lambda *_: None)
    model = detector_mod.load(detector_path)
    spec = detector_mod.spec_of(model)
    size = spec.image_size
    fold_r = _resolve_fold(fold, quantize, size)
    head_r = _resolve_head(head, quantize)
    if quantize not in QUANTIZE_MODES:
        raise TfbdError(f"unknown quantization '{quantize}' (known: {', '.join(QUANTIZE_MODES)})")
    if clip is None:
        clip = DEFAULT_CLIP if (quantize == "int8" and fold_r == "fc") else 0
    if clip < 0:
        raise TfbdError(f"--clip must be >= 0 (got {clip})")
    clip = float(clip) or None
    if tail is None:
        tail = DEFAULT_TAIL if quantize == "int8" else 0.0
    if not 0.0 <= tail < 0.5:
        raise TfbdError(f"--calibration-tail must be in [0, 0.5) (got {tail})")
    fold_bn = fold_bn or (DEFAULT_FOLD_BN if quantize in ("int8", "int16x8") else "none")
    screener = build_screener(model, fold_r, head_r, clip=clip, fold_bn=fold_bn)
    reps = None
    if quantize in ("int8", "int16x8"):
        if calibration_size is None or calibration_size < 1:
            raise TfbdError(f"--calibration-size must be >= 1 (got {calibration_size})")
        reps = representative_images(calibration, calibration_size, size, seed, trigger_dir, echo)
    echo(f"converting ({quantize}, fold={fold_r}, head={head_r}, clip={clip}, fold_bn={fold_bn}, tail={tail})")
    tfl = convert(screener, quantize, reps, tail=tail)
    op_list = check_builtin_only(tfl, str(out))
    info = describe(tfl)
    if info["input"]["shape"] != [1, size, size, 3] or info["input"]["dtype"] != "uint8":
        raise RuntimeError(f"exported input is {info['input']}, expected uint8 [1, {size}, {size}, 3]")
    if quantize == "int8" and info["input"]["quantization"] != [1.0, 0]:
        raise RuntimeError(f"int8 input quantization is {info['input']['quantization']}, expected scale 1 / zero point 0")
    if info["output"]["shape"] != [1, 1]:
        raise RuntimeError(f"exported output is {info['output']}, expected [1, 1]")
    out = Path(out)
    digest = hashlib.sha256(tfl).hexdigest()
    side = make_sidecar(spec.threshold, [size, size], digest, quantize=quantize,
                        source=str(detector_path or detector_mod.DEFAULT_DETECTOR), fold=fold_r, head=head_r,
                        clip=clip, fold_bn=fold_bn)
    if reps is not None:
        side["calibration"] = {"spec": calibration, "per_part": int(calibration_size), "images": int(len(reps)),
                               "seed": int(seed), "tail": tail if quantize == "int8" else 0.0}
    _write_atomic(out, tfl)
    _write_atomic(sidecar_path(out), (json.dumps(side, indent=2) + "\n").encode())
    return {**side, "out": str(out), "sidecar": str(sidecar_path(out)), "bytes": len(tfl), "ops": info["ops"],
            "float_ops_between": info["float_ops_between"], "op_list": op_list}
