"""The paper authors' detector (Keras 2.2.4 HDF5 weights) loaded as a tfbackdoor detector, for comparison."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from . import models
from .errors import TfbdError


def load_reference(path) -> keras.Model:
    """The paper authors' Keras 2.2.4 HDF5 detector as a tfbackdoor detector (for comparison).

    Builds our cnn6 without input normalization (their model takes raw DCT of 0..255 pixels) and
    copies the weights layer by layer in order.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise TfbdError(f"reference detector not found: {path}")
    core = models.cnn6(32, normalize=False)
    try:
        with h5py.File(path, "r") as h:
            g = h["model_weights"]

            def order(prefix):
                names = [k for k in g.keys() if k.startswith(prefix) or (prefix == "conv2d_" and k == "last_conv")]
                return sorted(names, key=lambda k: (k == "last_conv", int(k.split("_")[-1]) if k != "last_conv" else 0))

            def weights(name, keys):
                grp = g[name]
                sub = grp[list(grp.keys())[0]]
                return [np.asarray(sub[k + ":0"]) for k in keys]

            convs = [layer for layer in core.layers if isinstance(layer, keras.layers.Conv2D)]
            bns = [layer for layer in core.layers if isinstance(layer, keras.layers.BatchNormalization)]
            for layer, name in zip(convs, order("conv2d_")):
                layer.set_weights(weights(name, ["kernel", "bias"]))
            for layer, name in zip(bns, order("batch_normalization_")):
                layer.set_weights(weights(name, ["gamma", "beta", "moving_mean", "moving_variance"]))
            core.get_layer("probs").set_weights(weights("dense", ["kernel", "bias"]))
    except Exception as e:
        raise TfbdError(f"{path}: cannot read the reference weights ({type(e).__name__}: {e})") from None
    out = models.DetectorSpec("dct", "cnn6", 32, 0.5, {"source": str(path)}, name="detector_spec")(core.output)
    return keras.Model(core.input, out, name="paper_cnn6")
