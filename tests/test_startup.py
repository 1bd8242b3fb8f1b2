"""Start-up (issue 12, goal 4): errors that need no model or data come before TensorFlow is imported,
with the same one-line messages the loaders give. (Timings are in benchmarks/throughput.py.)"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def tfbd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["evaluate", "--dataset", "cifar1O:test"], "unknown dataset 'cifar1O:test'"),
    (["evaluate", "--dataset", "npz:ok.npz", "--attacks", "badnets,nope"], "unknown attack 'nope'"),
    (["spectrum", "--dataset", "npz:ok.npz", "--attacks", "smooth:/nonexistent.npy", "--out", "f.png"],
     "trigger file not found: /nonexistent.npy"),
    (["scan", "--dataset", "npz:/nonexistent.npz", "--out", "r.csv"], "npz:/nonexistent.npz: file not found"),
    (["scan", "--dataset", "npz:ok.npz", "--out", "r.csv", "--detector", "/nonexistent.keras"], "detector file not found"),
    (["train-victim", "--dataset", "npz:ok.npz", "--test-dataset", "none", "--poison", "badnetz", "--out", "v.keras"],
     "unknown attack 'badnetz'"),
    (["poison", "--dataset", "npz:ok.npz", "--trigger", "lf:x", "--target", "0", "--out", "p.npz"],
     "expected lf:SEED with an integer seed"),
    (["evaluate", "--dataset", "npz:ok.npz", "--limit", "0"], "--limit must be positive"),
])
def test_cheap_errors_one_line_exit_2(args, needle, tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, int))
    r = tfbd(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tfbd: error:") and needle in lines[0], r.stderr


def test_bad_option_value_is_a_usage_error():
    r = tfbd("train-detector", "--arch", "cnn7", "--out", "x.keras")
    assert r.returncode == 2 and "cnn7" in r.stderr


def test_validation_path_does_not_import_tensorflow(tmp_path):
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from cli.main import main\n"
            "for args in (['evaluate', '--dataset', 'cifar1O:test'], ['evaluate', '--attacks', 'nope'],\n"
            "             ['scan', '--dataset', 'npz:/no.npz', '--out', 'r.csv'], ['datasets'], ['--help']):\n"
            "    r = CliRunner().invoke(main, args)\n"
            "    print(r.exit_code, 'tensorflow' in sys.modules)\n"
            "from tfbackdoor import specs\n"
            "specs.check_dataset('cifar10:test+npz:/x.npz') if False else specs.check_attacks('all,zoo,badnets+jpeg75')\n"
            "print('tensorflow' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "False", "2", "False", "2", "False", "0", "False", "0", "False", "False"], r.stdout


def test_specs_agree_with_the_loaders(tmp_path):
    """The TF-free copies of the attack names give the same answers and messages as triggers.get."""
    from tfbackdoor import data, specs, triggers
    from tfbackdoor.errors import TfbdError
    from tfbackdoor.triggers import zoo

    assert data.SHORT_NAMES is specs.SHORT_NAMES and data.CROP_SOURCES is specs.CROP_SOURCES
    assert list(specs.ATTACK_NAMES) == list(triggers.available())
    from tfbackdoor import models

    assert specs.ARCH_NAMES == tuple(models.ARCHS)
    from tfbackdoor import export

    assert specs.QUANTIZE_MODES == export.QUANTIZE_MODES and specs.EXPORT_FOLDS == export.FOLDS
    assert specs.ZOO_NAME_FORMS == zoo.NAME_FORMS
    assert {k: tuple(v) for k, v in zoo.GROUPS.items()} == {k: specs.ATTACK_GROUPS[k] for k in zoo.GROUPS}
    for name in ["nope", "badnetz+jpeg75", "lf:x", "wanet:1.5", "smooth:/no.npy", "file:/no.png", " Badnets"]:
        with pytest.raises(TfbdError) as ref:
            triggers.get(name)
        with pytest.raises(TfbdError) as fast:
            specs.check_attack(name)
        assert str(fast.value) == str(ref.value)
    for name in ["badnets", "sig+jpeg90", "clean+jpeg75", "lf:3", "wanet:2", "smooth:random", "checker"]:
        specs.check_attack(name)
        triggers.get(name)
    for spec in ["cifar1O:test", "npz:/no.npz", "dir:/no/dir", "crops:/no/dir:5", "", "npz:", str(tmp_path)]:
        with pytest.raises(TfbdError) as ref:
            data.load(spec)
        with pytest.raises(TfbdError) as fast:
            specs.check_dataset(spec)
        assert str(fast.value) == str(ref.value)
