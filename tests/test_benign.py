"""BenignProcessing on whole batches: per-image draws with the configured distributions, the same
result as the per-image ops, deterministic per seed."""

import numpy as np
import pytest
import tensorflow as tf

from tfbackdoor import detector, perturb

N = 1024
SEED = tf.constant([5, 6], tf.int64)


def _noise(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _only(**kw):
    """BenignProcessing with every step off except those given."""
    return perturb.BenignProcessing(**{"p_jpeg": 0, "p_color": 0, "p_blur": 0, "p_resize": 0, **kw})


def _changed(x, out):
    return (out != x).reshape(len(x), -1).any(axis=1)


def _near(frac, p, n=N):
    return abs(frac - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9


def _ks(values, points, cdf):
    """Kolmogorov-Smirnov distance of the sample from ``cdf``, taken at ``points`` (every support point
    of a discrete law, or a fine grid), against its 0.1% critical value 1.95 / sqrt(n)."""
    values = np.asarray(values, np.float64)
    d = max(abs((values <= p).mean() - cdf(p)) for p in points)
    return d < 1.95 / np.sqrt(len(values))


@pytest.mark.parametrize("step, kw", [("jpeg", {"p_jpeg": 0.5}), ("jpeg", {"p_jpeg": 0.2}), ("blur", {"p_blur": 0.1}),
                                      ("resize", {"p_resize": 0.1}), ("resize", {"p_resize": 0.6})])
def test_each_step_runs_on_its_share_of_the_batch_and_leaves_the_rest_untouched(step, kw):
    x = _noise()
    b = _only(**kw)
    t = b.get_random_transformation(x, SEED)
    out = b.transform_images(x, t).numpy()
    drew = t["do_" + step].numpy()
    changed = _changed(x, out)
    assert _near(drew.mean(), kw["p_" + step]), drew.mean()
    assert (changed == drew).all()                     # exactly the images that drew it (noise always changes)


def test_jpeg_quality_is_drawn_per_image_over_the_whole_range_and_used():
    x = _noise()
    b = _only(p_jpeg=1.0, jpeg_quality=(40, 95))
    t = b.get_random_transformation(x, SEED)
    out = b.transform_images(x, t).numpy()
    q = t["quality"].numpy()
    assert q.min() == 40 and q.max() == 95 and len(np.unique(q)) == 56     # integers 40..95, each drawn
    assert _ks(q, range(40, 96), lambda k: (k - 39) / 56)                 # uniform on the integers
    for i in range(0, N, 97):                          # each image at its own quality
        assert (out[i] == perturb.jpeg(x[i], int(q[i])).numpy()).all(), i


def test_brightness_shift_is_uniform_per_image_in_the_configured_range():
    x = np.full((N, 32, 32, 3), 128, np.uint8)
    out = _only(p_color=1.0, brightness=30.0, contrast=(1.0, 1.0))(x, SEED).numpy().astype(int)
    shift = out[:, 0, 0, 0] - 128
    assert (out == out[:, :1, :1, :1]).all()           # one shift per image, the same on every pixel
    assert shift.min() >= -30 and shift.max() <= 30 and shift.min() <= -28 and shift.max() >= 28
    assert abs(shift.mean()) < 4 * 17.3 / np.sqrt(N) and abs(shift.std() - 60 / np.sqrt(12)) < 1.5
    assert _ks(shift, range(-30, 31), lambda k: min(1.0, (k + 30.5) / 60))   # round(uniform(-30, 30))
    # p_color: the share of images changed (a shift that rounds to 0, 1 in 60, leaves one unchanged)
    some = _only(p_color=0.3, brightness=30.0, contrast=(1.0, 1.0))(x, SEED).numpy()
    assert _near(_changed(x, some).mean(), 0.3 * 59 / 60)


def test_contrast_gain_is_uniform_per_image_in_the_configured_range_around_the_image_mean():
    ramp = (np.arange(32 * 32 * 3) % 96 + 80).reshape(32, 32, 3)      # 80..175: no clipping up to gain 1.6
    x = np.repeat(ramp[None], N, axis=0).astype(np.uint8)
    out = _only(p_color=1.0, brightness=0.0, contrast=(0.7, 1.3))(x, SEED).numpy().astype(float)
    mean = ramp.mean(axis=(0, 1))                                      # per channel, as BenignProcessing
    c = (ramp - mean).ravel()
    gain = (out - mean).reshape(N, -1) @ c / (c @ c)                   # least squares, +-0.001
    assert np.abs(out.mean(axis=(1, 2)) - mean).max() < 0.1            # around each image's channel means
    assert gain.min() >= 0.7 - 2e-3 and gain.max() <= 1.3 + 2e-3 and gain.min() < 0.71 and gain.max() > 1.29
    assert _ks(gain, np.linspace(0.7, 1.3, 121), lambda g: (g - 0.7) / 0.6)


def test_batched_steps_match_the_per_image_ops():
    x = _noise(48, seed=3)
    b = perturb.BenignProcessing(p_jpeg=0.0, p_color=1.0, p_blur=1.0, p_resize=1.0)
    t = b.get_random_transformation(x, SEED)
    out = b.transform_images(x, t).numpy().astype(int)
    f = t["factor"].numpy()
    s = t["sigma"].numpy()
    assert 0.5 <= f.min() and f.max() < 0.9 and f.std() > 0.05 and 0.3 <= s.min() and s.max() < 1.0 and s.std() > 0.1
    for i in range(len(x)):
        y = perturb._gaussian_blur(perturb._resize_down_up(tf.cast(x[i], tf.float32), t["factor"][i]), t["sigma"][i])
        mean = tf.reduce_mean(y, axis=[0, 1], keepdims=True)
        ref = perturb._u8((y - mean) * t["gain"][i] + mean + t["delta"][i]).numpy().astype(int)
        assert np.abs(ref - out[i]).max() <= 1, i      # float rounding only


def test_same_seed_same_output_and_one_image_or_a_graph_work():
    x = _noise(64, seed=4)
    b = perturb.BenignProcessing(p_blur=0.5, p_resize=0.5, seed=2)
    a1, a2 = b(x, SEED).numpy(), perturb.BenignProcessing.from_config(b.get_config())(x, SEED).numpy()
    assert (a1 == a2).all() and (b(x).numpy() == b(x).numpy()).all()
    assert (a1 != b(x, tf.constant([5, 7], tf.int64)).numpy()).any()
    assert b(x[0], SEED).shape == (32, 32, 3)
    # a step that no image drew, with the mask a graph constant (TensorFlow's optimiser folds it)
    none = tf.function(lambda: b.transform_images(x, dict(b.get_random_transformation(x, SEED),
                                                          do_jpeg=tf.zeros([64], tf.bool), do_blur=tf.zeros([64], tf.bool))))
    assert none().shape == x.shape


def test_training_pipeline_is_deterministic_per_seed():
    x = _noise(300, seed=5)

    def first_epoch(seed):
        return [b[0].numpy() for b in detector.training_dataset(x, batch_size=128, seed=seed, domain="image")]

    e1, e2, other = first_epoch(3), first_epoch(3), first_epoch(4)
    assert all((a == b).all() for a, b in zip(e1, e2)) and [len(a) for a in e1] == [256, 256, 88]
    assert any((a != b).any() for a, b in zip(e1, other))


def test_every_benign_variant_runs_on_two_image_sizes_in_one_process():
    """The fixed variants are cached graphs; the second size retraces them without a static shape
    (``resize`` read the static height and width, and failed on 224-px images after 32-px ones)."""
    rng = np.random.default_rng(0)
    for size in (32, 48, 32):
        x = rng.integers(0, 256, (2, size, size, 3)).astype(np.uint8)
        for name, fn in perturb.BENIGN_VARIANTS.items():
            out = np.asarray(fn(x))
            assert out.shape == x.shape and out.dtype == np.uint8, name
    small = rng.integers(0, 256, (2, 40, 40, 3)).astype(np.uint8)
    again = np.asarray(perturb.BENIGN_VARIANTS["resize"](small))
    direct = np.asarray(perturb._u8(tf.map_fn(lambda im: perturb._resize_down_up(tf.cast(im, tf.float32),
                                                                                tf.constant(0.75)), small,
                                              fn_output_signature=tf.float32)))
    np.testing.assert_array_equal(again, direct)
