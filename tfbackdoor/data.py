"""Data sources: one spec string selects a dataset everywhere in the CLI and the API.

Specs (``load(spec)`` returns a ``tf.data.Dataset`` of ``(uint8 HxWx3 image, int64 label)``):

* ``npz:PATH``: a ``.npz`` with arrays ``x`` (N, H, W, 3) or (N, H, W) uint8 and ``y`` (N,).
* ``dir:PATH``: class sub-folders of image files of any size (label = sorted folder index),
  or a flat folder of images without sub-folders (label -1: unlabelled, e.g. for ``scan``);
  resized to ``image_size``; greyscale expanded to RGB. Unreadable files, images whose header
  declares more than ``$TFBD_MAX_PIXELS`` pixels (default 40 million: refused before decoding),
  symlink loops and class folders that link to the dataset folder or an ancestor are skipped and
  reported (:func:`report_missing`). Symlinked folders are followed (each real folder once).
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

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import shards as shards_mod
from .atomic import atomic_path
from .decode import (IMAGE_EXTENSIONS, TF_DECODABLE, SkippedItems, decode_file, decode_with_pil, diagnose,
                     file_id, max_pixels, resize_uint8, subset)
from .errors import TfbdError, dataset_hint

# The short names, data_root and the crop sources live in the TF-free specs module (fast CLI checks).
from .specs import CROP_SOURCES, DEFAULT_CROPS, SHORT_NAMES, data_root  # noqa: E402,F401

# Sources without an official split get a fixed, seeded 80/20 one (by file, stratified by nothing).
_SPLITS = {"lfw62:train": ("train", 0.8), "lfw62:test": ("test", 0.8)}


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
    problems: list | None = None  # (path, reason) of folders and links of a dir: tree that were skipped

    def __len__(self):
        return len(self.y) if self.y is not None else len(self.files)


UNLABELLED = -1  # the label of the images of a flat dir: folder (no class sub-folders)


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


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _walk_images(top: Path, seen: set, ancestors: frozenset, problems: list) -> list:
    """Image files under ``top``, following symlinked folders: a folder that links back to one of its
    ancestors (a loop) or to a folder already listed is not entered and is added to ``problems``."""
    try:
        st = os.stat(top)
    except OSError as e:
        problems.append((str(top), f"folder not readable ({e.strerror or type(e).__name__}); skipped"))
        return []
    key = (st.st_dev, st.st_ino)
    if key in ancestors:
        problems.append((str(top), f"symlink loop (links back to {os.path.realpath(top)}); not followed"))
        return []
    if key in seen:
        problems.append((str(top), f"links to {os.path.realpath(top)}, already listed; not followed "
                                   "(its images would be counted twice)"))
        return []
    seen.add(key)
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        problems.append((str(top), f"folder not readable ({e.strerror or type(e).__name__}); skipped"))
        return []
    files = []
    for e in entries:   # DirEntry: file types from the directory listing, no stat per file
        try:
            is_dir = e.is_dir()
            is_image = not is_dir and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()
            broken = not (is_dir or is_image) and e.is_symlink() and not os.path.exists(e.path)
        except OSError:   # ELOOP: a link to itself
            is_dir = is_image = False
            broken = True
        if is_dir:
            files.extend(_walk_images(top / e.name, seen, ancestors | {key}, problems))
        elif is_image:
            files.append(top / e.name)
        elif broken:
            problems.append((e.path, "broken symlink or symlink loop; skipped"))
    return files


def _list_dir(spec, path):
    """List a ``dir:`` tree: class sub-folders (label = index in the sorted folder names) or, when it
    has none, a flat folder of images (label :data:`UNLABELLED`). Never decodes a file."""
    path = Path(path)
    if not path.is_dir():
        raise TfbdError(f"{spec}: directory not found: {path}")
    entries = sorted(path.iterdir())
    classes = [p.name for p in entries if p.is_dir()]
    problems = [(str(p), "broken symlink or symlink loop; skipped")
                for p in entries if p.is_symlink() and not p.exists()]
    if not classes:
        flat = [str(p) for p in entries if _is_image_file(p)]
        if not flat:
            raise TfbdError(f"{spec}: {path} has no class sub-folders and no image files")
        return Source(spec, files=flat, labels=np.full(len(flat), UNLABELLED, np.int64), class_names=[],
                      problems=problems)
    root = os.stat(path)
    root_key = (root.st_dev, root.st_ino)
    real_root = Path(os.path.realpath(path))
    seen = {root_key}
    files, labels = [], []
    for i, c in enumerate(classes):
        real = Path(os.path.realpath(path / c))
        if real == real_root or real in real_root.parents:
            problems.append((str(path / c), f"class folder links to {real}, the dataset folder or one of its parents; "
                                            "skipped (its images would be listed again under a wrong label)"))
            continue
        found = sorted(_walk_images(path / c, seen, frozenset({root_key}), problems))
        files.extend(str(f) for f in found)
        labels.extend([i] * len(found))
    if not files:
        raise TfbdError(f"{spec}: no image files under {path}")
    return Source(spec, files=files, labels=np.asarray(labels, np.int64), class_names=classes, problems=problems)


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
    raise TfbdError(f"unknown dataset '{spec}'{dataset_hint(spec)} (known: {known})")


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
    if spec.strip().partition(":")[0] in ("tfrecord", "tar"):   # sharded encoded images: tfbackdoor.shards
        return shards_mod.load(spec.strip(), image_size, limit, seed, shuffle, with_ids, skipped)
    src = resolve(spec, image_size)
    size = int(image_size or src.image_size or 32)
    idx = subset(len(src), limit, seed, shuffle)
    if src.x is not None:
        x, y = src.x[idx], src.y[idx]
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if x.shape[1] != size or x.shape[2] != size:
            ds = ds.map(lambda a, b: (resize_uint8(a, size), b), num_parallel_calls=tf.data.AUTOTUNE)
        if with_ids:
            ids = np.asarray([f"{spec}#{i}" for i in idx])
            ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(ids))).map(lambda xy, i: (xy[0], xy[1], i))
        return ds
    files = [src.files[i] for i in idx]
    labels = src.labels[idx]
    return _file_dataset(spec, files, labels, size, with_ids, skipped)


def _file_dataset(spec, files, labels, size, with_ids, skipped):
    tf_ok = np.asarray([f.lower().endswith(TF_DECODABLE) for f in files], bool)
    limit = max_pixels()

    def decode(path, label, ident):
        return decode_file(path, size, limit), label, ident

    # Paths go to TensorFlow as raw bytes (a name that is not valid UTF-8 is still read); the ids
    # reported are file_id()s, valid UTF-8.
    paths = np.asarray([os.fsencode(f) for f in files] or [b""], object)[:len(files)]
    ids = np.asarray([file_id(f) for f in files], object)
    ds = tf.data.Dataset.from_tensor_slices((paths[tf_ok].astype(bytes), labels[tf_ok], ids[tf_ok].astype(str)))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Decoding errors (corrupt or non-image files) drop the element; which ones is found by
    # comparing the ids that came through with the file list (see report_missing).
    ds = ds.ignore_errors()
    if (~tf_ok).any():
        others = [(f, int(lab)) for f, lab, ok in zip(files, labels, tf_ok) if not ok]

        def gen():
            for f, lab in others:
                try:
                    yield decode_with_pil(f, size, limit), lab, file_id(f)
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
    try:
        x, y, ids = materialize(load(spec, image_size, limit, seed, shuffle, with_ids=True), spec)
    except TfbdError:
        report_missing(spec, [], limit, seed, shuffle, skipped)   # say why, then fail
        raise
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
        idx = subset(len(src), limit, seed, shuffle)
        out.extend([file_id(src.files[i]) for i in idx] if src.files is not None else [f"{part}#{i}" for i in idx])
    return out


def _is_file_source(part: str) -> bool:
    """Whether a single spec streams files (``dir:`` or a short name backed by a folder)."""
    part = part.strip()
    return SHORT_NAMES[part][0] == "dir" if part in SHORT_NAMES else part.startswith("dir:")


def report_missing(spec, seen_ids, limit=None, seed=0, shuffle=None, skipped=None) -> list:
    """Warn about (and append to ``skipped``) the items of ``spec`` that were not in ``seen_ids``,
    and the folders and links of its ``dir:`` trees that were not followed.

    Only file sources can drop unreadable items (arrays are checked whole when loaded), so only
    their file lists are compared; array sources are not loaded a second time. Each skipped item
    gets a reason (:func:`diagnose`: e.g. an image too large to decode, or unreadable). The one
    warning is a :class:`SkippedItems` (``.items`` = the ``(id, reason)`` pairs).
    """
    seen = set(seen_ids)
    file_parts = [p for p in spec.split("+") if p.strip() and _is_file_source(p)]
    items, missing = [], []
    for part in file_parts:
        src = resolve(part)
        items.extend(src.problems or [])
        idx = subset(len(src), limit, seed, shuffle)
        for i in idx:
            if file_id(src.files[i]) not in seen:
                missing.append(file_id(src.files[i]))
                items.append((missing[-1], diagnose(src.files[i])))
    if items:
        listed = ", ".join(f"{i} ({r})" for i, r in items[:10])
        msg = f"{spec}: skipped {len(items)} item(s): {listed}" + (" ..." if len(items) > 10 else "")
        warnings.warn(SkippedItems(msg, items), stacklevel=3)
        if skipped is not None:
            skipped.extend(items)
    return missing


# --------------------------------------------------------------------------- writing shards

def write_shards(spec: str, out: str, shards: int, image_size=None, limit=None, seed=0, batch_size=256,
                 progress=None) -> dict:
    """Write the decoded images of ``spec`` as ``shards`` TFRecord files ``PREFIX-SSSSS-of-NNNNN.tfrecord``
    (``out`` = ``tfrecord:PREFIX``; the format of :mod:`tfbackdoor.shards`): lossless PNG, the ids and
    labels of ``spec``, item ``k`` in shard ``k % shards``. Each file is written beside its target and renamed when all are complete (an
    interrupted run leaves none). Unreadable items are skipped and listed in the summary."""
    if not str(out).startswith("tfrecord:") or not str(out)[9:]:
        raise TfbdError(f"--out must be tfrecord:PREFIX (got '{out}')")
    if shards <= 0:
        raise TfbdError(f"--shards must be positive (got {shards})")
    prefix = str(out)[9:]
    names = [shards_mod.shard_name(prefix, i, shards) for i in range(shards)]
    skipped = []
    ds = load(spec, image_size=image_size, with_ids=True, limit=limit, seed=seed, skipped=skipped)
    n, seen = 0, []
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(name, ".tfrecord")) for name in names]
        writers = [tf.io.TFRecordWriter(t) for t in tmps]
        try:
            for bx, by, bi in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
                size = int(bx.shape[1])
                for img, lab, ident in zip(bx, by, bi):
                    ident = ident.decode()
                    writers[n % shards].write(shards_mod.example(ident, int(lab), shards_mod.encode_png(img)))
                    seen.append(ident)
                    n += 1
                if progress:
                    progress(len(bx))
        finally:
            for w in writers:
                w.close()
        report_missing(spec, seen, limit, seed, None, skipped)
        if not n:
            raise TfbdError(f"{spec}: no readable images (nothing written)")
    return {"dataset": spec, "n": n, "shards": names, "skipped": [s[0] for s in skipped], "image_size": size}
