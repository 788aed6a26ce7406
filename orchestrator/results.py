"""Run directories: ``results/<run-id>/`` with experiment.toml, metrics.csv, summary.json,
events.log. The writer flushes every row, so nothing completed is lost on a crash or Ctrl-C;
``load_run`` reads any run back as plain numpy arrays and dicts (pandas not needed).
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import RelufitError
from orchestrator.trial import COLUMNS, RoundRow, TrialResult

REQUIRED_COLUMNS = ("trial", "round", "elapsed_s", "rel_error", "loss", "bytes_up", "bytes_down")


def new_run_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"


class RunWriter:
    """Writes one run directory as the run goes. Use as a context manager."""

    def __init__(self, out: str | Path, run_id: str, experiment_toml: str, meta: dict[str, Any]):
        base = Path(out) / run_id
        path, k = base, 1
        while path.exists():  # two runs in the same second get distinct directories
            k += 1
            path = base.with_name(f"{base.name}-{k}")
        path.mkdir(parents=True)
        self.path = path
        self.run_id = path.name
        (path / "experiment.toml").write_text(experiment_toml)
        self._metrics = open(path / "metrics.csv", "w", newline="")
        self._csv = csv.writer(self._metrics)
        self._csv.writerow(COLUMNS)
        self._metrics.flush()
        self._events = open(path / "events.log", "a")
        self.summary: dict[str, Any] = {"run_id": self.run_id, **meta, "trials": []}
        self._write_summary()

    def row(self, r: RoundRow) -> None:
        self._csv.writerow(_fmt(v) for v in asdict(r).values())
        self._metrics.flush()

    def event(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        self._events.write(f"{stamp}Z {message}\n")
        self._events.flush()

    def trial_done(self, index: int, params: dict[str, Any], spec: dict, res: TrialResult,
                   lr_rule: str = "fixed") -> None:
        """One trial's entry; ``lr`` and ``lr_rule`` ("auto" or "fixed") say where its step
        came from."""
        entry = {"trial": index, "params": params, "spec": spec, "lr": spec["lr"],
                 "lr_rule": lr_rule, **asdict(res)}
        if not res.reason:
            entry.pop("reason")
        self.summary["trials"].append(entry)
        self._write_summary()

    def finish(self, status: str) -> None:
        self.summary["status"] = status
        self._write_summary()

    def _write_summary(self) -> None:
        tmp = self.path / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2, default=_json_default) + "\n")
        os.replace(tmp, self.path / "summary.json")

    def close(self) -> None:
        self._metrics.close()
        self._events.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    raise TypeError(f"not JSON serializable: {v!r}")


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv as a dict of column name -> numpy array (ints stay ints)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise RelufitError(f"{path}: no such file; is this a relufit run directory?") from None
    if not rows:
        raise RelufitError(f"{path}: empty metrics file")
    header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise RelufitError(f"{path}: not a relufit metrics file (missing columns {missing})")
    out = {}
    for i, name in enumerate(header):
        col = [r[i] for r in body]
        try:
            out[name] = np.array([int(x) for x in col], dtype=np.int64)
        except ValueError:
            try:
                out[name] = np.array([float(x) for x in col], dtype=np.float64)
            except ValueError:
                raise RelufitError(f"{path}: column {name!r} is not numeric") from None
    return out


def read_summary(path: str | Path) -> dict[str, Any]:
    """summary.json of run directory ``path``, checked; a clear RelufitError when it is
    missing or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise RelufitError(f"{path}: no such run directory")
    try:
        summary = json.loads((path / "summary.json").read_text())
    except FileNotFoundError:
        raise RelufitError(f"{path}: no summary.json; is this a relufit run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RelufitError(f"{path}/summary.json is corrupt: {e}") from None
    _check_summary(path, summary)
    return summary


def run_record(path: str | Path) -> dict[str, Any]:
    """What ``relufit run --json`` prints: ``run_dir`` (the local run directory), then every
    key of its summary.json (run_id, experiment, backend, trials_planned, status, trials)."""
    return {"run_dir": str(path), **read_summary(path)}


def load_run(path: str | Path) -> dict[str, Any]:
    """A run directory as ``{"path", "metrics": {column: array}, "summary": dict,
    "experiment": str, "trials": [per-trial dict]}`` (see ``split_trials``); a clear
    RelufitError when it is missing or corrupt."""
    path = Path(path)
    summary = read_summary(path)
    exp = path / "experiment.toml"
    experiment = exp.read_text() if exp.exists() else ""
    metrics = read_metrics(path / "metrics.csv")
    return {
        "path": path,
        "metrics": metrics,
        "summary": summary,
        "experiment": experiment,
        "trials": split_trials(metrics, summary, experiment),
    }


def _check_summary(path: Path, summary: Any) -> None:
    trials = summary.get("trials") if isinstance(summary, dict) else None
    ok = isinstance(trials, list) and all(
        isinstance(t, dict) and isinstance(t.get("trial"), int) for t in trials
    )
    if not ok:
        raise RelufitError(f"{path}/summary.json is corrupt: expected an object whose 'trials' "
                           "is a list of objects with an integer 'trial'")


def trial_metrics(metrics: dict[str, np.ndarray], trial: int) -> dict[str, np.ndarray]:
    """The rows of one trial, sorted by round."""
    rows = np.flatnonzero(metrics["trial"] == trial)
    rows = rows[np.argsort(metrics["round"][rows], kind="stable")]
    return {name: col[rows] for name, col in metrics.items()}


def flat_params(params: dict[str, Any]) -> dict[str, Any]:
    """Swept params with section sweeps (``{"compress": {"levels": 2}}``) as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def split_trials(
    metrics: dict[str, np.ndarray], summary: dict[str, Any], experiment: str = ""
) -> list[dict[str, Any]]:
    """One dict per trial: the summary's entry (``params``, ``spec``, ``status``, ``rounds``...)
    plus ``"metrics"``, that trial's rows. A trial with rows but no summary entry (the run was
    killed mid-trial) gets status ``"incomplete"`` and, when experiment.toml allows, its spec."""
    entries = {t["trial"]: dict(t) for t in summary.get("trials", [])}
    for index in sorted(set(metrics["trial"].tolist()) - set(entries)):
        entries[index] = {"trial": index, "status": "incomplete", **_planned(experiment, index)}
    out = []
    for index in sorted(entries):
        entry = entries[index]
        entry.setdefault("params", {})
        entry.setdefault("spec", {})
        entry["metrics"] = trial_metrics(metrics, index)
        out.append(entry)
    return out


def _planned(experiment: str, index: int) -> dict[str, Any]:
    """The params and spec experiment.toml planned for trial ``index``; {} if unknown."""
    from orchestrator.config import from_dict, tomllib

    if not experiment.strip():
        return {}
    try:
        trials = from_dict(tomllib.loads(experiment), "run").trials()
        return {"params": trials[index].params, "spec": trials[index].spec.to_dict()}
    except (RelufitError, tomllib.TOMLDecodeError, IndexError):
        return {}
