"""Detector architectures (Keras functional models on DCT or image inputs).

* :func:`cnn6` — the paper's small-input detector: three blocks of two 3x3 convolutions
  (32, 64, 128 filters, L2 1e-4) each followed by ELU and BatchNorm, 2x2 max-pooling and dropout
  0.2 / 0.3 / 0.4, then flatten and a dense softmax over {clean, poisoned}.
* :func:`large` — our detector for inputs of 128 px and more (see its docstring for the design).
* :func:`edge` — a camera-frame detector for 224 px on an edge CPU: ``large`` with a 4x4 stride-4
  patchify stem, about a quarter of its cost (see its docstring).

Both start with a ``keras.layers.Normalization`` over ``(H, W, C)`` (per-frequency mean/std,
set by ``adapt`` on clean training inputs) instead of feeding raw DCT values whose DC term is in
the thousands while high frequencies are single digits. That keeps the first convolution
well-conditioned and, for export, makes the per-frequency scale explicit so it can be folded
into the DCT for integer quantization. They end with a :class:`DetectorSpec` identity layer that
stores what the model expects (domain, image size, threshold, provenance) inside the ``.keras``.
"""

from __future__ import annotations

import keras
from keras import layers, ops, regularizers

from .errors import TfbdError


@keras.saving.register_keras_serializable(package="tfbackdoor")
class DetectorSpec(layers.Layer):
    """Identity layer carrying a detector's metadata in its config.

    Args:
      domain: ``"dct"`` (inputs are :func:`tfbackdoor.frequency.dct2d` of 0..255 pixels) or
        ``"image"`` (inputs are 0..255 pixels).
      arch: architecture name.
      image_size: side of the square input images.
      threshold: P(poisoned) above which an input is flagged.
      info: free-form JSON-able dict (training data, command, excluded fine-tuning samples...).

    Input/output: ``(batch, 2)`` softmax, unchanged.
    """

    def __init__(self, domain="dct", arch="cnn6", image_size=32, threshold=0.5, info=None, **kwargs):
        super().__init__(**kwargs)
        self.domain = domain
        self.arch = arch
        self.image_size = int(image_size)
        self.threshold = float(threshold)
        self.info = dict(info or {})

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"domain": self.domain, "arch": self.arch, "image_size": self.image_size,
                       "threshold": self.threshold, "info": self.info})
        return config


@keras.saving.register_keras_serializable(package="tfbackdoor")
class FrequencyCoords(layers.Layer):
    """Append two channels holding each position's normalised row and column (u/H, v/W).

    On DCT inputs a position *is* a frequency; the coordinates let translation-invariant
    convolutions and global pooling still know which frequency band they look at.

    Input: ``(batch, H, W, C)``. Output: ``(batch, H, W, C + 2)``.
    """

    def call(self, inputs):
        shape = ops.shape(inputs)
        h, w = inputs.shape[1], inputs.shape[2]
        rows = ops.reshape(ops.arange(h, dtype=self.compute_dtype) / h, (1, h, 1, 1))
        cols = ops.reshape(ops.arange(w, dtype=self.compute_dtype) / w, (1, 1, w, 1))
        rows = ops.broadcast_to(rows, (shape[0], h, w, 1))
        cols = ops.broadcast_to(cols, (shape[0], h, w, 1))
        return ops.concatenate([inputs, rows, cols], axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + 2,)


def _conv_block(x, filters, l2, name):
    x = layers.Conv2D(filters, 3, padding="same", kernel_regularizer=regularizers.l2(l2), name=name)(x)
    x = layers.Activation("elu")(x)
    return layers.BatchNormalization()(x)


def cnn6(image_size=32, normalize=True, l2=1e-4, name="cnn6"):
    """The paper's 6-conv detector on ``(image_size, image_size, 3)`` inputs; softmax ``(batch, 2)``."""
    inp = keras.Input((image_size, image_size, 3), name="inputs")
    x = layers.Normalization(axis=(1, 2, 3), name="input_norm")(inp) if normalize else inp
    for i, (filters, drop) in enumerate(((32, 0.2), (64, 0.3), (128, 0.4))):
        x = _conv_block(x, filters, l2, f"conv{2 * i + 1}")
        x = _conv_block(x, filters, l2, f"conv{2 * i + 2}")
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(drop)(x)
    x = layers.Flatten()(x)
    out = layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name)


