"""Tests for the standalone LiteRT screener in ``edge/``.

Tiny screener models are built here with TensorFlow (the screener itself must
not import it): each one scores an image by its mean brightness, so a white
image scores ~1 and a black one ~0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "edge" / "screen.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge import screen  # noqa: E402
from edge.screen import ModelError, Screener, encode_pixels, iter_sources, main, run  # noqa: E402

SIZE = 32


# --------------------------------------------------------------------------
# Tiny model builder
# --------------------------------------------------------------------------


def build_tiny_model(path: Path, kind: str) -> Path:
    """Write a tiny ``.tflite`` to ``path`` and return it.

    kinds:
      ``float``    uint8 [1,32,32,3] -> cast -> mean(pixels/255) -> float [1,1]
      ``softmax``  like float but output [1,2] = [1-m, m]
      ``uint8``    full-integer quantized, uint8 input and uint8 output
      ``int8``     full-integer quantized, int8 input (scale 1, zp -128) and int8 output
      ``vector``   NOT a screener: float input [1,10] -> [1,1]
    """
    import tensorflow as tf

    def brightness(pixels):
        return tf.reduce_mean(pixels / 255.0, axis=[1, 2, 3], keepdims=False)[:, None]

    if kind == "vector":
        spec = tf.TensorSpec([1, 10], tf.float32)
        fn = tf.function(lambda x: tf.reduce_mean(x, axis=1, keepdims=True), input_signature=[spec])
    elif kind in ("float", "softmax"):
        spec = tf.TensorSpec([1, SIZE, SIZE, 3], tf.uint8)

        def fn_impl(x):
            m = brightness(tf.cast(x, tf.float32))
            return tf.concat([1.0 - m, m], axis=1) if kind == "softmax" else m

        fn = tf.function(fn_impl, input_signature=[spec])
    elif kind in ("uint8", "int8"):
        spec = tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)
        fn = tf.function(brightness, input_signature=[spec])
    else:
        raise ValueError(kind)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    if kind in ("uint8", "int8"):
        def representative():
            rng = np.random.default_rng(0)
            for value in (0, 255):
                yield [np.full((1, SIZE, SIZE, 3), value, np.float32)]
            for _ in range(6):
                yield [rng.integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        dtype = tf.uint8 if kind == "uint8" else tf.int8
        converter.inference_input_type = dtype
        converter.inference_output_type = dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected..."
        path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """All test models, keyed by kind, plus ``random`` (random bytes)."""
    folder = tmp_path_factory.mktemp("models")
    built = {kind: build_tiny_model(folder / f"{kind}.tflite", kind)
             for kind in ("float", "softmax", "uint8", "int8", "vector")}
    built["random"] = folder / "random.tflite"
    built["random"].write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    for kind in ("float", "softmax", "uint8", "int8"):  # sidecars as the exporter writes them
        write_sidecar(built[kind])
    return built


def write_sidecar(model: Path, threshold: float = 0.5, **extra) -> Path:
    side = {"threshold": threshold, "image_size": [SIZE, SIZE],
            "sha256": hashlib.sha256(model.read_bytes()).hexdigest(), **extra}
    path = model.with_suffix(".json")
    path.write_text(json.dumps(side))
    return path


def solid(value: int, width: int = 40, height: int = 30) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def records(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python edge/screen.py ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))


def our_stderr(stderr: str) -> list:
    """stderr lines written by screen.py (not LiteRT's INFO lines)."""
    return [line for line in stderr.splitlines() if line.startswith("screen:")]


# --------------------------------------------------------------------------
# Screener library
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float", "softmax", "uint8", "int8"])
def test_white_scores_above_dark(models, kind):
    screener = Screener(models[kind])
    assert screener.input_size == (SIZE, SIZE)
    assert screener.threshold == 0.5
    white, dark = screener.score(solid(250)), screener.score(solid(10))
    assert white > 0.9 and dark < 0.1
    assert screener.verdict(white) == "poisoned" and screener.verdict(dark) == "clean"
    assert screener.score(solid(128)) == pytest.approx(128 / 255, abs=0.02)


def test_input_encoding():
    pixels = np.array([[0, 128, 255]], np.uint8)
    assert encode_pixels(pixels, np.uint8, (0.0, 0)).tolist() == [[0, 128, 255]]
    assert encode_pixels(pixels, np.int8, (1.0, -128)).tolist() == [[-128, 0, 127]]
    assert encode_pixels(pixels, np.int8, (2.0, -10)).tolist() == [[-10, 54, 118]]
    assert encode_pixels(pixels, np.int8, (0.5, 0)).tolist() == [[0, 127, 127]]  # clipped


def test_preprocess_crop_and_stretch(models):
    wide = np.zeros((SIZE, 3 * SIZE, 3), np.uint8)
    wide[:, SIZE:2 * SIZE] = 255  # white centre third
    assert Screener(models["float"], resize="crop").score(wide) == pytest.approx(1.0, abs=0.01)
    assert Screener(models["float"], resize="stretch").score(wide) == pytest.approx(1 / 3, abs=0.05)
    grey = Screener(models["float"]).preprocess(np.full((10, 20), 255, np.uint8))
    assert grey.shape == (1, SIZE, SIZE, 3) and grey.dtype == np.uint8 and grey.min() == 255


def test_sidecar_threshold(models, tmp_path):
    model = Path(shutil.copy(models["float"], tmp_path / "m.tflite"))
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps({"threshold": 0.9, "image_size": [SIZE, SIZE]}))
    assert Screener(model).threshold == 0.9
    assert Screener(model, threshold=0.2).threshold == 0.2
    sidecar.write_text(json.dumps({"threshold": 0.9, "image_size": [64, 64]}))
    with pytest.raises(ModelError, match="does not match"):
        Screener(model)
    sidecar.write_text("{not json")
    with pytest.raises(ModelError, match="sidecar"):
        Screener(model)


