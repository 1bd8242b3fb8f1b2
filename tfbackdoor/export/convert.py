"""Conversion of a screener graph to ``.tflite`` bytes (int8, int16x8, float16, float32), with the
int8 activation ranges calibrated on tail quantiles."""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

from ..errors import TfbdError
from .flatbuffer import _schema, add_float_logistic, fuse_int8_elu

QUANTIZE_MODES = ("int8", "int16x8", "float16", "float32")


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
