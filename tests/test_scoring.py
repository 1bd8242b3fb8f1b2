"""Scoring through one cached graph (issue 12, goal 3) gives today's eager results."""

import csv

import numpy as np
import pytest
import tensorflow as tf

from tfbackdoor import detector


def _eager_reference(model, images, batch_size=256):
    """The previous implementation of detector.score: a tf.data map and an eager model call per batch."""
    domain = detector.spec_of(model).domain
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(lambda b: detector.to_inputs(b, domain))
    return np.concatenate([model(b, training=False).numpy()[:, 1] for b in ds])


@pytest.mark.parametrize("domain", ["dct", "image"])
def test_score_matches_the_eager_path_on_a_fresh_model(domain, rng):
    model = detector.build("cnn6", 32, domain)
    x = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)   # 256 + a partial batch
    s = detector.score(model, x)
    assert s.shape == (300,) and s.dtype == np.float32
    np.testing.assert_allclose(s, _eager_reference(model, x), atol=1e-5)
    np.testing.assert_allclose(detector.score(model, x[:7], batch_size=3), s[:7], atol=1e-5)
    assert detector.score(model, x[:0]).shape == (0,)


def test_score_follows_weight_changes(rng):
    """The graph is cached per model but reads its variables at every call."""
    model = detector.build("cnn6", 32, "dct")
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    before = detector.score(model, x)
    dense = model.get_layer("probs")
    w, b = dense.get_weights()
    dense.set_weights([w * 0, b + np.asarray([0.0, 3.0], np.float32)])
    after = detector.score(model, x)
    np.testing.assert_allclose(after, _eager_reference(model, x), atol=1e-5)
    assert not np.allclose(before, after)


def test_shipped_detector_score_and_scan_match_the_eager_path(lossless, tmp_path):
    model = detector.load()
    x, y = lossless
    s = detector.score(model, x)
    np.testing.assert_allclose(s, _eager_reference(model, x), atol=1e-5)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    summary = detector.scan(model, f"npz:{tmp_path / 'set.npz'}", tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        scanned = np.asarray([float(r["score"]) for r in csv.DictReader(f)])
    assert summary["n"] == len(x)
    np.testing.assert_allclose(scanned, s, atol=2e-6)   # the CSV keeps 6 decimals
