"""Running a screener ``.tflite`` with LiteRT (``ai_edge_litert``): interpreters, scores, a description."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .flatbuffer import float_islands, list_ops


def interpreter(tflite, num_threads=None):
    """A LiteRT interpreter (``ai_edge_litert``) for a path or bytes, tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(tflite, (bytes, bytearray)):
        it = Interpreter(model_content=bytes(tflite), num_threads=num_threads)
    else:
        it = Interpreter(model_path=str(tflite), num_threads=num_threads)
    it.allocate_tensors()
    return it


def spectral_part(tflite):
    """The :class:`edge.screen.SpectralPart` of the sidecar beside a screener path, else ``None``."""
    from edge.screen import SpectralPart, read_sidecar

    if isinstance(tflite, (bytes, bytearray)) or hasattr(tflite, "invoke"):
        return None
    _, side = read_sidecar(Path(tflite))
    return SpectralPart(side["spectral"]) if side.get("spectral") is not None else None


def tflite_scores(tflite, images, num_threads=None, return_latency=False, spectral="auto"):
    """P(poisoned) of uint8 images ``(N, H, W, 3)`` through a screener ``.tflite`` (batch 1).

    ``tflite`` is a path, bytes, or an already allocated interpreter (reused as is, e.g. for
    repeated timing rounds). With ``return_latency`` also returns per-image
    set_tensor + invoke + get_tensor times in ms. ``spectral``: ``"auto"`` combines the
    ``.tflite``'s scores with the spectral part of the sidecar beside a path, when it has one,
    as ``edge/screen.py`` does (the screener's scores; the latency then includes it); ``None``:
    the ``.tflite`` alone; or an :class:`edge.screen.SpectralPart`.
    """
    part = spectral_part(tflite) if spectral == "auto" else spectral
    it = tflite if hasattr(tflite, "invoke") else interpreter(tflite, num_threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    images = np.asarray(images)
    dtype = np.dtype(inp["dtype"])
    scores = np.empty(len(images), np.float64)
    lat = np.empty(len(images), np.float64)
    oscale, ozp = out["quantization"]
    for i in range(len(images)):
        x = images[i:i + 1]
        if dtype == np.int8:
            x = (x.astype(np.int16) - 128).astype(np.int8)
        else:
            x = x.astype(dtype)
        t0 = time.perf_counter()
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])
        lat[i] = (time.perf_counter() - t0) * 1000.0
        v = y.reshape(-1)[-1]
        scores[i] = (float(v) - ozp) * oscale if np.issubdtype(y.dtype, np.integer) else float(v)
        if part is not None:
            scores[i] = part.combine(scores[i], part.ratio(images[i])[0])
            lat[i] = (time.perf_counter() - t0) * 1000.0
    return (scores, lat) if return_latency else scores


def describe(tflite) -> dict:
    """Input/output details and op counts of a ``.tflite`` (for the command's report)."""
    b = Path(tflite).read_bytes() if not isinstance(tflite, (bytes, bytearray)) else bytes(tflite)
    it = interpreter(b)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    op_list = list_ops(b)
    counts = {}
    for name in op_list:
        counts[name] = counts.get(name, 0) + 1
    return {"input": {"shape": [int(v) for v in i["shape"]], "dtype": np.dtype(i["dtype"]).name,
                      "quantization": [float(i["quantization"][0]), int(i["quantization"][1])]},
            "output": {"shape": [int(v) for v in o["shape"]], "dtype": np.dtype(o["dtype"]).name},
            "ops": counts, "float_ops_between": float_islands(b), "bytes": len(b)}
