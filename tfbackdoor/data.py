"""Data sources: one spec string selects a dataset everywhere in the CLI and the API.

Specs (``load(spec)`` returns a ``tf.data.Dataset`` of ``(uint8 HxWx3 image, int64 label)``):

* ``npz:PATH``: a ``.npz`` with arrays ``x`` (N, H, W, 3) or (N, H, W) uint8 and ``y`` (N,).
* ``dir:PATH``: class sub-folders of image files of any size (label = sorted folder index);
  resized to ``image_size``; greyscale expanded to RGB; unreadable files are skipped and listed
  in a warning.
* ``tfds:NAME[:SPLIT]``: ``tensorflow_datasets.load`` (needs internet or a prepared
  ``TFDS_DATA_DIR``).
* ``crops:PATH[:N]``: ``N`` (default 20,000) seeded random square crops of the images in the
  folder ``PATH``, each downscaled (antialiased) to the output size: *lossless* natural image
  statistics at any size from a few large photos (label 0). ``photos:crops`` is that of
  ``$TFBD_DATA/photos``. Detector training uses them so that clean images that never went
  through a lossy codec are not mistaken for manipulated ones.
* Short names for the data under ``$TFBD_DATA`` (default ``../shared/data``):
  ``cifar10:train|test|lossless``, ``gtsrb:train|test``, ``tsrd:train|test``, ``lfw62`` (all 3,023
  images; ``lfw62:train`` / ``lfw62:test`` are a fixed seeded 80/20 split of them).
* Several specs joined by ``+`` (e.g. ``cifar10:train+gtsrb:train``) are concatenated; labels
  are kept as they are.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from .errors import TfbdError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
_TF_DECODABLE = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

SHORT_NAMES = {
    "cifar10:train": ("dir", "cifar10/train", 32),
    "cifar10:test": ("dir", "cifar10/test", 32),
    "cifar10:lossless": ("npz", "cifar10/lossless.npz", 32),
    "gtsrb:train": ("npz", "gtsrb/train.npz", 32),
    "gtsrb:test": ("npz", "gtsrb/test.npz", 32),
    "tsrd:train": ("npz", "tsrd/train.npz", 32),
    "tsrd:test": ("npz", "tsrd/test.npz", 32),
    "lfw62": ("dir", "lfw62", 224),
    "lfw62:train": ("dir", "lfw62", 224),
    "lfw62:test": ("dir", "lfw62", 224),
}
# Sources without an official split get a fixed, seeded 80/20 one (by file, stratified by nothing).
_SPLITS = {"lfw62:train": ("train", 0.8), "lfw62:test": ("test", 0.8)}
CROP_SOURCES = {"photos:crops": "photos"}
DEFAULT_CROPS = 20000


def data_root() -> Path:
    """``$TFBD_DATA`` or ``../shared/data`` relative to the repository root."""
    env = os.environ.get("TFBD_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass
class Source:
    """A resolved spec: in-memory arrays (``x``, ``y``) or a list of files to stream."""

    spec: str
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    files: list | None = None
    labels: np.ndarray | None = None
    class_names: list | None = None
    image_size: int | None = None

    def __len__(self):
        return len(self.y) if self.y is not None else len(self.files)


def _check_arrays(spec, x, y):
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise TfbdError(f"{spec}: array x has shape {x.shape}, expected (N, H, W, 3)")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size and x.min() >= 0 and x.max() <= 1:
            x = np.round(x * 255).astype(np.uint8)
        else:
            raise TfbdError(f"{spec}: array x has dtype {x.dtype}, expected uint8 (or float in [0, 1])")
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise TfbdError(f"{spec}: x has {len(x)} images but y has {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise TfbdError(f"{spec}: labels y have dtype {y.dtype}, expected integers")
    return x, y.astype(np.int64)


def _load_npz(spec, path):
    path = Path(path)
    if not path.is_file():
        raise TfbdError(f"{spec}: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d.files or "y" not in d.files:
                raise TfbdError(f"{spec}: {path} must hold arrays 'x' and 'y' (has {sorted(d.files)})")
            x, y = d["x"], d["y"]
    except TfbdError:
        raise
    except Exception as e:  # zipfile/pickle/format errors
        raise TfbdError(f"{spec}: cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    x, y = _check_arrays(spec, x, y)
    return Source(spec, x=x, y=y, image_size=x.shape[1])


def _list_dir(spec, path):
    path = Path(path)
    if not path.is_dir():
        raise TfbdError(f"{spec}: directory not found: {path}")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise TfbdError(f"{spec}: {path} has no class sub-folders")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((path / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(str(f))
                labels.append(i)
    if not files:
        raise TfbdError(f"{spec}: no image files under {path}")
    return Source(spec, files=files, labels=np.asarray(labels, np.int64), class_names=classes)


def _load_tfds(spec, name, split):
    try:
        import tensorflow_datasets as tfds

        ds = tfds.load(name, split=split, as_supervised=True, data_dir=os.environ.get("TFDS_DATA_DIR"))
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise TfbdError(
            f"{spec}: tensorflow_datasets could not load '{name}' split '{split}' ({msg}). Offline? "
            f"Prepare it on a connected machine and set TFDS_DATA_DIR, or save arrays x, y to a "
            f".npz and use npz:PATH (or a class-folder tree with dir:PATH)"
        ) from None
    xs, ys = [], []
    for img, lab in ds.as_numpy_iterator():
        xs.append(img)
        ys.append(lab)
    if not xs:
        raise TfbdError(f"{spec}: the split is empty")
    sizes = {a.shape for a in xs}
    if len(sizes) == 1:
        x, y = _check_arrays(spec, np.stack(xs), np.asarray(ys))
        return Source(spec, x=x, y=y, image_size=x.shape[1])
    raise TfbdError(f"{spec}: images have several sizes {sorted(sizes)[:3]}...; export to a dir: tree instead")


def _load_crops(spec, path, n=DEFAULT_CROPS, size=32, seed=0):
    """``n`` square crops of the photos in ``path``, downscaled to ``size`` (see the module doc).

    Crop sides are log-uniform between ``1.5 * size`` and the photo's shorter side, so scales
    from a whole photo to close-ups occur; the resampling filter (box, bilinear, Lanczos: all
    antialiased) and a horizontal flip are drawn per crop. Deterministic for a given ``seed``.
    """
    # Pillow rather than tf.image: crops of varying size from a handful of photos, done once.
    from PIL import Image

    path = Path(path)
    if not path.is_dir():
        raise TfbdError(f"{spec}: directory not found: {path}")
    photos = []
    for f in sorted(path.iterdir()):
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if min(im.size) >= int(1.5 * size) + 1:
                        photos.append(im.copy())
            except Exception as e:
                warnings.warn(f"{spec}: skipped unreadable image {f} ({type(e).__name__})")
    if not photos:
        raise TfbdError(f"{spec}: no readable image of at least {int(1.5 * size) + 1} px under {path}")
    rng = np.random.default_rng(seed)
    filters = (Image.BOX, Image.BILINEAR, Image.LANCZOS)
    x = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        side = int(np.exp(rng.uniform(np.log(1.5 * size), np.log(min(w, h)))))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.resize((size, size), filters[int(rng.integers(0, 3))], box=(left, top, left + side, top + side),
                         reducing_gap=3.0)  # reduce by whole factors first: 10x faster, still antialiased
        a = np.asarray(crop, np.uint8)
        x[i] = a[:, ::-1] if rng.random() < 0.5 else a
    return Source(spec, x=x, y=np.zeros(n, np.int64), image_size=size)


def _parse_crops(spec, rest):
    folder, _, count = rest.rpartition(":")
    if count.isdigit() and folder:
        n = int(count)
    else:
        folder, n = rest, DEFAULT_CROPS
    if n <= 0:
        raise TfbdError(f"{spec}: the number of crops must be positive")
    return folder, n


def resolve(spec: str, image_size: int | None = None) -> Source:
    """Parse one spec (no ``+``) into a :class:`Source` without decoding files.

    ``image_size`` is used only by sources that are generated at the requested size (``crops:``).
    """
    spec = spec.strip()
    if spec in CROP_SOURCES or spec in SHORT_NAMES:
        root = data_root()
        if not root.is_dir():
            raise TfbdError(f"{spec}: data directory {root} not found (set $TFBD_DATA)")
    if spec in CROP_SOURCES:
        return _load_crops(spec, root / CROP_SOURCES[spec], DEFAULT_CROPS, int(image_size or 32))
    if spec in SHORT_NAMES:
        kind, rel, size = SHORT_NAMES[spec]
        src = _load_npz(spec, root / rel) if kind == "npz" else _list_dir(spec, root / rel)
        src.image_size = src.image_size or size
        if spec in _SPLITS:
            part, frac = _SPLITS[spec]
            order = np.random.default_rng(12345).permutation(len(src.files))
            cut = int(round(frac * len(order)))
            keep = np.sort(order[:cut] if part == "train" else order[cut:])
            src.files = [src.files[i] for i in keep]
            src.labels = src.labels[keep]
        return src
    kind, _, rest = spec.partition(":")
    if kind == "npz" and rest:
        return _load_npz(spec, rest)
    if kind == "dir" and rest:
        return _list_dir(spec, rest)
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return _load_tfds(spec, name, split or "train")
    if kind == "crops" and rest:
        folder, n = _parse_crops(spec, rest)
        return _load_crops(spec, folder, n, int(image_size or 32))
    known = ", ".join(list(SHORT_NAMES) + list(CROP_SOURCES) + ["npz:PATH", "dir:PATH", "tfds:NAME[:SPLIT]",
                                                                 "crops:PATH[:N]"])
    raise TfbdError(f"unknown dataset '{spec}' (known: {known})")


def _resize_uint8(img, size):
    """Resize a uint8 HxWx3 tensor to ``size`` x ``size`` (bilinear, antialiased); no-op when equal."""
    def do():
        r = tf.image.resize(tf.cast(img, tf.float32), (size, size), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(r), 0, 255), tf.uint8)

    same = tf.logical_and(tf.equal(tf.shape(img)[0], size), tf.equal(tf.shape(img)[1], size))
    out = tf.cond(same, lambda: img, do)
    return tf.ensure_shape(out, (size, size, 3))


def _decode_file(path, size):
    data = tf.io.read_file(path)
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    return _resize_uint8(img, size)


def _decode_with_pil(path: str, size: int) -> np.ndarray:
    """Pillow fallback for formats TensorFlow cannot decode (webp, tiff, ppm)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, np.uint8)


