"""What a detector records about its data: sample ids relative to their source, recorded info made
portable (no absolute paths of this machine), and the exclusion lists (the ids a detector was
fine-tuned or calibrated on, left out of evaluations) inline or in a manifest beside the model."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from . import models, specs
from .errors import TfbdError


def _source_folder(part):
    """The folder a ``dir:``-type dataset part reads (its file ids start with it), else ``None``."""
    kind, rel = (specs.SHORT_NAMES.get(part) or (None, None))[:2]
    if kind == "dir":
        return str(specs.data_root() / rel)
    if part.startswith("dir:"):
        return part[4:]
    return None


def relative_id(part, ident):
    """A sample id of dataset ``part`` relative to its data source: a file under the part's folder
    becomes its path inside it (``automobile/3808.jpg``); other ids (``cifar10:lossless#5``) stay.
    Recorded exclusions and loaded ids are compared in this form, so a model trained on one machine
    leaves out the same images on another (and models that recorded absolute paths still work)."""
    folder = _source_folder(part)
    if folder:
        folder = folder.rstrip("/") + "/"
        if ident.startswith(folder):
            return ident[len(folder):]
    return ident


_ABS_PATH = re.compile(r"(?<![\w$/.])/(?:[^\s/\"',]+/)+([^\s/\"',]+)")


def portable_info(info):
    """``info`` without this machine's absolute paths, for saving inside a model.

    Exclusion ids become :func:`relative_id`; in every other string a path under the data root
    becomes ``$TFBD_DATA/...``, one under the repository becomes relative to it, and any other
    absolute path is reduced to its file name (e.g. a training command's ``--out /tmp/x/det.keras``).
    """
    roots = [(str(specs.data_root().resolve()).rstrip("/") + "/", "$TFBD_DATA/"),
             (str(specs.data_root()).rstrip("/") + "/", "$TFBD_DATA/"),
             (str(Path(__file__).resolve().parent.parent) + "/", "")]

    def text(v):
        for root, new in roots:
            v = v.replace(root, new)
        return _ABS_PATH.sub(lambda m: m.group(1), v)

    def walk(v, key=None):
        if key == "exclude" and isinstance(v, dict):
            return {part: list(dict.fromkeys(relative_id(part, i) for i in ids)) for part, ids in v.items()}
        if isinstance(v, dict):
            return {k: walk(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return text(v) if isinstance(v, str) else v

    return walk(dict(info or {}))


# Exclusion lists (the ids a detector was fine-tuned or calibrated on; 47,000 for the shipped one)
# of at least this many ids go to a manifest beside the model, not into its config (issue 15 item 16).
MANIFEST_MIN_IDS = 1000
MANIFEST_FORMAT = "tfbd-exclusions/1"


def manifest_path(path) -> Path:
    """The exclusion manifest beside detector ``path``: ``NAME.keras`` -> ``NAME.keras.manifest.json``."""
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def _split_manifest(info, model_name):
    """``(info, manifest bytes or None)``: each bulky ``exclude`` dict of ``info`` (the top level's, or
    a nested one such as ``init.info``'s) moves to the manifest's ``sections`` under its dotted place
    and is replaced by ``exclude_manifest = {file, sha256, section, counts}``; small ones stay inline.
    A nested ``exclude_manifest`` already there (an ``--init`` model's) is a record of that model's own
    manifest, beside the recorded ``init.path``, and is kept as it is."""
    sections, refs = {}, []

    def walk(d, place):
        out = {}
        for k, v in d.items():
            here = f"{place}.{k}" if place else k
            if (k == "exclude" and isinstance(v, dict) and all(isinstance(ids, list) for ids in v.values())
                    and sum(len(ids) for ids in v.values()) >= MANIFEST_MIN_IDS):
                sections[here] = v
                refs.append({"file": manifest_path(model_name).name, "sha256": None, "section": here,
                             "counts": {part: len(ids) for part, ids in v.items()}})
                out["exclude_manifest"] = refs[-1]
            else:
                out[k] = walk(v, here) if isinstance(v, dict) else v
        return out

    info = walk(info, "")
    if not sections:
        return info, None
    blob = (json.dumps({"format": MANIFEST_FORMAT, "model": Path(model_name).name, "sections": sections},
                       separators=(",", ":")) + "\n").encode()
    digest = hashlib.sha256(blob).hexdigest()
    for ref in refs:
        ref["sha256"] = digest
    return info, blob


def _read_manifest(model, ref) -> dict:
    """The ``exclude`` dict that ``ref`` (an ``exclude_manifest``) points to, checked against its sha256."""
    src = model.__dict__.get("_tfbd_path")
    if src is None:
        raise TfbdError(f"{model.name}: its exclusion list is in {ref.get('file')}, beside its .keras file, "
                        "which is not known here (load the model with detector.load)")
    path = Path(src).parent / str(ref.get("file"))
    if not path.is_file() and manifest_path(src).is_file():
        path = manifest_path(src)   # the model and its manifest renamed together
    n = sum((ref.get("counts") or {}).values())
    if not path.is_file():
        raise TfbdError(f"{path}: exclusion manifest not found: {Path(src).name} keeps the ids of its {n} "
                        "fine-tuning/calibration images there, so evaluations can leave them out; copy it "
                        "beside the model")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != ref.get("sha256"):
        raise TfbdError(f"{path}: sha256 does not match the one recorded in {Path(src).name} "
                        "(the manifest was changed or belongs to another model)")
    try:
        section = json.loads(blob)["sections"][ref["section"]]
    except (ValueError, KeyError, TypeError) as e:
        raise TfbdError(f"{path}: not a valid exclusion manifest ({type(e).__name__}: {e})") from None
    return section


def exclusions(model) -> dict:
    """``{dataset part: [ids]}`` the detector was fine-tuned or calibrated on (left out of evaluations):
    inline in its info (small lists, and models saved before manifests) or read from its manifest
    (:func:`manifest_path`; a missing or changed one is a one-line :class:`TfbdError` naming it)."""
    info = models.spec_of(model).info
    if "exclude" in info or "exclude_manifest" not in info:
        return dict(info.get("exclude", {}))
    ref = info["exclude_manifest"]
    cache = model.__dict__.setdefault("_tfbd_exclusions", {})   # plain attribute, as _tfbd_score_fns
    if ref.get("sha256") not in cache:
        cache[ref.get("sha256")] = _read_manifest(model, ref)
    return dict(cache[ref.get("sha256")])


def _set_exclusions(spec, excl):
    spec.info = {**{k: v for k, v in spec.info.items() if k != "exclude_manifest"}, "exclude": excl}


def excluded_ids(model, part) -> set:
    """The ids of dataset ``part`` that ``model`` leaves out of evaluations, as :func:`relative_id` gives them."""
    return {relative_id(part, i) for i in exclusions(model).get(part, [])}
