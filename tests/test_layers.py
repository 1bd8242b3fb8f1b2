"""Triggers and manipulations are registered Keras layers: every one round-trips its config through
Keras's serialisation (same output on a fixed batch) and runs inside a ``tf.data`` map."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfbackdoor import perturb, triggers
from tfbackdoor.triggers import Trigger, paper, zoo

NAMES = triggers.available() + ["smooth:random", "lf:3", "wanet:5", "clean+jpeg75", "badnets+jpeg90"]


def _batch(size=32, n=6):
    return np.random.default_rng(3).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _built():
    """Instances covering every Trigger subclass beside the named ones (built in code only)."""
    bad, sig = paper.badnets(), zoo.SigTrigger()
    return [paper.PatchTrigger(np.ones((3, 3, 3), np.float32), "random", seed=4, name="patch_random"),
            paper.PatchTrigger(np.zeros((2, 2)), (5, 7), mask=np.full((2, 2), 0.5), name="patch_at"),
            paper.OneOf([bad, sig, zoo.ftrojan()], seed=3), paper.Compose([sig, bad], name="sig_then_badnets"),
            paper.AdditiveTrigger(np.full((32, 32, 3), 0.1, np.float32), np.eye(32), 0.5, name="file:DIR/x.npy"),
            zoo.NoTrigger(), zoo.JpegTrigger(triggers.serialize(sig), 60)]


def _round_trip(layer):
    return keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))


def _check(layer, x, *args):
    again = _round_trip(layer)
    assert type(again) is type(layer) and again.name == layer.name
    np.testing.assert_array_equal(layer(x, *args).numpy(), again(x, *args).numpy())
    # inside a tf.data map, batch by batch, the same values as called eagerly on those batches
    mapped = tf.data.Dataset.from_tensor_slices(x).batch(3).map(lambda b: again(b, *args))
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in mapped]),
                                  np.concatenate([layer(x[i:i + 3], *args).numpy() for i in range(0, len(x), 3)]))


@pytest.mark.parametrize("name", NAMES)
def test_named_trigger_config_round_trip_and_tf_data(name, data_dir):
    t = triggers.get(name)
    assert isinstance(t, keras.layers.Layer)
    _check(t, _batch())
    assert triggers.from_config(triggers.serialize(t)).name == t.name


def test_every_trigger_class_round_trips(data_dir):
    layers = [triggers.get(n) for n in NAMES] + _built()
    for t in _built():
        x = _batch()
        if t.name != "patch_random":   # draws a new location at each call: compared on first calls below
            _check(t, x)
    first = _built()[0]
    np.testing.assert_array_equal(first(_batch()).numpy(), _round_trip(first)(_batch()).numpy())
    subclasses, todo = set(), [Trigger]
    while todo:
        c = todo.pop()
        subclasses.add(c)
        todo.extend(c.__subclasses__())
    assert subclasses - {Trigger} <= {type(t) for t in layers}


def test_bare_class_name_config_still_loads():
    t = triggers.from_config({"class_name": "SigTrigger", "config": {"delta": 20.0, "frequency": 3, "name": "s"}})
    assert isinstance(t, zoo.SigTrigger) and t.delta == 20.0 and t.name == "s"


@pytest.mark.parametrize("kinds", ["paper", "generic"])
def test_random_manipulation_config_round_trip_and_tf_data(kinds):
    m = perturb.RandomManipulation(kinds=kinds, seed=5)
    assert isinstance(m, keras.layers.Layer)
    for args in ((), (11,), (tf.constant([3, 9], tf.int64),)):
        _check(m, _batch(), *args)
    assert perturb.RandomManipulation.from_config(m.get_config()).settings() == m.settings()


@pytest.mark.parametrize("cfg", [{}, {"p_jpeg": 1.0, "p_blur": 0.5, "p_resize": 0.5, "p_color": 0.5}])
def test_benign_processing_config_round_trip_and_tf_data(cfg):
    b = perturb.BenignProcessing(seed=2, **cfg)
    assert isinstance(b, keras.layers.Layer)
    for args in ((), (13,), (tf.constant([5, 1], tf.int64),)):
        _check(b, _batch(), *args)
    np.testing.assert_array_equal(b(_batch()[0], 3).numpy(), _round_trip(b)(_batch()[0], 3).numpy())
    assert list(b.settings()) == list(perturb.BenignProcessing._SETTINGS)
