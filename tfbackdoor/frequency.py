"""Frequency transforms: the orthonormal type-II 2-D DCT, per channel, and spectrum statistics.

Two implementations of the same transform (both basis matmuls):

* :func:`dct2d` / :func:`idct2d` are plain TensorFlow functions (one einsum with the DCT basis)
  that run inside ``tf.data`` maps, vectorised over the batch.
* :class:`DCT2D` is a Keras layer that multiplies by fixed DCT basis matrices with
  ``keras.ops.matmul``. A model containing it converts to TFLite with builtin ops only
  (``tf.signal.dct`` needs Flex ops), so it is what the exported screener uses.

Convention (as in the paper): the DCT is taken of pixel values in 0..255.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def dct2d(x):
    """Orthonormal type-II 2-D DCT of each channel.

    Args:
      x: ``(N, H, W, C)`` or ``(H, W, C)`` tensor; integer inputs are cast to float32.
        Pass pixel values in 0..255 to follow the paper's convention.

    Returns:
      Float tensor of the same shape; ``out[n, u, v, c]`` is the coefficient of vertical
      frequency ``u`` and horizontal frequency ``v``. Equal to
      ``scipy.fft.dctn(x, type=2, norm="ortho", axes=(1, 2))``.
    """
    return _basis_transform(x, inverse=False)


def idct2d(x):
    """Inverse of :func:`dct2d` (the orthonormal type-III DCT along H and W)."""
    return _basis_transform(x, inverse=True)


_BASES = {}


def _basis(n):
    if n not in _BASES:
        _BASES[n] = dct_matrix(n).astype(np.float32)
    return _BASES[n]


def _basis_transform(x, inverse):
    """``D_H X D_W^T`` per channel (or ``D_H^T Y D_W``) as one einsum with the DCT basis.

    Why not ``tf.signal.dct``: at the sizes detectors use (32..224 px) its FFT route runs 2-2.6x
    slower than two small matmuls on a CPU (measured by benchmarks/throughput.py), and it fails on
    an empty batch. The values agree to float32 rounding.
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    dh = tf.constant(_basis(int(x.shape[-3])), x.dtype)
    dw = tf.constant(_basis(int(x.shape[-2])), x.dtype)
    if inverse:
        return tf.einsum("uh,...uvc,vw->...hwc", dh, x, dw)
    return tf.einsum("uh,...hwc,vw->...uvc", dh, x, dw)