def _subset(n, limit, seed, shuffle):
    idx = np.arange(n)
    if shuffle is None:
        shuffle = limit is not None
    if shuffle:
        idx = np.random.default_rng(seed).permutation(n)
    if limit is not None:
        if limit <= 0:
            raise TfbdError(f"--limit must be positive (got {limit})")
        idx = idx[:limit]
    return idx


def load(spec: str, image_size: int | None = None, limit: int | None = None, seed: int = 0,
         shuffle: bool | None = None, with_ids: bool = False, skipped: list | None = None) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(uint8 (S, S, 3) image, int64 label)`` for ``spec``.

    Args:
      spec: dataset spec (see the module docstring); ``A+B`` concatenates.
      image_size: output side ``S``; images of another size are resized (bilinear, antialiased).
        Defaults to the source's own size (32 for the short names, 224 for ``lfw62``).
      limit: keep only ``limit`` items (a seeded random subset, see ``shuffle``).
      seed: seed of the shuffle; the same seed gives the same order.
      shuffle: shuffle the order once (deterministically); default: only when ``limit`` is set.
      with_ids: also yield a string id per item (file path or ``spec#index``).
      skipped: a list that receives ``(id, reason)`` of unreadable files as they are met.

    Unreadable files of a ``dir:`` source are skipped with a warning naming them, never a crash.
    """
    parts = [p for p in spec.split("+") if p.strip()]
    if len(parts) > 1:
        dss = [load(p, image_size, limit, seed, shuffle, with_ids, skipped) for p in parts]
        out = dss[0]
        for d in dss[1:]:
            out = out.concatenate(d)
        return out
    src = resolve(spec, image_size)
    size = int(image_size or src.image_size or 32)
    idx = _subset(len(src), limit, seed, shuffle)
    if src.x is not None:
        x, y = src.x[idx], src.y[idx]
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if x.shape[1] != size or x.shape[2] != size:
            ds = ds.map(lambda a, b: (_resize_uint8(a, size), b), num_parallel_calls=tf.data.AUTOTUNE)
        if with_ids:
            ids = np.asarray([f"{spec}#{i}" for i in idx])
            ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(ids))).map(lambda xy, i: (xy[0], xy[1], i))
        return ds
    files = [src.files[i] for i in idx]
    labels = src.labels[idx]
    return _file_dataset(spec, files, labels, size, with_ids, skipped)


def _file_dataset(spec, files, labels, size, with_ids, skipped):
    tf_ok = np.asarray([f.lower().endswith(_TF_DECODABLE) for f in files], bool)

    def decode(path, label):
        return _decode_file(path, size), label, path

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(files)[tf_ok], labels[tf_ok]))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Decoding errors (corrupt or non-image files) drop the element; which ones is found by
    # comparing the ids that came through with the file list (see report_missing).
    ds = ds.ignore_errors()
    if (~tf_ok).any():
        others = [(f, int(lab)) for f, lab, ok in zip(files, labels, tf_ok) if not ok]

        def gen():
            for f, lab in others:
                try:
                    yield _decode_with_pil(f, size), lab, f
                except Exception:
                    continue

        ds = ds.concatenate(tf.data.Dataset.from_generator(gen, output_signature=(
            tf.TensorSpec((size, size, 3), tf.uint8), tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string))))
    if with_ids:
        return ds
    return ds.map(lambda a, b, p: (a, b))


def load_arrays(spec: str, image_size: int | None = None, limit: int | None = None, seed: int = 0,
                shuffle: bool | None = None, skipped: list | None = None):
    """Materialise ``load(...)`` as numpy ``(x uint8 (N,S,S,3), y int64 (N,))``.

    Files that fail to decode are skipped, listed in a warning and appended to ``skipped``.
    """
    x, y, ids = materialize(load(spec, image_size, limit, seed, shuffle, with_ids=True), spec)
    report_missing(spec, ids, limit, seed, shuffle, skipped)
    return x, y


def materialize(ds, spec: str = "dataset"):
    """Numpy ``(x, y, ids)`` from a ``load(..., with_ids=True)`` dataset; error if it is empty."""
    xs, ys, ids = [], [], []
    for bx, by, bi in ds.batch(1024).prefetch(2).as_numpy_iterator():
        xs.append(bx)
        ys.append(by)
        ids.extend(i.decode() for i in bi)
    if not xs:
        raise TfbdError(f"{spec}: no readable images")
    return np.concatenate(xs), np.concatenate(ys), ids


def expected_ids(spec: str, limit: int | None = None, seed: int = 0, shuffle: bool | None = None) -> list:
    """The ids ``load(spec, with_ids=True)`` yields when every item is readable, in order."""
    out = []
    for part in [p for p in spec.split("+") if p.strip()]:
        src = resolve(part)
        idx = _subset(len(src), limit, seed, shuffle)
        out.extend([src.files[i] for i in idx] if src.files is not None else [f"{part}#{i}" for i in idx])
    return out


def _is_file_source(part: str) -> bool:
    """Whether a single spec streams files (``dir:`` or a short name backed by a folder)."""
    part = part.strip()
    return SHORT_NAMES[part][0] == "dir" if part in SHORT_NAMES else part.startswith("dir:")


def report_missing(spec, seen_ids, limit=None, seed=0, shuffle=None, skipped=None) -> list:
    """Warn about (and append to ``skipped``) the items of ``spec`` that were not in ``seen_ids``.

    Only file sources can drop unreadable items (arrays are checked whole when loaded), so only
    their file lists are compared; array sources are not loaded a second time.
    """
    seen = set(seen_ids)
    file_parts = "+".join(p for p in spec.split("+") if p.strip() and _is_file_source(p))
    missing = [i for i in expected_ids(file_parts, limit, seed, shuffle) if i not in seen] if file_parts else []
    if missing:
        msg = f"{spec}: skipped {len(missing)} unreadable file(s): " + ", ".join(missing[:10])
        warnings.warn(msg + (" ..." if len(missing) > 10 else ""), stacklevel=3)
        if skipped is not None:
            skipped.extend((m, "unreadable or corrupt image") for m in missing)
    return missing
