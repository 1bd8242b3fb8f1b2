"""The LiteRT screener export (``tfbackdoor.export``, ``tfbd export``) and ``tfbd screen``.

A small cnn6 detector is built, its normalization adapted and briefly fitted on real lossless
CIFAR-10 images (a few seconds, so that its verdicts differ between images), then exported.
"""

from __future__ import annotations

import hashlib
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from tfbackdoor import detector, export, frequency, triggers


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_detector(lossless, tmp_path_factory):
    """(model, path) of a cnn6 detector fitted for one short epoch on 384 lossless images."""
    x, _ = lossless
    keras.utils.set_random_seed(0)
    model = detector.build()
    detector.adapt_normalization(model, x[:384], "dct", n=384)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(detector.training_dataset(x[:384], batch_size=64, seed=0), epochs=2, verbose=0)
    # Threshold in the middle of the clean scores so that verdicts are not all the same.
    detector.spec_of(model).threshold = float(np.median(detector.score(model, x[384:])))
    path = tmp_path_factory.mktemp("det") / "small.keras"
    detector.save(model, path)
    return model, path


@pytest.fixture(scope="module")
def int8_screener(small_detector, tmp_path_factory):
    """The int8 screener exported with the command (calibrated on lossless CIFAR-10)."""
    _, path = small_detector
    out = tmp_path_factory.mktemp("scr") / "small_int8.tflite"
    r = run("export", "--detector", path, "--out", out, "--quantize", "int8",
            "--calibration", "cifar10:lossless", "--calibration-size", 64)
    assert r.exit_code == 0, r.output
    return out, r.output


# ------------------------------------------------------------------------ float equivalence

@pytest.mark.parametrize("fold", ["fc", "separable", "basis"])
def test_folded_dct_normalization_equals_dct2d_then_normalization(lossless, fold):
    x = lossless[0][:32].astype("float32")
    norm = keras.layers.Normalization(axis=(1, 2, 3))
    norm.adapt(frequency.dct2d(lossless[0][:256]))
    ref = norm(frequency.DCT2D()(x)).numpy()
    folded = export.FoldedDCTNormalization.from_normalization(norm, (32, 32, 3), fold=fold)
    got = folded(x).numpy()
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    # The config round-trips (the layer is registered serialisable).
    again = export.FoldedDCTNormalization.from_config(folded.get_config())
    assert np.allclose(again(x).numpy(), got, atol=1e-4)


def test_screener_graph_equals_detector_in_float(small_detector, lossless):
    model, _ = small_detector
    x = lossless[0][:48]
    ref = detector.score(model, x)
    for fold, head, clip, fold_bn in [("fc", "logit", None, "last"), ("fc", "logit", None, "all"),
                                      ("fc", "softmax", None, "none"), ("separable", "logit", None, "last"),
                                      ("none", "softmax", None, "none"), ("fc", "logit", 8.0, "last"),
                                      ("basis", "logit", None, "last"), ("basis", "logit", 8.0, "last")]:
        s = export.build_screener(model, fold, head, clip=clip, fold_bn=fold_bn)
        got = export.screener_scores(s, x)
        # Exact up to float rounding; clipping at +-8 only touches the rare larger coefficients.
        assert np.abs(got - ref).max() < (1e-4 if clip is None else 5e-3), (fold, head, clip, fold_bn)


def test_basis_fold_takes_each_frequency_from_the_better_scaled_order():
    """Statistics like a 128-px detector's (row/column means large, vertical and horizontal detail
    tiny): every frequency comes from exactly one order, the int8 intermediate's noise factor
    ``s / std`` of that order stays small where the single row-first order would be ~100x, and the
    remaining per-frequency scales are near 1 (one int8 scale then serves every frequency)."""
    from tfbackdoor.export.layer import basis_fold

    n = 64
    u = np.arange(n)[:, None, None]
    v = np.arange(n)[None, :, None]
    std = np.broadcast_to(3000.0 / (1 + u) ** 1.3 / (1 + v) ** 1.3 + 0.5, (n, n, 3)).copy()
    mean = np.zeros((n, n, 3))
    mean[0, 0] = 12000.0
    d = frequency.dct_matrix(n)
    f = basis_fold(d, d, mean, std)
    a, b = f["scale_a"] != 0, f["scale_b"] != 0
    assert np.all(a ^ b) and a.any() and b.any()
    ey2 = std ** 2 + mean ** 2
    col, row = np.sqrt(ey2.mean(axis=(0, 2))), np.sqrt(ey2.mean(axis=(1, 2)))
    chosen = np.where(a, col[None, :, None], row[:, None, None]) / std
    assert chosen.max() < 10 and (col[None, :, None] / std).max() > 100
    scale = np.where(a, f["scale_a"], f["scale_b"])
    assert 0.2 < scale.min() and scale.max() < 5


