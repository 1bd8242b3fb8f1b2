"""Detector training-data throughput: our tf.data pipeline vs a per-image numpy/scipy loop.

The baseline mirrors the paper's released code: a Python loop that, for every image, draws one
random manipulation with numpy, then takes ``scipy.fft.dctn`` of the clean and the manipulated
image. Ours is :func:`tfbackdoor.detector.training_dataset` (benign processing, one of five
manipulations, DCT, all vectorised in tf.data with AUTOTUNE). Both produce the same thing: a
clean and a manipulated DCT input per image.

    python benchmarks/pipeline_throughput.py --dataset cifar10:train --limit 8000 --out benchmarks/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import scipy.fft

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def paper_style_loop(x, seed=0):
    """Per-image Python loop with numpy manipulations and scipy DCT (the paper's approach)."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = x.shape
    out_c = np.empty(x.shape, np.float32)
    out_p = np.empty(x.shape, np.float32)
    for i in range(n):
        img = x[i].astype(np.float32)
        k = rng.integers(5)
        p = img.copy()
        if k in (0, 1):
            rh, rw = rng.integers(2, h // 3 + 1, size=2)
            t, l = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
            p[t:t + rh, l:l + rw] = 255.0 if k == 0 else rng.uniform(0, 255, 3)
        elif k == 2:
            p = p + rng.normal(0, rng.uniform(3, 16), p.shape)
        elif k == 3:
            yy, xx = np.mgrid[:h, :w]
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.2, 0.7) * h
            p[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= rng.uniform(0.35, 0.8)
        else:
            a = rng.uniform(0.05, 0.2)
            p = (1 - a) * p + a * x[rng.integers(n)].astype(np.float32)
        p = np.clip(np.round(p), 0, 255)
        out_c[i] = scipy.fft.dctn(img, type=2, norm="ortho", axes=(0, 1))
        out_p[i] = scipy.fft.dctn(p, type=2, norm="ortho", axes=(0, 1))
    return out_c, out_p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="cifar10:train")
    ap.add_argument("--limit", type=int, default=8000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfbackdoor import data, detector

    x, _ = data.load_arrays(args.dataset, limit=args.limit, seed=0)
    n = len(x)
    ds = detector.training_dataset(x, batch_size=128, seed=0)
    next(iter(ds))  # trace once
    t = time.perf_counter()
    count = sum(int(b[1].shape[0]) for b in ds)
    ours = time.perf_counter() - t
    ds_nob = detector.training_dataset(x, batch_size=128, seed=0, benign=False)
    next(iter(ds_nob))
    t = time.perf_counter()
    sum(int(b[1].shape[0]) for b in ds_nob)
    ours_nob = time.perf_counter() - t
    t = time.perf_counter()
    paper_style_loop(x)
    loop = time.perf_counter() - t
    res = {
        "dataset": args.dataset, "images": n, "cpu_cores": os.cpu_count(),
        "tfdata_images_per_s": round(n / ours, 1), "tfdata_inputs_per_s": round(count / ours, 1),
        "tfdata_no_benign_images_per_s": round(n / ours_nob, 1),
        "numpy_scipy_loop_images_per_s": round(n / loop, 1),
        "speedup": round(loop / ours, 2), "speedup_no_benign": round(loop / ours_nob, 2),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        from tfbackdoor.atomic import write_json

        write_json(res, args.out)


if __name__ == "__main__":
    main()
