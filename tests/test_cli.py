import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_every_command_and_version():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ["demo", "spectrum", "train-detector", "finetune", "evaluate", "scan", "datasets"]:
        assert cmd in r.output
    assert "0.1" in run("--version").output


def test_demo_writes_heatmap(tmp_path):
    out = tmp_path / "demo.png"
    r = run("demo", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 10_000
    lines = r.output.splitlines()
    assert any(line.startswith("HF ratio = ") for line in lines)     # says what the ratio means
    start = next(i for i, line in enumerate(lines) if line.startswith("set "))
    ratios = {line.split()[0]: float(line.split()[1]) for line in lines[start + 1:start + 5]}
    assert ratios["checker"] > ratios["clean"]
    # then the shipped int8 screener's verdicts on 4 samples, clean and with each built-in trigger
    assert "screening with screener_cifar10_int8.tflite" in r.output
    verdicts = [line for line in r.output.splitlines() if line.rstrip().endswith(("clean", "poisoned"))
                and "_" in line.split()[0]]
    assert len(verdicts) == 16


def test_spectrum_on_real_cifar10(data_dir, tmp_path):
    out, js = tmp_path / "fig.png", tmp_path / "s.json"
    r = run("spectrum", "--dataset", "cifar10:lossless", "--attacks", "all", "--limit", "300",
            "--out", str(out), "--json", str(js))
    assert r.exit_code == 0, r.output
    sets = {s["set"]: s for s in json.loads(js.read_text())["sets"]}
    assert set(sets) == {"clean", "badnets", "trojan_wm", "trojan_sq", "blend", "nature", "l2_inv", "l0_inv"}
    # Every paper trigger adds high-frequency energy to natural images.
    assert all(sets[k]["hf_ratio"] > sets["clean"]["hf_ratio"] for k in sets if k != "clean")
    assert out.stat().st_size > 20_000


@pytest.mark.parametrize("args,needle", [
    (["spectrum", "--dataset", "nosuch:thing", "--out", "x.png"], "unknown dataset 'nosuch:thing'"),
    (["spectrum", "--dataset", "npz:/nonexistent.npz", "--out", "x.png"], "/nonexistent.npz"),
    (["evaluate", "--detector", "/nonexistent.keras", "--dataset", "cifar10:test"], "detector file not found"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith("tfbd: error:")]
    assert len(lines) == 1 and needle in lines[0]


def test_unknown_attack_and_corrupt_npz(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("ok.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, int))
    r = CliRunner().invoke(main, ["spectrum", "--dataset", "npz:ok.npz", "--attacks", "badnetz", "--out", "f.png"])
    assert r.exit_code == 2 and "unknown attack 'badnetz'" in r.output
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 10)
    r = CliRunner().invoke(main, ["spectrum", "--dataset", "npz:bad.npz", "--out", "f.png"])
    assert r.exit_code == 2 and "bad.npz" in r.output
    assert not (tmp_path / "f.png").exists()


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train-detector" in r.stdout
