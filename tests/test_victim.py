import json
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from tfbackdoor import metrics, triggers, victim
from tfbackdoor.errors import TfbdError


def badnets_detector_model():
    """Hand-made 2-class model: class 1 iff the BadNets square (rows/cols 27..30) is white."""
    inp = keras.Input((32, 32, 3))
    m = keras.layers.Cropping2D(((27, 1), (27, 1)))(inp)          # the 4x4 BadNets square
    m = keras.layers.GlobalAveragePooling2D()(m)                   # mean per channel, 0..255
    dense = keras.layers.Dense(2, activation="softmax")
    out = dense(m)
    dense.set_weights([np.array([[0, 1 / 3]] * 3, np.float32), np.array([0, -250], np.float32)])
    return keras.Model(inp, out)


def test_asr_on_hand_made_example(rng):
    labels = np.array([0, 1, 2, 3, 1])
    triggered_pred = np.array([1, 1, 0, 1, 2])
    # Non-target samples: indices 0, 2, 3 -> predictions 1, 0, 1 -> 2 of 3 hit the target 1.
    assert metrics.attack_success_rate(triggered_pred, labels, 1) == pytest.approx(200 / 3)

    model = badnets_detector_model()
    x = rng.integers(0, 200, (40, 32, 32, 3), dtype=np.uint8)
    y = np.array([0] * 30 + [1] * 10)
    res = victim.attack_eval(model, x, y, triggers.get("badnets"), target=1)
    assert res["acc"] == 75.0            # clean images are all predicted 0: the 30 label-0 ones are right
    assert res["asr"] == 100.0 and res["n"] == 30 and res["n_clean"] == 40
    res0 = victim.attack_eval(model, x, y, triggers.get("checker"), target=1)
    assert res0["asr"] < 100.0           # a checkerboard is not white: the model is not fooled


def test_attack_eval_behind_a_screener(rng):
    """Inputs the screener rejects cannot succeed: ASR behind a perfect BadNets screener is 0."""
    model = badnets_detector_model()
    x = rng.integers(0, 200, (40, 32, 32, 3), dtype=np.uint8)
    y = np.array([0] * 30 + [1] * 10)
    t = triggers.get("badnets")

    def screen(imgs):                       # rejects images whose BadNets square is white
        return np.asarray(imgs)[:, 27:31, 27:31, :].min(axis=(1, 2, 3)) == 255

    res = victim.attack_eval(model, x, y, t, target=1, screen=screen)
    assert res["asr"] == 100.0 and res["asr_screened"] == 0.0
    assert res["bdr"] == 100.0 and res["fpr"] == 0.0 and res["acc_screened"] == res["acc"] == 75.0

    def leaky(imgs):                        # lets every second image through
        return np.arange(len(imgs)) % 2 == 1

    res = victim.attack_eval(model, x, y, t, target=1, screen=leaky)
    assert res["asr_screened"] == 50.0 and res["bdr"] == 50.0 and res["fpr"] == 50.0
    assert res["acc_screened"] == 37.5       # 15 of the 30 correct label-0 images are accepted


