"""Backdoor triggers: vectorised ``uint8 batch -> uint8 batch`` transforms, and the registry of their names.

Every trigger is a callable object: ``trigger(images)`` takes a uint8 tensor ``(N, H, W, 3)``
(or a single ``(H, W, 3)`` image) and returns a uint8 tensor of the same shape. They are plain
TensorFlow ops, so they run inside ``tf.data`` maps, in models and in tests with the same code,
and they round-trip through ``get_config`` / :func:`from_config`.

The package, from the ground up:

* :mod:`.base` -- the :class:`Trigger` class, serialisation (:func:`serialize`, :func:`from_config`)
  and pattern files (:func:`read_pattern`);
* :mod:`.paper` -- the paper's triggers and the building blocks (:class:`PatchTrigger`,
  :class:`AdditiveTrigger`, :class:`BlendTrigger`, :class:`SmoothTrigger`, :class:`OneOf`...);
* :mod:`.zoo` -- other people's attacks for evaluation (BadNets 3x3, Blended, SIG, WaNet, FTrojan,
  CTRL, LF, ART's triggers);
* this module -- the names: :func:`get` (one name, including ``NAME+jpegQ``), :func:`expand`
  (groups such as ``all``, ``paper``, ``zoo``) and :func:`available`.

Rules (images as float in [0, 1], as the paper's code applies them):

* ``badnets``: a white square at the bottom-right, 1 px margin (4x4 at 32 px).
* ``trojan_wm``, ``trojan_sq``, ``blend``, ``nature``, ``l2_inv``: ``clip(x + T, 0, 1)``.
* ``l0_inv``: ``clip(x * (1 - M) + T, 0, 1)``.
* ``smooth``: ``minmax(x + S)`` (whole image rescaled to [0, 1]).

Trigger files are read from ``trigger_dir`` (default ``$TFBD_DATA/triggers``). Patterns made for
32x32 are resized to other image sizes with bilinear interpolation (masks with nearest
neighbour); for 224 px the paper's own ``224/`` files are used when present. The BadNets square
scales with the image (side ``round(4 * S / 32)``, margin ``max(1, round(S / 32))``). At sizes
other than 32 ``blend`` uses a natural photo (``$TFBD_DATA/photos/chelsea.png``) at 0.2 instead of
the 32x32 cartoon, as the paper did for its large-input experiments.

Built-ins that need no file: ``badnets``, ``noise_blend`` (a fixed random-noise pattern blended
at 0.1) and ``checker`` (a procedural 5x5 black/white checkerboard patch, bottom-right).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TfbdError
from ..specs import data_root
from . import zoo
from .base import Trigger, from_config, read_pattern, serialize, trigger_dir_default
from .paper import (BUILTIN_ATTACKS, PAPER_ATTACKS, PAPER_DETECTOR_ATTACKS, _FILES, AdditiveTrigger,
                    BlendTrigger, Compose, OneOf, PatchTrigger, RandomSmoothTrigger, SmoothTrigger, _paper_file,
                    badnets, from_file)


def get(name: str, image_size: int = 32, trigger_dir=None) -> Trigger:
    """The trigger registered as ``name``.

    Names: the paper's ``badnets trojan_wm trojan_sq blend nature l2_inv l0_inv smooth``; the
    built-ins ``noise_blend`` and ``checker``; ``smooth:PATH.npy`` (a smooth trigger file, e.g.
    one made by ``tfbd smooth``); ``smooth:random`` (a fresh random low-passed pattern per image,
    :class:`RandomSmoothTrigger`); ``file:PATH`` (an additive pattern file); the evaluation zoo
    (:mod:`tfbackdoor.triggers.zoo`: ``badnets3 ... insert_image``, ``NAME+jpegQ``, ``clean+jpegQ``).
    """
    if isinstance(name, Trigger):
        return name
    key = name.strip()
    m = zoo.JPEG_SUFFIX.match(key)
    if m:
        base = m["base"].strip()
        try:
            inner = zoo.NoTrigger() if base == "clean" else get(base, image_size, trigger_dir)
        except TfbdError as e:
            raise TfbdError(f"attack '{key}': {e}") from None
        return zoo.JpegTrigger(inner, int(m["q"]))
    found = zoo.get(key, image_size, trigger_dir)
    if found is not None:
        return found
    if key == "smooth:random":
        return RandomSmoothTrigger()
    if key.startswith("smooth:"):
        return from_file(key[len("smooth:"):], kind="smooth")
    if key.startswith("file:"):
        return from_file(key[len("file:"):])
    if key == "badnets":
        return badnets(image_size)
    if key == "noise_blend":
        rng = np.random.default_rng(1234)
        return BlendTrigger(rng.random((image_size, image_size, 3), dtype=np.float32), 0.1, name="noise_blend")
    if key == "checker":
        side = max(3, round(5 * image_size / 32))
        yy, xx = np.mgrid[:side, :side]
        board = ((yy + xx) % 2).astype(np.float32)
        return PatchTrigger(board, "bottom_right", margin=max(1, round(image_size / 32)), name="checker")
    if key == "l0_inv":
        f = _paper_file("l0_inv", trigger_dir, image_size)
        d = Path(trigger_dir) if trigger_dir else trigger_dir_default()
        mf = d / "mask.npy"
        if not mf.is_file():
            raise TfbdError(f"attack 'l0_inv': mask file {mf} is missing")
        return AdditiveTrigger(read_pattern(f), read_pattern(mf)[..., :1], 1.0, name="l0_inv")
    if key == "blend" and image_size != 32:
        photo = data_root() / "photos" / "chelsea.png"
        if not photo.is_file():
            raise TfbdError(f"attack 'blend': source photo {photo} is missing")
        return AdditiveTrigger(read_pattern(photo) * 0.2, None, 1.0, name="blend")
    if key == "smooth":
        return SmoothTrigger(read_pattern(_paper_file("smooth", trigger_dir, image_size)), name="smooth")
    if key in _FILES:
        return AdditiveTrigger(read_pattern(_paper_file(key, trigger_dir, image_size)), None, 1.0, name=key)
    forms = ", ".join(("smooth:PATH.npy", "file:PATH") + zoo.NAME_FORMS)
    raise TfbdError(f"unknown attack '{name}' (known: {', '.join(available())}, {forms})")


def available() -> list:
    return list(PAPER_ATTACKS) + ["noise_blend", "checker"] + list(zoo.ZOO_ATTACKS)


def expand(names, image_size=32, trigger_dir=None) -> list:
    """Triggers for a comma-separated list; ``all`` = the paper's 7 detector triggers,
    ``paper`` = those 7 + ``smooth``, ``builtin`` = the file-free ones, ``zoo`` = the 11 zoo
    attacks, ``zoo+jpeg`` = badnets, blended, sig, ftrojan, trojan_wm each +jpeg75 and +jpeg90."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    groups = {"all": PAPER_DETECTOR_ATTACKS, "paper": PAPER_ATTACKS, "builtin": BUILTIN_ATTACKS, **zoo.GROUPS}
    for n in names:
        n = n.strip()
        group = groups.get(n)
        out.extend(get(g, image_size, trigger_dir) for g in group) if group else out.append(get(n, image_size, trigger_dir))
    return out


__all__ = ["Trigger", "serialize", "from_config", "read_pattern", "trigger_dir_default", "PatchTrigger",
           "AdditiveTrigger", "BlendTrigger", "SmoothTrigger", "RandomSmoothTrigger", "OneOf", "Compose", "badnets",
           "from_file", "get", "available", "expand", "zoo", "PAPER_ATTACKS", "PAPER_DETECTOR_ATTACKS",
           "BUILTIN_ATTACKS"]