@pytest.mark.parametrize("arch", ["large", "edge"])
def test_int8_export_above_32_px_uses_the_basis_fold(lossless, tmp_path, arch):
    """A 64-px detector (untrained 'large' or 'edge' body, normalization adapted on upscaled images) exports to
    a full-integer int8 screener with the basis fold (fc would need a 4096x4096 matrix per channel);
    its scores follow the Keras detector's."""
    from tfbackdoor.export.graph import _resolve_fold

    assert _resolve_fold("auto", "int8", 32) == "fc" and _resolve_fold("auto", "int8", 224) == "basis"
    x = np.asarray(Image.fromarray(np.concatenate(list(lossless[0][:64]), axis=1)).resize((64 * 64, 64),
                                                                                          Image.BICUBIC))
    x = np.stack(np.split(x, 64, axis=1))   # 64 images of 64x64
    keras.utils.set_random_seed(0)
    model = detector.build(arch, image_size=64)
    detector.adapt_normalization(model, x, "dct", n=64)
    scores = detector.score(model, x)
    detector.spec_of(model).threshold = float(np.median(scores))
    path = tmp_path / "det64.keras"
    detector.save(model, path)
    npz = tmp_path / "cal.npz"
    np.savez(npz, x=x[:32], y=np.zeros(32, np.int64))
    summary = export.export(path, tmp_path / "s64.tflite", "int8", f"npz:{npz}", 32)
    assert summary["fold"] == "basis" and summary["float_ops_between"] == []
    assert {"FULLY_CONNECTED", "DEPTHWISE_CONV_2D"} <= set(summary["ops"])
    info = export.describe(tmp_path / "s64.tflite")
    assert info["input"] == {"shape": [1, 64, 64, 3], "dtype": "uint8", "quantization": [1.0, 0]}
    ts = export.tflite_scores(tmp_path / "s64.tflite", x)
    assert np.corrcoef(ts, scores)[0, 1] > 0.9, (ts.round(3), scores.round(3))


# ----------------------------------------------------------------------------- int8 export

def test_int8_export_is_builtin_full_integer_with_screener_io(int8_screener, small_detector):
    out, output = int8_screener
    b = out.read_bytes()
    ops = export.check_builtin_only(b)
    assert not any(o.startswith("CUSTOM") for o in ops) and "FULLY_CONNECTED" in ops
    assert "ops (builtin only):" in output
    info = export.describe(b)
    assert info["input"] == {"shape": [1, 32, 32, 3], "dtype": "uint8", "quantization": [1.0, 0]}
    assert info["output"] == {"shape": [1, 1], "dtype": "float32"}
    # Full-integer: no float op between the input QUANTIZE and the final DEQUANTIZE (ELU is int8).
    assert info["float_ops_between"] == []
    assert ops[0] == "QUANTIZE" and ops[-2:] == ["DEQUANTIZE", "LOGISTIC"]
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["sha256"] == hashlib.sha256(b).hexdigest()
    assert side["image_size"] == [32, 32] and side["quantize"] == "int8"
    assert side["threshold"] == pytest.approx(detector.spec_of(small_detector[0]).threshold)


def test_int8_screener_agrees_with_keras(int8_screener, small_detector, lossless):
    model, _ = small_detector
    out, _ = int8_screener
    clean = lossless[0][128:448]
    x = np.concatenate([clean, triggers.get("badnets")(clean[:80]).numpy()])
    ks = detector.score(model, x)
    ts = export.tflite_scores(out, x)
    thr = detector.spec_of(model).threshold
    keras_flags = ks > thr
    assert 0.1 < keras_flags.mean() < 0.9  # a model whose verdicts differ
    # The threshold sits at the median clean score, where flips are likeliest (about 93 % here;
    # an int8 export without the folded normalization agrees on ~50 % and is off by ~0.4).
    assert np.mean((ts > thr) == keras_flags) >= 0.88
    assert np.mean(np.abs(ts - ks)) < 0.025
    assert np.corrcoef(np.argsort(np.argsort(ts)), np.argsort(np.argsort(ks)))[0, 1] > 0.95


