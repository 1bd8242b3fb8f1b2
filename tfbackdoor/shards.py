"""Sharded image datasets: TFRecord files of encoded images and WebDataset-style tar shards.

Two dataset specs (read by :func:`tfbackdoor.data.load`, so every command takes them, and by the
Beam scan, :mod:`tfbackdoor.beam_scan`):

* ``tfrecord:GLOB``: TFRecord files (uncompressed) of ``tf.train.Example`` records with the features

  ============== ======= ==========================================================================
  feature        type    meaning
  ============== ======= ==========================================================================
  image/encoded  bytes   the image file's bytes (PNG, JPEG, GIF, BMP; others through Pillow)
  image/id       bytes   UTF-8 id reported in scan reports (optional: ``FILENAME#INDEX``)
  label          int64   class label (optional: -1, unlabelled)
  ============== ======= ==========================================================================

  ``tfbd shard`` writes them (lossless PNG of the decoded pixels, the source's ids and labels).
* ``tar:GLOB``: WebDataset-style tar shards: members ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.bmp``,
  ``.gif``, ``.webp``) with an optional ``KEY.cls`` (the label as text); the id is ``KEY`` (the
  member name without its extensions, folders kept). Members of one key must be consecutive, as
  WebDataset writes them.

``GLOB`` is a local glob or a URL pattern that ``tf.io.gfile`` understands (``gs://...``). Files
are read in sorted order, records in file order. Images are decoded exactly as ``dir:`` files
(``tf.io.decode_image``, then the bilinear antialiased resize to the detector's size) so a scan of
shards gives the scores of a scan of the original files. A record that cannot be used (corrupt
image bytes, an image whose header declares more than ``$TFBD_MAX_PIXELS``, a record that is not
an Example, a truncated file) is a :class:`BadItem`: :func:`iter_items` yields it with its reason,
:func:`load` skips it with a :class:`tfbackdoor.decode.SkippedItems` warning, the Beam scan writes it
to its dead-letter output.

Import-light: TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import glob as _glob
import io
import os
import tarfile
import warnings
from pathlib import PurePosixPath

from .errors import TfbdError

KINDS = ("tfrecord", "tar")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp")
_TF_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM")


class BadItem(Exception):
    """An item that cannot be scored; ``reason`` says why."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def is_shard_spec(spec: str) -> bool:
    kind, _, rest = str(spec).strip().partition(":")
    return kind in KINDS and bool(rest)


def _is_url(pattern: str) -> bool:
    return "://" in pattern