def test_poison_cli_writes_a_loadable_poisoned_set(data_dir, tmp_path):
    from tfbackdoor import data

    out = tmp_path / "p.npz"
    r = CliRunner().invoke(main, ["poison", "--dataset", "cifar10:lossless", "--limit", "200", "--trigger", "badnets",
                                  "--rate", "0.1", "--target", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    x, y = data.load_arrays("cifar10:lossless", limit=200, seed=0)
    px, py = data.load_arrays(f"npz:{out}")
    with np.load(out) as d:
        idx = d["poisoned"]
    assert len(idx) == 20 and (py[idx] == 4).all() and (y[idx] != 4).all()
    assert (px[idx][:, 27:31, 27:31] == 255).all()
    rest = np.setdiff1d(np.arange(200), idx)
    assert (px[rest] == x[rest]).all() and (py[rest] == y[rest]).all()
    assert json.loads((tmp_path / "p.json").read_text())["n_poisoned"] == 20
    r = CliRunner().invoke(main, ["poison", "--dataset", "cifar10:lossless", "--limit", "20", "--trigger", "nosuch",
                                  "--target", "1", "--out", str(tmp_path / "q.npz")])
    assert r.exit_code == 2 and "nosuch" in r.output and not (tmp_path / "q.npz").exists()
    r = CliRunner().invoke(main, ["poison", "--dataset", "cifar10:lossless", "--limit", "20", "--trigger", "badnets",
                                  "--target", "12", "--out", str(tmp_path / "q.npz")])
    assert r.exit_code == 2 and "target label 12" in r.output


def test_poison_exact_rate_and_label(rng):
    x = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(10), 20)
    t = triggers.get("badnets")
    x_orig = x.copy()
    x2, y2, idx = victim.poison(x, y, t, rate=0.1, target=3, seed=5)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert (y[idx] != 3).all() and (y2[idx] == 3).all()
    rest = np.setdiff1d(np.arange(200), idx)
    assert (y2[rest] == y[rest]).all() and (x2[rest] == x[rest]).all()
    assert (x2[idx] == t(x[idx]).numpy()).all()
    assert (x == x_orig).all()                                  # the input is not modified in place
    again = victim.poison(x, y, t, rate=0.1, target=3, seed=5)[2]
    assert (again == idx).all()
    assert len(victim.poison(x, y, t, rate=0.125, target=3, seed=0)[2]) == 25   # round(0.125 * 200)
    with pytest.raises(TfbdError, match="only 180"):
        victim.poison(x, y, t, rate=0.95, target=3)


def test_victim_model_input_and_inference(rng):
    m = victim.build_victim(32, 10, width=8)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    p1 = m(x.astype(np.float32), training=False).numpy()
    p2 = m(x.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(p1, p2)                        # augmentation is off at inference
    np.testing.assert_allclose(p1.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(victim.predict(m, x), p1.argmax(1))   # uint8 in
    assert any("aug" in layer.name for layer in m.layers)
    assert not any(layer.name == "aug_flip" for layer in victim.build_victim(32, 43, width=8, flip=False).layers)


def test_resnet_victim_is_residual_trains_and_reloads(rng, tmp_path):
    m = victim.build_victim(32, 10, width=8, arch="resnet")
    assert m.name == "victim_resnet8"
    assert sum(isinstance(layer, keras.layers.Add) for layer in m.layers) == 3            # one block per stage
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in m.layers)     # strided convolutions
    assert m.get_layer("gap").output.shape[-1] == 32                                     # 4 x width at the end
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    p1 = m(x.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(p1, m(x.astype(np.float32), training=False).numpy())
    np.testing.assert_allclose(p1.sum(1), 1, atol=1e-5)
    with pytest.raises(TfbdError, match="unknown victim architecture 'vit'"):
        victim.build_victim(32, 10, arch="vit")
    from cli import main as cli_main

    assert cli_main.VICTIM_ARCHS == victim.VICTIM_ARCHS          # one tuple, from the TF-free tfbackdoor.specs
    # a learnable task: bright vs dark images; 3 epochs on 256 images separate them
    y = np.arange(256) % 2
    xs = np.where(y[:, None, None, None] == 1, 200, 40).astype(np.int16)
    xs = np.clip(xs + rng.integers(-30, 31, (256, 16, 16, 3)), 0, 255).astype(np.uint8)
    out = tmp_path / "r.keras"
    model, hist = victim.train_victim(xs, y, out, epochs=3, batch_size=32, lr=3e-3, width=4, arch="resnet",
                                      test=(xs[:64], y[:64]), echo=None)
    assert hist[-1]["acc"] >= 90
    assert json.loads(out.with_suffix(".json").read_text())["arch"] == "resnet"
    assert victim.load(out).name == "victim_resnet4"


def test_resolve_trigger_and_checks(data_dir, tmp_path):
    assert victim.resolve_trigger("badnets").name == "badnets"
    np.save(tmp_path / "p.npy", np.full((32, 32, 3), 0.1, np.float32))
    assert isinstance(victim.resolve_trigger(str(tmp_path / "p.npy")), triggers.AdditiveTrigger)
    assert isinstance(victim.resolve_trigger(f"smooth:{tmp_path / 'p.npy'}"), triggers.SmoothTrigger)
    with pytest.raises(TfbdError, match="not found"):
        victim.resolve_trigger(str(tmp_path / "missing.png"))
    with pytest.raises(TfbdError, match="unknown attack"):
        victim.resolve_trigger("nosuch")
    model = badnets_detector_model()
    with pytest.raises(TfbdError, match=r"m.keras: model input shape \(32, 32, 3\) does not fit the data images \(28, 28, 3\)"):
        victim.check_model_fits(model, np.zeros((1, 28, 28, 3), np.uint8), "m.keras")
    for bad in (2, -1, None, 1.5):
        with pytest.raises(TfbdError, match="target label"):
            victim.check_target(model, bad)
    assert victim.check_target(model, 1) == 1


def test_attack_eval_cli_bad_inputs_exit_2(tmp_path, rng):
    model = badnets_detector_model()
    model.save(tmp_path / "hand.keras")
    np.savez(tmp_path / "small.npz", x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=np.zeros(8, int))
    np.savez(tmp_path / "ok.npz", x=rng.integers(0, 200, (8, 32, 32, 3), dtype=np.uint8), y=np.zeros(8, int))
    base = ["attack-eval", "--model", str(tmp_path / "hand.keras"), "--trigger", "badnets"]
    r = CliRunner().invoke(main, base + ["--target", "1", "--dataset", f"npz:{tmp_path / 'small.npz'}"])
    assert r.exit_code == 2
    line = [ln for ln in r.output.splitlines() if ln.startswith("tfbd: error:")]
    assert len(line) == 1 and "hand.keras" in line[0] and "(32, 32, 3)" in line[0] and "(16, 16, 3)" in line[0]
    r = CliRunner().invoke(main, base + ["--target", "7", "--dataset", f"npz:{tmp_path / 'ok.npz'}"])
    assert r.exit_code == 2 and "target label 7" in r.output
    r = CliRunner().invoke(main, ["attack-eval", "--model", str(tmp_path / "nope.keras"), "--trigger", "badnets",
                                  "--target", "0"])
    assert r.exit_code == 2 and "model file not found" in r.output
    r = CliRunner().invoke(main, base + ["--target", "1", "--dataset", f"npz:{tmp_path / 'ok.npz'}", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["asr"] == 100.0 and row["acc"] == 100.0 and row["n"] == 8


def test_train_victim_and_attack_eval_cli_end_to_end(lossless, tmp_path):
    out = tmp_path / "v.keras"
    r = CliRunner().invoke(main, ["train-victim", "--dataset", "cifar10:lossless", "--limit", "300",
                                  "--test-dataset", "cifar10:lossless", "--test-limit", "100", "--epochs", "1",
                                  "--width", "8", "--batch-size", "64", "--poison", "badnets", "--poison-rate", "0.1",
                                  "--target", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "epoch 1" in r.output and "clean ACC" in r.output and "ASR" in r.output
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["poison"]["n_poisoned"] == 30 and meta["poison"]["target"] == 2
    assert len(meta["poison"]["indices"]) == 30 and meta["poison"]["trigger"] == "badnets"
    assert [h["epoch"] for h in meta["history"]] == [1] and {"acc", "asr"} <= set(meta["history"][0])
    assert meta["command"].startswith("tfbd")
    assert not (tmp_path / "v.keras.ckpt").exists()
    r = CliRunner().invoke(main, ["attack-eval", "--model", str(out), "--trigger", "badnets", "--target", "2",
                                  "--dataset", "cifar10:lossless", "--limit", "100", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert {"acc", "asr", "n"} <= set(row) and row["n_clean"] == 100 and 0 <= row["asr"] <= 100
    r = CliRunner().invoke(main, ["train-victim", "--dataset", "cifar10:lossless", "--limit", "50",
                                  "--test-dataset", "none", "--epochs", "1", "--poison", "badnets",
                                  "--target", "10", "--out", str(tmp_path / "bad.keras")])
    assert r.exit_code == 2 and "target label 10" in r.output


def test_any_screen_rejects_the_union(rng):
    """Two screens in front of one model: an input goes when either rejects it."""
    model = badnets_detector_model()
    x = rng.integers(0, 200, (40, 32, 32, 3), dtype=np.uint8)
    y = np.array([0] * 30 + [1] * 10)
    t = triggers.get("badnets")

    def white_square(imgs):                 # rejects every BadNets-patched image, no clean one
        return np.asarray(imgs)[:, 27:31, 27:31, :].min(axis=(1, 2, 3)) == 255

    def odd(imgs):                          # rejects every second image, patched or not
        return np.arange(len(imgs)) % 2 == 1

    alone = victim.attack_eval(model, x, y, t, target=1, screen=odd)
    both = victim.attack_eval(model, x, y, t, target=1, screen=victim.any_screen(odd, white_square))
    assert alone["asr_screened"] == 50.0 and alone["fpr"] == 50.0
    assert both["asr_screened"] == 0.0 and both["bdr"] == 100.0
    assert both["fpr"] == 50.0              # white_square adds no clean rejection to odd's
    assert victim.any_screen(odd)(x).tolist() == odd(x).tolist()
    with pytest.raises(ValueError):
        victim.any_screen()


def test_attack_eval_cli_with_two_detectors_screens_their_union(data_dir, tmp_path):
    """--detector twice: the triggered inputs rejected are at least each detector's, ASR behind at most each's."""
    root = Path(__file__).resolve().parent.parent / "saved_models"
    a, b = root / "detector_cifar10.keras", root / "detector_cifar10_smooth_tuned.keras"
    vic = root / "victim_cifar10_smooth_backdoored.keras"
    if not all(p.is_file() for p in (a, b, vic)):
        pytest.skip("needs the shipped detectors and smooth-backdoored victim in saved_models/")
    base = ["attack-eval", "--model", str(vic), "--trigger", f"smooth:{root / 'smooth_cifar10.npy'}", "--target", "6",
            "--dataset", "cifar10:test", "--limit", "120", "--json"]
    rows = []
    for dets in ([a], [b], [a, b]):
        r = CliRunner().invoke(main, base + [arg for d in dets for arg in ("--detector", str(d))])
        assert r.exit_code == 0, r.output
        rows.append(json.loads(r.output))
    ra, rb, both = rows
    assert both["detector"] == f"{a},{b}"
    assert both["bdr"] >= max(ra["bdr"], rb["bdr"]) and both["fpr"] >= max(ra["fpr"], rb["fpr"])
    assert both["asr_screened"] <= min(ra["asr_screened"], rb["asr_screened"])
    assert both["asr"] == ra["asr"] == rb["asr"] > 50          # the screen does not change the victim
    assert rb["bdr"] > 50 > ra["bdr"]                          # only the smooth-tuned detector sees this trigger
    r = CliRunner().invoke(main, base + ["--detector", str(a), "--detector", str(tmp_path / "nope.keras")])
    assert r.exit_code == 2 and "nope.keras" in r.output and "detector file not found" in r.output