def _conv_output_scales(b):
    it = export.interpreter(b)
    scale = {t["index"]: t["quantization"][0] for t in it.get_tensor_details()}
    return np.array([scale[o["outputs"][0]] for o in it._get_ops_details() if o["op_name"] == "CONV_2D"])


def test_fused_int8_elu_is_bit_identical_and_tail_ranges_are_finer(small_detector, int8_screener, lossless):
    model, _ = small_detector
    out, _ = int8_screener
    # The same graph and calibration images as the command's export, but TFLite's min..max ranges
    # and the converter's float ELU sandwiches.
    reps = export.representative_images("cifar10:lossless", 64, 32, 0)
    s = export.build_screener(model, "fc", "logit", clip=export.DEFAULT_CLIP, fold_bn=export.DEFAULT_FOLD_BN)
    plain = export.convert(s, "int8", reps, fuse_elu=False)
    assert "DEQUANTIZE" in export.list_ops(plain)[1:-2]      # the float sandwiches are there
    fused, n = export.fuse_int8_elu(plain)
    assert n == 6 and export.list_ops(fused).count("ELU") == 6 and not export.describe(fused)["float_ops_between"]
    x = lossless[0][200:240]
    assert np.array_equal(export.tflite_scores(plain, x), export.tflite_scores(fused, x))
    # Tail calibration (the command's default) gives every convolution output a finer int8 step.
    minmax, tail = _conv_output_scales(plain), _conv_output_scales(out.read_bytes())
    assert len(minmax) == len(tail) == 6 and (tail <= minmax * 1.0001).all() and (tail / minmax).mean() < 0.95


def test_float32_export_matches_keras(small_detector, lossless, tmp_path):
    model, path = small_detector
    out = tmp_path / "f32.tflite"
    summary = export.export(path, out, "float32")
    assert summary["bytes"] == out.stat().st_size and not summary["float_ops_between"]
    assert export.describe(out)["input"]["dtype"] == "uint8"
    x = lossless[0][:64]
    assert np.abs(export.tflite_scores(out, x) - detector.score(model, x)).max() < 1e-4


# --------------------------------------------------------------------------------- the CLI

