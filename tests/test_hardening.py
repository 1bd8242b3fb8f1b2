"""Issue 15 hardening, the rest: resumable and reproducible training, signals, outputs checked before
the work, packaging, data preparation, compact model records, the demo."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def _images(n=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _tiny_detector():
    """A small detector (conv, dropout, softmax) built from seed 0: quick to trace and train."""
    import keras

    from tfbackdoor import models

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(keras.layers.Rescaling(1 / 255)(inp))
    h = keras.layers.Dropout(0.3)(keras.layers.GlobalAveragePooling2D()(h))
    out = keras.layers.Dense(2, activation="softmax", name="probs")(h)
    out = models.DetectorSpec("image", "tiny", 32, 0.5, {}, name="detector_spec")(out)
    return keras.Model(inp, out)


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if "tmp" in p.name)


# ----------------------------------------------------------------------------- item 5: resume = uninterrupted

def test_a_resumed_training_reproduces_the_uninterrupted_one(tmp_path, monkeypatch):
    import keras

    from tfbackdoor import detector, perturb

    x = _images()
    kw = dict(epochs=2, batch_size=16, seed=0, verbose=0, calibration=0, domain="image", lr=0.05,   # calibration: below
              manipulation=perturb.RandomManipulation(kinds=("noise", "white_block")))
    full = detector.train(x, tmp_path / "full.keras", model=_tiny_detector(), **kw)

    def stop(self, epoch, logs=None):   # a kill between epoch 1 and 2 (after epoch 1 was backed up)
        if epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_begin", stop, raising=False)
    with pytest.raises(KeyboardInterrupt):
        detector.train(x, tmp_path / "resumed.keras", model=_tiny_detector(), **kw)
    monkeypatch.undo()
    assert (tmp_path / "resumed.keras.ckpt").is_dir() and not (tmp_path / "resumed.keras").exists()
    resumed = detector.train(x, tmp_path / "resumed.keras", model=_tiny_detector(), **kw)
    assert resumed.history.epoch == [1]            # only the missing epoch was trained
    for a, b in zip(full.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    held_out = _images(32, seed=1)
    thresholds = [detector.calibrate_threshold(m, held_out, 5.0, variants=()) for m in (full, resumed)]
    assert thresholds[0] == pytest.approx(thresholds[1], abs=1e-5)


# ----------------------------------------------------------------------------- item 2: kill while calibrating/saving

_TRAIN_KW = "dict(epochs=2, batch_size=16, seed=0, verbose=0, calibration=0.25, domain='image', lr=0.05, " \
            "manipulation=perturb.RandomManipulation(kinds=('noise', 'white_block')))"

_KILLED_TRAINING = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_hardening import _images, _tiny_detector
from tfbackdoor import detector, perturb
if sys.argv[2] == "calibrate":
    def stuck(*a, **k):
        print("MARK", flush=True); time.sleep(120)
    detector.calibrate_threshold = stuck
else:   # keras has written part of the .keras file when the kill comes
    import keras
    def stuck(self, path, *a, **k):
        open(path, "wb").write(b"PK partial"); print("MARK", flush=True); time.sleep(120)
    keras.Model.save = stuck
detector.train(_images(), sys.argv[1], model=_tiny_detector(), **{kw})
"""


