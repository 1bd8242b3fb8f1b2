"""The clean-spectrum anomaly part (tfbackdoor.spectral) and `tfbd fit-spectral`."""

import json

import numpy as np
import pytest

from tfbackdoor import detector, models, perturb, spectral, triggers
from tfbackdoor.frequency import dct2d
from tfbackdoor.metrics import auroc


@pytest.fixture(scope="module")
def natural(data_dir):
    from tfbackdoor import data

    x = data.load_arrays("natural32", limit=1400, seed=11)[0]
    return x[:1000], x[1000:1200], x[1200:]


@pytest.fixture(scope="module")
def fitted(natural):
    fit, cal, _ = natural
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    model, report = spectral.fit(base, [fit, perturb.BENIGN_VARIANTS["jpeg75"](fit[:300]).numpy()], [cal], target_fpr=1.0,
                                 statistic="texture")
    return base, model, report


@pytest.fixture(scope="module")
def cifar_split(data_dir):
    """CIFAR-10 fit / calibration images (JPEG train + lossless) and 800 other lossless test images."""
    from tfbackdoor import data

    lo = data.load_arrays("cifar10:lossless", limit=1800, seed=3)[0]
    jp = data.load_arrays("cifar10:train", limit=1500, seed=3)[0]
    return [jp[:1200], lo[:600]], [jp[1200:], lo[600:1000]], lo[1000:]


def test_the_router_tells_jpeg_from_lossless(natural):
    _, cal, test = natural
    layer = spectral.SpectralAnomaly()
    layer.build((None, 32, 32, 3))
    lossless = layer.route(dct2d(test)).numpy()
    jpeg = layer.route(dct2d(perturb.BENIGN_VARIANTS["jpeg75"](test))).numpy()
    assert lossless.mean() < 0.1, lossless.mean()
    assert jpeg.mean() > 0.9, jpeg.mean()


