"""This tree's code against an earlier commit's, on the same crowded local run.

Run (in a git checkout): python benchmarks/versus.py REV [--workers 8]
    [--topology allreduce] [--pairs 6] [--window 10] [--settle 14]

REV is checked out into a temporary git worktree (removed at the end). Each run is the
same ``relufit run`` on the local backend as benchmarks/sched.py's (d = 1e4, n = 1e5,
batch 128 a worker, s15b128fixed, until stopped), started from either tree: the master and
its agents import that tree's code (its directory first on the path). The two alternate,
pair after pair, so a noisy spell of the machine hits both. Per run: the median round and
the CPU of every thread of the master and its agents per round (/proc; Linux only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sched import add_run_options, one_run, report, run_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def protocol_version(tree: Path) -> int:
    """The wire protocol version the code in ``tree`` speaks (and proof it is imported)."""
    out = subprocess.run([sys.executable, "-c", "import worker.protocol as p; print(p.VERSION)"],
                         cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the commit to measure against")
    add_run_options(p)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        args.rev], check=True, capture_output=True)
        try:
            trees = {"this tree": ROOT, args.rev: old}
            print(", ".join(f"{k}: protocol {protocol_version(t)}" for k, t in trees.items()))
            exp, out = run_file(args, Path(tmp))
            got: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
            for i in range(args.pairs):
                for name, tree in trees.items():
                    got[name].append(one_run(exp, out, {"PYTHONPATH": str(tree)}, args, tree))
                    r, c = got[name][-1]
                    print(f"pair {i + 1} {name}: round {1e3 * r:.2f} ms, CPU {1e3 * c:.2f} ms "
                          "a round", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           capture_output=True)
    report(got, args, "code", "this tree", args.rev)


if __name__ == "__main__":
    main()
