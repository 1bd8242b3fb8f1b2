"""Graph folds of a detector body before conversion: BatchNorm into the next linear layer, an input
scale into the first convolution (exact in float; checked on random inputs by :func:`fold_batchnorm`)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


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