def test_combine_flags_iff_either_part_flags():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500).astype(np.float32)
    a = rng.uniform(0, 2, 500).astype(np.float32)
    layer = spectral.CombineScores(threshold=0.7)
    out = layer([np.stack([1 - p, p], 1), a]).numpy()
    assert np.allclose(out.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(out[:, 1] > 0.7, (p > 0.7) | (a > 1.0))
    # monotone in the anomaly ratio where the CNN is quiet
    q = layer([np.tile([[0.99, 0.01]], (3, 1)).astype(np.float32), np.array([0.5, 1.0, 1.5], np.float32)]).numpy()[:, 1]
    assert q[0] < q[1] < q[2] and abs(q[1] - 0.7) < 1e-5


def test_fit_catches_sig_and_chroma_bumps_at_the_fitted_fpr(fitted, natural):
    base, model, report = fitted
    _, _, test = natural
    assert report["thresholds"][0] > 1 and report["routed_jpeg_share_fit"] > 0.1
    ratio = lambda x: model.get_layer("spectral_anomaly")(dct2d(x)).numpy()
    clean = ratio(test)
    assert (clean > 1).mean() <= 0.04, (clean > 1).mean()   # fitted at 1% on other images
    hit = (ratio(triggers.get("ftrojan")(test).numpy()) > 1).mean()
    assert hit >= 0.8, hit   # 99% on cifar10:lossless in the benchmark; natural32 has heavier tails
    # SIG's sinusoid is an outlier at its frequency too, though (natural32's tails being heavy) mostly
    # below the 1% operating point: it ranks far above clean images
    assert auroc(clean, ratio(triggers.get("sig")(test).numpy())) > 85


def test_the_detector_flags_what_either_part_flags_and_strip_gives_back_the_cnn(fitted, natural):
    base, model, _ = fitted
    _, _, test = natural
    x = np.concatenate([test, triggers.get("sig")(test).numpy()])
    cnn = detector.score(base, x)
    both = detector.score(model, x)
    ratio = model.get_layer("spectral_anomaly")(dct2d(x)).numpy()
    assert np.all(both >= cnn - 1e-6)
    np.testing.assert_array_equal(both > 0.7, (cnn > 0.7) | (ratio > 1))
    np.testing.assert_allclose(detector.score(spectral.strip(model), x), cnn, atol=1e-6)
    assert not spectral.has_spectral(spectral.strip(model)) and spectral.has_spectral(model)


def test_save_and_load_keep_scores_and_config(fitted, natural, tmp_path):
    _, model, report = fitted
    _, _, test = natural
    path = tmp_path / "d.keras"
    detector.save(model, path)
    again = detector.load(path)
    np.testing.assert_allclose(detector.score(again, test), detector.score(model, test), atol=1e-6)
    assert detector.spec_of(again).info["spectral"]["thresholds"] == report["thresholds"]
    layer = model.get_layer("spectral_anomaly")
    assert spectral.SpectralAnomaly.from_config(layer.get_config()).route_cut == layer.route_cut
    # refitting replaces the spectral part instead of stacking a second one
    refit, _ = spectral.fit(again, [test[:100]], [test[100:]], target_fpr=1.0)
    assert sum(isinstance(l, spectral.SpectralAnomaly) for l in refit.layers) == 1


def test_the_texture_statistic_catches_sig_that_max_z_alone_misses_at_the_same_fpr(cifar_split):
    """Fitted and calibrated on CIFAR-10 (JPEG train + lossless), scored on other lossless images:
    contrast-raised clean images set max-z's threshold above most SIG images; the texture statistic
    (max-z over the image's median) does not, at no more clean flags."""
    fit, cal, test = cifar_split
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    sig = triggers.get("sig")(test).numpy()
    rates = {}
    for texture in (False, True):
        model, report = spectral.fit(base, fit, cal, target_fpr=0.5, texture=texture)
        ratio = lambda x: model.get_layer("spectral_anomaly")(dct2d(x)).numpy()
        rates[texture] = {"sig": (ratio(sig) > 1).mean(), "clean": (ratio(test) > 1).mean(),
                          "contrast": (ratio(perturb.BENIGN_VARIANTS["contrast"](test).numpy()) > 1).mean()}
        assert ("texture_thresholds" in report) == texture
    plain, tex = rates[False], rates[True]
    assert tex["sig"] >= plain["sig"] + 0.25, rates
    assert tex["clean"] <= 0.02 and tex["contrast"] <= 0.03, rates


def test_the_band_statistic_catches_sig_and_survives_save_and_load(cifar_split, tmp_path):
    """Bands (luma and chroma apart, a threshold per band) on the same CIFAR-10 fit: SIG, whose
    sinusoid stands out only among mid frequencies, is caught where max-z alone catches none, as are
    FTrojan's chroma bumps, at few clean flags; saving keeps the layer and its scores."""
    fit, cal, test = cifar_split
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    model, report = spectral.fit(base, fit, cal, target_fpr=0.5, statistic="bands")
    layer = model.get_layer("spectral_anomaly")
    assert isinstance(layer, spectral.BandAnomaly) and np.array(report["thresholds"]).shape == (2, 10)
    ratio = lambda x: layer(dct2d(x)).numpy()
    rates = {"sig": (ratio(triggers.get("sig")(test).numpy()) > 1).mean(),
             "ftrojan": (ratio(triggers.get("ftrojan")(test).numpy()) > 1).mean(),
             "clean": (ratio(test) > 1).mean(),
             "contrast": (ratio(perturb.BENIGN_VARIANTS["contrast"](test).numpy()) > 1).mean()}
    assert rates["sig"] >= 0.5 and rates["ftrojan"] >= 0.9, rates
    assert rates["clean"] <= 0.02 and rates["contrast"] <= 0.03, rates
    path = tmp_path / "bands.keras"
    detector.save(model, path)
    again = detector.load(path)
    assert isinstance(again.get_layer("spectral_anomaly"), spectral.BandAnomaly)
    np.testing.assert_allclose(detector.score(again, test[:200]), detector.score(model, test[:200]), atol=1e-6)
    with pytest.raises(Exception, match="unknown spectral statistic"):
        spectral.fit(base, fit, cal, statistic="median")


def test_jpeg_tables_are_the_lattice_libjpeg_quantises_to():
    """An image saved at quality 60 by TensorFlow's libjpeg, then decoded: its luma 8x8 block
    coefficients (> 90% of them) lie within the decoder's rounding of multiples of ``jpeg_tables()`` at 60, not
    of its neighbours' steps (so the table formula is libjpeg's)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    smooth = tf.image.resize(rng.uniform(0, 255, (1, 8, 8, 3)), (64, 64), "bicubic")
    img = tf.cast(tf.clip_by_value(smooth + rng.normal(0, 12, (1, 64, 64, 3)), 0, 255), tf.uint8)[0]
    dec = tf.io.decode_jpeg(tf.io.encode_jpeg(img, quality=60)).numpy().astype(np.float64)
    luma = dec[..., 0] * 0.299 + dec[..., 1] * 0.587 + dec[..., 2] * 0.114 - 128.0
    d8 = spectral.frequency.dct_matrix(8)
    c = np.einsum("pi,bicj,qj->bcpq", d8, luma.reshape(8, 8, 8, 8), d8)
    tables = spectral.jpeg_tables()
    lo = spectral.GRID_QUALITIES[0]

    def fit(q):
        t = tables[q - lo]
        d = c - np.round(c / t) * t
        big = np.abs(c) > spectral.GRID_BIG
        big[..., 0, 0] = False
        return (np.abs(d)[big] < spectral.GRID_TOL).mean()

    assert fit(60) > 0.9 and fit(50) < 0.6 and fit(70) < 0.6, (fit(60), fit(50), fit(70))


def test_the_grid_statistic_finds_edits_made_after_jpeg_decoding_not_global_changes(data_dir, tmp_path):
    """A 4x4 patch or a pasted icon on decoded JPEG images moves their blocks off the quantisation
    lattice; contrast, another JPEG quality, blur and lossless images move every block alike."""
    from tfbackdoor import data

    jp = data.load_arrays("cifar10:train", limit=600, seed=5)[0]
    lo = data.load_arrays("cifar10:lossless", limit=300, seed=5)[0]
    layer = spectral.BandAnomaly(grid=True)
    layer.build((None, 32, 32, 3))
    g = lambda x: layer.grid_statistic(dct2d(np.asarray(x))).numpy()
    clean = [g(jp), g(lo)] + [g(perturb.BENIGN_VARIANTS[v](jp).numpy()) for v in ("contrast", "jpeg50", "blur", "brighter")]
    cut = max(np.quantile(v, 0.99) for v in clean)
    assert max((v > cut).mean() for v in clean) <= 0.01
    patched = g(triggers.get("badnets")(jp).numpy())
    assert (patched > cut).mean() >= 0.8
    assert (g(triggers.get("insert_image")(jp).numpy()) > cut).mean() >= 0.8
    assert np.median(clean[2]) < 0.3 * np.median(patched)      # contrast: every block alike
    # the detector's layer: one more threshold column, kept by save/load; old configs have none
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    model, report = spectral.fit(base, [jp[:400], lo[:150]], [jp[400:], lo[150:]], target_fpr=1.0, statistic="grid")
    assert report["statistic"] == "grid" and np.array(report["thresholds"]).shape == (2, 11)
    path = tmp_path / "grid.keras"
    detector.save(model, path)
    again = detector.load(path).get_layer("spectral_anomaly")
    assert again.grid and tuple(again.thresholds.shape) == (2, 11)
    config = spectral.BandAnomaly().get_config()
    config.pop("grid")      # a config saved before the option existed
    old = spectral.BandAnomaly.from_config(config)
    old.build((None, 32, 32, 3))
    assert not old.grid and tuple(old.thresholds.shape) == (2, 10)


def test_the_island_statistic_finds_pasted_flat_patches_not_clipping(data_dir, tmp_path):
    """A white 3x3 / 4x4 patch on lossless photos makes a flat island that stands out; clean photos
    and their brightened, darkened and contrast-raised versions (clipping makes flat regions too)
    almost never hold one."""
    from tfbackdoor import data

    x = data.load_arrays("natural32", limit=500, seed=21)[0]
    layer = spectral.BandAnomaly(grid=True, island=True)
    layer.build((None, 32, 32, 3))
    isl = lambda images: layer.island_statistic(dct2d(np.asarray(images))).numpy()
    clean = [isl(x)] + [isl(perturb.BENIGN_VARIANTS[v](x).numpy()) for v in ("brighter", "darker", "contrast", "blur")]
    assert max((v > 0).mean() for v in clean) <= 0.01, [(v > 0).mean() for v in clean]
    for attack in ("badnets", "badnets3"):
        found = isl(triggers.get(attack)(x).numpy())
        assert (found > 0).mean() >= 0.6, (attack, (found > 0).mean())
        assert np.all((found == 0) | (found > spectral.ISLAND_MIN_STEP))
    # a flat patch whose colour is all over the image is no island (clipping looks like that)
    white = x.copy()
    white[:, :6, :, :] = 255
    assert (isl(triggers.get("badnets3")(white).numpy()) > 0).mean() <= 0.01
    # a patch of any colour, anywhere (not just white corners)
    grey = x.copy()
    grey[:, 10:14, 5:9, :] = np.array([40, 200, 90], np.uint8)
    assert (isl(grey) > 0).mean() >= 0.6
    # the detector: a 12th threshold column, kept by save/load; configs without it have none
    base = detector.build("cnn6", 32, "dct", threshold=0.7)
    model, report = spectral.fit(base, [x[:300]], [x[300:]], target_fpr=1.0, statistic="island")
    assert report["island"] == spectral.island_settings() and np.array(report["thresholds"]).shape == (2, 12)
    path = tmp_path / "island.keras"
    detector.save(model, path)
    again = detector.load(path).get_layer("spectral_anomaly")
    assert again.island and again.grid and tuple(again.thresholds.shape) == (2, 12)
    assert again.island_near_tol == spectral.ISLAND_NEAR_TOL < spectral.ISLAND_NEAR_TOL_ROUND8
    config = spectral.BandAnomaly(grid=True).get_config()
    config.pop("island")      # a config saved before the option existed
    old = spectral.BandAnomaly.from_config(config)
    old.build((None, 32, 32, 3))
    assert not old.island and tuple(old.thresholds.shape) == (2, 11)


def test_the_island_tolerance_is_the_layers_and_old_configs_keep_8_levels():
    """``island_near_tol`` decides whether a near-white textured area elsewhere hides a white patch;
    it is saved with the layer, and a config saved before it was (round 8) keeps 8 levels."""
    rng = np.random.default_rng(0)
    x = rng.integers(60, 120, (4, 32, 32, 3)).astype(np.uint8)
    x[:, :4, :16] = rng.integers(246, 253, (4, 4, 16, 3))     # bright texture: 3..9 levels below 255
    x[:, -3:, -3:] = 255                                        # a white 3x3 patch
    coeffs = dct2d(x)
    values = {}
    for tol in (0.0, spectral.ISLAND_NEAR_TOL, 8.0):
        layer = spectral.BandAnomaly(grid=True, island=True, island_near_tol=tol)
        layer.build((None, 32, 32, 3))
        values[tol] = layer.island_statistic(coeffs).numpy()
    assert np.all(values[0.0] > spectral.ISLAND_MIN_STEP) and np.all(values[8.0] == 0), values
    np.testing.assert_array_equal(values[spectral.ISLAND_NEAR_TOL], values[0.0])
    config = spectral.BandAnomaly(grid=True, island=True, island_near_tol=3.0).get_config()
    assert spectral.BandAnomaly.from_config(config).island_near_tol == 3.0
    config.pop("island_near_tol")     # a round-8 config
    assert spectral.BandAnomaly.from_config(config).island_near_tol == spectral.ISLAND_NEAR_TOL_ROUND8 == 8.0
    assert spectral.island_settings(5.0)["near_tol"] == 5.0


def test_an_island_tolerance_is_refused_for_other_statistics_before_any_image_is_loaded():
    from tfbackdoor.errors import TfbdError

    x = [np.zeros((4, 32, 32, 3), np.uint8)]
    with pytest.raises(TfbdError, match="only for the island statistic .got statistic 'grid'"):
        spectral.fit(detector.build("cnn6", 32, "dct"), x, x, statistic="grid", island_near_tol=2.0)
    with pytest.raises(TfbdError, match="0..255 levels"):
        spectral.check_statistic("island", 300)
    assert spectral.check_statistic("island", None) == spectral.ISLAND_NEAR_TOL
    assert spectral.check_statistic("island", "1.5") == 1.5
    # detector.fit_spectral checks first: a dataset that cannot be loaded is never reached
    with pytest.raises(TfbdError, match="only for the island statistic"):
        detector.fit_spectral(detector.build("cnn6", 32, "dct"), "dir:/nonexistent", 10, statistic="bands",
                              island_tolerance=4.0, verbose=False)


def test_large_inputs_are_searched_for_islands_after_an_area_downsampling():
    """Above 64 px the rectangle search runs on the image area-downsampled by ``island_factor``
    (224 px: 7, to 32 px; 128 px: 4): a patch scaled with the frame, aligned or not with the
    7x7 cells, is still a flat island there, and a noisy frame without one has none."""
    from edge.screen import island_factor as edge_factor

    assert [spectral.island_factor(s, s) for s in (32, 64, 65, 128, 224, 250)] == [1, 1, 3, 4, 7, 8]
    assert all(edge_factor(h, w) == spectral.island_factor(h, w) for h, w in ((224, 224), (64, 64), (96, 200)))
    rng = np.random.default_rng(3)
    for size, side in ((224, 28), (128, 16)):
        x = np.clip(rng.normal(120, 25, (3, size, size, 3)), 0, 255).astype(np.uint8)
        layer = spectral.BandAnomaly(grid=True, island=True)
        layer.build((None, size, size, 3))
        assert layer._island_factor == spectral.island_factor(size, size) and layer._island
        patched = x.copy()
        patched[1, -side - 3:-3, -side - 3:-3] = 255               # not on the cells' lattice
        patched[2, 2 * side:3 * side, side:2 * side] = (30, 200, 90)  # on it, any colour
        found = layer.island_statistic(dct2d(patched)).numpy()
        assert found[0] == 0 and found[1] > spectral.ISLAND_MIN_STEP and found[2] > spectral.ISLAND_MIN_STEP, found


def test_the_island_statistic_at_224_px_on_camera_photos_and_its_numpy_twin(data_dir):
    """On real 224-px colour photos: the paper's BadNets square (resized to 224) makes an island in
    most of them, the clean photos and their benign variants in almost none, and the edge
    screener's numpy statistic equals the layer's, downsampling included."""
    from edge.screen import SpectralPart
    from tfbackdoor import data, export

    x = data.load_arrays(f"dir:{data_dir}/natural/camera", image_size=224, limit=60, seed=4)[0]
    model, _ = spectral.fit(detector.build("edge", 224, "dct", threshold=0.7), [x[:20]], [x[20:30]],
                            target_fpr=2.0, statistic="island-only")   # the island statistic is the same
    layer = model.get_layer("spectral_anomaly")
    isl = lambda images: layer.island_statistic(dct2d(np.asarray(images))).numpy()
    test = x[30:]
    clean = [isl(test)] + [isl(perturb.BENIGN_VARIANTS[v](test).numpy()) for v in ("brighter", "contrast", "resize")]
    assert max((v > 0).mean() for v in clean) <= 0.1, [(v > 0).mean() for v in clean]
    badnets = triggers.expand("badnets", 224)[0](test).numpy()
    assert (isl(badnets) > 0).mean() >= 0.6
    part = SpectralPart(json.loads(json.dumps(export.sidecar_entry(model))), (224, 224))
    both = np.concatenate([test[:10], badnets[:10]])
    np.testing.assert_array_equal(part.island_statistic(both.astype(np.float64)), isl(both))


def test_band_edges_cover_every_frequency_but_the_dc_once():
    for size in (32, 64, 224):
        masks = spectral.band_masks(size, size)
        assert masks.shape == (5, size, size)
        total = masks.sum(0)
        assert total[0, 0] == 0 and np.all(total.reshape(-1)[1:] == 1)


def test_models_fitted_before_the_texture_statistic_load_as_max_z_only():
    config = spectral.SpectralAnomaly(name="spectral_anomaly").get_config()
    config.pop("texture")   # a config saved before the option existed
    old = spectral.SpectralAnomaly.from_config(config)
    old.build((None, 32, 32, 3))
    assert not old.texture and len(old.weights) == 2
    new = spectral.SpectralAnomaly(texture=True)
    new.build((None, 32, 32, 3))
    assert len(new.weights) == 4


def test_image_domain_detectors_are_refused():
    from tfbackdoor.errors import TfbdError

    with pytest.raises(TfbdError, match="DCT-domain"):
        spectral.fit(detector.build("cnn6", 32, "image"), [np.zeros((4, 32, 32, 3), np.uint8)],
                     [np.zeros((4, 32, 32, 3), np.uint8)])


def test_cli_fit_spectral_records_its_images_and_evaluate_leaves_them_out(tmp_path, data_dir):
    from click.testing import CliRunner

    from cli.main import main

    def run_tfbd(*args):
        return CliRunner().invoke(main, list(args))

    out = tmp_path / "spec.keras"
    base = tmp_path / "base.keras"
    detector.save(detector.build("cnn6", 32, "dct", threshold=0.7), base)
    r = run_tfbd("fit-spectral", "--detector", str(base), "--dataset", "cifar10:lossless", "--samples", "150",
                 "--calibration", "50", "--out", str(out))
    assert r.exit_code == 0, r.output
    model = detector.load(out)
    excl = detector.exclusions(model)["cifar10:lossless"]
    assert len(excl) == 200
    x = detector.load_eval_images(model, "cifar10:lossless", limit=3800)
    assert len(x) == 3800
    bad = run_tfbd("fit-spectral", "--detector", str(base), "--dataset", "cifar10:lossless", "--target-fpr", "0",
                   "--out", str(out))
    assert bad.exit_code != 0 and "--target-fpr" in bad.output and "Traceback" not in bad.output
    bad = run_tfbd("fit-spectral", "--detector", str(base), "--dataset", "cifar10:lossless", "--island-tolerance", "2",
                   "--out", str(out))
    assert bad.exit_code != 0 and "only for the island statistic (got statistic 'bands')" in bad.output
    r = run_tfbd("fit-spectral", "--detector", str(base), "--dataset", "cifar10:lossless", "--samples", "150",
                 "--calibration", "50", "--statistic", "island", "--island-tolerance", "1.5", "--out", str(out))
    assert r.exit_code == 0, r.output
    layer = detector.load(out).get_layer("spectral_anomaly")
    assert layer.island and layer.island_near_tol == 1.5
    assert detector.spec_of(detector.load(out)).info["spectral"]["island"]["near_tol"] == 1.5


def test_island_only_calibrates_the_island_statistic_alone(data_dir):
    """``statistic="island-only"``: the same layer, every other statistic at ``UNUSED`` (never
    passes), so the part flags exactly the images with an island above its threshold."""
    from tfbackdoor import data

    x = data.load_arrays("natural32", limit=400, seed=23)[0]
    assert spectral.check_statistic("island-only", 6.0) == 6.0
    model, report = spectral.fit(detector.build("cnn6", 32, "dct", threshold=0.7), [x[:200]], [x[200:300]],
                                 target_fpr=1.0, statistic="island-only")
    thr = np.array(report["thresholds"])
    assert report["statistic"] == "island-only" and thr.shape == (2, 12)
    assert np.all(thr[:, :-1] == np.float32(spectral.UNUSED)) and np.all(thr[:, -1] < 100)
    layer = model.get_layer("spectral_anomaly")
    test = np.concatenate([x[300:], triggers.get("badnets3")(x[300:]).numpy()])
    coeffs = dct2d(test)
    ratio = layer(coeffs).numpy()
    branch = layer.route(coeffs).numpy().astype(int)
    islands = layer.island_statistic(coeffs).numpy()
    np.testing.assert_array_equal(ratio > 1, islands > layer.thresholds.numpy()[branch, -1])
    # the layer does not compute the unused statistics (zeros), and keeps that through save/load
    assert layer.island_only and not np.any(layer.band_statistics(coeffs, layer.route(coeffs)).numpy()[:, :-1])
    assert spectral.BandAnomaly.from_config(layer.get_config()).island_only
    config = layer.get_config()
    config.pop("island_only")      # a config saved before the option existed
    assert not spectral.BandAnomaly.from_config(config).island_only
    assert (ratio[100:] > 1).mean() >= 0.6 and (ratio[:100] > 1).mean() <= 0.02