def expand(spec: str) -> list:
    """The sorted files matched by a ``tfrecord:GLOB`` / ``tar:GLOB`` spec; error when none."""
    kind, _, pattern = str(spec).strip().partition(":")
    if kind not in KINDS or not pattern:
        raise TfbdError(f"unknown shard spec '{spec}' (known: tfrecord:GLOB, tar:GLOB)")
    if _is_url(pattern):
        import tensorflow as tf

        files = sorted(tf.io.gfile.glob(pattern))
    else:
        files = sorted(f for f in _glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
        raise TfbdError(f"{spec}: no files match {pattern}")
    return files


def check_spec(spec: str) -> None:
    """TensorFlow-free check for the CLI: local globs must match a file (URLs are not listed)."""
    if not _is_url(str(spec).strip().partition(":")[2]):
        expand(spec)


# --------------------------------------------------------------------------- reading

def parse_example(record: bytes, default_id: str):
    """``(id, label, encoded bytes)`` of one serialized ``tf.train.Example``; :class:`BadItem` if unusable."""
    import tensorflow as tf

    try:
        ex = tf.train.Example.FromString(record)
    except Exception:
        raise BadItem("not a tf.train.Example record") from None
    f = ex.features.feature
    ident = default_id
    if "image/id" in f and f["image/id"].bytes_list.value:
        ident = f["image/id"].bytes_list.value[0].decode("utf-8", "backslashreplace")
    if "image/encoded" not in f or not f["image/encoded"].bytes_list.value:
        raise BadItem("record has no image/encoded bytes")
    label = -1
    if "label" in f and f["label"].int64_list.value:
        label = int(f["label"].int64_list.value[0])
    return ident, label, f["image/encoded"].bytes_list.value[0]


def _masked_crc(data: bytes):
    try:
        import google_crc32c
    except ImportError:   # checksums are then not verified (a corrupt record still fails to parse or decode)
        return None
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(fh):
    """The records of an uncompressed TFRecord stream (length, masked CRC-32C, data, masked CRC-32C);
    ``ValueError`` on a truncated file or a checksum mismatch."""
    import struct

    while True:
        head = fh.read(12)
        if not head:
            return
        if len(head) < 12:
            raise ValueError("truncated record header")
        length, length_crc = struct.unpack("<QI", head)
        expected = _masked_crc(head[:8])
        if expected is not None and expected != length_crc:
            raise ValueError("bad length checksum")
        data = fh.read(length)
        tail = fh.read(4)
        if len(data) < length or len(tail) < 4:
            raise ValueError("truncated record")
        expected = _masked_crc(data)
        if expected is not None and expected != struct.unpack("<I", tail)[0]:
            raise ValueError("bad data checksum")
        yield data


def iter_tfrecord(path: str):
    """Yield ``(id, label, encoded bytes, None)`` or ``(id, None, None, reason)`` for each record of one file."""
    import tensorflow as tf

    name = os.path.basename(path)
    i = 0
    with tf.io.gfile.GFile(path, "rb") as fh:
        it = read_records(fh)
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            except (ValueError, OSError, tf.errors.OpError) as e:
                yield f"{name}#{i}", None, None, f"corrupt or truncated TFRecord file from record {i} on ({e})"
                return
            try:
                ident, label, data = parse_example(record, f"{name}#{i}")
                yield ident, label, data, None
            except BadItem as e:
                yield f"{name}#{i}", None, None, e.reason
            i += 1


def _split_member(name: str):
    p = PurePosixPath(name)
    base, _, ext = p.name.partition(".")
    return str(p.with_name(base)) if p.parent != PurePosixPath(".") else base, ext.lower()


def iter_tar(path: str):
    """Yield ``(id, label, encoded bytes, None)`` or ``(id, None, None, reason)`` per key of one tar shard."""
    import tensorflow as tf

    def finish(key, parts):
        img = next((parts[e] for e in TAR_IMAGE_EXTENSIONS if e in parts), None)
        if img is None:
            return key, None, None, f"no image member ({', '.join(TAR_IMAGE_EXTENSIONS)})"
        label = -1
        if "cls" in parts:
            try:
                label = int(parts["cls"].decode().strip())
            except ValueError:
                return key, None, None, "unreadable .cls label"
        return key, label, img, None

    key, parts, n = None, {}, 0
    with tf.io.gfile.GFile(path, "rb") as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    k, ext = _split_member(m.name)
                    if k != key and key is not None:
                        yield finish(key, parts)
                        parts = {}
                    key = k
                    parts[ext] = tar.extractfile(m).read()
                    n += 1
        except (tarfile.TarError, OSError, EOFError) as e:
            if key is not None and parts:   # the members of the last key read whole before the damage
                yield finish(key, parts)
            yield (f"{os.path.basename(path)}@{n}", None, None,
                   f"corrupt or truncated tar file after {n} members ({type(e).__name__})")
            return
    if key is not None and parts:
        yield finish(key, parts)


def iter_items(spec: str, files=None):
    """Every item of a shard spec, in order: ``(id, label, encoded bytes, None)`` or ``(id, None, None, reason)``."""
    kind = str(spec).strip().partition(":")[0]
    reader = iter_tfrecord if kind == "tfrecord" else iter_tar
    for f in files if files is not None else expand(spec):
        yield from reader(f)


# --------------------------------------------------------------------------- decoding

_DECODERS = {}


def decoder(size: int):
    """``decode(data: bytes) -> uint8 (size, size, 3)`` with the ``dir:`` rule (see the module doc),
    raising :class:`BadItem`; one traced ``tf.function`` per size and process."""
    if size in _DECODERS:
        return _DECODERS[size]
    import tensorflow as tf

    from . import decode as dec

    limit = int(dec.max_pixels())

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    def _decode(data):
        check = tf.debugging.assert_less_equal(dec.declared_pixels(data, tf.constant(b"")),
                                               tf.constant(limit, tf.int64), message="image too large")
        with tf.control_dependencies([check]):
            img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        return dec.resize_uint8(img, size)

    def decode(data: bytes):
        try:
            return _decode(tf.constant(data)).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.OutOfRangeError) as e:
            too_large = "image too large" in str(e)
        if not too_large and not data.startswith(_TF_MAGIC):   # webp, tiff...: Pillow, as dir: does
            try:
                return dec.decode_with_pil(io.BytesIO(data), size)
            except Exception:
                pass
        reason = dec.diagnose(io.BytesIO(data))
        if too_large and not reason.startswith("image too large"):
            reason = f"image too large: more than {limit / 1e6:g} megapixels declared (TFBD_MAX_PIXELS); not decoded"
        raise BadItem(reason)

    _DECODERS[size] = decode
    return decode


def load(spec: str, image_size=None, limit=None, seed=0, shuffle=None, with_ids=False, skipped=None):
    """A ``tf.data.Dataset`` of ``(uint8 image, int64 label[, id])`` for a shard spec (see
    :func:`tfbackdoor.data.load`). Decoding runs in Python (one traced function); unusable items are
    skipped, appended to ``skipped`` and named in one :class:`~tfbackdoor.decode.SkippedItems` warning.
    ``limit``: a seeded subset (the same rule as the other specs: first the records are counted),
    in stored order."""
    import numpy as np
    import tensorflow as tf

    from .decode import SkippedItems, subset

    size = int(image_size or 32)
    files = expand(spec)
    keep = None
    if limit is not None:
        n = sum(1 for _ in iter_items(spec, files))
        keep = set(int(i) for i in subset(n, limit, seed, shuffle))

    def gen():
        decode = decoder(size)
        bad = []
        for i, (ident, label, data, reason) in enumerate(iter_items(spec, files)):
            if keep is not None and i not in keep:
                continue
            if reason is None:
                try:
                    yield decode(data), np.int64(label), ident
                    continue
                except BadItem as e:
                    reason = e.reason
            bad.append((ident, reason))
        if bad:
            if skipped is not None:
                skipped.extend(bad)
            listed = ", ".join(f"{i} ({r})" for i, r in bad[:10])
            msg = f"{spec}: skipped {len(bad)} item(s): {listed}" + (" ..." if len(bad) > 10 else "")
            warnings.warn(SkippedItems(msg, bad))

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((size, size, 3), tf.uint8), tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)))
    return ds if with_ids else ds.map(lambda a, b, c: (a, b))


# --------------------------------------------------------------------------- writing

def encode_png(image) -> bytes:
    """Lossless PNG bytes of one uint8 ``(H, W, 3)`` image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def example(ident: str, label: int, encoded: bytes) -> bytes:
    """One serialized ``tf.train.Example`` with the schema of the module doc."""
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[ident.encode("utf-8")])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    })).SerializeToString()


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}.tfrecord"