def test_export_rejects_a_non_detector_with_one_line(tmp_path):
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    bad = tmp_path / "plain.keras"
    plain.save(bad)
    out = tmp_path / "s.tflite"
    r = run("export", "--detector", bad, "--out", out)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith("tfbd: error:")]
    assert len(lines) == 1 and "not a tfbackdoor detector" in lines[0] and "plain.keras" in lines[0]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_screen_folder_of_pngs_end_to_end(int8_screener, small_detector, lossless, tmp_path):
    out, _ = int8_screener
    folder = tmp_path / "imgs"
    folder.mkdir()
    x = lossless[0][:6]
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")  # ignored: folders are searched for images only
    r = CliRunner().invoke(main, ["screen", "--model", str(out), str(folder)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert len(lines) == 7 and lines[-1]["summary"]["n"] == 6 and lines[-1]["summary"]["errors"] == 0
    thr = json.loads(out.with_suffix(".json").read_text())["threshold"]
    assert lines[-1]["summary"]["threshold"] == pytest.approx(thr)
    scores = np.array([line["score"] for line in lines[:-1]])
    assert np.abs(scores - export.tflite_scores(out, x)).max() < 1e-5  # PNG is lossless: same pixels
    r = CliRunner().invoke(main, ["screen", "--model", str(out), "--threshold", "0", "--summary-only", str(folder)])
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["summary"]["poisoned"] == 6
    r = CliRunner().invoke(main, ["screen", "--model", str(tmp_path / "missing.tflite"), str(folder)])
    assert r.exit_code == 2


# ------------------------------------------------------------------- the spectral anomaly part

@pytest.fixture(scope="module")
def natural(data_dir):
    from tfbackdoor import data

    x = data.load_arrays("natural32", limit=700, seed=11)[0]
    return x[:400], x[400:500], x[500:]


@pytest.fixture(scope="module")
def spectral_detector(natural, lossless, tmp_path_factory):
    """(model, path) of a cnn6 detector (normalization adapted, untrained, threshold 0.7) with a
    spectral part fitted on natural32."""
    from tfbackdoor import perturb, spectral

    fit, cal, _ = natural
    keras.utils.set_random_seed(0)
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    detector.adapt_normalization(base, lossless[0][:256], "dct", n=256)
    model, _ = spectral.fit(base, [fit, perturb.BENIGN_VARIANTS["jpeg75"](fit[:150]).numpy()], [cal], target_fpr=2.0,
                            statistic="texture")
    path = tmp_path_factory.mktemp("spec") / "spec.keras"
    detector.save(model, path)
    return model, path


def _mixed(test):
    """~200 images: clean, JPEG-recompressed (q75, q50), SIG and FTrojan-triggered."""
    from tfbackdoor import perturb

    return np.concatenate([test[:60], perturb.BENIGN_VARIANTS["jpeg75"](test[60:100]).numpy(),
                           perturb.BENIGN_VARIANTS["jpeg50"](test[100:130]).numpy(),
                           triggers.get("sig")(test[130:165]).numpy(), triggers.get("ftrojan")(test[165:200]).numpy()])


def test_numpy_spectral_part_equals_the_keras_layers(spectral_detector, natural):
    from edge.screen import SpectralPart
    from tfbackdoor import spectral

    model, _ = spectral_detector
    x = _mixed(natural[2])
    entry = json.loads(json.dumps(export.sidecar_entry(model)))   # through JSON, as on the device
    part = SpectralPart(entry, (32, 32))
    layer = model.get_layer("spectral_anomaly")
    coeffs = frequency.dct2d(x)
    np.testing.assert_array_equal(part.route(x.astype(np.float64)), layer.route(coeffs).numpy().astype(int))
    assert 0.2 < part.route(x.astype(np.float64)).mean() < 0.8   # both branches are exercised
    keras_ratio = layer(coeffs).numpy()
    ratio = part.ratio(x)
    np.testing.assert_allclose(ratio, keras_ratio, rtol=1e-4, atol=1e-12)   # island-only: 0 vs ~1e-30
    assert 0 < (ratio > 1).sum() < len(x)
    cnn = detector.score(spectral.strip(model), x)
    np.testing.assert_allclose(part.combine(cnn, ratio), detector.score(model, x), atol=1e-5)
    assert part.threshold == pytest.approx(0.7) and part.scale.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("statistic,version", [("bands", 3), ("grid", 4), ("island", 5), ("island-only", 5)])
def test_numpy_band_part_equals_the_keras_layer(natural, lossless, statistic, version):
    from edge.screen import SpectralPart
    from tfbackdoor import spectral

    fit, cal, test = natural
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    model, _ = spectral.fit(base, [fit, perturb_jpeg75(fit[:150])], [cal], target_fpr=2.0, statistic=statistic)
    x = _mixed(test)
    if statistic != "bands":                # patches made after JPEG decoding: what the grid statistic is for
        x = np.concatenate([x, triggers.get("badnets")(perturb_jpeg75(test[:60])).numpy()])
    if statistic.startswith("island"):      # patches on lossless images: the island statistic's
        x = np.concatenate([x, triggers.get("badnets3")(test[60:120]).numpy()])
    entry = json.loads(json.dumps(export.sidecar_entry(model)))
    assert entry["version"] == version and entry["statistic"] == statistic.replace("-only", "") \
        and len(entry["bands"]) == 5
    if statistic == "island-only":          # the other statistics never pass, and the screener skips them
        thr = np.array(entry["thresholds"])
        assert np.all(thr[:, :-1] == np.float32(spectral.UNUSED)) and np.all(thr[:, -1] < 1e3)
    if statistic == "grid":
        bad = json.loads(json.dumps(entry))
        bad["grid"]["tables"] = [[[0] * 8] * 8]
        with pytest.raises(ValueError, match="grid tables"):
            SpectralPart(bad, (32, 32))
        del bad["grid"]
        with pytest.raises(ValueError, match="missing grid"):
            SpectralPart(bad, (32, 32))
    if statistic.startswith("island"):
        bad = json.loads(json.dumps(entry))
        bad["island"]["near_max"] = -1
        with pytest.raises(ValueError, match="island constants"):
            SpectralPart(bad, (32, 32))
        del bad["island"]
        with pytest.raises(ValueError, match="missing island"):
            SpectralPart(bad, (32, 32))
    part = SpectralPart(entry, (32, 32))
    layer = model.get_layer("spectral_anomaly")
    keras_ratio = layer(frequency.dct2d(x)).numpy()
    ratio = part.ratio(x)
    np.testing.assert_allclose(ratio, keras_ratio, rtol=1e-4, atol=1e-12)   # island-only: 0 vs ~1e-30
    assert 0 < (ratio > 1).sum() < len(x)
    if statistic.startswith("island"):
        islands = part.island_statistic(x.astype(np.float64))
        np.testing.assert_array_equal(islands, layer.island_statistic(frequency.dct2d(x)).numpy())
        assert (islands[-60:] > 0).mean() > 0.5 and (islands[:len(test)] > 0).mean() < 0.05
    bad = json.loads(json.dumps(entry))
    bad["thresholds"] = bad["thresholds"][:1]
    with pytest.raises(ValueError, match="thresholds"):
        SpectralPart(bad, (32, 32))


def perturb_jpeg75(x):
    from tfbackdoor import perturb

    return perturb.BENIGN_VARIANTS["jpeg75"](x).numpy()


def test_int8_screener_of_a_spectral_detector_flags_what_keras_flags(spectral_detector, natural, tmp_path):
    from edge.screen import Screener

    model, path = spectral_detector
    out = tmp_path / "spec_int8.tflite"
    summary = export.export(path, out, "int8", "cifar10:lossless", 32)
    assert "base64" not in json.dumps(summary) and summary["spectral"]["scale"]["shape"] == [2, 32, 32, 3]
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and "base64" in side["spectral"]["scale"]
    test = natural[2]
    x = np.concatenate([test[:100], triggers.get("ftrojan")(test[100:200]).numpy()])
    thr = detector.spec_of(model).threshold
    keras_flags = detector.score(model, x) > thr
    assert keras_flags[100:].mean() > 0.1 > keras_flags[:100].mean()   # few fit images: a modest operating point
    screener = Screener(out)
    assert screener.spectral is not None and screener.threshold == pytest.approx(thr)
    scores = np.array([screener.score(img) for img in x])
    flags = np.array([screener.verdict(s) == "poisoned" for s in scores])
    assert np.mean(flags == keras_flags) >= 0.99
    np.testing.assert_allclose(export.tflite_scores(out, x), scores, atol=1e-6)


def test_a_sidecar_without_spectral_is_the_tflite_alone_and_bad_entries_are_refused(spectral_detector, natural,
                                                                                    tmp_path):
    from edge.screen import ModelError, Screener

    _, path = spectral_detector
    out = tmp_path / "spec_f32.tflite"
    export.export(path, out, "float32")
    side = json.loads(out.with_suffix(".json").read_text())
    x = triggers.get("ftrojan")(natural[2][:30]).numpy()
    cnn = export.tflite_scores(out, x, spectral=None)
    assert np.abs(export.tflite_scores(out, x) - cnn).max() > 0.05   # the spectral part matters here
    plain = dict(side)
    del plain["spectral"]
    out.with_suffix(".json").write_text(json.dumps(plain))
    screener = Screener(out)
    assert screener.spectral is None
    np.testing.assert_allclose([screener.score(img) for img in x], cnn, atol=1e-6)
    np.testing.assert_allclose(export.tflite_scores(out, x), cnn, atol=0)
    bad = json.loads(json.dumps(side))
    bad["spectral"]["scale"]["shape"] = [2, 16, 16, 3]
    out.with_suffix(".json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="bad spectral entry"):
        Screener(out)
    # the texture statistic's fields (sidecar version 2) are required, and a newer version is refused
    assert side["spectral"]["version"] == 2
    for key, value, match in (("texture_ref", None, "missing texture_ref"), ("texture_thresholds", [1.0], "2 positive"),
                              ("version", 6, "version 6")):
        bad = json.loads(json.dumps(side))
        if value is None:
            del bad["spectral"][key]
        else:
            bad["spectral"][key] = value
        out.with_suffix(".json").write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=match):
            Screener(out)
