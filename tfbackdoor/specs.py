"""TensorFlow-free checks of what a user typed: dataset specs, attack names, trigger files.

The CLI calls these before it imports TensorFlow (4-9 s on 2 cores), so a typo such as
``--dataset cifar1O:test`` or ``--attacks nope`` is reported in a fraction of a second. They
raise the same :class:`~tfbackdoor.errors.TfbdError` messages as the loaders
(:func:`tfbackdoor.data.resolve`, :func:`tfbackdoor.triggers.get`), which stay the reference:
a spec that passes here may still fail there (e.g. an unreadable file), never the reverse.

This module owns the dataset short-name table (:data:`SHORT_NAMES`, re-exported by
:mod:`tfbackdoor.data`). The attack names below mirror :mod:`tfbackdoor.triggers`
(``tests/test_startup.py`` checks they agree). Import nothing heavy here: only the standard library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import TfbdError, dataset_hint

SHORT_NAMES = {
    "cifar10:train": ("dir", "cifar10/train", 32),
    "cifar10:test": ("dir", "cifar10/test", 32),
    "cifar10:lossless": ("npz", "cifar10/lossless.npz", 32),
    "gtsrb:train": ("npz", "gtsrb/train.npz", 32),
    "gtsrb:test": ("npz", "gtsrb/test.npz", 32),
    "tsrd:train": ("npz", "tsrd/train.npz", 32),
    "tsrd:test": ("npz", "tsrd/test.npz", 32),
    "natural32": ("npz", "natural/natural32.npz", 32),
    "lfw62": ("dir", "lfw62", 224),
    "lfw62:train": ("dir", "lfw62", 224),
    "lfw62:test": ("dir", "lfw62", 224),
}
CROP_SOURCES = {"photos:crops": "photos"}
DEFAULT_CROPS = 20000
SPEC_FORMS = ("npz:PATH", "dir:PATH", "tfds:NAME[:SPLIT]", "crops:PATH[:N]")

# Detector architectures of tfbackdoor.models.ARCHS (a copy for the CLI's choices; tests/test_startup.py
# checks they agree).
ARCH_NAMES = ("cnn6", "large", "edge")
# Victim architectures of tfbackdoor.victim.build_victim (owned here, not a copy: victim.py and the CLI import it).
VICTIM_ARCHS = ("vgg", "resnet")

# tfbackdoor.export's QUANTIZE_MODES and FOLDS, for `tfbd export`'s choices without importing TensorFlow
# (copies: tests/test_startup.py checks they agree).
QUANTIZE_MODES = ("int8", "int16x8", "float16", "float32")
EXPORT_FOLDS = ("auto", "fc", "basis", "separable", "none")

# Attack names accepted by tfbackdoor.triggers.get / expand and tfbackdoor.triggers.zoo.get (a copy:
# tests/test_startup.py checks it equals triggers.available(), the groups and zoo.NAME_FORMS).
PAPER_DETECTOR_ATTACKS = ("badnets", "trojan_wm", "trojan_sq", "blend", "nature", "l2_inv", "l0_inv")
PAPER_ATTACKS = PAPER_DETECTOR_ATTACKS + ("smooth",)
BUILTIN_ATTACKS = ("badnets", "noise_blend", "checker")
ZOO_ATTACKS = ("badnets3", "badnets_grid", "blended", "sig", "lf", "ftrojan", "ctrl", "wanet", "art_single",
               "art_pattern", "insert_image")
ZOO_JPEG_ATTACKS = tuple(f"{a}+jpeg{q}" for a in ("badnets", "blended", "sig", "ftrojan", "trojan_wm") for q in (75, 90))
ATTACK_NAMES = PAPER_ATTACKS + ("noise_blend", "checker") + ZOO_ATTACKS
ATTACK_GROUPS = {"all": PAPER_DETECTOR_ATTACKS, "paper": PAPER_ATTACKS, "builtin": BUILTIN_ATTACKS,
                 "zoo": ZOO_ATTACKS, "zoo+jpeg": ZOO_JPEG_ATTACKS}
ZOO_NAME_FORMS = ("blended:PATH[:ALPHA]", "lf:SEED", "wanet:SEED", "insert_image:PATH", "NAME+jpegQ", "clean+jpegQ")
_JPEG_SUFFIX = re.compile(r"^(?P<base>.+)\+jpeg(?P<q>\d{1,3})$")
TRIGGER_FILE_SUFFIXES = (".png", ".npy", ".jpg", ".jpeg", ".bmp")


def data_root() -> Path:
    """``$TFBD_DATA`` or ``../shared/data`` relative to the repository root."""
    env = os.environ.get("TFBD_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _crops_folder(spec, rest):
    folder, _, count = rest.rpartition(":")
    if not (count.isdigit() and folder):
        return rest
    if int(count) <= 0:
        raise TfbdError(f"{spec}: the number of crops must be positive")
    return folder


def check_dataset(spec: str) -> None:
    """Raise the loader's ``TfbdError`` for an unknown spec or a missing file/folder (no decoding).

    ``A+B`` checks every part. ``tfds:`` specs are only checked for their syntax.
    """
    parts = [p.strip() for p in str(spec).split("+") if p.strip()] or [str(spec).strip()]
    for part in parts:
        if part in SHORT_NAMES or part in CROP_SOURCES:
            root = data_root()
            if not root.is_dir():
                raise TfbdError(f"{part}: data directory {root} not found (set $TFBD_DATA)")
            if part in CROP_SOURCES:
                if not (root / CROP_SOURCES[part]).is_dir():
                    raise TfbdError(f"{part}: directory not found: {root / CROP_SOURCES[part]}")
                continue
            kind, rel, _ = SHORT_NAMES[part]
            path = root / rel
        else:
            kind, _, rest = part.partition(":")
            if kind in ("tfrecord", "tar") and rest:   # sharded encoded images (tfbackdoor.shards)
                from .shards import check_spec

                check_spec(part)
                continue
            if kind not in ("npz", "dir", "tfds", "crops") or not rest:
                known = ", ".join(list(SHORT_NAMES) + list(CROP_SOURCES) + list(SPEC_FORMS))
                raise TfbdError(f"unknown dataset '{part}'{dataset_hint(part)} (known: {known})")
            if kind == "tfds":
                continue
            path = Path(_crops_folder(part, rest) if kind == "crops" else rest)
        if kind == "npz" and not path.is_file():
            raise TfbdError(f"{part}: file not found: {path}")
        if kind in ("dir", "crops") and not path.is_dir():
            raise TfbdError(f"{part}: directory not found: {path}")


def _unknown_attack(name):
    forms = ", ".join(("smooth:PATH.npy", "file:PATH") + ZOO_NAME_FORMS)
    return TfbdError(f"unknown attack '{name}' (known: {', '.join(ATTACK_NAMES)}, {forms})")


def _check_trigger_file(path):
    if not Path(path).is_file():
        raise TfbdError(f"trigger file not found: {Path(path)}")


def check_attack(name: str) -> None:
    """One name as :func:`tfbackdoor.triggers.get` takes it (no groups)."""
    key = str(name).strip()
    m = _JPEG_SUFFIX.match(key)
    if m:   # NAME+jpegQ (zoo): the inner name must be valid
        base = m["base"].strip()
        if base != "clean":
            try:
                check_attack(base)
            except TfbdError as e:
                raise TfbdError(f"attack '{key}': {e}") from None
        return
    if key == "smooth:random" or key in ATTACK_NAMES or key.startswith(("blended:", "insert_image:")):
        return
    for prefix in ("lf:", "wanet:"):
        if key.startswith(prefix):
            try:
                int(key[len(prefix):])
            except ValueError:
                raise TfbdError(f"attack '{key}': expected {prefix}SEED with an integer seed") from None
            return
    for prefix in ("smooth:", "file:"):
        if key.startswith(prefix):
            return _check_trigger_file(key[len(prefix):])
    raise _unknown_attack(name)


def check_attacks(names) -> None:
    """A comma-separated list as :func:`tfbackdoor.triggers.expand` takes it (groups allowed)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    for n in names:
        if n.strip() not in ATTACK_GROUPS:
            check_attack(n)


