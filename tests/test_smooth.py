import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cli.main import main
from tfbackdoor import filters, smooth, triggers, victim
from tfbackdoor.errors import TfbdError
from tfbackdoor.frequency import dct2d, high_frequency_ratio


def hf(images_float):
    return high_frequency_ratio(dct2d(tf.convert_to_tensor(images_float, tf.float32))).numpy()


# ------------------------------------------------------------------------------ the filter

def test_kernel_has_30_taps_sums_to_one_and_is_symmetric():
    k = filters.gaussian_kernel()
    assert k.shape == (30,) and k.dtype == np.float32
    assert abs(float(k.sum()) - 1.0) < 1e-6
    np.testing.assert_allclose(k, k[::-1], atol=1e-7)
    assert k.argmax() in (14, 15) and k[0] < k[14]
    # sigma 6 px: the ratio of the taps 6 px apart from the centre is exp(-1/2).
    i = np.arange(30) - 14.5
    np.testing.assert_allclose(k / k.max(), np.exp(-0.5 * (i / 6.0) ** 2) / np.exp(-0.5 * (0.5 / 6) ** 2), rtol=1e-5)
    with pytest.raises(TfbdError):
        filters.gaussian_kernel(taps=0)


def test_low_pass_removes_high_frequencies_keeps_shape(rng):
    noise = rng.random((4, 32, 32, 3)).astype(np.float32) * 255
    out = filters.low_pass(noise).numpy()
    assert out.shape == noise.shape
    before, after = hf(noise), hf(out)
    assert before.min() > 0.6          # white noise: most AC energy is outside the low quarter
    assert after.max() < 0.01          # filtered: almost none left
    # Interior of a constant image is preserved (the kernel sums to 1); borders see the zero padding.
    const = filters.low_pass(np.ones((1, 64, 64, 3), np.float32)).numpy()
    assert abs(const[0, 32, 32, 0] - 1.0) < 1e-5 and const[0, 0, 0, 0] < 0.5
    np.testing.assert_allclose(filters.low_pass(noise[0]).numpy(), out[0], atol=1e-4)


def test_low_pass_layer_matches_function_and_round_trips(tmp_path, rng):
    x = rng.random((2, 32, 32, 3)).astype(np.float32)
    layer = filters.LowPass()
    np.testing.assert_allclose(layer(x).numpy(), filters.low_pass(x).numpy(), atol=1e-5)
    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, filters.LowPass(sigma=3.0, taps=12)(inp))
    model.save(tmp_path / "lp.keras")
    again = keras.saving.load_model(tmp_path / "lp.keras", safe_mode=True)
    np.testing.assert_allclose(again(x).numpy(), filters.low_pass(x, 3.0, 12).numpy(), atol=1e-5)


# ------------------------------------------------------------------------------- the rule M

def test_minmax_maps_to_unit_range_without_clipping(rng):
    x = rng.random((3, 8, 8, 3)).astype(np.float32) * 0.5 + 0.25
    r = np.zeros((8, 8, 3), np.float32)
    r[2, 3, 1] = 2.0                                   # pushes one pixel far above 1
    out = smooth.minmax_apply(x, r, lam=1.0).numpy()
    flat = out.reshape(3, -1)
    np.testing.assert_allclose(flat.min(1), 0, atol=1e-6)
    np.testing.assert_allclose(flat.max(1), 1, atol=1e-6)
    v = (x + r).reshape(3, -1)
    expected = (v - v.min(1, keepdims=True)) / (v.max(1, keepdims=True) - v.min(1, keepdims=True))
    np.testing.assert_allclose(flat, expected, atol=1e-6)    # linear, no clip: the order is kept
    assert len(np.unique(np.round(flat[0], 5))) > 150        # a clip would flatten values at 1
    # lam scales the trigger; M ignores constants added to it.
    np.testing.assert_allclose(smooth.minmax_apply(x, r, 0.5).numpy(), smooth.minmax_apply(x, 0.5 * r, 1.0).numpy(), atol=1e-6)
    np.testing.assert_allclose(smooth.minmax_apply(x, r + 0.3).numpy(), out, atol=1e-6)
    # Same values as the registry's SmoothTrigger on uint8 images (within rounding).
    xu = (x * 255).round().astype(np.uint8)
    via_trigger = triggers.SmoothTrigger(r)(xu).numpy().astype(int)
    direct = np.round(smooth.minmax_apply(xu / 255.0, r).numpy() * 255).astype(int)
    assert np.abs(via_trigger - direct).max() <= 1


def test_project_bounds_and_shifts():
    r = tf.constant(np.linspace(-1, 3, 48, dtype=np.float32).reshape(4, 4, 3))
    p = smooth.project(r, 0.2).numpy()
    assert abs(p.min()) < 1e-7 and abs(p.max() - 0.2) < 1e-6
    small = smooth.project(r * 0.01, 0.2).numpy()      # within the bound: only shifted
    assert abs(small.max() - 0.04) < 1e-6


# ---------------------------------------------------------------------------- Algorithm 1

