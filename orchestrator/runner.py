"""Run an ``Experiment`` on a worker pool: every trial of the sweep through ``run_trial``,
written to a run directory as it goes, with progress a person can follow.

Backends differ only in the pool they hand in (see ``orchestrator.providers``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.config import Experiment, Trial
from orchestrator.errors import INTERRUPT_REQUESTED
from orchestrator.results import RunWriter, new_run_id
from orchestrator.trial import RoundRow, TrialInterrupted, TrialResult, WorkerPool, run_trial
from worker.node import TrialSpec

Progress = Callable[[str], None]


def compression(s: TrialSpec) -> str:
    """``fp32`` or ``qsgd s=4 elias b=16``."""
    comp = "fp32" if s.scheme == "none" else f"qsgd s={s.levels} {s.coding}"
    return comp + (f" b={s.bucket_size}" if s.scheme == "qsgd" and s.bucket_size else "")


def describe(trial: Trial) -> str:
    s = trial.spec
    comp = compression(s)
    swept = " ".join(
        " ".join(f"{k}.{x}={y}" for x, y in v.items()) if isinstance(v, dict) else f"{k}={v}"
        for k, v in trial.params.items()
    )
    lr = f"lr={s.lr:.4g}" + (f" ({trial.lr_rule})" if trial.lr_rule != "fixed" else "")
    return (f"d={s.d} n={s.n} M={s.workers} {s.topology} {comp} {lr}"
            + (f" [{swept}]" if swept else ""))


class _RoundPrinter:
    """At most a few lines per second: trial, round, rel_error, MB sent."""

    def __init__(self, progress: Progress, label: str, total: int, every_s: float = 0.5):
        self.progress, self.label, self.total, self.every_s = progress, label, total, every_s
        self.last = 0.0
        self.mb = 0.0

    def __call__(self, row: RoundRow) -> None:
        self.mb += (row.bytes_up + row.bytes_down + row.bytes_peer) / 1e6
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.progress(
                f"  {self.label} round {row.round + 1}/{self.total}  rel_error {row.rel_error:.3e}"
                f"  sent {self.mb:.2f} MB  workers {row.workers}"
            )


# The progress lines a display can follow (on a cluster it sees the master's log as text):
# "trial k/K: <describe>" as a trial starts, _RoundPrinter's round line, and _record's
# "trial k/K: <status> after N rounds, rel_error X". Keep these in step with them.
_ROUND_RE = re.compile(r"^\s*trial (\d+)/(\d+) round (\d+)/(\d+)\s+rel_error (\S+)")
_DONE_RE = re.compile(r"^trial (\d+)/(\d+): \w+ after (\d+) rounds, rel_error ([^,\s]+)")
_START_RE = re.compile(r"^trial (\d+)/(\d+): ")


def parse_progress(line: str) -> dict[str, Any] | None:
    """What a progress line of ``run_experiment`` says of the run: ``trial`` and ``trials``,
    and where known ``round`` (rounds done), ``rounds`` (planned) and ``rel_error``; None
    for any other line."""
    if m := _ROUND_RE.match(line):
        k, total, r, rounds = (int(g) for g in m.groups()[:4])
        return {"trial": k, "trials": total, "round": r, "rounds": rounds,
                "rel_error": float(m.group(5))}
    if m := _DONE_RE.match(line):
        return {"trial": int(m.group(1)), "trials": int(m.group(2)), "round": int(m.group(3)),
                "rel_error": float(m.group(4))}
    if m := _START_RE.match(line):
        return {"trial": int(m.group(1)), "trials": int(m.group(2)), "round": 0,
                "rounds": None, "rel_error": None}
    return None


def run_experiment(
    exp: Experiment,
    pool: WorkerPool,
    out: str | Path,
    backend: str,
    progress: Progress = print,
    run_id: str | None = None,
) -> Path:
    """Run every trial; return the run directory. Ctrl-C marks the current trial
    ``interrupted``, keeps every completed round on disk, and re-raises."""
    trials = exp.trials()
    INTERRUPT_REQUESTED.clear()  # a request from an earlier run in this process is spent
    meta = {"experiment": exp.name, "backend": backend, "trials_planned": len(trials)}
    with RunWriter(out, run_id or new_run_id(exp.name), exp.to_toml(), meta) as writer:
        progress(f"run {writer.run_id}: {len(trials)} trial(s), backend {backend} -> {writer.path}")
        writer.event(f"run started: {exp.name}, {len(trials)} trials, backend {backend}")
        status = "completed"
        try:
            for trial in trials:
                label = f"trial {trial.index + 1}/{len(trials)}"
                progress(f"{label}: {describe(trial)}")
                printer = _RoundPrinter(progress, label, trial.spec.rounds)

                def on_round(row: RoundRow, printer: _RoundPrinter = printer) -> None:
                    writer.row(row)
                    printer(row)

                try:
                    res = run_trial(
                        trial.spec, pool, on_round, writer.event, exp.cluster.on_worker_loss
                    )
                except TrialInterrupted as stop:
                    _record(writer, trial, stop.result, progress, label)
                    status = "interrupted"
                    raise
                _record(writer, trial, res, progress, label)
                if res.status == "failed":
                    status = "failed"
        except KeyboardInterrupt:
            status = "interrupted"
            writer.event("run interrupted by the user")
            raise
        finally:
            writer.finish(status)
            writer.event(f"run {status}")
        return writer.path


def _record(
    writer: RunWriter, trial: Trial, res: TrialResult, progress: Progress, label: str
) -> None:
    writer.trial_done(trial.index, trial.params, trial.spec.to_dict(), res, trial.lr_rule)
    mb = (res.total_bytes_up + res.total_bytes_down + res.total_bytes_peer) / 1e6
    line = (
        f"{label}: {res.status} after {res.rounds} rounds, rel_error {res.final_rel_error:.3e},"
        f" {mb:.2f} MB, {res.wall_time_s:.2f} s"
    )
    if res.status == "completed" and trial.spec.target_rel_error > 0 and not res.reached_target:
        line += f", target {trial.spec.target_rel_error:g} not reached"
    progress(line + (f" ({res.reason})" if res.reason else ""))
    writer.event(line)