def check_trigger(spec: str) -> None:
    """A trigger as :func:`tfbackdoor.victim.resolve_trigger` takes it: a name, ``smooth:PATH``,
    ``file:PATH`` or a bare pattern-file path."""
    s = str(spec).strip()
    if ":" not in s and Path(s).suffix.lower() in TRIGGER_FILE_SUFFIXES:
        return _check_trigger_file(s)
    check_attack(s)


def check_file(path, what: str) -> None:
    """``what`` not found: PATH, unless ``path`` is ``None`` or an existing file."""
    if path is not None and not Path(path).is_file():
        raise TfbdError(f"{what} not found: {path}")


def check_out(path, option: str = "--out", kind: str = "file") -> None:
    """Refuse an output that cannot be written, before any work (issue 15 item 7).

    ``kind="file"``: ``path`` must not be an existing directory or special file (``/dev/null``, a FIFO);
    ``kind="dir"``: it must not be an existing non-directory. Either way, its nearest existing folder
    must accept a new file (tried for real: catches read-only and pseudo file systems such as ``/sys``
    and ``/proc``, and missing permissions, also for root). Remote URLs (``gs://``) are not checked.
    """
    if path is None or "://" in str(path):
        return
    p = Path(path)
    if kind == "file":
        if p.is_dir():
            raise TfbdError(f"{option} {path} is a directory (give a file name inside it)")
        if p.exists() and not p.is_file():
            raise TfbdError(f"{option} {path} is not a regular file (refusing to replace it)")
    elif p.exists() and not p.is_dir():
        raise TfbdError(f"{option} {path} exists and is not a directory")
    folder = p if kind == "dir" else p.parent
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise TfbdError(f"{option} {path}: {folder} is not a directory")
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".tfbd-write-check.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise TfbdError(f"{option} {path}: cannot write in {folder} ({e.strerror or e})") from None


def shipped_model(name: str) -> Path:
    """A shipped model file: ``saved_models/NAME`` of a source checkout (or an editable install), else
    the copy a non-editable ``pip install .`` puts in the package (``tfbackdoor/saved_models/NAME``,
    setup.cfg ``package_dir``). Returns the source-tree path when neither exists (for the error)."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "saved_models" / name, here / "saved_models" / name]
    return next((p for p in candidates if p.is_file()), candidates[0])
