"""Rounds to the target with ``train.lr = "auto"`` against the best hand-tuned step (sim).

For every setting of an experiment file (its trials grouped over seeds), runs the setting's
seeds on the ``sim`` backend at the auto step and at each step of a geometric grid around it
(``--ratio`` apart, ``--span`` times below and above, plus the file's own lr), and prints,
per setting: the auto step and its mean rounds, the grid's best step and its mean rounds,
and their ratio. A step counts as converged only when every seed reaches the target within
``--budget`` x the file's round budget.

    python benchmarks/stepsize.py experiments/paper/convergence.toml [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import stepsize  # noqa: E402
from orchestrator.config import Trial, load_experiment  # noqa: E402
from orchestrator.runner import compression  # noqa: E402
from orchestrator.trial import SimPool, run_trial  # noqa: E402
from worker.node import TrialSpec  # noqa: E402


def settings(trials: list[Trial]) -> dict[str, list[TrialSpec]]:
    """The file's trials grouped by everything but the seed and the step."""
    out: dict[str, list[TrialSpec]] = {}
    for t in trials:
        s = t.spec
        key = f"d={s.d} B={s.batch_size} M={s.workers} {s.topology} {compression(s)}"
        out.setdefault(key, []).append(s)
    return out


def mean_rounds(specs: list[TrialSpec], lr: float, rounds: int) -> float:
    """Mean rounds to the target over the seeds; inf as soon as one seed misses it."""
    total = 0
    for spec in specs:
        res = run_trial(replace(spec, lr=lr, rounds=rounds), SimPool(), lambda row: None)
        if not res.reached_target:
            return math.inf
        total += res.rounds
    return total / len(specs)


def compare(specs: list[TrialSpec], ratio: float, span: int, rounds: int) -> dict:
    auto = stepsize.for_spec(specs[0])
    grid = sorted({auto * ratio**k for k in range(-span, span + 1)} | {specs[0].lr})
    tried = {lr: mean_rounds(specs, lr, rounds) for lr in grid}
    best = min(tried, key=lambda lr: (tried[lr], lr))
    return {"auto_lr": auto, "auto_rounds": tried[auto], "best_lr": best,
            "best_rounds": tried[best], "file_lr": specs[0].lr,
            "file_rounds": tried[specs[0].lr], "ratio": tried[auto] / tried[best],
            "best_at_edge": best in (grid[0], grid[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("--ratio", type=float, default=2 ** 0.25, help="grid step (default 2^1/4)")
    ap.add_argument("--span", type=int, default=8, help="grid points each side of auto")
    ap.add_argument("--budget", type=float, default=3.0, help="x the file's train.rounds")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    exp = load_experiment(args.experiment)
    rounds = int(args.budget * exp.train.rounds)
    rows = []
    print("| setting | auto lr | auto rounds | best lr | best rounds | auto / best |"
          " file lr | file rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, specs in settings(exp.trials()).items():
        r = {"setting": name, "seeds": len(specs), **compare(specs, args.ratio, args.span, rounds)}
        rows.append(r)
        edge = " (grid edge)" if r["best_at_edge"] else ""
        print(f"| {name} | {r['auto_lr']:.4g} | {r['auto_rounds']:.1f} | {r['best_lr']:.4g}{edge}"
              f" | {r['best_rounds']:.1f} | {r['ratio']:.2f} | {r['file_lr']:.4g}"
              f" | {r['file_rounds']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