def dct_matrix(n: int) -> np.ndarray:
    """The ``(n, n)`` orthonormal DCT-II matrix ``D`` with ``dct(x) = D @ x`` (float64)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


@keras.saving.register_keras_serializable(package="tfbackdoor")
class DCT2D(keras.layers.Layer):
    """Orthonormal type-II 2-D DCT per channel, as two fixed basis matmuls.

    Computes ``Y_c = D_H @ X_c @ D_W^T`` for each channel ``c``, the same values as
    :func:`dct2d`, using only ``keras.ops`` (transpose + matmul), so it converts to TFLite
    builtin ops.

    Args:
      inverse: if True compute the inverse transform (``D^T @ Y @ D``).
      scale: constant multiplied into the input first (e.g. 255.0 when the input is float
        in [0, 1] and the detector expects 0..255 DCT inputs).

    Input shape: ``(batch, H, W, C)``; any numeric dtype (cast to the compute dtype).
    Output shape: same as the input, float.
    """

    def __init__(self, inverse: bool = False, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.inverse = bool(inverse)
        self.scale = float(scale)

    def build(self, input_shape):
        h, w = int(input_shape[1]), int(input_shape[2])
        dh, dw = dct_matrix(h), dct_matrix(w)
        if self.inverse:
            dh, dw = dh.T, dw.T
        # Fixed (non-trainable) constants, not weights: nothing to save or train.
        self._left = ops.convert_to_tensor(dh.astype("float32") * self.scale)
        self._right = ops.convert_to_tensor(dw.T.astype("float32"))
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        x = ops.transpose(x, (0, 3, 1, 2))                     # N C H W
        x = ops.matmul(ops.matmul(self._left, x), self._right)  # D_H X D_W^T
        return ops.transpose(x, (0, 2, 3, 1))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"inverse": self.inverse, "scale": self.scale})
        return config


def low_frequency_mask(h: int, w: int, fraction: float = 0.5) -> np.ndarray:
    """Boolean ``(h, w)`` mask of the low-frequency block ``u < fraction*h and v < fraction*w``.

    With the default 0.5 the block is the low-frequency *quarter* of the spectrum's area.
    """
    return (np.arange(h)[:, None] < fraction * h) & (np.arange(w)[None, :] < fraction * w)


def high_frequency_ratio(coeffs, fraction: float = 0.5):
    """Share of AC energy outside the low-frequency quarter, per image.

    ``ratio = sum_{(u,v) not in L} c_uv^2 / sum_{(u,v) != (0,0)} c_uv^2`` summed over channels,
    where ``L`` is :func:`low_frequency_mask` (``u < H/2`` and ``v < W/2``). The DC term is left
    out of the denominator because it only measures brightness. Natural images
    (~1/f^2 spectra) give small ratios; sharp trigger patches raise it.

    Args:
      coeffs: DCT coefficients ``(N, H, W, C)``.

    Returns:
      ``(N,)`` float tensor in [0, 1].
    """
    coeffs = tf.convert_to_tensor(coeffs, tf.float32)
    h, w = coeffs.shape[1], coeffs.shape[2]
    energy = tf.reduce_sum(tf.square(coeffs), axis=-1)  # N H W
    hf = tf.constant(~low_frequency_mask(h, w), tf.float32)
    ac = tf.constant(np.pad(np.zeros((1, 1)), ((0, h - 1), (0, w - 1)), constant_values=1.0), tf.float32)
    num = tf.reduce_sum(energy * hf, axis=[1, 2])
    den = tf.reduce_sum(energy * ac, axis=[1, 2])
    return num / tf.maximum(den, 1e-12)


class SpectrumStats:
    """Streaming mean log-magnitude DCT spectrum and high-frequency energy of a set of images.

    ``update`` takes batches of uint8 images ``(N, H, W, 3)`` (any number of batches, so the set
    can be larger than memory); ``result()`` returns

    * ``mean_log_spectrum``: ``(H, W)`` numpy array, the mean over images and channels of
      ``log10(|DCT| + 1)`` of 0..255 pixel values;
    * ``hf_ratio``: the set's pooled high-frequency energy ratio (see :func:`high_frequency_ratio`,
      numerator and denominator summed over the set) and ``hf_ratio_mean`` (mean of per-image ratios);
    * ``n``: images seen.
    """

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction
        self.n = 0
        self._sum_log = None
        self._hf = 0.0
        self._ac = 0.0
        self._ratio_sum = 0.0

    def update(self, images):
        c = dct2d(tf.cast(images, tf.float32))
        h, w = c.shape[1], c.shape[2]
        log_mag = tf.reduce_sum(tf.math.log(tf.abs(c) + 1.0) / math.log(10.0), axis=[0, 3]).numpy()
        energy = tf.reduce_sum(tf.square(c), axis=[0, 3]).numpy().astype(np.float64)
        hf_mask = ~low_frequency_mask(h, w, self.fraction)
        ac_mask = np.ones((h, w), bool)
        ac_mask[0, 0] = False
        self._hf += float(energy[hf_mask].sum())
        self._ac += float(energy[ac_mask].sum())
        self._ratio_sum += float(tf.reduce_sum(high_frequency_ratio(c, self.fraction)))
        channels = c.shape[3]
        self._sum_log = log_mag / channels if self._sum_log is None else self._sum_log + log_mag / channels
        self.n += int(c.shape[0])

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no images were added")
        return {
            "mean_log_spectrum": self._sum_log / self.n,
            "hf_ratio": self._hf / max(self._ac, 1e-12),
            "hf_ratio_mean": self._ratio_sum / self.n,
            "n": self.n,
        }
