"""Imagenette as 224-px colour training data for the camera detector, without the camera test images.

Why: ``$TFBD_DATA/natural/camera`` (470 colour 224-px photos, one per ImageNet class) is our unseen
colour test set for large-input detectors, and Imagenette (fast.ai's 10-class ImageNet subset) is
the colour training set. Both come from ImageNet, so a camera photo of one of Imagenette's ten
classes can be in Imagenette too, cropped differently (tench and English springer are: found by
this script). This writes a copy of an Imagenette split with every image that *may* be such a
duplicate left out: a 16x16 greyscale thumbnail correlating >= ``--cut`` with a camera photo of
the same class. A few look-alikes are dropped too; that costs nothing.

Source: Imagenette v2 at 224 px (every file 224x224 JPEG q75), here from the public mirror
``thunderInfy/imagenette`` @ b850f030 (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``); with
internet, ``tfds:imagenette/full-size-v2`` resized to 224 is the same set.

    python benchmarks/prepare_imagenette.py --src /path/to/imagenette --split train --out /path/to/imagenette224/train

Files are hard-linked when possible (copied otherwise); ``excluded.json`` beside the output lists
what was left out and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfbackdoor.specs import data_root  # noqa: E402  (TF-free: $TFBD_DATA or ../shared/data)


def thumb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        t = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), np.float32).ravel()
    return (t - t.mean()) / (t.std() + 1e-6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="Imagenette root with <split>/<wnid>/*.JPEG")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True, help="Output folder (class sub-folders)")
    ap.add_argument("--camera", default=str(data_root() / "natural" / "camera"), help="Camera test photos <wnid>_<name>.jpg")
    ap.add_argument("--cut", type=float, default=0.6, help="Thumbnail correlation that counts as a possible duplicate")
    args = ap.parse_args(argv)

    src, out = Path(args.src) / args.split, Path(args.out)
    if not src.is_dir():
        print(f"error: {src}: not a folder (expected <split>/<wnid>/*.JPEG)", file=sys.stderr)
        return 2
    cams = {}
    for c in sorted(Path(args.camera).glob("*.jpg")):
        cams.setdefault(c.name.split("_")[0], []).append((c.name, thumb(c)))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    excluded, kept = [], 0
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (tmp / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir()):
            if f.suffix.lower() not in (".jpeg", ".jpg", ".png"):
                continue
            if cls.name in cams:
                t = thumb(f)
                r, name = max((float(np.mean(t * u)), n) for n, u in cams[cls.name])
                if r >= args.cut:
                    excluded.append({"file": f"{cls.name}/{f.name}", "camera": name, "thumb_corr": round(r, 3)})
                    continue
            try:
                os.link(f, tmp / cls.name / f.name)
            except OSError:
                shutil.copy2(f, tmp / cls.name / f.name)
            kept += 1
    (tmp / "excluded.json").write_text(json.dumps({"cut": args.cut, "excluded": excluded}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{out}: {kept} images kept, {len(excluded)} left out as possible camera duplicates (excluded.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