def large(image_size=224, l2=1e-4, name="large"):
    """Detector for large inputs (>= 128 px), our design.

    Why this shape: on large images a trigger's artifacts are spread over many more frequency
    positions and are easier to separate (the paper's PubFig row), so capacity matters less than
    cost; cnn6's flatten+dense would need ~100k inputs per unit at 224 px and its full-resolution
    convs are slow on a CPU. So:

    * per-frequency ``Normalization`` then :class:`FrequencyCoords` (the conv stack knows the band);
    * a stride-2 3x3 stem (32) and four stages of [3x3 conv + ELU + BN] x 2 with 2x2 max-pool
      (32, 64, 96, 128 filters): the receptive field grows over neighbouring frequencies, where
      a trigger's energy clusters;
    * global average *and* global max pooling: the max keeps a localized high-frequency peak that
      an average over 50k positions would dilute;
    * dropout 0.3 and a dense softmax over {clean, poisoned}. About 0.3M parameters, size-agnostic
      apart from the normalization statistics.
    """
    return _staged(image_size, l2, name, stem_kernel=3, stem_stride=2, stem_padding="same", pool_last=True)


def edge(image_size=224, l2=1e-4, name="edge"):
    """Detector for camera frames (224 px) on an edge CPU, our design (issue 13).

    Why this shape: ``large`` spends ~60% of its ~0.6 GMAC per 224-px frame on 3x3 convolutions at
    112x112, which costs the frame rate on a device and the training time on a CPU. A DCT input's
    neighbouring positions are neighbouring frequencies, whose energies are similar, so a learned
    4x4 stride-4 *patchify* stem (one linear map of each 4x4 block of frequencies and their
    coordinates to 32 features) loses little of a trigger's evidence and divides the spatial size
    by 16 at once. Then the ``large`` recipe at 56, 28, 14 and 7 px ([3x3 conv + ELU + BN] x 2,
    2x2 max-pool; 32, 64, 96, 128 filters), global average *and* max pooling (the max keeps a
    localized peak), dropout 0.3 and a softmax over {clean, poisoned}. About 0.15 GMAC per frame
    at 224 px and ~0.48M weights (plus the normalization statistics); plain Conv2D/BN/ELU only,
    so the int8 exporter folds it like ``large``. Input ``(batch, image_size, image_size, 3)``,
    ``image_size`` a multiple of 32 (4 x 2^3).
    """
    if image_size % 32:
        raise TfbdError(f"the edge architecture needs an image size that is a multiple of 32 (got {image_size})")
    return _staged(image_size, l2, name, stem_kernel=4, stem_stride=4, stem_padding="valid", pool_last=False)


def _staged(image_size, l2, name, stem_kernel, stem_stride, stem_padding, pool_last):
    """The body ``large`` and ``edge`` share: normalization, frequency coordinates, a 32-filter
    stem, four stages of [3x3 conv + ELU + BN] x 2 (32, 64, 96, 128 filters) with 2x2 max-pool
    between them (and after the last when ``pool_last``), global average + max pooling, dropout
    0.3, softmax over {clean, poisoned}."""
    inp = keras.Input((image_size, image_size, 3), name="inputs")
    x = layers.Normalization(axis=(1, 2, 3), name="input_norm")(inp)
    x = FrequencyCoords()(x)
    x = layers.Conv2D(32, stem_kernel, strides=stem_stride, padding=stem_padding,
                      kernel_regularizer=regularizers.l2(l2), name="stem")(x)
    x = layers.Activation("elu")(x)
    x = layers.BatchNormalization()(x)
    for i, filters in enumerate((32, 64, 96, 128)):
        x = _conv_block(x, filters, l2, f"conv{2 * i + 1}")
        x = _conv_block(x, filters, l2, f"conv{2 * i + 2}")
        if pool_last or i < 3:
            x = layers.MaxPooling2D(2)(x)
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)])
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name)


ARCHS = {"cnn6": cnn6, "large": large, "edge": edge}


def spec_of(model) -> DetectorSpec:
    """The :class:`DetectorSpec` layer of a detector model (what it expects, its threshold and info)."""
    for layer in model.layers:
        if isinstance(layer, DetectorSpec):
            return layer
    raise TfbdError(f"model '{model.name}' is not a tfbackdoor detector (no DetectorSpec layer)")
