"""The folded input layer of the int8 screener: the DCT and the detector's per-frequency
normalisation as one affine map (see :mod:`tfbackdoor.export` for why it is folded)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ..frequency import dct_matrix


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
