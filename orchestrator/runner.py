"""Run an ``Experiment`` on a worker pool: every trial of the sweep through ``run_trial``,
written to a run directory as it goes, with progress a person can follow.

Backends differ only in the pool they hand in (see ``orchestrator.providers``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import Experiment, Trial
from orchestrator.errors import INTERRUPT_REQUESTED, RelufitError
from orchestrator.results import RunWriter, new_run_id
from orchestrator.trial import (
    Checkpoint,
    RoundRow,
    TrialInterrupted,
    TrialResult,
    WorkerPool,
    run_trial,
)
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
    resume: str | Path | None = None,
) -> Path:
    """Run every trial; return the run directory. Ctrl-C marks the current trial
    ``interrupted``, keeps every completed round on disk, and re-raises. ``resume``: a run
    directory of ``exp`` to go on with (``plan_resume``) instead of a new one."""
    trials = exp.trials()
    INTERRUPT_REQUESTED.clear()  # a request from an earlier run in this process is spent
    if resume is not None:
        plan = plan_resume(resume, exp)
        writer = RunWriter.reopen(resume, plan.keeps, set(plan.kept))
        progress(f"resuming run {writer.run_id}: {plan.describe(len(trials))}")
        writer.event(f"run resumed: {plan.describe(len(trials))}, backend {backend}")
    else:
        plan = ResumePlan()
        meta = {"experiment": exp.name, "backend": backend, "trials_planned": len(trials)}
        writer = RunWriter(out, run_id or new_run_id(exp.name), exp.to_toml(), meta)
        progress(f"run {writer.run_id}: {len(trials)} trial(s), backend {backend} -> "
                 f"{writer.path}")
        writer.event(f"run started: {exp.name}, {len(trials)} trials, backend {backend}")
    with writer:
        status = "completed"
        try:
            for trial in trials:
                if trial.index in plan.kept:
                    continue
                label = f"trial {trial.index + 1}/{len(trials)}"
                progress(f"{label}: {describe(trial)}")
                printer = _RoundPrinter(progress, label, trial.spec.rounds)

                def on_round(row: RoundRow, printer: _RoundPrinter = printer) -> None:
                    writer.row(row)
                    printer(row)

                try:
                    res = run_trial(
                        trial.spec, pool, on_round, writer.event, exp.cluster.on_worker_loss,
                        plan.checkpoints.get(trial.index), writer.checkpoint,
                        exp.train.checkpoint_rounds,
                    )
                except TrialInterrupted as stop:
                    _record(writer, trial, stop.result, progress, label)
                    status = "interrupted"
                    raise
                _record(writer, trial, res, progress, label)
                if res.status == "failed":
                    status = "failed"
            if status == "completed" and "failed" in plan.kept.values():
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
    if is_final(res.status, res.reason):
        writer.drop_checkpoint(trial.index)
    mb = (res.total_bytes_up + res.total_bytes_down + res.total_bytes_peer) / 1e6
    line = (
        f"{label}: {res.status} after {res.rounds} rounds, rel_error {res.final_rel_error:.3e},"
        f" {mb:.2f} MB, {res.wall_time_s:.2f} s"
    )
    if res.status == "completed" and trial.spec.target_rel_error > 0 and not res.reached_target:
        line += f", target {trial.spec.target_rel_error:g} not reached"
    progress(line + (f" ({res.reason})" if res.reason else ""))
    writer.event(line)


# ---------------------------------------------------------------- resume


def is_final(status: str, reason: str = "") -> bool:
    """Whether a trial's outcome stands, so a resumed run keeps it: it completed, or it
    diverged (the same numbers would diverge again). A trial interrupted, or failed on a
    lost worker, runs again from its last checkpoint."""
    return status == "completed" or (status == "failed" and reason.startswith("diverged"))


@dataclass
class ResumePlan:
    """What ``relufit run --resume`` keeps of a run, and where each other trial restarts."""

    kept: dict[int, str] = field(default_factory=dict)  # trial -> its final status
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)

    def keeps(self, trial: int, round_: int) -> bool:
        """Whether a metrics row stays: kept trials', and those before a checkpoint."""
        ckpt = self.checkpoints.get(trial)
        return trial in self.kept or (ckpt is not None and round_ < ckpt.round)

    def describe(self, planned: int) -> str:
        again = [f"trial {t + 1} from round {c.round}" for t, c in sorted(self.checkpoints.items())]
        return (f"{len(self.kept)} of {planned} trial(s) kept"
                + (f", {', '.join(again)}" if again else "")
                + (", the others from their start" if planned - len(self.kept) > len(again)
                   else ""))


def plan_resume(run: str | Path, exp: Experiment) -> ResumePlan:
    """What of run directory ``run`` a resume with ``exp`` keeps; RelufitError when ``exp``
    is not the run's experiment (naming the keys that differ) or nothing is left to do."""
    from orchestrator.config import differences, from_dict, tomllib
    from orchestrator.results import read_checkpoint, read_summary

    run = Path(run)
    summary = read_summary(run)
    try:
        ran = from_dict(tomllib.loads((run / "experiment.toml").read_text()), exp.name)
    except (OSError, tomllib.TOMLDecodeError, RelufitError) as e:
        raise RelufitError(f"{run}/experiment.toml cannot be read back ({e})") from None
    diff = differences(ran, exp)
    if diff:
        raise RelufitError(f"cannot resume {run}: the experiment differs from the run's at "
                           f"{'; '.join(diff)} (the run's own is {run}/experiment.toml)")
    trials = exp.trials()
    plan = ResumePlan(kept={t["trial"]: t["status"] for t in summary["trials"]
                            if is_final(t.get("status", ""), t.get("reason", ""))
                            and t["trial"] < len(trials)})
    if len(plan.kept) == len(trials):
        raise RelufitError(f"nothing to resume: run {run.name} has all {len(trials)} trial(s) "
                           "done")
    for t in trials:
        if t.index not in plan.kept:
            ckpt = read_checkpoint(run, t.index, t.spec.d)
            if ckpt is not None:
                plan.checkpoints[t.index] = ckpt
    return plan
