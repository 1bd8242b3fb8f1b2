"""``tfbd data prepare``: download public datasets into the layout ``$TFBD_DATA`` expects (issue 15 item 14).

* ``cifar10`` (``keras.datasets``, about 170 MB): ``cifar10/lossless.npz`` (the first 4,000 images of
  ``data_batch_1``, lossless), ``cifar10/train/<class>/NNNN.jpg`` (the other 46,000) and
  ``cifar10/test/<class>/NNNN.jpg`` (10,000), JPEG quality 75 with 4:2:0 chroma, as the copy the
  shipped models were trained on.
* ``tfds:NAME`` (any TFDS image dataset): ``NAME/SPLIT.npz`` (``x``, ``y``) per split, read as
  ``npz:$TFBD_DATA/NAME/SPLIT.npz``.

GTSRB, TSRD, LFW-62 and natural32 have no loader here (see the data README for their sources).
Without internet each fails with one line, before anything is written.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import TfbdError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NO_LOADER = {"gtsrb", "tsrd", "lfw62", "natural32", "photos"}


def _load_cifar10():
    import keras

    (xtr, ytr), (xte, yte) = keras.datasets.cifar10.load_data()
    return (xtr, ytr.reshape(-1)), (xte, yte.reshape(-1))


def _offline(what, e) -> TfbdError:
    msg = " ".join(str(e).split())[:200]
    return TfbdError(f"{what}: download failed ({type(e).__name__}: {msg}); without internet, copy a prepared "
                     f"data folder here and set TFBD_DATA to it")


def _write_jpegs(folder: Path, x, y, start=0):
    from PIL import Image

    for i, (img, lab) in enumerate(zip(x, y)):
        d = folder / CIFAR10_CLASSES[int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75, subsampling=2)
        with atomic_path(d / f"{start + i:05d}.jpg", ".jpg") as tmp:
            Path(tmp).write_bytes(buf.getvalue())


def _save_npz(path: Path, **arrays):
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def prepare(name: str, root, force=False, echo=print) -> list:
    """Download ``name`` (``cifar10`` or ``tfds:NAME``) into ``root``; returns the paths written."""
    root = Path(root)
    if name in NO_LOADER:
        raise TfbdError(f"{name}: no public loader in tfbd data prepare (known: cifar10, tfds:NAME); "
                        f"see the data README for its source")
    if name == "cifar10":
        out = [root / "cifar10" / "lossless.npz", root / "cifar10" / "train", root / "cifar10" / "test"]
        if not force and all(p.exists() for p in out):
            echo(f"cifar10 already under {root} (--force to write it again)")
            return out
        try:
            (xtr, ytr), (xte, yte) = _load_cifar10()
        except Exception as e:   # keras raises a plain Exception on a failed URL fetch
            raise _offline("cifar10", e) from None
        _save_npz(out[0], x=xtr[:4000], y=ytr[:4000].astype(np.int64))
        _write_jpegs(out[1], xtr[4000:], ytr[4000:], start=4000)
        _write_jpegs(out[2], xte, yte)
        echo(f"wrote {out[0]} (4,000 lossless), {out[1]}/ ({len(xtr) - 4000} JPEG q75), {out[2]}/ ({len(xte)} JPEG q75)")
        return out
    if name.startswith("tfds:") and name[5:]:
        ds_name = name[5:]
        try:
            import tensorflow_datasets as tfds

            splits = tfds.load(ds_name, as_supervised=True, batch_size=-1)
        except Exception as e:
            raise _offline(name, e) from None
        written = []
        for split, (x, y) in splits.items():
            path = root / ds_name.replace("/", "_") / f"{split}.npz"
            _save_npz(path, x=np.asarray(x, np.uint8), y=np.asarray(y, np.int64))
            written.append(path)
            echo(f"wrote {path} ({len(x)} images; use as npz:{path})")
        return written
    raise TfbdError(f"unknown dataset to prepare '{name}' (known: cifar10, tfds:NAME)")
