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


#: Largest channel count of one ``DEPTHWISE_CONV_2D`` in the basis fold: TFLite's calibrator takes
#: 0.2 s for a 1x1 depthwise layer of 4,096 channels and many minutes for one of 6,144 (measured
#: here), so the per-frequency scale of the ``H*W*C`` values is split into layers of at most this many.
BASIS_DW_MAX_CHANNELS = 4096


def _basis_path(d_first, d_second, mean, ey2, std, chosen):
    """One order of the separable DCT for :func:`basis_fold`, on statistics laid out ``(p, q, C)``
    where the first matmul contracts the pixel axis of ``q`` (``T = X D_q^T``) and the second
    that of ``p``: ``(k1, b1, k2, scale, corr)`` with ``T' = (X D_q^T - o) / s`` per column ``q``,
    ``Y' = diag(1/a) D_p T'``, so ``Y = a_p s_q Y' + o_q sum D_p[p, :]``; ``scale = a_p s_q / std``.

    ``o_q``/``s_q``: the mean over rows and RMS of column ``q`` of ``T`` (from the statistics:
    ``T = D_p^T Y`` per column, ``D_p`` orthonormal). ``a_p``: the geometric mean over the
    frequencies of row ``p`` this order computes (``chosen``) of the RMS of ``Y / s_q``, so ``Y'``
    has about unit RMS there (the largest, for a row with none chosen: then ``Y'`` stays small).
    """
    mean_t = np.einsum("uh,uvc->hvc", d_second, mean)
    off = mean_t.mean(axis=(0, 2))
    s = np.sqrt(np.maximum(ey2.mean(axis=(0, 2)) - off ** 2, 1e-6))
    log_rms = 0.5 * np.log(np.maximum(ey2, 1e-12)) - np.log(s)[None, :, None]
    a = np.array([np.exp(log_rms[i][chosen[i]].mean()) if chosen[i].any() else np.exp(log_rms[i].max())
                  for i in range(len(log_rms))])
    scale = (a[:, None] * s[None, :])[..., None] / std
    corr = np.outer(d_second.sum(axis=1), off)[..., None]
    return d_first.T / s[None, :], -off / s, d_second.T / a[None, :], scale, corr


