"""A round's mini-batch gather: rows copied into a new array against into a kept buffer.

Run: python benchmarks/gather.py [--d 10000] [--rows 12500] [--batch 128] [--repeats 400]

Every worker of a shard-backed run (n > 0) copies its batch's rows out of its shard each
round (``relu.minibatch``): at d = 1e4, batch 128, that is 10 MB, as much time as the
gradient's two matrix-vector products. Both ways copy the same rows (checked); they are
interleaved, so a noisy spell of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import relu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=12_500, help="the shard's (n = 1e5 over 8)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=400)
    args = p.parse_args()
    X = np.random.default_rng(0).standard_normal((args.rows, args.d))
    y = np.zeros(args.rows)
    buf = np.empty((args.batch, args.d))
    new_rng, kept_rng = np.random.default_rng(1), np.random.default_rng(1)
    times: dict[str, list[float]] = {"new array": [], "kept buffer": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a, _ = relu.minibatch(X, y, args.batch, new_rng)
        t1 = time.perf_counter()
        b, _ = relu.minibatch(X, y, args.batch, kept_rng, out=buf)
        t2 = time.perf_counter()
        times["new array"].append(t1 - t0)
        times["kept buffer"].append(t2 - t1)
        if not np.array_equal(a, b):
            raise SystemExit("the two gathers copied different rows")
    print(f"d = {args.d}, shard {args.rows} rows, batch {args.batch}: "
          f"{args.batch * args.d * 8 / 1e6:.1f} MB a gather; ms, median [p10-p90] of "
          f"{args.repeats}")
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:12s} {1e3 * med[k]:.3f} [{1e3 * np.percentile(v, 10):.3f}-"
              f"{1e3 * np.percentile(v, 90):.3f}]")
    print(f"kept buffer / new array: {med['kept buffer'] / med['new array']:.2f}")


if __name__ == "__main__":
    main()