def _run_until_marker(args, sig, cwd=None, timeout=120):
    """Start ``args``, wait for a line ``MARK`` on its stdout, send ``sig``; returns (returncode, stderr)."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or str(ROOT))
    start = time.time()
    for line in p.stdout:
        if line.strip() == "MARK":
            break
        assert time.time() - start < timeout
    else:
        raise AssertionError(f"no marker; stderr: {p.stderr.read()[-2000:]}")
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


@pytest.mark.parametrize("stage", ["calibrate", "save"])
def test_a_kill_while_calibrating_or_saving_keeps_the_epochs_and_leaves_no_temp_file(tmp_path, stage):
    from tfbackdoor import detector, perturb

    out = tmp_path / "det.keras"
    script = _KILLED_TRAINING.format(root=str(ROOT), kw=_TRAIN_KW)
    rc, err = _run_until_marker([sys.executable, "-c", script, str(out), stage], signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-2000:]
    meta = json.loads((tmp_path / "det.keras.ckpt" / "backup" / "training_metadata.json").read_text())
    assert meta["epoch"] == 2 and not out.exists()   # every finished epoch survived the kill
    assert bool(_leftovers(tmp_path)) == (stage == "save")   # the killed writer's partial file
    # The rerun skips straight to calibration and saving, and removes the killed process's temp file.
    model = detector.train(_images(), out, model=_tiny_detector(), **eval(_TRAIN_KW))
    assert model.history.epoch == []
    assert detector.load(out) and not (tmp_path / "det.keras.ckpt").exists()
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- item 4: SIGTERM

_STUCK_SCAN = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
real = np.lib.format.write_array_header_2_0
def stuck(*a, **k):   # the report is complete, the sanitised set is being written
    print("MARK", flush=True); time.sleep(120)
np.lib.format.write_array_header_2_0 = stuck
from cli.main import main
main(sys.argv[1:])
"""


def test_sigterm_during_scan_exits_cleanly_and_keeps_report_and_sanitised_set_paired(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "ds").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ds" / f"{i}.png")
    report, clean = tmp_path / "r.csv", tmp_path / "clean.npz"
    report.write_text("old report\n")
    clean.write_bytes(b"old set")
    script = _STUCK_SCAN.format(root=str(ROOT))
    rc, err = _run_until_marker([sys.executable, "-c", script, "scan", "--dataset", f"dir:{tmp_path / 'ds'}",
                                 "--out", str(report), "--write-clean", f"npz:{clean}"], signal.SIGTERM)
    assert rc == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("tfbd: terminated")
    assert report.read_text() == "old report\n" and clean.read_bytes() == b"old set"   # neither replaced
    assert _leftovers(tmp_path) == []


def test_a_temp_file_of_a_killed_process_is_removed_by_the_next_write(tmp_path):
    from tfbackdoor.atomic import atomic_path

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()   # a process id that is gone
    stale = tmp_path / f".r.csv.tmp{p.pid}.abcd.csv"
    stale.write_text("partial")
    mine = tmp_path / f".r.csv.tmp{os.getpid()}.efgh.csv"   # a live writer's file is left alone
    mine.write_text("in progress")
    with atomic_path(tmp_path / "r.csv") as tmp:
        Path(tmp).write_text("done")
    assert (tmp_path / "r.csv").read_text() == "done" and not stale.exists() and mine.exists()


# ----------------------------------------------------------------------------- item 7: outputs checked first

_OUT_COMMANDS = [
    ["scan", "--dataset", "DS", "--out", "BAD"],
    ["scan", "--dataset", "DS", "--out", "OK/r.csv", "--write-clean", "npz:BAD"],
    ["evaluate", "--dataset", "DS", "--out", "BAD"],
    ["spectrum", "--dataset", "DS", "--out", "BAD"],
    ["spectrum", "--dataset", "DS", "--out", "OK/s.png", "--json", "BAD"],
    ["demo", "--out", "BAD"],
    ["export", "--out", "BAD"],
    ["poison", "--dataset", "DS", "--trigger", "badnets", "--target", "0", "--out", "BAD"],
    ["train-detector", "--dataset", "DS", "--out", "BAD"],
    ["finetune", "--dataset", "DS", "--out", "BAD"],
    ["train-victim", "--dataset", "DS", "--test-dataset", "none", "--out", "BAD"],
    ["attack-eval", "--model", "MODEL", "--trigger", "badnets", "--target", "0", "--dataset", "DS", "--out", "BAD"],
    ["smooth", "--model", "MODEL", "--dataset", "DS", "--out", "BAD"],
    ["shard", "--dataset", "DS", "--out", "tfrecord:BAD"],
    ["defend", "--dataset", "DS", "--test-dataset", "DS", "--attacks", "badnets", "--out-dir", "OK", "--out", "BAD"],
]


