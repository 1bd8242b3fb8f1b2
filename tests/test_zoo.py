"""The evaluation attack zoo (tfbackdoor.triggers.zoo): shapes, determinism and one property per attack that can fail."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.fft import dctn

from tfbackdoor import detector, scoring, triggers
from tfbackdoor.errors import TfbdError
from tfbackdoor.triggers import zoo

NEEDS_DATA = {"blended"}


def _imgs(rng, n=6, size=32, lo=0, hi=255):
    """Random uint8 images with values in [lo, hi)."""
    return rng.integers(lo, hi, (n, size, size, 3), dtype=np.uint8)


def _get(name, request, size=32):
    if name.split("+")[0] in NEEDS_DATA or name.split("+")[0] in triggers.PAPER_ATTACKS:
        request.getfixturevalue("data_dir")
    return triggers.get(name, size)


def _changed(x, out):
    return (out != x).any(-1)  # N H W


# --------------------------------------------------------------------------- every attack

@pytest.mark.parametrize("name", zoo.ZOO_ATTACKS)
def test_every_zoo_attack_shape_dtype_determinism(name, request, rng):
    x = _imgs(rng)
    t = _get(name, request)
    out = t(x).numpy()
    assert out.shape == x.shape and out.dtype == np.uint8
    assert (out != x).any()
    np.testing.assert_array_equal(t(x).numpy(), out)                      # same object again
    np.testing.assert_array_equal(_get(name, request)(x).numpy(), out)    # a fresh one, same seed
    assert t(x[0]).shape == x[0].shape                                     # single images
    big = _get(name, request, 64)(_imgs(rng, 2, 64)).numpy()
    assert big.shape == (2, 64, 64, 3) and big.dtype == np.uint8


def test_zoo_attacks_run_inside_tf_data(data_dir, rng):
    import tensorflow as tf

    x = _imgs(rng, 8)
    for name in list(zoo.ZOO_ATTACKS) + ["badnets+jpeg90", "clean+jpeg75"]:
        ds = tf.data.Dataset.from_tensor_slices(x).batch(4).map(triggers.get(name))  # first call in a graph
        out = np.concatenate(list(ds.as_numpy_iterator()))
        t = triggers.get(name)
        np.testing.assert_array_equal(out, np.concatenate([t(x[:4]).numpy(), t(x[4:]).numpy()]), err_msg=name)


def test_groups_names_and_errors(data_dir):
    zoo_trigs = triggers.expand("zoo")
    assert len(zoo_trigs) == 11 and [t.name for t in zoo_trigs] == list(zoo.ZOO_ATTACKS)
    assert len(triggers.expand("all,zoo")) == 7 + 11
    jp = triggers.expand("zoo+jpeg")
    assert [t.name for t in jp] == [f"{a}+jpeg{q}" for a in ("badnets", "blended", "sig", "ftrojan", "trojan_wm")
                                    for q in (75, 90)]
    assert all(hasattr(t, "clean_transform") for t in jp)
    assert set(zoo.ZOO_ATTACKS) <= set(triggers.available())
    for bad in ("no_such_attack", "no_such_attack+jpeg90", "lf:abc", "wanet:x1"):
        with pytest.raises(TfbdError, match=bad.split("+")[0]):
            triggers.get(bad)
    with pytest.raises(TfbdError, match="quality"):
        triggers.get("badnets+jpeg0")
    with pytest.raises(TfbdError, match="badnets3"):  # the known list names the zoo
        triggers.get("no_such_attack")


@pytest.mark.parametrize("name", list(zoo.ZOO_ATTACKS) + ["lf:3", "wanet:5", "badnets+jpeg90", "clean+jpeg75",
                                                          "sig+jpeg75"])
def test_config_round_trip_gives_identical_outputs(name, request, rng):
    x = _imgs(rng, 4)
    t = _get(name, request)
    cfg = json.loads(json.dumps(triggers.serialize(t)))
    t2 = triggers.from_config(cfg)
    assert type(t2) is type(t) and t2.name == t.name
    np.testing.assert_array_equal(t2(x).numpy(), t(x).numpy())


# --------------------------------------------------------------------------- patches

def test_badnets3_and_grid_change_exactly_the_bottom_right_3x3(rng):
    x = _imgs(rng, hi=255)  # no 255s, so every white pixel changes
    out = triggers.get("badnets3")(x).numpy()
    expected = np.zeros((32, 32), bool)
    expected[29:, 29:] = True
    assert (_changed(x, out) == expected).all()
    assert (out[:, 29:, 29:] == 255).all()
    x = _imgs(rng, lo=1, hi=255)  # no 0s or 255s: every grid cell changes
    out = triggers.get("badnets_grid")(x).numpy()
    assert (_changed(x, out) == expected).all()
    grid = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]]) * 255
    assert (out[:, 29:, 29:] == grid[None, :, :, None]).all()
    assert triggers.get("badnets3", 64).patch.shape[:2] == (6, 6)


@pytest.mark.parametrize("size", [32, 64])
def test_art_single_and_pattern_set_exactly_those_pixels(size, rng):
    x = _imgs(rng, size=size, hi=255)
    h = w = size
    for name, pixels in (("art_single", [(h - 2, w - 2)]),
                         ("art_pattern", [(h - 2, w - 2), (h - 3, w - 3), (h - 2, w - 4), (h - 4, w - 2)])):
        out = triggers.get(name, size)(x).numpy()
        expected = np.zeros((h, w), bool)
        for r, c in pixels:
            expected[r, c] = True
        assert (_changed(x, out) == expected).all(), name
        assert all((out[:, r, c] == 255).all() for r, c in pixels)


def test_insert_image_pastes_a_blended_10x10_icon_at_varying_places(rng, tmp_path):
    x = _imgs(rng, 16, lo=1, hi=255)
    t = triggers.get("insert_image")
    out = t(x).numpy()
    icon = t.patch(32)
    assert icon.shape == (10, 10, 3)
    corners = set()
    for xi, oi in zip(x, out):
        rows, cols = np.nonzero(_changed(xi, oi))
        top, left = rows.min(), cols.min()
        assert rows.max() - top < 10 and cols.max() - left < 10   # only a 10x10 region changes
        top, left = min(top, 22), min(left, 22)
        region = xi[top:top + 10, left:left + 10].astype(np.float64)
        want = np.round(np.clip(0.8 * icon + 0.2 * region / 255.0, 0, 1) * 255)
        np.testing.assert_allclose(oi[top:top + 10, left:left + 10], want, atol=1)
        corners.add((top, left))
    assert len(corners) > 8
    # The default icon is a warning sign: red outline, yellow fill, black mark, white around it.
    big = zoo.alert_icon()
    for colour in ([0.85, 0.05, 0.05], [1.0, 0.85, 0.1], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]):
        assert (np.abs(big - colour).max(-1) < 1e-6).sum() > 100
    # An icon file, resized to 10x10.
    Image.fromarray(np.full((40, 40, 3), (0, 0, 255), np.uint8)).save(tmp_path / "blue.png")
    t2 = triggers.get(f"insert_image:{tmp_path / 'blue.png'}")
    np.testing.assert_allclose(t2.patch(32), np.broadcast_to([0.0, 0.0, 1.0], (10, 10, 3)), atol=1e-6)


# --------------------------------------------------------------------------- blended

def test_blended_is_the_convex_blend_with_the_recovered_kitty(data_dir, rng, tmp_path):
    x = _imgs(rng)
    kitty = np.clip(triggers.read_pattern(data_dir / "triggers" / "blend.png") / 0.2, 0, 1)
    assert kitty.max() > 0.95  # recovered to the full range
    out = triggers.get("blended")(x).numpy().astype(np.float64)
    want = np.round((0.8 * x / 255.0 + 0.2 * kitty) * 255)
    assert np.abs(out - want).max() <= 1
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "grey.png")
    t = triggers.get(f"blended:{tmp_path / 'grey.png'}:0.5")
    assert t.alpha == 0.5
    assert np.abs(t(x).numpy() - np.round(0.5 * x + 100)).max() <= 1
    assert triggers.get(f"blended:{tmp_path / 'grey.png'}").alpha == 0.2


# --------------------------------------------------------------------------- SIG

def test_sig_adds_a_horizontal_sinusoid_at_f_cycles(rng):
    x = _imgs(rng, lo=50, hi=200)  # no clipping
    d = triggers.get("sig")(x).numpy().astype(np.float64) - x
    assert (d == d[:, :1]).all()                      # the same for every row
    assert (d == d[..., :1]).all()                    # and every channel
    spec = np.abs(np.fft.rfft(d, axis=2)).mean(axis=(0, 1, 3))
    assert np.argmax(spec) == 6
    assert abs(spec[6] * 2 / 32 - 40) < 1.5           # amplitude delta = 40
    assert spec[6] > 20 * np.delete(spec, 6).max()


# --------------------------------------------------------------------------- WaNet

def test_wanet_warps_pixels_but_keeps_the_mean(lossless):
    x = lossless[0][:128]
    t = triggers.get("wanet")
    out = t(x).numpy().astype(np.float64)
    d = out - x
    assert np.median(np.abs(d).max(axis=(1, 2, 3))) > 20           # pixels move: edges change a lot
    assert np.abs(out.mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3))).mean() < 0.01 * 255
    shift = t.grid(32, 32) - zoo.WarpTrigger(s=0.0).grid(32, 32)
    assert 0.05 < np.abs(shift).max() * 15.5 < 2.0                 # sub-pixel to ~1 px displacements
    other = zoo.WarpTrigger(seed=1)
    assert np.abs(other.grid(32, 32) - t.grid(32, 32)).max() > 1e-3
    assert (other(x).numpy() != out).any()


def test_wanet_sampler_conventions(rng):
    x = _imgs(rng, 3)
    np.testing.assert_array_equal(zoo.WarpTrigger(s=0.0)(x).numpy(), x)  # identity grid -> identity

    class Shift(zoo.WarpTrigger):
        def grid(self, h, w):  # every pixel samples its right neighbour (align-corners units)
            g = zoo.WarpTrigger(s=0.0).grid(h, w)
            g[..., 0] = np.clip(g[..., 0] + 2.0 / (w - 1), -1, 1)
            return g

    out = Shift()(x).numpy()
    np.testing.assert_array_equal(out[:, :, :-1], x[:, :, 1:])
    np.testing.assert_array_equal(zoo._bicubic_matrix(4, 4), np.eye(4))
    m = zoo._bicubic_matrix(32, 4)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(m[[0, -1]], np.eye(4)[[0, -1]], atol=1e-12)  # corners aligned


# --------------------------------------------------------------------------- FTrojan / CTRL

def _chroma_dct(x, out, name):
    """DCT of the difference's chroma channels per 32x32 window: (N, bh, bw, 2, 32, 32)."""
    a, b = x.astype(np.float32), out.astype(np.float32)
    if name == "ftrojan":
        import cv2

        conv = lambda im: np.stack([cv2.cvtColor(i, cv2.COLOR_RGB2YCrCb) for i in im])  # noqa: E731
    else:
        m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
        conv = lambda im: im @ m.T  # noqa: E731
    d = conv(b) - conv(a)
    n, h, w, _ = d.shape
    blocks = d.reshape(n, h // 32, 32, w // 32, 32, 3).transpose(0, 1, 3, 5, 2, 4)
    return dctn(blocks, axes=(4, 5), norm="ortho"), d[..., 0]


@pytest.mark.parametrize("name,magnitude", [("ftrojan", 30.0), ("ctrl", 100.0)])
@pytest.mark.parametrize("size", [32, 64])
def test_chroma_dct_peaks_at_the_chosen_coefficients(name, magnitude, size, rng):
    x = _imgs(rng, 4, size, lo=70, hi=186)  # no clipping
    out = triggers.get(name, size)(x).numpy()
    c, luma = _chroma_dct(x, out, name)
    assert np.abs(luma).max() < 1.5                          # luma untouched but for rounding
    for ch in (1, 2):
        mag = np.abs(c[:, :, :, ch])                         # N bh bw 32 32
        flat = mag.reshape(*mag.shape[:3], -1)
        top2 = np.sort(np.argsort(flat, axis=-1)[..., -2:], axis=-1)
        assert (top2 == [15 * 32 + 15, 31 * 32 + 31]).all()  # in every window of every image
        for u in (15, 31):
            np.testing.assert_allclose(c[:, :, :, ch, u, u], magnitude, rtol=0.12)
        rest = flat.copy()
        rest[..., [15 * 32 + 15, 31 * 32 + 31]] = 0
        assert rest.max() < 0.2 * magnitude


def test_chroma_dct_leaves_pixels_beyond_the_last_window(rng):
    x = _imgs(rng, 2, 40, lo=70, hi=186)
    out = triggers.get("ftrojan", 40)(x).numpy()
    assert (out[:, 32:] == x[:, 32:]).all() and (out[:, :, 32:] == x[:, :, 32:]).all()
    assert (out[:, :32, :32] != x[:, :32, :32]).any()
    with pytest.raises(TfbdError, match="window"):
        triggers.get("ftrojan", 16)(_imgs(rng, 1, 16))


# --------------------------------------------------------------------------- LF

def test_lf_is_low_frequency_with_max_amplitude_0_1(rng):
    x = _imgs(rng, 4, lo=30, hi=225)  # no clipping
    t = triggers.get("lf")
    d = t(x).numpy().astype(np.float64) - x
    assert np.abs(d).max() in (25, 26)                                # 0.1 * 255, rounded
    e = dctn(d, axes=(1, 2), norm="ortho") ** 2
    low = np.add.outer(np.arange(32), np.arange(32)) < 32 / 4
    assert e[:, low].sum() / e.sum() > 0.95
    p = t.pattern(32, 32)
    assert np.isclose(np.abs(p).max(), 0.1) and np.abs(p.mean(axis=(0, 1))).max() < 1e-6
    assert np.abs(triggers.get("lf:1").pattern(32, 32) - p).max() > 0.01


# --------------------------------------------------------------------------- JPEG

_LUMA_Q = np.array([[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
                    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
                    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
                    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]])


def _quantised_share(images, quality, offset=0):
    """Share of the nonzero 8x8 luma DCT coefficients (table entries >= 8) lying within 1.5 of a
    multiple of the JPEG quantisation step: near 1 for a JPEG decode on its grid, ~0.2 otherwise."""
    q = np.clip((_LUMA_Q * (200 - 2 * quality) + 50) // 100, 1, 255)
    y = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) - 128
    s = 32 - (8 if offset else 0)
    y = y[:, offset:offset + s, offset:offset + s]
    n = y.shape[0]
    c = dctn(y.reshape(n, s // 8, 8, s // 8, 8).transpose(0, 1, 3, 2, 4), axes=(3, 4), norm="ortho")
    level = np.round(c / q)
    sel = (np.abs(level) >= 1) & (q >= 8)
    return float((np.abs(c - level * q)[sel] < 1.5).mean())


def test_jpeg_suffix_round_trips_after_the_trigger(lossless):
    x = lossless[0][:48]
    t = triggers.get("badnets+jpeg90")
    out = t(x).numpy()
    assert out.shape == x.shape and out.dtype == np.uint8 and t.name == "badnets+jpeg90"
    assert isinstance(t.clean_transform, zoo.JpegRoundTrip) and t.clean_transform.quality == 90
    np.testing.assert_array_equal(out, t.clean_transform(triggers.get("badnets")(x)).numpy())
    np.testing.assert_array_equal(t(x).numpy(), out)
    # 8x8 block quantisation is visible on the JPEG grid, not off it, nor in the lossless input.
    assert _quantised_share(out, 90) > 0.85
    assert _quantised_share(out, 90, offset=4) < 0.4 and _quantised_share(x, 90) < 0.4
    assert t.clean_transform(x[0]).shape == x[0].shape
    assert zoo.JpegRoundTrip(90) == t.clean_transform and zoo.JpegRoundTrip(75) != t.clean_transform


def test_clean_jpeg_is_the_round_trip_alone(lossless):
    x = lossless[0][:32]
    t = triggers.get("clean+jpeg90")
    out = t(x).numpy()
    np.testing.assert_array_equal(out, t.clean_transform(x).numpy())
    assert (out != x).any() and _quantised_share(out, 90) > 0.95
    assert t.name == "clean+jpeg90"


def test_evaluation_compares_jpeg_rows_with_jpeg_clean_images(monkeypatch, rng):
    """The clean side of a row whose trigger has a clean_transform is scored after that transform."""
    x = _imgs(rng, 40)
    seen = []

    def fake_score(model, images, batch_size=256):  # a deterministic image statistic as the score
        images = np.asarray(images)
        seen.append(images)
        return np.abs(np.diff(images.astype(np.float64), axis=2)).mean(axis=(1, 2, 3)) / 255.0

    monkeypatch.setattr(scoring, "score", fake_score)
    monkeypatch.setattr(scoring, "spec_of", lambda m: type("S", (), {"threshold": 0.5})())
    thr = float(np.median(fake_score(None, zoo.JpegRoundTrip(90)(x).numpy())))
    attacks = [triggers.get("clean+jpeg90"), triggers.get("badnets+jpeg90"), triggers.get("badnets")]
    seen.clear()
    rows = detector.evaluate_images(None, x, attacks, threshold=thr)
    n_scored = len(seen)
    assert [r["attack"] for r in rows] == ["clean", "clean+jpeg90", "badnets+jpeg90", "badnets"]
    clean_jpeg = next(r for r in rows if r["attack"] == "clean+jpeg90")
    assert clean_jpeg["fpr"] == clean_jpeg["bdr"] and clean_jpeg["auroc"] == 50.0
    jpeg_fpr = round(100 * np.mean(fake_score(None, zoo.JpegRoundTrip(90)(x).numpy()) > thr), 2)
    assert rows[2]["fpr"] == jpeg_fpr and rows[3]["fpr"] == rows[0]["fpr"]
    assert rows[0]["fpr"] != jpeg_fpr                     # the comparison is different without it
    # The JPEG'd clean images were scored once for both JPEG rows.
    assert n_scored == 1 + 3 + 1  # clean, (trigger, jpeg clean), trigger, trigger
