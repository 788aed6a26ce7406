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

    def trial_done(self, index: int, params: dict[str, Any], spec: dict, res: TrialResult) -> None:
        entry = {"trial": index, "params": params, "spec": spec, **asdict(res)}
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


def load_run(path: str | Path) -> dict[str, Any]:
    """A run directory as ``{"path", "metrics": {column: array}, "summary": dict,
    "experiment": str}``; a clear RelufitError when it is missing or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise RelufitError(f"{path}: no such run directory")
    try:
        summary = json.loads((path / "summary.json").read_text())
    except FileNotFoundError:
        raise RelufitError(f"{path}: no summary.json; is this a relufit run directory?") from None
    except json.JSONDecodeError as e:
        raise RelufitError(f"{path}/summary.json is corrupt: {e}") from None
    exp = path / "experiment.toml"
    return {
        "path": path,
        "metrics": read_metrics(path / "metrics.csv"),
        "summary": summary,
        "experiment": exp.read_text() if exp.exists() else "",
    }
