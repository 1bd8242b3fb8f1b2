"""Which frame policy should the edge screener use on video: centre-crop or stretch? (issue 13, goal 3)

Camera frames are wider than the screener's square input. ``--resize crop`` centre-crops each frame
to the model's aspect before resizing (a blind spot at the sides, undistorted content), ``stretch``
resizes the whole frame (sees everything, squeezes it horizontally). This script measures which
keeps the screener's verdicts on triggered vs clean frames better:

* frames: every colour photo in ``$TFBD_DATA/natural/camera`` (470, 224 px) zoomed to a wide frame
  (16:9, 398x224, and 4:3, 298x224: the photo scaled to the frame width, centre rows kept);
* triggers at the screener's scale (its ``image_size``, 32 px for the shipped screener): the
  trigger's change on the region resized to that size, upscaled (nearest) back onto the region;
  the region is the centre square of the frame (what a crop sees) or the whole frame (a trigger
  made for a stretched view: BadNets in the frame's corner, the watermark over the whole frame);
* each photo gives one clean frame and one frame per trigger placement; all frames of one aspect
  are written to one video (``--codec``, default MJPG at OpenCV's quality 95, what USB cameras
  stream) and screened from that file by ``edge/screen.py``'s ``Screener`` + ``iter_sources``
  with each policy.

Reported per aspect and policy: FPR on clean frames, BDR per trigger placement (share flagged,
the screener's own threshold) and the AUROC of all triggered vs clean frames.

    nice -n 19 python benchmarks/video_resize_policy.py --out benchmarks/results/video_resize_policy.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

TRIGGERS = ("badnets", "trojan_wm")
PLACEMENTS = ("centre", "frame")
ASPECTS = {"16:9": (398, 224), "4:3": (298, 224)}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="saved_models/screener_cifar10_int8.tflite")
    ap.add_argument("--photos", default=None, help="Folder of photos (default $TFBD_DATA/natural/camera).")
    ap.add_argument("--limit", type=int, default=None, help="At most this many photos.")
    ap.add_argument("--codec", default="MJPG", help="FourCC: MJPG (.avi) or mp4v (.mp4).")
    ap.add_argument("--out", default=None, help="JSON results.")
    return ap.parse_args()


def zoom_to_frame(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """The photo scaled to ``width`` (bilinear), its centre ``height`` rows: a wide frame."""
    side = width
    big = np.asarray(Image.fromarray(photo).resize((side, side), Image.BILINEAR))
    top = (side - height) // 2
    return np.ascontiguousarray(big[top:top + height])


def triggered(region: np.ndarray, trigger, size: int) -> np.ndarray:
    """``region`` with ``trigger``'s change at ``size`` x ``size`` px upscaled (nearest) onto it."""
    h, w = region.shape[:2]
    small = np.asarray(Image.fromarray(region).resize((size, size), Image.BILINEAR)).astype(np.float32)
    delta = np.asarray(trigger(small[None].astype(np.uint8)).numpy(), np.float32)[0] - small
    up = np.stack([np.asarray(Image.fromarray(delta[..., c]).resize((w, h), Image.NEAREST)) for c in range(3)], -1)
    return np.clip(region.astype(np.float32) + up, 0, 255).round().astype(np.uint8)


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks of ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    rp = ranks[len(neg):].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main():
    args = parse_args()
    import cv2

    from edge.screen import Screener, iter_sources
    from tfbackdoor import triggers
    from tfbackdoor.atomic import write_json
    from tfbackdoor.specs import data_root

    folder = args.photos or str(data_root() / "natural" / "camera")
    files = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:args.limit]
    if not files:
        sys.exit(f"no .jpg photos in {folder}")
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    probe = Screener(args.model)
    size = probe.input_size[0]
    trig = {name: triggers.get(name, size) for name in TRIGGERS}
    sets = ["clean"] + [f"{t}-{p}" for t in TRIGGERS for p in PLACEMENTS]
    ext = ".avi" if args.codec.upper() == "MJPG" else ".mp4"
    tmp = tempfile.mkdtemp(prefix="tfbd_video_policy_")
    results = []
    for aspect, (width, height) in ASPECTS.items():
        path = os.path.join(tmp, f"frames_{width}x{height}{ext}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*args.codec), 25, (width, height))
        if args.codec.upper() == "MJPG":
            writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
        labels = []
        left = (width - height) // 2
        for photo in photos:
            frame = zoom_to_frame(photo, width, height)
            for name in sets:
                out = frame.copy()
                if name != "clean":
                    t, placement = name.split("-")
                    if placement == "centre":
                        out[:, left:left + height] = triggered(frame[:, left:left + height], trig[t], size)
                    else:
                        out = triggered(frame, trig[t], size)
                writer.write(np.ascontiguousarray(out[..., ::-1]))
                labels.append(name)
        writer.release()
        labels = np.array(labels)
        for policy in ("crop", "stretch"):
            screener = Screener(args.model, resize=policy, num_threads=1)
            t0 = time.perf_counter()
            scores = np.array([screener.score(rgb) for _, rgb in iter_sources([path])])
            fps = len(scores) / (time.perf_counter() - t0)
            if len(scores) != len(labels):
                sys.exit(f"{path}: read {len(scores)} frames, wrote {len(labels)}")
            flagged = scores > screener.threshold
            clean = scores[labels == "clean"]
            row = {"aspect": aspect, "frame": [width, height], "policy": policy, "frames": int(len(scores)),
                   "fpr": round(100 * float(flagged[labels == "clean"].mean()), 2),
                   "bdr": {s: round(100 * float(flagged[labels == s].mean()), 2) for s in sets[1:]},
                   "auroc": round(100 * auroc(clean, scores[labels != "clean"]), 2),
                   "frames_per_s": round(fps, 1)}
            row["bdr_mean"] = round(float(np.mean(list(row["bdr"].values()))), 2)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    for f in glob.glob(os.path.join(tmp, "*")):
        os.remove(f)
    os.rmdir(tmp)
    result = {"command": "python " + " ".join(sys.argv), "model": args.model, "photos": folder,
              "n_photos": len(photos), "codec": args.codec, "threshold": probe.threshold, "rows": results}
    if args.out:
        write_json(result, args.out)
    print(f"\n### crop vs stretch on wide video frames ({len(photos)} photos, {args.codec}, {args.model})\n")
    print("| frame | policy | clean FPR % | " + " | ".join(f"BDR {s} %" for s in sets[1:]) + " | mean BDR % | AUROC % |")
    print("|---|---|---|" + "---|" * (len(sets) + 1))
    for r in results:
        print(f"| {r['aspect']} {r['frame'][0]}x{r['frame'][1]} | {r['policy']} | {r['fpr']:.2f} | "
              + " | ".join(f"{r['bdr'][s]:.1f}" for s in sets[1:]) + f" | {r['bdr_mean']:.1f} | {r['auroc']:.2f} |")


if __name__ == "__main__":
    main()
