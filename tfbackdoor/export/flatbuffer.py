"""Reading and editing ``.tflite`` flatbuffers: the op list, the builtin-only check, and two rewrites
of the converted model (int8 ELU fusion, a float LOGISTIC on the logit output).

Uses TensorFlow Lite's own schema and flatbuffer helpers (``tensorflow.lite.python`` /
``tensorflow.lite.tools``, imported when first needed).
"""

from __future__ import annotations

import numpy as np


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


def float_islands(tflite_bytes) -> list:
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
