"""The screener graph: a Keras model ``pixels (1, H, W, 3) -> P(poisoned)`` built from a DCT detector
(the folded input layer, the folded body, a softmax or logit head)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .. import detector as detector_mod
from ..errors import TfbdError
from ..frequency import DCT2D
from .folds import fold_batchnorm
from .layer import FoldedDCTNormalization

FOLDS = ("auto", "fc", "basis", "separable", "none")
HEADS = ("auto", "logit", "softmax")
FC_FOLD_MAX_PIXELS = 1024  # 32x32: one 1024x1024 matrix per channel (1 MB as int8, shared)


def _resolve_fold(fold, quantize, image_size):
    if fold not in FOLDS:
        raise TfbdError(f"unknown fold '{fold}' (known: {', '.join(FOLDS)})")
    if fold != "auto":
        return fold
    if quantize in ("float32", "float16"):
        return "none"  # float keeps the small separable DCT2D + Normalization, exact
    # Above 32x32 the fc fold's (H*W)^2 matrix per channel grows too large (128 px: 268 M weights);
    # the basis fold's two small matmuls (H^2 + W^2 weights) scale.
    return "fc" if image_size * image_size <= FC_FOLD_MAX_PIXELS else "basis"


def _resolve_head(head, quantize):
    if head not in HEADS:
        raise TfbdError(f"unknown head '{head}' (known: {', '.join(HEADS)})")
    if head != "auto":
        return head
    return "logit" if quantize == "int8" else "softmax"


def build_screener(model, fold="fc", head="softmax", clip=None, fold_bn=True) -> keras.Model:
    """A Keras model ``pixels (1, H, W, 3) float 0..255 -> P(poisoned) (1, 1)`` from a DCT detector.

    Args:
      model: a tfbackdoor detector (``DetectorSpec``, domain ``dct``, with an ``input_norm``
        Normalization layer unless ``fold="none"``).
      fold: ``"fc"``/``"basis"``/``"separable"``: :class:`FoldedDCTNormalization` replaces
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
        scaled = bool(clip) and fold in ("fc", "basis")
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