@pytest.mark.parametrize("kind, reason", [
    ("vector", "input shape [1, 10]"),
    ("random", "cannot load as a TFLite model"),
])
def test_not_a_screener(models, kind, reason):
    with pytest.raises(ModelError, match="not a tfbackdoor screener") as info:
        Screener(models[kind])
    assert reason in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------
# Files, folders, videos
# --------------------------------------------------------------------------


def make_image_folder(folder: Path) -> Path:
    """2 poisoned-looking (bright) + 2 clean (dark) images, 2 broken, 2 ignored."""
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(solid(250)).save(folder / "white.png")
    Image.fromarray(solid(5)).save(folder / "dark.jpg", quality=95)
    Image.fromarray(np.full((20, 20), 240, np.uint8)).save(folder / "sub" / "grey.bmp")
    Image.fromarray(np.full((20, 20, 4), 8, np.uint8), "RGBA").save(folder / "sub" / "rgba.PNG")
    (folder / "sub" / "notes.txt").write_text("ignored: not an image extension")
    (folder / ".hidden.png").write_text("ignored: hidden")
    (folder / "text.png").write_text("this is not a png")
    jpeg = folder / "sub" / "cut.jpeg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    return folder


def test_folder_reports_and_skips_broken_files(models, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs")
    assert main(["--model", str(models["int8"]), str(folder)]) == 1  # unreadable files: exit 1
    out, err = capsys.readouterr()
    lines = records(out)
    by_name = {Path(r["source"]).name: r for r in lines[:-1]}
    assert sorted(by_name) == ["cut.jpeg", "dark.jpg", "grey.bmp", "rgba.PNG", "text.png", "white.png"]
    assert by_name["white.png"]["verdict"] == "poisoned"
    assert by_name["grey.bmp"]["verdict"] == "poisoned"
    assert by_name["dark.jpg"]["verdict"] == "clean"
    assert by_name["rgba.PNG"]["verdict"] == "clean"
    assert "truncated" in by_name["cut.jpeg"]["error"].lower()
    assert "not a readable image" in by_name["text.png"]["error"]
    assert all(r["latency_ms"] >= 0 and set(r) == {"source", "score", "verdict", "latency_ms"}
               for r in by_name.values() if "error" not in r)
    timing = {k: lines[-1]["summary"][k] for k in ("mean_latency_ms", "frames_per_s", "elapsed_s")}
    assert lines[-1] == {"summary": {"n": 4, "poisoned": 2, "clean": 2, "errors": 2, **timing, "threshold": 0.5}}
    assert lines[-1]["summary"]["mean_latency_ms"] > 0
    assert len(err.strip().splitlines()) == 3 and "text.png" in err and "cut.jpeg" in err
    assert "2 input(s) missing, unreadable or empty" in err.strip().splitlines()[-1]


def test_files_threshold_and_missing_source(models, tmp_path, capsys):
    Image.fromarray(solid(200)).save(tmp_path / "a.png")
    assert main(["--model", str(models["uint8"]), "--threshold", "0.9",
                 str(tmp_path / "a.png"), str(tmp_path / "missing.jpg")]) == 1
    lines = records(capsys.readouterr().out)
    assert lines[0]["verdict"] == "clean" and lines[0]["score"] == pytest.approx(200 / 255, abs=0.01)
    assert lines[1] == {"source": str(tmp_path / "missing.jpg"), "error": "no such file or directory"}
    assert lines[2]["summary"]["threshold"] == 0.9
    assert (lines[2]["summary"]["n"], lines[2]["summary"]["errors"]) == (1, 1)


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring ``width x height`` with only a few rows of data (a few KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (3 * width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(models, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    bomb_png(folder / "bomb.png", 12000, 12000)  # 144 MP: Pillow alone only warns (432 MB decoded)
    Image.fromarray(solid(250)).save(folder / "ok.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert main(["--model", str(models["float"]), str(folder)]) == 1
    lines = records(capsys.readouterr().out)
    assert lines[0]["source"].endswith("bomb.png")
    assert lines[0]["error"].startswith("image too large: its header declares 12000x12000 = 144.0 megapixels")
    assert lines[1]["verdict"] == "poisoned" and lines[2]["summary"]["errors"] == 1
    monkeypatch.setenv("TFBD_MAX_PIXELS", "1000")  # configurable: 40 x 30 = 1200 px is now too large
    assert main(["--model", str(models["float"]), str(folder / "ok.png")]) == 1
    assert "more than the limit of 0.001" in records(capsys.readouterr().out)[0]["error"]


def test_missing_input_or_empty_folder_exits_1_after_the_rest(models, tmp_path):
    (tmp_path / "empty").mkdir()
    Image.fromarray(solid(0)).save(tmp_path / "k.png")
    result = cli("--model", str(models["float"]), str(tmp_path / "empty"), str(tmp_path / "k.png"))
    assert result.returncode == 1
    lines = records(result.stdout)
    assert lines[0] == {"source": str(tmp_path / "empty"), "error": "no image files in this folder"}
    assert lines[1]["verdict"] == "clean" and lines[2]["summary"]["n"] == 1
    result = cli("--model", str(models["float"]), str(tmp_path / "k.png"))
    assert result.returncode == 0


def test_missing_sidecar_needs_threshold(models, tmp_path):
    model = Path(shutil.copy(models["float"], tmp_path / "bare.tflite"))  # no sidecar beside it
    with pytest.raises(ModelError, match="no threshold: no sidecar bare.json beside it; pass --threshold T"):
        Screener(model)
    assert Screener(model, threshold=0.7).threshold == 0.7
    Image.fromarray(solid(250)).save(tmp_path / "w.png")
    result = cli("--model", str(model), str(tmp_path / "w.png"))
    assert result.returncode == 2 and result.stdout == ""
    (message,) = our_stderr(result.stderr)
    assert message.startswith(f"screen: {model}: no threshold")
    assert cli("--model", str(model), "--threshold", "0.5", str(tmp_path / "w.png")).returncode == 0
    write_sidecar(model, image_size=[SIZE, SIZE]).write_text(json.dumps({"image_size": [SIZE, SIZE]}))
    with pytest.raises(ModelError, match="has no threshold"):
        Screener(model)


def test_sidecar_sha256_must_match_the_model(models, tmp_path):
    model = Path(shutil.copy(models["float"], tmp_path / "m.tflite"))
    write_sidecar(model)
    assert Screener(model).threshold == 0.5
    shutil.copy(models["softmax"], model)  # the model swapped, the sidecar kept
    with pytest.raises(ModelError, match="sha256 does not match"):
        Screener(model, threshold=0.5)
    Image.fromarray(solid(250)).save(tmp_path / "w.png")
    result = cli("--model", str(model), str(tmp_path / "w.png"))
    assert result.returncode == 2 and result.stdout == ""
    (message,) = our_stderr(result.stderr)
    assert message == (f"screen: {tmp_path / 'm.json'}: sha256 does not match {model} (the model was replaced, "
                       "or the sidecar belongs to another model); use the sidecar exported with this model")


def write_video(path: Path, frames: int = 10) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 25, np.uint8))
    writer.release()
    return path


def test_video_every_and_max_frames(models, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi")
    assert main(["--model", str(models["float"]), "--every", "2", str(video)]) == 0
    lines = records(capsys.readouterr().out)
    assert [r["source"] for r in lines[:-1]] == [f"{video}#frame={i}" for i in (0, 2, 4, 6, 8)]
    scores = [r["score"] for r in lines[:-1]]
    assert scores == sorted(scores) and scores[0] < 0.05 and scores[-1] > 0.7  # frame 8 = 200/255
    assert lines[-1]["summary"]["n"] == 5
    assert main(["--model", str(models["float"]), "--every", "3", "--max-frames", "2", str(video)]) == 0
    lines = records(capsys.readouterr().out)
    assert [r["source"] for r in lines[:-1]] == [f"{video}#frame=0", f"{video}#frame=3"]


def test_summary_only_and_broken_video(models, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", frames=4)
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    assert main(["--model", str(models["float"]), "--summary-only", str(video), str(broken)]) == 1
    out, err = capsys.readouterr()
    (line,) = records(out)
    assert (line["summary"]["n"], line["summary"]["errors"]) == (4, 1)
    assert "broken.mp4: cannot open video" in err


def test_out_file_rows_and_frames_per_s(models, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", frames=4)
    Image.fromarray(solid(250)).save(tmp_path / "w.png")
    missing = tmp_path / "gone.mp4"
    out = tmp_path / "rows.csv"
    assert main(["--model", str(models["float"]), "--out", str(out), str(tmp_path / "w.png"), str(video),
                 str(missing)]) == 1
    lines = records(capsys.readouterr().out)
    assert [r.get("frame") for r in lines[:-2]] == [None, 0, 1, 2, 3]   # images have no frame index
    summary = lines[-1]["summary"]
    assert summary["n"] == 5 and summary["frames_per_s"] > 0 and summary["elapsed_s"] >= 0
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(screen.ROW_FIELDS)
    assert [(r["frame"], r["flagged"], r["verdict"]) for r in rows[:2]] == [("", "True", "poisoned"), ("0", "False", "clean")]
    assert rows[-1]["source"] == str(missing) and rows[-1]["error"] == "no such file or directory"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".rows.csv")] == []   # no temporary left
    jsonl = tmp_path / "rows.jsonl"
    assert main(["--model", str(models["float"]), "--summary-only", "--out", str(jsonl), str(video)]) == 0
    got = records(jsonl.read_text())
    assert [r["frame"] for r in got[:-1]] == [0, 1, 2, 3] and got[-1]["summary"]["n"] == 4
    assert main(["--model", str(models["float"]), "--out", str(tmp_path / "rows.txt"), str(video)]) == 2
    assert "--out must end in .csv or .jsonl" in capsys.readouterr().err


def test_video_without_opencv_names_the_extra(models, tmp_path, capsys, monkeypatch):
    video = write_video(tmp_path / "clip.avi", frames=2)
    monkeypatch.setitem(sys.modules, "cv2", None)   # import cv2 -> ImportError
    assert main(["--model", str(models["float"]), str(video)]) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "clip.avi" in line]
    assert line == (f"screen: {video}: video and camera input need OpenCV: pip install 'tfbackdoor[video]' "
                    "(or opencv-python-headless alone beside screen.py)")


DATA = Path(os.environ.get("TFBD_DATA", ROOT.parent / "shared" / "data"))
SHIPPED = ROOT / "saved_models" / "screener_cifar10_int8.tflite"


def test_generated_video_with_shipped_screener(tmp_path):
    """20 frames of camera photos, every other one with a BadNets-like white square at the
    screener's scale (4/32 of the frame height, bottom-right), screened by the shipped int8 model."""
    import cv2

    photos = sorted((DATA / "natural" / "camera").glob("*.jpg"))[:10]
    if len(photos) < 10 or not SHIPPED.is_file():
        pytest.skip(f"needs 10 photos in {DATA / 'natural' / 'camera'} and {SHIPPED}")
    width, height = 298, 224   # 4:3 camera frames
    side, margin = height * 4 // 32, height // 32
    video = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    assert writer.isOpened()
    triggered = []
    for i in range(20):
        frame = np.asarray(Image.open(photos[i // 2]).convert("RGB").resize((width, height), Image.BILINEAR)).copy()
        if i % 2:
            left = (width + height) // 2 - margin - side   # inside the centre square (seen by crop and stretch)
            frame[height - margin - side:height - margin, left:left + side] = 255
        triggered.append(bool(i % 2))
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    out = tmp_path / "frames.csv"
    result = cli("--model", str(SHIPPED), "--out", str(out), "--summary-only", str(video))
    assert result.returncode == 0, result.stderr
    (line,) = records(result.stdout)
    summary = line["summary"]
    assert (summary["n"], summary["errors"]) == (20, 0) and summary["frames_per_s"] > 0
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in rows] == list(range(20))
    assert all(r["source"] == f"{video}#frame={r['frame']}" and r["error"] == "" for r in rows)
    scores = np.array([float(r["score"]) for r in rows])
    assert all((r["flagged"] == "True") == (float(r["score"]) > summary["threshold"]) for r in rows)
    assert scores[triggered].mean() > scores[~np.array(triggered)].mean() + 0.15, scores.round(3)


@pytest.mark.parametrize("name, content", [("broken.avi", b"RIFF\x00\x00\x00\x00AVI junk" * 10),
                                           ("broken.mp4", bytes(range(256)) * 12)])
def test_corrupt_video_is_one_line_error(tmp_path, name, content):
    broken = tmp_path / name
    broken.write_bytes(content)
    result = cli("--model", str(SHIPPED), "--summary-only", str(broken))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO:")]
    assert lines[0] == f"screen: {broken}: cannot open video (unsupported codec or corrupt file)", lines
    assert len(lines) == 2 and "1 input(s) missing, unreadable or empty" in lines[1]   # nothing from OpenCV/FFmpeg
    assert records(result.stdout)[0]["summary"]["errors"] == 1


# --------------------------------------------------------------------------
# Camera (faked capture: no device needed)
# --------------------------------------------------------------------------


class FakeCapture:
    """Delivers ``frames`` BGR frames, then fails (or raises ``interrupt_at``)."""

    def __init__(self, frames: int, interrupt_at: int = -1):
        self.frames, self.interrupt_at, self.read_count, self.released = frames, interrupt_at, 0, False

    def _next(self) -> bool:
        if self.read_count == self.interrupt_at:
            raise KeyboardInterrupt
        self.read_count += 1
        return self.read_count <= self.frames

    def read(self):
        ok = self._next()
        return ok, (np.full((48, 64, 3), 255, np.uint8) if ok else None)

    def grab(self):
        return self._next()

    def release(self):
        self.released = True


@pytest.mark.parametrize("interrupt_at, expected", [(-1, 3), (4, 2)])
def test_camera_stop_and_interrupt_end_with_summary(models, monkeypatch, capsys, interrupt_at, expected):
    fake = FakeCapture(frames=6, interrupt_at=interrupt_at)
    monkeypatch.setattr(screen, "open_capture", lambda target, is_camera=False: fake)
    summary = run(Screener(models["float"]), iter_sources([], every=2, camera="0"))
    out, err = capsys.readouterr()
    lines = records(out)
    assert [r["source"] for r in lines[:-1]] == [f"camera:0#frame={i}" for i in range(0, 2 * expected, 2)]
    assert lines[-1] == {"summary": summary} and summary["poisoned"] == expected
    assert fake.released
    assert ("interrupted" in err) == (interrupt_at >= 0)


def test_camera_that_cannot_open(models, monkeypatch, capsys):
    def refuse(target, is_camera=False):
        raise screen.UnreadableInput("cannot open camera (no such device, or it is busy)")

    monkeypatch.setattr(screen, "open_capture", refuse)
    assert main(["--model", str(models["float"]), "--camera", "7"]) == 1
    lines = records(capsys.readouterr().out)
    assert lines[0]["source"] == "camera:7" and "cannot open camera" in lines[0]["error"]
    assert lines[1]["summary"]["errors"] == 1


# --------------------------------------------------------------------------
# The CLI as a subprocess
# --------------------------------------------------------------------------


def test_cli_subprocess_end_to_end(models, tmp_path):
    Image.fromarray(solid(255)).save(tmp_path / "w.png")
    Image.fromarray(solid(0)).save(tmp_path / "k.png")
    result = cli("--model", str(models["int8"]), str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = records(result.stdout)
    assert [(Path(r["source"]).name, r["verdict"]) for r in lines[:-1]] == [
        ("k.png", "clean"), ("w.png", "poisoned")]
    assert lines[-1]["summary"]["n"] == 2 and our_stderr(result.stderr) == []


@pytest.mark.parametrize("kind", ["vector", "random"])
def test_cli_not_a_screener_exit_2(models, tmp_path, kind):
    Image.fromarray(solid(255)).save(tmp_path / "w.png")
    result = cli("--model", str(models[kind]), str(tmp_path / "w.png"))
    assert result.returncode == 2 and result.stdout == ""
    (message,) = our_stderr(result.stderr)
    assert message.startswith(f"screen: {models[kind]}: not a tfbackdoor screener (")


def test_cli_usage_errors_exit_2(models, tmp_path):
    missing = tmp_path / "nope.tflite"
    result = cli("--model", str(missing), "x.png")
    assert result.returncode == 2
    assert our_stderr(result.stderr) == [f"screen: {missing}: model file not found"]
    result = cli("--model", str(models["float"]))
    assert result.returncode == 2 and "no sources" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for bad in (["--every", "0"], ["--threshold", "2"], ["--resize", "zoom"]):
        result = cli("--model", str(models["float"]), *bad, "x.png")
        assert result.returncode == 2 and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and "usage error" in result.stderr


def test_screen_does_not_import_tensorflow():
    code = ("import sys; sys.path.insert(0, %r); import edge.screen; "
            "from edge.screen import Screener, run, iter_sources; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "import ai_edge_litert.interpreter; "
            "assert 'tensorflow' not in sys.modules" % str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
