"""Bad input to the tfbd CLI and the model loaders (issue 15): one clear line, no lost work."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def tfbd(*args, cwd=None):
    """``python -m cli.main ARGS`` in a subprocess: what a user sees on a terminal (warnings included)."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or str(ROOT), env=env)


def _images(folder, names, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.fsencode(folder) + b"/" + name)


def test_scan_of_non_images_prints_each_skipped_file_once_without_a_python_warning(tmp_path, rng):
    _images(tmp_path / "ds" / "a", [b"0.png", b"1.png"], rng)
    (tmp_path / "ds" / "b").mkdir()
    for name in ("notes.png", "readme.jpg", "data.bmp"):
        (tmp_path / "ds" / "b" / name).write_text("not an image")
    r = tfbd("scan", "--dataset", f"dir:{tmp_path / 'ds'}", "--out", str(tmp_path / "r.csv"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Warning" not in r.stderr and "warnings.warn" not in r.stderr
    for name in ("notes.png", "readme.jpg", "data.bmp"):
        lines = [line for line in r.stderr.splitlines() if name in line]
        assert lines == [f"tfbd: skipped {tmp_path / 'ds' / 'b' / name}: unreadable or corrupt image"]


def test_scan_takes_a_flat_folder_and_a_file_name_that_is_not_utf8(tmp_path, rng):
    flat = tmp_path / "flat"
    _images(flat, [b"ok.png", b"bad\xff.png", b"also\xfe.webp"], rng)
    out = tmp_path / "r.csv"
    r = tfbd("scan", "--dataset", f"dir:{flat}", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(Path(row["id"]).name for row in rows) == ["also\\xfe.webp", "bad\\xff.png", "ok.png"]
    assert {row["label"] for row in rows} == {"-1"} and all(row["score"] for row in rows)


def test_a_plain_folder_as_dataset_gets_a_dir_hint(tmp_path):
    r = CliRunner().invoke(main, ["scan", "--dataset", str(tmp_path), "--out", str(tmp_path / "r.csv")])
    assert r.exit_code == 2
    (line,) = [x for x in r.output.splitlines() if x.startswith("tfbd: error:")]
    assert line.startswith(f"tfbd: error: unknown dataset '{tmp_path}': did you mean dir:{tmp_path}?")


def test_lambda_refusal_is_a_whole_sentence(tmp_path):
    import keras

    from tfbackdoor import detector, victim
    from tfbackdoor.errors import TfbdError

    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp)).save(tmp_path / "lam.keras")
    for load in (detector.load, victim.load):
        with pytest.raises(TfbdError) as info:
            load(tmp_path / "lam.keras")
        assert str(info.value) == (f"{tmp_path / 'lam.keras'}: refused: the model contains a Lambda layer (arbitrary "
                                   "Python code, which could run anything when loaded); tfbd loads models in Keras "
                                   "safe mode only, so rebuild it with built-in layers")


def test_no_empty_checkpoint_folder_after_training(tmp_path, rng):
    from tfbackdoor import detector

    out = tmp_path / "d.keras"
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    detector.train(x, out, epochs=1, batch_size=16, calibration=0.25, verbose=0)
    assert out.is_file() and not (tmp_path / "d.keras.ckpt").exists()


def test_tfbd_screen_exits_1_on_a_missing_input_or_an_empty_folder(tmp_path, rng):
    _images(tmp_path / "imgs", [b"a.png"], rng)
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    assert runner.invoke(main, ["screen", str(tmp_path / "imgs")]).exit_code == 0
    r = runner.invoke(main, ["screen", str(tmp_path / "imgs"), str(tmp_path / "nope.png"), str(tmp_path / "empty")])
    assert r.exit_code == 1
    assert '"error": "no such file or directory"' in r.output and '"error": "no image files in this folder"' in r.output
    assert '"n": 1' in r.output   # the rest was screened
