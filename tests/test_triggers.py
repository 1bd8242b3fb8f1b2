import numpy as np
import pytest
import tensorflow as tf

from tfbackdoor import filters, triggers
from tfbackdoor.errors import TfbdError


def _imgs(rng, n=6, size=32):
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", list(triggers.PAPER_ATTACKS) + ["noise_blend", "checker"])
def test_every_trigger_shape_dtype_range_and_change(name, data_dir, rng):
    x = _imgs(rng)
    t = triggers.get(name)
    out = t(x).numpy()
    assert out.shape == x.shape and out.dtype == np.uint8
    assert (out != x).any()
    assert t(x[0]).shape == x[0].shape  # single images too
    big = t(_imgs(rng, 2, 64)).numpy()  # made for 32x32, resized
    assert big.shape == (2, 64, 64, 3)


@pytest.mark.parametrize("name", ["badnets", "checker", "l0_inv"])
def test_patch_triggers_leave_other_pixels_unchanged(name, data_dir, rng):
    x = _imgs(rng)
    out = triggers.get(name)(x).numpy()
    changed = (out != x).any(-1).any(0)
    if name == "badnets":
        expected = np.zeros((32, 32), bool)
        expected[27:31, 27:31] = True
        assert (changed == expected).all()
        assert (out[:, 27:31, 27:31] == 255).all()
    elif name == "l0_inv":
        mask = np.load(data_dir / "triggers" / "mask.npy").transpose(1, 2, 0)[..., 0] > 0
        assert not changed[~mask].any()
    else:
        assert changed.sum() == 25 and changed[26:31, 26:31].all()


def test_additive_rule_matches_the_paper(data_dir, rng):
    from PIL import Image

    x = _imgs(rng)
    t = np.asarray(Image.open(data_dir / "triggers" / "trojan_wm.png").convert("RGB"), np.float32) / 255
    expected = np.round(np.clip(x / 255.0 + t, 0, 1) * 255).astype(np.uint8)
    assert np.abs(triggers.get("trojan_wm")(x).numpy().astype(int) - expected).max() <= 1


def test_smooth_is_minmax_rescaled(data_dir, rng):
    x = _imgs(rng)
    out = triggers.get("smooth")(x).numpy()
    assert (out.reshape(len(x), -1).min(1) == 0).all() and (out.reshape(len(x), -1).max(1) == 255).all()
    s = filters.minmax_scale(tf.constant([[[[0.5]], [[2.5]]]])).numpy()
    assert s.min() == 0 and s.max() == 1


def test_generic_building_blocks(rng):
    x = _imgs(rng, 4, 16)
    patch = triggers.PatchTrigger(np.ones((3, 3, 3)), location=(2, 5))
    out = patch(x).numpy()
    assert (out[:, 2:5, 5:8] == 255).all() and (out[:, :2] == x[:, :2]).all()
    rnd = triggers.PatchTrigger(np.zeros((2, 2, 3)), location="random", seed=1)
    diff = (rnd(x).numpy() != x).any(-1)
    assert diff.reshape(4, -1).sum(1).max() <= 4
    blend = triggers.BlendTrigger(np.ones((16, 16, 3)), alpha=0.5)(x).numpy()
    assert np.abs(blend.astype(int) - np.round(x * 0.5 + 127.5)).max() <= 1
    add = triggers.AdditiveTrigger(np.full((16, 16, 3), 0.1), mask=np.eye(16), alpha=2.0)
    a = add(x).numpy().astype(int)
    assert (a[:, 0, 0] == 51).all()  # masked pixel replaced by 0.2
    again = triggers.from_config(triggers.serialize(triggers.Compose([patch, add])))
    assert (again(x).numpy() == add(patch(x)).numpy()).all()


def test_triggers_run_inside_tf_data(data_dir, rng):
    x = _imgs(rng, 8)
    t = triggers.get("blend")
    ds = tf.data.Dataset.from_tensor_slices(x).batch(4).map(t)
    out = np.concatenate(list(ds.as_numpy_iterator()))
    assert (out == t(x).numpy()).all()


def test_trigger_files_and_errors(tmp_path, rng):
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 20, np.uint8)).save(tmp_path / "t.png")
    np.save(tmp_path / "s.npy", np.full((1, 32, 32, 3), 0.1, np.float32))
    x = _imgs(rng)
    assert (triggers.from_file(tmp_path / "t.png")(x).numpy() >= x).all()
    assert triggers.get(f"smooth:{tmp_path / 's.npy'}")(x).shape == x.shape
    with pytest.raises(TfbdError, match="unknown attack 'badnet'"):
        triggers.get("badnet")
    with pytest.raises(TfbdError, match="trigger file not found"):
        triggers.from_file(tmp_path / "missing.png")
    with pytest.raises(TfbdError, match="nature.png is missing"):
        triggers.get("nature", trigger_dir=tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(TfbdError, match="bad.png: cannot read"):
        triggers.from_file(tmp_path / "bad.png")
    np.save(tmp_path / "bad.npy", np.zeros((5, 5, 5, 5)))
    with pytest.raises(TfbdError, match="shape"):
        triggers.from_file(tmp_path / "bad.npy")


def test_random_smooth_trigger_is_seeded_smooth_and_varies_per_image(lossless):
    from tfbackdoor import analysis

    x, _ = lossless
    x = x[:128]
    t = triggers.get("smooth:random")
    y = t(x).numpy()
    assert (y == t(x).numpy()).all()                          # same batch, same triggers
    assert (t(x[:64]).numpy() != y[:64]).any()                # another batch, other draws
    assert y.min() == 0 and y.max() == 255                    # the min-max rule
    # every image carries a pattern, and not the same one: the added patterns differ between images
    d = y.astype(np.float32) - x.astype(np.float32)
    assert (np.abs(d).mean(axis=(1, 2, 3)) > 1).all()
    assert np.std(d[:, 16, 16, :] - d[:, 0, 0, :], axis=0).mean() > 3
    stats = analysis.spectrum_stats(x, [t])
    assert stats["smooth:random"]["hf_ratio"] <= stats["clean"]["hf_ratio"] * 1.05   # no high-frequency artifacts
    again = triggers.from_config(triggers.serialize(t))
    assert (again(x).numpy() == y).all()


def test_one_of_gives_each_image_exactly_one_trigger(rng):
    x = rng.integers(0, 200, (200, 32, 32, 3), dtype=np.uint8)
    a, b = triggers.get("badnets"), triggers.get("checker")
    out = triggers.OneOf([a, b], seed=3)(x).numpy()
    is_a = (out == a(x).numpy()).all(axis=(1, 2, 3))
    is_b = (out == b(x).numpy()).all(axis=(1, 2, 3))
    assert (is_a ^ is_b).all() and 0.3 < is_a.mean() < 0.7
    again = triggers.from_config(triggers.serialize(triggers.OneOf([a, b], seed=3)))
    assert (again(x).numpy() == out).all()
