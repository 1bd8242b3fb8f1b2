"""Export a detector as a LiteRT (``.tflite``) screener: raw uint8 pixels in, P(poisoned) out.

The package, one concern a module (this one orchestrates :func:`export` and re-exports the public names):
:mod:`.layer` (:class:`FoldedDCTNormalization`), :mod:`.folds` (BatchNorm folds), :mod:`.graph`
(:func:`build_screener`), :mod:`.calibration` (:func:`representative_images`), :mod:`.flatbuffer`
(op lists and rewrites of the ``.tflite``), :mod:`.convert` (:func:`convert`), :mod:`.spectral`
(the sidecar's ``"spectral"`` entry) and :mod:`.runtime` (:func:`tflite_scores`, :func:`describe`).

The screener runs the whole detector on a device without TensorFlow (see ``edge/screen.py``):

* input: ONE uint8 tensor ``[1, H, W, 3]`` of RGB pixels 0..255 (static batch 1: an int8 model
  with a dynamic batch dimension does not load in LiteRT);
* output: ONE float32 tensor ``[1, 1]`` = P(poisoned);
* TFLite builtin ops only (never Flex/Select-TF ops; :func:`check_builtin_only`);
* a sidecar ``OUT.json`` (same stem) with ``threshold``, ``image_size``, ``quantize``, ``source``
  and ``sha256`` of the ``.tflite``;
* a detector with a clean-spectrum anomaly part (:mod:`tfbackdoor.spectral`): the ``.tflite`` is
  its CNN (``build_screener`` stops at ``probs``), and the sidecar gets a ``"spectral"`` entry
  (:mod:`.spectral`) from which ``edge/screen.py`` recomputes the anomaly ratio in numpy and
  combines it with the CNN's P(poisoned) as the detector does.

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
an ``(H*W)^2`` matrix, so it is used up to 32x32 px. Above, ``fold="basis"`` computes the DCT as
small basis matmuls (``X D_W^T`` then ``D_H``: two ``FULLY_CONNECTED`` of ``W x W`` and ``H x H``
weights shared by the channels), with per-column scales that give the int8 intermediate unit RMS
per column, and the rest of the normalisation as a per-channel-per-frequency scale and offset
(``1 x 1`` ``DEPTHWISE_CONV_2D`` layers, one int8 weight scale per frequency). One order alone
leaves some frequencies in an intermediate column dominated by others (the vertical detail of the
row means: ~400x its own RMS at 128 px), where int8 noise reads as a trigger; so both orders are
computed and each frequency is taken from the one whose intermediate is scaled for it
(:func:`.layer.basis_fold`). ``fold="separable"`` (one order, a depthwise ``H x 1`` convolution
per column) is exact in float but less precise in int8, and TFLite's calibration of a depthwise
layer of more than ~4,096 channels takes many minutes.

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
from pathlib import Path

from edge.screen import make_sidecar

from .. import detector as detector_mod
from ..atomic import sidecar_path, write_bytes
from ..errors import TfbdError
from .calibration import DEFAULT_CALIBRATION, representative_images
from .convert import QUANTIZE_MODES, convert
from .flatbuffer import add_float_logistic, check_builtin_only, float_islands, fuse_int8_elu, list_ops
from .folds import fold_batchnorm
from .graph import FOLDS, HEADS, _resolve_fold, _resolve_head, build_screener, screener_scores
from .layer import FoldedDCTNormalization
from .runtime import describe, interpreter, tflite_scores
from .spectral import describe_entry, sidecar_entry

DEFAULT_CLIP = 8.0       # int8: normalised DCT values saturate at +-8 (clean images stay within ~+-8)
DEFAULT_TAIL = 1e-3      # int8: share of each activation's calibration values left outside its range
DEFAULT_FOLD_BN = "last"  # int8: fold only the BatchNorm after the last convolution (into the head)


def export(detector_path, out, quantize="int8", calibration=DEFAULT_CALIBRATION, calibration_size=300,
           seed=0, fold="auto", head="auto", clip=None, tail=None, fold_bn=None, trigger_dir=None,
           echo=None) -> dict:
    """Export the detector at ``detector_path`` to a screener ``.tflite`` at ``out`` (+ sidecar).

    Checks builtin-only ops, the uint8 ``[1, H, W, 3]`` input (scale 1 for int8) and the
    ``[1, 1]`` float output, and that the ``.tflite`` runs; both files are written atomically.
    Returns a summary dict (also the sidecar's content plus ``ops``; a ``spectral`` entry without its scale bytes).
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
        clip = DEFAULT_CLIP if (quantize == "int8" and fold_r in ("fc", "basis")) else 0
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
    spectral_part = sidecar_entry(model)
    if spectral_part is not None:
        side["spectral"] = spectral_part
    write_bytes(out, tfl)
    write_bytes(sidecar_path(out), (json.dumps(side, indent=2) + "\n").encode())
    if spectral_part is not None:
        side["spectral"] = describe_entry(spectral_part)
    return {**side, "out": str(out), "sidecar": str(sidecar_path(out)), "bytes": len(tfl), "ops": info["ops"],
            "float_ops_between": info["float_ops_between"], "op_list": op_list}


__all__ = ["export", "FoldedDCTNormalization", "fold_batchnorm", "build_screener", "screener_scores",
           "representative_images", "list_ops", "check_builtin_only", "fuse_int8_elu", "add_float_logistic", "convert",
           "interpreter", "tflite_scores", "describe", "QUANTIZE_MODES", "FOLDS", "HEADS", "DEFAULT_CALIBRATION",
           "float_islands", "DEFAULT_CLIP", "DEFAULT_TAIL", "DEFAULT_FOLD_BN", "sidecar_entry"]
