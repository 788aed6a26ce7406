"""What a checkpoint costs (`relufit run --resume`): its parts, and a run with one every round
against the same run with none, in the same invocation.

Run: python benchmarks/checkpoint.py [--workers 4] [--dims 10000,1000000] [--repeats 5]

For each d, on ``--backend local`` (real agent processes on 127.0.0.1), QSGD s=16 elias in
``broadcast`` (the topology whose checkpoint holds the most: two weight vectors, the encoded
update and the master's generator), it prints medians over ``--repeats`` of:

- ``states``: the SAVE -> STATE round trip that collects every worker's generators;
- ``write``: writing ``checkpoints/trial-0.npz`` (numpy savez, fsync, rename);
- ``file``: its size;
- ``round``: a round without any checkpoint (the baseline), and the extra time per round of
  a run with a checkpoint after every round (``checkpoint_rounds = 1``), as a ratio.

With the default (a checkpoint about every 10 s), the cost per second of run time is
(states + write) / 10 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.config import from_dict
from orchestrator.providers import open_pool
from orchestrator.results import write_checkpoint
from orchestrator.trial import run_trial

ROUNDS = 30


def experiment(d: int, workers: int):
    return from_dict({
        "problem": {"d": d, "n": workers * 8, "seed": 0},
        "train": {"rounds": ROUNDS, "batch_size": 8, "lr": 1e-6, "target_rel_error": 0},
        "compress": {"scheme": "qsgd", "levels": 16, "coding": "elias"},
        "cluster": {"workers": workers, "topology": "broadcast", "connect_timeout": 60},
    }, "checkpoint-bench")


def timed_run(pool, spec, every: int, out: Path) -> tuple[float, list[float], list[float]]:
    """Seconds per round of one trial; each checkpoint's states and write times."""
    states_s, write_s = [], []

    def save(ckpt) -> None:
        t0 = time.perf_counter()
        write_checkpoint(out, ckpt)
        write_s.append(time.perf_counter() - t0)

    real_states = pool.states

    def states(round_: int):
        t0 = time.perf_counter()
        found = real_states(round_)
        states_s.append(time.perf_counter() - t0)
        return found

    pool.states = states
    try:
        t0 = time.perf_counter()
        run_trial(spec, pool, lambda row: None, on_checkpoint=save if every else None,
                  checkpoint_rounds=every)
        return (time.perf_counter() - t0) / spec.rounds, states_s, write_s
    finally:
        pool.states = real_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dims", default="10000,1000000")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"M = {args.workers}, broadcast, qsgd s=16 elias, {ROUNDS} rounds a run, medians of "
          f"{args.repeats} runs each")
    print(f"{'d':>9} {'round ms':>9} {'+ckpt ms':>9} {'ratio':>6} {'states ms':>10} "
          f"{'write ms':>9} {'file kB':>8}")
    for d in (int(x) for x in args.dims.split(",")):
        exp = experiment(d, args.workers)
        spec = exp.trials()[0].spec
        with open_pool("local", exp) as pool, tempfile.TemporaryDirectory() as tmp:
            base, each, states, writes = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                base.append(timed_run(pool, spec, 0, Path(tmp))[0])
                per_round, s, w = timed_run(pool, spec, 1, Path(tmp))
                each.append(per_round)
                states += s
                writes += w
            size = (Path(tmp) / "checkpoints" / "trial-0.npz").stat().st_size
        b, e = statistics.median(base), statistics.median(each)
        print(f"{d:>9} {1e3 * b:>9.2f} {1e3 * (e - b):>9.2f} {e / b:>6.2f} "
              f"{1e3 * statistics.median(states):>10.2f} {1e3 * statistics.median(writes):>9.2f}"
              f" {size / 1e3:>8.0f}")


if __name__ == "__main__":
    main()