@pytest.mark.parametrize("args", _OUT_COMMANDS, ids=lambda a: "-".join(x for x in a[:3] if x[0] != "-"))
def test_an_unwritable_or_directory_out_is_one_line_before_the_work(args, tmp_path):
    from PIL import Image

    (tmp_path / "ds").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ds" / "0.png")
    (tmp_path / "m.keras").write_bytes(b"unused")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bads = {"/sys/r.csv": "cannot write in /sys", "/proc/tfbd/r.csv": "cannot write in /proc",
            str(tmp_path): "is a directory", "/dev/null": "is not a regular file"}
    for bad, needle in bads.items():
        argv = [{"DS": f"dir:{tmp_path / 'ds'}", "OK": str(tmp_path / "ok"), "MODEL": str(tmp_path / "m.keras")}.get(
            x, x.replace("BAD", bad).replace("OK", str(tmp_path / "ok"))) for x in args]
        start = time.time()
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2, (argv, r.output[-2000:])
        (line,) = r.output.strip().splitlines()
        assert line.startswith("tfbd: error: ") and needle in line, line
        assert time.time() - start < 5   # before loading data or TensorFlow work
    if "--out-dir" in args:   # an --out-dir that is a file
        argv = [x.replace("OK", str(a_file)) if x == "OK" else x for x in args]
        argv = [{"DS": f"dir:{tmp_path / 'ds'}", "BAD": str(tmp_path / "r.json")}.get(x, x) for x in argv]
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2 and "is not a directory" in r.output, r.output[-2000:]


# ----------------------------------------------------------------------------- items 12, 13: install anywhere

def test_setup_supports_the_python_versions_of_tensorflow_2_21_and_offers_a_gpu_extra():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options"]["python_requires"].replace(" ", "") == ">=3.10,<3.14"   # TF 2.21: cp310-cp313 wheels
    for v in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Python :: {v}" in cfg["metadata"]["classifiers"]
    assert "tensorflow[and-cuda]>=2.21,<2.22" in cfg["options.extras_require"]["gpu"]
    assert 'tensorflow-cpu>=2.21,<2.22; platform_machine == "x86_64"' in cfg["options"]["install_requires"]
    assert "[gpu]" in (ROOT / "README.md").read_text()


def test_the_wheel_carries_the_shipped_models_and_finds_them_from_any_directory(tmp_path):
    import shutil
    import zipfile

    src = tmp_path / "src"   # a copy: building in the work tree would leave build/ there
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tfbackdoor", "cli", "edge", "saved_models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.ckpt"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("tfbackdoor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for model in ("detector_cifar10.keras", "screener_cifar10_int8.tflite", "screener_cifar10_int8.json"):
        assert f"tfbackdoor/saved_models/{model}" in names
    site = tmp_path / "site"   # the wheel unpacked = what pip install puts in site-packages
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys, site; sys.path[:0] = [sys.argv[1]]; sys.path += site.getsitepackages();"
            "import tfbackdoor.detector as d, edge.screen as e;"
            "print(d.__file__); print(d.DEFAULT_DETECTOR); print(e.default_model_path())")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site hooks, so the work tree's editable install cannot answer in place of the wheel.
    r = subprocess.run([sys.executable, "-S", "-c", code, str(site)], capture_output=True, text=True, timeout=120,
                       cwd=str(elsewhere))
    assert r.returncode == 0, r.stderr[-2000:]
    module, det, screener = r.stdout.split()
    assert module.startswith(str(site))
    assert det == str(site / "tfbackdoor" / "saved_models" / "detector_cifar10.keras") and Path(det).is_file()
    assert screener == str(site / "tfbackdoor" / "saved_models" / "screener_cifar10_int8.tflite")


# ----------------------------------------------------------------------------- item 14: tfbd data prepare