def basis_fold(dh, dw, mean, std, out_scale=1.0):
    """The constants of ``fold="basis"``: a dict with, for the row-first order ``"a"``
    (``T = X D_W^T``, then ``D_H``) and the column-first order ``"b"`` (``T = D_H X``, then
    ``D_W``), the first matmul's weights and bias (``k1_a``/``b1_a``, ``k1_b``/``b1_b``) and the
    second's weights (``k2_a``, ``k2_b``), and ``(H, W, C)`` arrays ``scale_a``, ``scale_b`` and
    ``offset`` such that ``z = Y'_a * scale_a + Y'_b * scale_b + offset = ((Y - mean) / std) /
    out_scale``, each frequency taken from one order (the other's scale is 0).

    Why two orders. The intermediate ``T = X D_W^T`` of the row-first order is one int8 tensor; its
    column ``v`` holds all vertical frequencies ``u`` of that horizontal frequency, and its
    quantization noise, spread evenly over ``u`` by ``D_H``, is ``s_v / std[u, v]`` times larger
    in normalised units than at the column's RMS ``s_v``: ~400x for the vertical high frequencies
    of column 0 at 128 px (the row means are large, their vertical detail tiny), which the
    detector reads as a trigger. The column-first order has the mirror problem (row 0). Each
    frequency is taken from the order whose intermediate is better scaled for it
    (``s_v`` vs ``s_u``), so no frequency gets more than ~5x the noise of its own RMS.
    """
    ey2 = std ** 2 + mean ** 2                                   # E[Y^2] per (u, v, c)
    col_rms = np.sqrt(ey2.mean(axis=(0, 2)))                     # RMS of column v of X D_W^T
    row_rms = np.sqrt(ey2.mean(axis=(1, 2)))                     # RMS of row u of D_H X
    use_a = (col_rms[None, :, None] <= row_rms[:, None, None]) | np.zeros(std.shape, bool)
    k1a, b1a, k2a, scale_a, corr_a = _basis_path(dw, dh, mean, ey2, std, use_a)
    t = (1, 0, 2)
    k1b, b1b, k2b, scale_b, corr_b = _basis_path(dh, dw, mean.transpose(t), ey2.transpose(t), std.transpose(t),
                                                 (~use_a).transpose(t))
    scale_b, corr_b = scale_b.transpose(t), corr_b.transpose(t)
    corr = np.where(use_a, corr_a, corr_b)
    return {"k1_a": k1a, "b1_a": b1a, "k2_a": k2a, "k1_b": k1b, "b1_b": b1b, "k2_b": k2b,
            "scale_a": np.where(use_a, scale_a, 0.0) / out_scale,
            "scale_b": np.where(use_a, 0.0, scale_b) / out_scale,
            "offset": (corr - mean) / std / out_scale}


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
      ``CONV_2D`` + ``DEPTHWISE_CONV_2D``; exact, but slow to calibrate from 64 px on);
    * ``fold="basis"``: the DCT as small basis matmuls shared by the channels, in both orders:
      ``Y'_a = diag(1/a) D_H (X D_W^T - o) diag(1/s)`` and its mirror ``Y'_b`` (column transform
      first), each two ``FULLY_CONNECTED`` of ``W x W`` / ``H x H`` weights whose per-column
      offsets and scales give the int8 intermediate tensor unit RMS per column and bring ``Y'``
      near unit RMS per frequency; then the rest of the per-frequency normalisation as a
      per-channel-per-frequency scale and offset, each frequency from the better-scaled order
      (:func:`basis_fold`): ``1 x 1`` ``DEPTHWISE_CONV_2D`` layers over the ``H*W*C`` values
      (chunks of :data:`BASIS_DW_MAX_CHANNELS`; each scale its own int8 weight scale, so exact)
      and an ``ADD`` of the two orders. Used for int8 inputs larger than 32x32:
      ``4 (H^2 W + H W^2) C`` multiply-adds instead of ``(H W)^2 C``.

    Args:
      mean, variance: ``(H, W, C)`` per-frequency statistics of the DCT (a detector's
        ``input_norm`` layer); ``std = max(sqrt(variance), 1e-7)`` as in ``Normalization``.
      fold: ``"fc"``, ``"separable"`` or ``"basis"``.
      clip: if set, normalised values are clipped to ``[-clip, clip]`` (computed as
        ``clip * min(max(z / clip, -1), 1)`` so that the converter fuses a ``RELU_N1_TO_1`` into
        the ``FULLY_CONNECTED`` and the int8 scale of that tensor covers exactly ``+-clip``
        instead of the largest value met in calibration).
      scaled_output: with ``clip`` and ``fold="fc"`` or ``"basis"``, return ``z / clip`` (in ``[-1, 1]``) and
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
        if fold not in ("fc", "separable", "basis"):
            raise ValueError(f"fold must be 'fc', 'separable' or 'basis', got {fold!r}")
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
        elif self.fold == "basis":
            f = basis_fold(dh, dw, self.mean, std, self.clip or 1.0)
            self._mats = {k: ops.convert_to_tensor(f[k].astype("float32"))
                          for k in ("k1_a", "b1_a", "k2_a", "k1_b", "b1_b", "k2_b")}
            # Values in (c, v, u) order (the row-first order's second matmul leaves them so), cut into
            # chunks; per chunk the depthwise scales of the orders it takes values from (+ the offset).
            flat = {k: f[k].transpose(2, 1, 0).reshape(-1) for k in ("scale_a", "scale_b", "offset")}
            n, step = flat["offset"].size, BASIS_DW_MAX_CHANNELS
            self._cuts = list(range(step, n, step))
            edges = [0] + self._cuts + [n]
            self._chunks = []
            for lo, hi in zip(edges, edges[1:]):
                kernels = {o: ops.convert_to_tensor(flat["scale_" + o][lo:hi].reshape(1, 1, -1, 1).astype("float32"))
                           for o in ("a", "b") if np.any(flat["scale_" + o][lo:hi])}
                self._chunks.append((kernels, ops.convert_to_tensor(flat["offset"][lo:hi].astype("float32"))))
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
        if self.fold == "basis":
            m = self._mats
            # Row-first order: T' = X D_W^T (rows (n, c, h), columns v), then D_H: Y'_a in (n, c, v, u).
            t = ops.matmul(ops.reshape(ops.transpose(x, (0, 3, 1, 2)), (-1, w)), m["k1_a"]) + m["b1_a"]
            t = ops.reshape(ops.transpose(ops.reshape(t, (-1, c, h, w)), (0, 1, 3, 2)), (-1, h))
            ya = ops.reshape(ops.matmul(t, m["k2_a"]), (-1, 1, 1, c * w * h))
            # Column-first order: T' = D_H X (rows (n, c, w), columns u), then D_W: Y'_b in (n, c, u, v).
            t = ops.matmul(ops.reshape(ops.transpose(x, (0, 3, 2, 1)), (-1, h)), m["k1_b"]) + m["b1_b"]
            t = ops.reshape(ops.transpose(ops.reshape(t, (-1, c, w, h)), (0, 1, 3, 2)), (-1, w))
            yb = ops.reshape(ops.matmul(t, m["k2_b"]), (-1, c, h, w))
            yb = ops.reshape(ops.transpose(yb, (0, 1, 3, 2)), (-1, 1, 1, c * w * h))   # (n, c, v, u) too
            parts = {"a": ops.split(ya, self._cuts, axis=-1) if self._cuts else [ya],
                     "b": ops.split(yb, self._cuts, axis=-1) if self._cuts else [yb]}
            zs = []
            for i, (kernels, offset) in enumerate(self._chunks):
                terms = [ops.depthwise_conv(parts[o][i], k, strides=1, padding="valid") for o, k in kernels.items()]
                z = terms[0] + offset if len(terms) == 1 else terms[0] + (terms[1] + offset)
                zs.append(ops.clip(z, -1.0, 1.0) if self.clip else z)   # clip per chunk: fused into its op
            y = ops.concatenate(zs, axis=-1) if len(zs) > 1 else zs[0]  # z / clip (n, 1, 1, c*v*u)
            y = ops.transpose(ops.reshape(y, (-1, c, w, h)), (0, 3, 2, 1))         # (n, u, v, c)
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
