"""Agents under SCHED_BATCH against the default policy, on one crowded machine.

Run: python benchmarks/sched.py [--workers 8] [--topology allreduce] [--pairs 6]
    [--window 10] [--d 10000] [--n 100000]

Each run is ``relufit run`` on the local backend (d = 1e4, n = 1e5, batch 128 a worker,
s15b128fixed, no target: it runs until stopped). The baseline is the same run with
``RELUFIT_AGENT_SCHED=normal`` (the agents keep the default policy); the two alternate, pair
after pair, so a noisy spell of the machine hits both. Per run: the median round over the
run's metrics (rounds after the 50th) and the CPU of every thread of the master and its
agents, from /proc over ``--window`` seconds, per round. Linux only (/proc, SCHED_BATCH).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import experiment, set_options  # noqa: E402
from worker.node import SCHED_ENV  # noqa: E402

SETTING = "s15b128fixed"

def tree(pid: int) -> list[int]:
    out = [pid]
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out += [k for c in open(f).read().split() for k in tree(int(c))]
        except OSError:
            continue
    return out


def cpu_s(root: int) -> float:
    """CPU seconds so far of every thread of ``root`` and its descendants."""
    ticks = 0
    for pid in tree(root):
        for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
            try:
                fields = open(stat).read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def one_run(exp: Path, out: Path, env: dict[str, str], args: argparse.Namespace,
            cwd: Path | None = None) -> tuple[float, float]:
    """(median round s, CPU s per round) of one run with ``env`` added to the environment,
    from the code in ``cwd`` (default: this tree's)."""
    before = set(out.iterdir())
    with open(out.parent / "relufit.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(exp),
                                 "--out", str(out), *set_options(args.topology, SETTING)],
                                env=dict(os.environ, **env), cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        time.sleep(args.settle)  # shards built, rounds under way
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        time.sleep(args.window)
        c1, t1 = cpu_s(proc.pid), time.monotonic()
    finally:
        proc.send_signal(signal.SIGINT)  # relufit stops its agents and writes what it has
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (run,) = set(out.iterdir()) - before
    with open(run / "metrics.csv") as f:
        elapsed = np.array([float(r["elapsed_s"]) for r in csv.DictReader(f)])
    if len(elapsed) < 100:
        tail = (out.parent / "relufit.log").read_text()[-1500:]
        raise SystemExit(f"only {len(elapsed)} rounds in {run} (raise --settle or --window?); "
                         f"relufit said:\n{tail}")
    per_round = float(np.median(np.diff(elapsed[50:])))
    return per_round, (c1 - c0) / ((t1 - t0) / per_round)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the local run that sched.py and versus.py repeat."""
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--topology", default="allreduce")
    p.add_argument("--d", type=int, default=10_000)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--lr", type=float, default=0.09, help="small enough not to diverge at M")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--window", type=float, default=10.0, help="s of CPU sampling a run")
    p.add_argument("--settle", type=float, default=14.0, help="s before sampling")


def run_file(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """The experiment (no target: a run goes on until it is stopped) and the results dir."""
    exp = tmp / "run.toml"
    exp.write_text(experiment(args.d, args.n, 128, args.lr, 1_000_000, 0, args.workers))
    out = tmp / "results"
    out.mkdir()
    return exp, out


def report(got: dict[str, list[tuple[float, float]]], args: argparse.Namespace, what: str,
           new: str, base: str) -> None:
    """Medians of each side's runs, and ``new`` over ``base``, overall and pair by pair."""
    med = {k: np.median(np.array(v), axis=0) for k, v in got.items()}
    print(f"\nM = {args.workers}, {args.topology}, d = {args.d}, {os.cpu_count()} CPUs; medians "
          f"of {args.pairs} runs each")
    print(f"| {what} | round ms | CPU ms a round (all threads) |\n|---|---|---|")
    for k, (r, c) in med.items():
        print(f"| {k} | {1e3 * r:.2f} | {1e3 * c:.2f} |")
    ratios = [b[0] / a[0] for a, b in zip(got[base], got[new], strict=True)]
    print(f"{new} / {base}: round {med[new][0] / med[base][0]:.2f}x, CPU "
          f"{med[new][1] / med[base][1]:.2f}x; pair by pair (round) "
          + ", ".join(f"{x:.2f}" for x in ratios))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p)
    args = p.parse_args()
    got: dict[str, list[tuple[float, float]]] = {"normal": [], "batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        exp, out = run_file(args, Path(tmp))
        for i in range(args.pairs):
            for sched in got:
                got[sched].append(one_run(exp, out, {SCHED_ENV: sched}, args))
                r, c = got[sched][-1]
                print(f"pair {i + 1} {sched:6s}: round {1e3 * r:.2f} ms, CPU {1e3 * c:.2f} ms "
                      "a round", flush=True)
    report(got, args, "agents' policy", "batch", "normal")


if __name__ == "__main__":
    main()
