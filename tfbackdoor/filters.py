"""Image filters shared by the triggers and the smooth-trigger search: the paper's Gaussian low-pass
filter and the per-image min-max rescale.

* :func:`gaussian_kernel` -- the 1-D kernel; :func:`low_pass` -- the separable filter (the one
  implementation); :class:`LowPass` -- the same filter as a serialisable Keras layer.
* :func:`minmax_scale` -- each image rescaled linearly to [0, 1] (the rule ``M`` of smooth triggers).

The low-pass filter ``g`` is the paper's: a separable Gaussian of ``sigma = 6`` px and 30 taps,
with zero padding (output size == input size), applied per channel by depthwise convolution.
Like :mod:`tfbackdoor.frequency` this is a ground-floor module: it imports nothing of ours but
:mod:`tfbackdoor.errors`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .errors import TfbdError

SIGMA = 6.0
TAPS = 30


def gaussian_kernel(sigma: float = SIGMA, taps: int = TAPS) -> np.ndarray:
    """The 1-D Gaussian ``exp(-((i - (taps - 1) / 2) / sigma)^2 / 2)``, ``i = 0..taps-1``, summing to 1.

    Returns float32 ``(taps,)``. The paper's filter is ``sigma = 6`` px with 30 taps.
    """
    if taps < 1 or sigma <= 0:
        raise TfbdError(f"low-pass filter: need taps >= 1 and sigma > 0 (got taps={taps}, sigma={sigma})")
    i = np.arange(taps, dtype=np.float64) - (taps - 1) / 2.0
    k = np.exp(-0.5 * (i / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _kernels(sigma, taps, channels, dtype=np.float32):
    k = gaussian_kernel(sigma, taps).astype(dtype)
    kv = np.tile(k.reshape(taps, 1, 1, 1), (1, 1, channels, 1))   # along H
    kh = np.tile(k.reshape(1, taps, 1, 1), (1, 1, channels, 1))   # along W
    return kv, kh


def low_pass(x, sigma: float = SIGMA, taps: int = TAPS):
    """Separable Gaussian low-pass of float NHWC ``x`` (or one HWC image), per channel.

    Depthwise convolution (``tf.nn.depthwise_conv2d``) along H then W with ``'SAME'`` zero
    padding: the output has the input's shape; pixels near the border see zeros outside the
    image (as the paper's filter). For an even number of taps the extra tap is on the
    trailing side (TensorFlow's ``SAME`` rule, the same split as the authors' padding).
    Integer inputs are cast to float32. Inside a ``tf.function`` the kernels are graph constants.
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    single = x.shape.rank == 3
    if single:
        x = x[tf.newaxis]
    kv, kh = _kernels(sigma, taps, int(x.shape[-1]), x.dtype.as_numpy_dtype)
    y = tf.nn.depthwise_conv2d(x, kv, strides=[1, 1, 1, 1], padding="SAME")
    y = tf.nn.depthwise_conv2d(y, kh, strides=[1, 1, 1, 1], padding="SAME")
    return y[0] if single else y


@keras.saving.register_keras_serializable(package="tfbackdoor")
class LowPass(keras.layers.Layer):
    """The paper's Gaussian low-pass filter as a Keras layer (computed by :func:`low_pass`).

    Args:
      sigma: standard deviation in pixels (paper: 6).
      taps: kernel length (paper: 30).

    Input shape: ``(batch, H, W, C)`` float. Output shape: the same (zero ``same`` padding).
    No weights; the kernel is a constant rebuilt from the config.
    """

    def __init__(self, sigma: float = SIGMA, taps: int = TAPS, **kwargs):
        super().__init__(**kwargs)
        self.sigma = float(sigma)
        self.taps = int(taps)
        gaussian_kernel(self.sigma, self.taps)  # validate early

    def call(self, inputs):
        return low_pass(keras.ops.cast(inputs, self.compute_dtype), self.sigma, self.taps)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"sigma": self.sigma, "taps": self.taps})
        return config


def minmax_scale(x, eps=1e-8):
    """Rescale each image of ``(N, H, W, C)`` linearly so its minimum is 0 and maximum 1 (no clipping)."""
    lo = tf.reduce_min(x, axis=[1, 2, 3], keepdims=True)
    hi = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    return (x - lo) / tf.maximum(hi - lo, eps)


__all__ = ["SIGMA", "TAPS", "gaussian_kernel", "low_pass", "LowPass", "minmax_scale"]
