"""Reading images: the one decoding rule of ``dir:`` files and shards, header checks, resizing.

Every image that enters the package from a file or a shard record goes through here: its header's
pixel count is checked against ``$TFBD_MAX_PIXELS`` before anything is decoded (decompression
bombs are refused; :func:`max_pixels`, the edge screener's rule), TensorFlow decodes the formats
it knows (:data:`TF_DECODABLE`) and Pillow the others, and the result is resized to the requested
side by :func:`resize_uint8` (bilinear, antialiased). :func:`diagnose` says why a file was not
usable, :class:`SkippedItems` carries the skipped items of a load, and :func:`subset` picks the
seeded subset of a source that ``--limit`` selects. Used by :mod:`tfbackdoor.data`,
:mod:`tfbackdoor.shards` and :mod:`tfbackdoor.beam_scan`, so a scan of shards or on Beam gives
the scores of a scan of the original files.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image

from edge.screen import max_pixels as edge_max_pixels

from .errors import TfbdError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
TF_DECODABLE = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class SkippedItems(UserWarning):
    """Items of a dataset that were skipped; ``items`` holds their ``(id, reason)`` pairs."""

    def __init__(self, message, items=()):
        super().__init__(message)
        self.items = list(items)


def max_pixels() -> int:
    """The largest pixel count (width x height, as declared in an image's header) that is decoded:
    ``$TFBD_MAX_PIXELS`` or 40 million. Larger images (decompression bombs: a 1.5 MB PNG can declare
    23000 x 23000 px, 1.6 GB decoded) are skipped and reported instead. One rule with the edge
    screener, which owns it (it must run without this package)."""
    try:
        return edge_max_pixels()
    except ValueError as e:
        raise TfbdError(str(e)) from None


def file_id(path: str) -> str:
    """The id (report name) of a file: its path, with the bytes of a name that is not valid UTF-8
    shown as ``\\xNN`` (the file itself is still read through its real name)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def too_large(w, h, limit, pixels=None):
    size = f"{w}x{h} = " if w else ""
    pixels = w * h if pixels is None else pixels
    return (f"image too large: its header declares {size}{pixels / 1e6:.1f} megapixels, more than the limit of "
            f"{limit / 1e6:g} (set TFBD_MAX_PIXELS to change it); not decoded")


def diagnose(path) -> str:
    """Why the image file ``path`` was not usable, from its header only (never decoded)."""
    limit = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:   # beyond Pillow's own limit: it gives only the pixel count
        found = re.search(r"\((\d+) pixels\)", str(e))
        return too_large(0, 0, limit, int(found.group(1))) if found else f"image too large ({e}); not decoded"
    except FileNotFoundError:
        return "file not found (removed while reading?)"
    except Exception:
        return "unreadable or corrupt image"
    return too_large(w, h, limit) if w * h > limit else "unreadable or corrupt image"


def _pil_pixels(path) -> np.int64:
    """Pixel count declared in the header of ``path`` (Pillow, lazy: nothing decoded); 0 when
    Pillow cannot tell (decoding will decide), a huge number for Pillow's own bomb limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path) as im:
                return np.int64(im.size[0] * im.size[1])
    except Image.DecompressionBombError:
        return np.int64(2 ** 62)
    except Exception:
        return np.int64(0)


def _bytes_at(data, start, n):
    return tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, n), tf.uint8), tf.int64)


def declared_pixels(data, path):
    """Width x height as declared by the header of the encoded image ``data`` (no decoding):
    PNG, GIF, BMP and JPEG in the graph, any other format through Pillow."""
    n = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 8)

    def png():
        b = _bytes_at(data, 16, 8)
        w = ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]
        h = ((b[4] * 256 + b[5]) * 256 + b[6]) * 256 + b[7]
        return tf.minimum(w, 2 ** 31) * tf.minimum(h, 2 ** 31)  # no int64 overflow for forged sizes

    def gif():
        b = _bytes_at(data, 6, 4)
        return (b[0] + 256 * b[1]) * (b[2] + 256 * b[3])

    def bmp():
        b = _bytes_at(data, 18, 8)
        w = b[0] + 256 * (b[1] + 256 * (b[2] + 256 * b[3]))
        h = b[4] + 256 * (b[5] + 256 * (b[6] + 256 * b[7]))
        signed = lambda v: tf.where(v >= 2 ** 31, 2 ** 32 - v, v)  # noqa: E731  (bottom-up BMPs: negative)
        return tf.minimum(signed(w), 2 ** 31) * tf.minimum(signed(h), 2 ** 31)

    def jpeg():
        s = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return s[0] * s[1]

    def other():
        return tf.reshape(tf.numpy_function(_pil_pixels, [path], tf.int64, stateful=False), [])

    return tf.case([
        (tf.logical_and(tf.equal(head, b"\x89PNG\r\n\x1a\n"), n >= 24), png),
        (tf.logical_and(tf.strings.regex_full_match(tf.strings.substr(data, 0, 6), "GIF8[79]a"), n >= 10), gif),
        (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), b"BM"), n >= 26), bmp),
        (tf.io.is_jpeg(data), jpeg),
    ], default=other, exclusive=False)


def resize_uint8(img, size):
    """Resize a uint8 HxWx3 tensor to ``size`` x ``size`` (bilinear, antialiased); no-op when equal."""
    def do():
        r = tf.image.resize(tf.cast(img, tf.float32), (size, size), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(r), 0, 255), tf.uint8)

    same = tf.logical_and(tf.equal(tf.shape(img)[0], size), tf.equal(tf.shape(img)[1], size))
    out = tf.cond(same, lambda: img, do)
    return tf.ensure_shape(out, (size, size, 3))


def decode_file(path, size, limit=None):
    """Decode and resize one file; an image whose header declares more than ``limit`` pixels
    (default :func:`max_pixels`) fails before it is decoded."""
    data = tf.io.read_file(path)
    limit = max_pixels() if limit is None else limit
    check = tf.debugging.assert_less_equal(declared_pixels(data, path), tf.constant(limit, tf.int64),
                                           message="image too large")
    with tf.control_dependencies([check]):
        img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    return resize_uint8(img, size)


def decode_with_pil(path: str, size: int, limit: int | None = None) -> np.ndarray:
    """Pillow fallback for formats TensorFlow cannot decode (webp, tiff, ppm); refuses an image whose
    header declares more than ``limit`` pixels before decoding it."""
    limit = max_pixels() if limit is None else limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        if im.size[0] * im.size[1] > limit:
            raise ValueError(too_large(im.size[0], im.size[1], limit))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, np.uint8)


def subset(n, limit, seed, shuffle):
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