@pytest.fixture(scope="module")
def tiny(lossless, tmp_path_factory):
    """A tiny victim (width 8) trained 3 epochs on 400 lossless CIFAR-10 images, saved to disk."""
    x, y = lossless
    keras.utils.set_random_seed(0)
    m = victim.build_victim(32, 10, width=8, augment=False, dropout=0.0)
    m.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    m.fit(x[:400].astype("float32"), y[:400], epochs=3, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.keras"
    m.save(path)
    return m, path, x, y


def test_search_fooling_rate_rises_and_trigger_stays_smooth(tiny):
    m, _, x, y = tiny
    seen = []
    res = smooth.smooth_trigger_search(m, x[:300], y[:300], fooling_rate=0.99, max_passes=4, batch_size=64,
                                       seed=0, progress=seen.append)
    h = res.history
    assert seen == h and [r["pass"] for r in h] == list(range(len(h)))
    assert res.fooling_rate >= h[1]["fooling_rate"]               # kept the best pass
    assert res.fooling_rate > h[0]["fooling_rate"] + 0.2          # rose well above the r = 0 level
    assert max(r["fooling_rate"] for r in h[2:]) >= h[1]["fooling_rate"]
    t = res.trigger
    assert t.shape == (32, 32, 3) and t.dtype == np.float32
    assert t.min() >= 0 and t.max() <= 0.2 + 1e-6
    assert smooth.trigger_hf_ratio(t) < 0.005                     # smooth: no high-frequency energy
    patched = triggers.SmoothTrigger(t)(x[:200]).numpy()
    assert hf(patched).mean() < hf(x[:200]).mean() * 1.1         # patched images stay at the clean level
    assert 0 <= res.target < 10


def test_search_targeted_lam_and_errors(tiny):
    m, _, x, y = tiny
    res = smooth.smooth_trigger_search(m, x[:100], None, target=3, lam=0.5, max_passes=1, holdout=20)
    assert res.target == 3 and all(r["target"] == 3 for r in res.history)
    assert res.trigger.max() <= 0.1 + 1e-6                        # lam * r with r in [0, 0.2]
    again = smooth.smooth_trigger_search(m, x[:100], None, target=3, lam=0.5, max_passes=1, holdout=20)
    np.testing.assert_allclose(again.trigger, res.trigger, atol=1e-6)   # same seed, same trigger
    with pytest.raises(TfbdError, match="target label 10"):
        smooth.smooth_trigger_search(m, x[:50], y[:50], target=10)
    with pytest.raises(TfbdError, match=r"model input shape \(32, 32, 3\) does not fit the data images \(16, 16, 3\)"):
        smooth.smooth_trigger_search(m, x[:50, :16, :16], y[:50])


def test_paper_loop_baseline_runs(tiny):
    m, _, x, y = tiny
    res = smooth.paper_loop_baseline(m, x[:20], y[:20], max_passes=1, max_iter=3, holdout=5)
    assert res.trigger.shape == (32, 32, 3) and res.trigger.min() >= 0 and res.trigger.max() <= 0.2 + 1e-6
    assert len(res.history) == 1


def test_naive_smooth_triggers(data_dir):
    trigs = smooth.naive_smooth_triggers(32, seed=0)
    assert [t.name for t in trigs] == [f"naive_smooth_{i}" for i in range(5)]
    for t in trigs:
        assert t.pattern.shape == (32, 32, 3)
        assert abs(t.pattern.min()) < 1e-7 and abs(t.pattern.max() - 0.2) < 1e-6
        assert smooth.trigger_hf_ratio(t.pattern) < 0.005
    corr = np.corrcoef([t.pattern.ravel() for t in trigs])
    assert np.abs(corr[np.triu_indices(5, 1)]).max() < 0.95        # five different patterns
    again = smooth.naive_smooth_triggers(32, seed=0)
    assert all((a.pattern == b.pattern).all() for a, b in zip(trigs, again))


# ------------------------------------------------------------------------------------ CLI

def test_smooth_and_naive_smooth_cli(tiny, tmp_path):
    _, path, _, _ = tiny
    out = tmp_path / "trig.npy"
    r = CliRunner().invoke(main, ["smooth", "--model", str(path), "--dataset", "cifar10:lossless", "--samples", "120",
                                  "--fooling-rate", "0.99", "--max-passes", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "pass   1" in r.output and "target label:" in r.output
    t = np.load(out)
    assert t.shape == (32, 32, 3) and t.dtype == np.float32
    meta = json.loads((tmp_path / "trig.json").read_text())
    for k in ("target", "fooling_rate", "samples", "lam", "hf_ratio", "clean_hf_ratio", "command"):
        assert k in meta
    assert meta["samples"] == 120 and f"target label: {meta['target']}" in r.output
    assert (tmp_path / "trig.png").stat().st_size > 5000
    assert triggers.get(f"smooth:{out}")(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 32, 32, 3)

    r = CliRunner().invoke(main, ["naive-smooth", "--out-dir", str(tmp_path / "naive")])
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "naive").glob("naive_smooth_*.npy"))
    assert len(files) == 5 and np.load(files[0]).dtype == np.float32


def test_smooth_cli_bad_inputs_exit_2(tiny, tmp_path):
    _, path, x, y = tiny
    np.savez(tmp_path / "small.npz", x=x[:20, :16, :16], y=y[:20])
    r = CliRunner().invoke(main, ["smooth", "--model", str(path), "--dataset", f"npz:{tmp_path / 'small.npz'}",
                                  "--out", str(tmp_path / "t.npy")])
    assert r.exit_code == 2
    line = [ln for ln in r.output.splitlines() if ln.startswith("tfbd: error:")][0]
    assert str(path) in line and "(32, 32, 3)" in line and "(16, 16, 3)" in line
    r = CliRunner().invoke(main, ["smooth", "--model", str(path), "--dataset", "cifar10:lossless", "--samples", "20",
                                  "--target", "12", "--out", str(tmp_path / "t.npy")])
    assert r.exit_code == 2 and "target label 12" in r.output
    assert not (tmp_path / "t.npy").exists()
