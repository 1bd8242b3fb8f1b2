"""Time one pass of Algorithm 1: the batched search vs the authors' per-sample loop.

    python benchmarks/smooth_loop.py --model VICTIM.keras [--dataset cifar10:train] [--samples 200]

Both start from r = 0 on the same samples and run one pass (the per-sample loop iterates
targeted DeepFool steps on each sample until it is fooled, up to --max-iter). Prints seconds per
pass and the fooling rate each reached; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", default="cifar10:train")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from tfbackdoor import data, smooth, victim

    model = victim.load(a.model)
    x, y = data.load_arrays(a.dataset, limit=a.samples, seed=a.seed)
    victim.check_model_fits(model, x, a.model)
    # Warm up (tf.function tracing) so the batched timing is the steady state.
    smooth.smooth_trigger_search(model, x[:16], y[:16], max_passes=1, batch_size=a.batch_size, holdout=4)
    rows = []
    for name, fn, kw in [("batched", smooth.smooth_trigger_search, {"batch_size": a.batch_size}),
                         ("per-sample loop", smooth.paper_loop_baseline, {"max_iter": a.max_iter})]:
        t = time.perf_counter()
        res = fn(model, x, y, max_passes=a.passes, seed=a.seed, **kw)
        dt = (time.perf_counter() - t) / a.passes
        rows.append((name, dt, res.fooling_rate, res.target))
        print(f"{name:<16} {dt:8.2f} s/pass  fooling rate {res.fooling_rate:.3f}  target {res.target}", flush=True)
    print(f"speed-up: {rows[1][1] / max(rows[0][1], 1e-9):.1f}x ({a.samples} samples, {a.dataset})")


if __name__ == "__main__":
    main()
