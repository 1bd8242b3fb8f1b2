"""Camera-like 224-px colour training frames from a folder of photos, without the camera test photos.

Why (issue 13): ``$TFBD_DATA/natural/camera`` (470 colour photos) is the unseen colour test set of
the large-input detector. Its photos are ImageNet-sample originals (high-quality JPEGs, ~500x375)
centre-cropped, resized to 224 with Lanczos and saved as JPEG q92. Imagenette, our first colour
training set, is 224-px q75 JPEGs with far less fine detail, and a detector trained on it flags
detailed q92 photos as poisoned (BENCHMARKS "Camera frames at 224 px"). This script makes
training frames the way the camera photos were made, from other photos of the same kind: the
other ~500 ImageNet-sample images (public snapshot ``EliSchwartz/imagenet-sample-images`` @
bc69043e, the source named in ``camera_sources.tsv``), or any folder of large photos.

Per source photo (short side >= ``--min-side``, colour): crop 0 is the centre square (the camera
recipe exactly); crops 1.. are squares of a random side in [``--min-frac``, 1] x the short side at a
random place (seeded per photo), so that one photo gives several different frames. Each crop is
resized to 224 with ``Image.LANCZOS`` (``reducing_gap=3.0``) and saved as JPEG q92 (optimized), as
``make_natural.py`` did for the camera set.

Left out: every photo whose file stem is a camera photo's (the same ImageNet image), and any
whose 16x16 greyscale thumbnail correlates >= ``--cut`` with a camera photo (``prepare_imagenette.thumb``).

    python benchmarks/prepare_camera_like.py --src SRC --out CAMLIKE --crops 3

Writes ``OUT/*.jpg``, ``OUT/sources.tsv`` (file, source, crop box, resize factor) and
``OUT/excluded.json``, into ``OUT.tmp`` first, then renamed (atomic for the folder).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_imagenette import thumb  # noqa: E402  (the duplicate test both scripts use)
from tfbackdoor.specs import data_root  # noqa: E402  (TF-free: $TFBD_DATA or ../shared/data)

SIDE = 224
EXTS = (".jpeg", ".jpg", ".png")


def is_grey(im: Image.Image) -> bool:
    """The camera set's colour check: mean ``|R-G| + |G-B|`` below 1 level."""
    a = np.asarray(im, np.float32)
    return float(np.mean(np.abs(a[..., 0] - a[..., 1]) + np.abs(a[..., 1] - a[..., 2]))) < 1.0


def crop_boxes(w: int, h: int, crops: int, min_frac: float, rng: np.random.Generator) -> list:
    """``crops`` square ``(left, top, right, bottom)`` boxes: the centre square, then random ones."""
    s = min(w, h)
    boxes = [((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)]
    for _ in range(crops - 1):
        side = int(round(s * rng.uniform(min_frac, 1.0)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        boxes.append((x, y, x + side, y + side))
    return boxes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="Folder of photos (*.JPEG, *.jpg, *.png; not recursive)")
    ap.add_argument("--out", required=True, help="Output folder of 224-px JPEG q92 frames")
    ap.add_argument("--camera", default=str(data_root() / "natural" / "camera"), help="Camera test photos to leave out")
    ap.add_argument("--crops", type=int, default=3, help="Frames per photo: the centre square and crops-1 random squares")
    ap.add_argument("--min-frac", type=float, default=0.6, help="Smallest random square, as a share of the short side")
    ap.add_argument("--min-side", type=int, default=256, help="Photos with a shorter short side are skipped")
    ap.add_argument("--cut", type=float, default=0.9,
                    help="Thumbnail correlation that counts as a possible duplicate (0.9: compared with every camera "
                         "photo, not one class's as in prepare_imagenette.py, 0.6 would drop half of all photos)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    src, out, cam = Path(args.src), Path(args.out), Path(args.camera)
    if not src.is_dir():
        print(f"error: {src}: not a folder of photos", file=sys.stderr)
        return 2
    if not cam.is_dir() or not any(cam.glob("*.jpg")):
        print(f"error: {cam}: no camera photos to leave out (set --camera or $TFBD_DATA)", file=sys.stderr)
        return 2
    if args.crops < 1 or not 0.0 < args.min_frac <= 1.0:
        print("error: --crops must be >= 1 and --min-frac in (0, 1]", file=sys.stderr)
        return 2
    cam_files = sorted(cam.glob("*.jpg"))
    cam_stems = {c.stem.lower() for c in cam_files}
    cam_thumbs = np.stack([thumb(c) for c in cam_files])               # (470, 256)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    excluded, rows, bad = [], [], []
    files = sorted(f for f in src.iterdir() if f.suffix.lower() in EXTS)
    for i, f in enumerate(files):
        if f.stem.lower() in cam_stems:
            excluded.append({"file": f.name, "why": "a camera photo"})
            continue
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:        # a corrupt file is reported and skipped
            bad.append({"file": f.name, "error": str(e).splitlines()[0]})
            continue
        if min(im.size) < args.min_side:
            excluded.append({"file": f.name, "why": f"short side {min(im.size)} < {args.min_side}"})
            continue
        if is_grey(im):
            excluded.append({"file": f.name, "why": "greyscale"})
            continue
        r = float(np.max(cam_thumbs @ thumb(f)) / cam_thumbs.shape[1])
        if r >= args.cut:
            excluded.append({"file": f.name, "why": f"thumbnail correlation {r:.3f} with a camera photo"})
            continue
        rng = np.random.default_rng([args.seed, i])
        for k, box in enumerate(crop_boxes(*im.size, args.crops, args.min_frac, rng)):
            name = f"{f.stem}_{k}.jpg"
            im.resize((SIDE, SIDE), resample=Image.LANCZOS, box=box, reducing_gap=3.0).save(
                tmp / name, format="JPEG", quality=92, optimize=True)
            rows.append(f"{name}\t{f.name}\t{','.join(map(str, box))}\t{(box[2] - box[0]) / SIDE:.2f}")
    (tmp / "sources.tsv").write_text("file\tsource\tbox\tfactor\n" + "\n".join(rows) + "\n")
    (tmp / "excluded.json").write_text(json.dumps({"cut": args.cut, "excluded": excluded, "unreadable": bad}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{out}: {len(rows)} frames from {len(rows) // args.crops} photos; {len(excluded)} photos left out, "
          f"{len(bad)} unreadable (excluded.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