def test_data_prepare_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from tfbackdoor import prepare

    def offline():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: None -- "
                        "[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(prepare, "_load_cifar10", offline)
    r = CliRunner().invoke(main, ["data", "prepare", "cifar10", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 2
    (line,) = r.output.strip().splitlines()
    assert line.startswith("tfbd: error: cifar10: download failed (Exception: URL fetch failure") and "TFBD_DATA" in line
    assert not (tmp_path / "d").exists()
    r = CliRunner().invoke(main, ["data", "prepare", "gtsrb", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and "no public loader" in r.output


def test_data_prepare_cifar10_writes_the_layout_the_short_names_read(tmp_path, monkeypatch):
    from tfbackdoor import data, prepare

    rng = np.random.default_rng(0)
    fake = ((rng.integers(0, 256, (4010, 32, 32, 3), dtype=np.uint8), np.arange(4010) % 10),
            (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10))
    monkeypatch.setattr(prepare, "_load_cifar10", lambda: fake)
    r = CliRunner().invoke(main, ["data", "prepare", "cifar10", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("TFBD_DATA", str(tmp_path))
    x, y = data.load_arrays("cifar10:lossless")
    assert np.array_equal(x, fake[0][0][:4000]) and np.array_equal(y, fake[0][1][:4000])
    assert len(data.load_arrays("cifar10:train")[0]) == 10 and len(data.load_arrays("cifar10:test")[0]) == 20


# ----------------------------------------------------------------------------- item 17 (the small ones)

def test_help_texts_and_the_datasets_listing():
    for cmd in ("train-detector", "finetune", "evaluate", "defend", "scan"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "%%" not in r.output
    scan_help = CliRunner().invoke(main, ["scan", "--help"]).output
    assert "seeded random subset" in scan_help.split("--limit")[1].split("--seed")[0]
    out = CliRunner().invoke(main, ["datasets"]).output
    assert "crops:PATH[:N]" in out and "natural32" in out and "photos:crops" in out


def test_demo_explains_the_hf_ratio_and_says_when_the_screener_misses(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d.png")])
    assert r.exit_code == 0, r.output[-2000:]
    assert "HF ratio = the share of the images' DCT energy" in r.output
    rows = [line.split() for line in r.output.splitlines() if line.endswith((" clean", " poisoned"))
            and not line.startswith("clean_")]
    missed = {row[0].rsplit("_", 1)[0] for row in rows if row[-1] == "clean"}
    for name in missed:
        assert f"samples through" in r.output and f" {name} samples" in r.output


def test_demo_figure_shows_the_screened_images_with_their_verdicts_beside_the_spectra(tmp_path, monkeypatch):
    from cli import demo
    from tfbackdoor import plots

    figures = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: (figures.append(fig), save(fig, out)))
    lines = []
    result = demo.demo(tmp_path / "d.png", echo=lines.append)
    (fig,) = figures
    assert fig.get_layout_engine() is not None                      # constrained: no overlapping labels
    axes = [ax for ax in fig.axes if ax.get_images()]
    pictures = [ax for ax in axes if ax.get_images()[0].get_array().shape == (32, 32, 3)]
    spectra = [ax for ax in axes if ax.get_images()[0].get_array().ndim == 2]
    sets = ["clean", "badnets", "noise_blend", "checker"]
    assert len(pictures) == 16 and [ax.get_ylabel() for ax in pictures[::4]] == sets   # 4 images per set
    assert [ax.get_title().split()[:2] for ax in spectra] == [["HF", "ratio"]] * 4
    assert result["panels"]["spectra"] == sets and len(result["panels"]["images"]) == 16
    if result["verdicts"]:                                           # the shipped screener is there
        titles = [ax.get_title() for ax in pictures]
        assert [t.split()[1] for t in titles] == [v[2] for v in result["verdicts"]]
        missed = [t for t, v in zip(titles, result["verdicts"]) if v[0] != "clean" and v[2] == "clean"]
        assert all(t.endswith("(missed)") for t in missed)
    assert any(line.startswith(f"wrote {tmp_path / 'd.png'}: each set's first 4 sample images") for line in lines)


# ----------------------------------------------------------------------------- item 1: a PNG bomb in scan

_MEASURED = """
import resource, sys
sys.path.insert(0, {root!r})
from cli.main import main
try:
    main(sys.argv[1:])
finally:
    print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _bomb_png(path, width, height):
    """A valid PNG header declaring ``width x height`` with a few rows of data (a few KB on disk)."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    idat = zlib.compress(b"\x00" * (3 * width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_scan_skips_a_png_bomb_from_its_header_and_stays_small(tmp_path):
    import csv

    from PIL import Image

    (tmp_path / "ds").mkdir()
    for i, img in enumerate(_images(2)):
        Image.fromarray(img).save(tmp_path / "ds" / f"{i}.png")
    _bomb_png(tmp_path / "ds" / "bomb.png", 23000, 23000)     # 1.6 GB decoded; 8.7 GB of scan before the fix
    out = tmp_path / "r.csv"

    def scan(folder):
        return subprocess.run([sys.executable, "-c", _MEASURED.format(root=str(ROOT)), "scan", "--dataset",
                               f"dir:{folder}", "--out", str(out)], capture_output=True, text=True, timeout=300)

    (tmp_path / "plain").mkdir()
    for i, img in enumerate(_images(2)):
        Image.fromarray(img).save(tmp_path / "plain" / f"{i}.png")
    base = scan(tmp_path / "plain")                           # the same scan without the bomb: the baseline
    assert base.returncode == 0, base.stderr[-2000:]
    r = scan(tmp_path / "ds")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"tfbd: skipped {tmp_path / 'ds' / 'bomb.png'}: image too large: its header declares "
            "529.0 megapixels, more than the limit of 40") in r.stderr
    rows = {Path(row["id"]).name: row["score"] for row in csv.DictReader(out.open())}
    assert rows.keys() == {"0.png", "1.png", "bomb.png"} and rows["bomb.png"] == "" and rows["0.png"]
    maxrss, baseline = (int(p.stderr.split("maxrss_kb")[-1].split()[0]) for p in (r, base))
    # KB. TensorFlow and the detector alone peak at ~0.69 GB on an idle machine, but at up to 2.14 GB
    # inside full-suite runs on a loaded one (unexplained), so a fixed bound was flaky: the bound is
    # the same scan without the bomb, measured now. Decoding the bomb would add its 1.6 GB bitmap.
    assert maxrss < baseline + 800_000, (maxrss, baseline)


# ----------------------------------------------------------------------------- item 15: start-up noise

def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tmp_path):
    np.savez(tmp_path / "ok.npz", x=_images(4), y=np.zeros(4, int))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}   # as on a user's terminal
    args = ["scan", "--dataset", f"npz:{tmp_path / 'ok.npz'}", "--out", str(tmp_path / "r.csv")]
    quiet = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""            # no absl/oneDNN/cpu_feature_guard lines, no Python warnings
    assert json.loads(quiet.stdout.strip().splitlines()[-1])["n"] == 4


def test_verbose_lets_tensorflow_log_lines_through_unless_the_user_set_the_level(monkeypatch):
    """``tfbd --verbose`` sets TensorFlow's C++ log level to 0 before TensorFlow is imported (which
    lines then appear depends on the CPU and build, so the setting is what is checked), and a
    ``TF_CPP_MIN_LOG_LEVEL`` the user exported wins."""
    import cli.main as cli_main

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setattr(cli_main, "_TF_LOG_PRESET", False)
    monkeypatch.setattr(cli_main, "_VERBOSE", False)
    assert CliRunner().invoke(main, ["datasets"]).exit_code == 0
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and not cli_main._VERBOSE
    assert CliRunner().invoke(main, ["--verbose", "datasets"]).exit_code == 0
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and cli_main._VERBOSE
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setattr(cli_main, "_TF_LOG_PRESET", True)
    assert CliRunner().invoke(main, ["--verbose", "datasets"]).exit_code == 0
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
