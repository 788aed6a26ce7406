"""Run directories: ``results/<run-id>/`` with experiment.toml, metrics.csv, summary.json,
events.log. The writer flushes every row, so nothing completed is lost on a crash or Ctrl-C;
``load_run`` reads any run back as plain numpy arrays and dicts (pandas not needed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import RelufitError
from orchestrator.trial import COLUMNS, Checkpoint, Reply, RoundRow, TrialResult

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
        (path / "experiment.toml").write_text(experiment_toml)
        _replace_text(path / "metrics.csv", _csv_text([list(COLUMNS)]))
        self._open(path, {"run_id": path.name, **meta, "trials": []})

    @classmethod
    def reopen(cls, path: str | Path, keep: Callable[[int, int], bool],
               kept_trials: set[int]) -> RunWriter:
        """Go on writing run directory ``path`` (``relufit run --resume``): only the metrics
        rows ``keep(trial, round)`` allows and the summary entries of ``kept_trials`` stay;
        both files are rewritten atomically first."""
        path = Path(path)
        summary = read_summary(path)
        with open(path / "metrics.csv", newline="") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(rows[0]) != COLUMNS:
            raise RelufitError(f"{path}/metrics.csv is not this relufit's metrics file")
        body = [r for r in rows[1:] if len(r) == len(COLUMNS) and _kept(r, keep)]
        _replace_text(path / "metrics.csv", _csv_text([rows[0], *body]))
        summary.pop("status", None)
        summary["trials"] = [t for t in summary["trials"] if t["trial"] in kept_trials]
        summary["resumed"] = summary.get("resumed", 0) + 1
        writer = cls.__new__(cls)
        writer._open(path, summary)
        return writer

    def _open(self, path: Path, summary: dict[str, Any]) -> None:
        self.path, self.run_id = path, path.name
        self._metrics = open(path / "metrics.csv", "a", newline="")
        self._csv = csv.writer(self._metrics)
        self._events = open(path / "events.log", "a")
        self.summary = summary
        self._write_summary()

    def checkpoint(self, ckpt: Checkpoint) -> None:
        """Keep ``ckpt`` as its trial's checkpoint (atomically: a crash mid-write leaves the
        previous one)."""
        write_checkpoint(self.path, ckpt)

    def drop_checkpoint(self, trial: int) -> None:
        """The trial is over for good: its checkpoint is of no more use."""
        checkpoint_path(self.path, trial).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: other trials' are kept
            (self.path / CHECKPOINTS).rmdir()

    def row(self, r: RoundRow) -> None:
        self._csv.writerow([_fmt(getattr(r, k)) for k in COLUMNS])
        self._metrics.flush()

    def event(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        self._events.write(f"{stamp}Z {message}\n")
        self._events.flush()

    def trial_done(self, index: int, params: dict[str, Any], spec: dict, res: TrialResult,
                   lr_rule: str = "fixed") -> None:
        """One trial's entry; ``lr`` and ``lr_rule`` ("auto" or "fixed") say where its step
        came from. Entries stay in trial order, also when a resumed run fills a gap."""
        entry = {"trial": index, "params": params, "spec": spec, "lr": spec["lr"],
                 "lr_rule": lr_rule, **asdict(res)}
        if not res.reason:
            entry.pop("reason")
        trials = [t for t in self.summary["trials"] if t["trial"] != index] + [entry]
        self.summary["trials"] = sorted(trials, key=lambda t: t["trial"])
        self._write_summary()

    def finish(self, status: str) -> None:
        self.summary["status"] = status
        self._write_summary()
        if self.summary.get("resumed"):  # a trial run again after later ones: back in order
            self._metrics.close()
            with open(self.path / "metrics.csv", newline="") as f:
                header, *body = list(csv.reader(f))
            body.sort(key=lambda r: (int(r[0]), int(r[1])))
            _replace_text(self.path / "metrics.csv", _csv_text([header, *body]))
            self._metrics = open(self.path / "metrics.csv", "a", newline="")
            self._csv = csv.writer(self._metrics)

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


def _kept(row: list[str], keep: Callable[[int, int], bool]) -> bool:
    """Whether a metrics row stays; a row cut short by a crash mid-write never does."""
    try:
        return keep(int(row[0]), int(row[1])) and all(row)
    except ValueError:
        return False


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


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


# ---------------------------------------------------------------- checkpoints
#
# ``checkpoints/trial-<k>.npz`` in the run directory: arrays only (np.load with
# allow_pickle=False reads it back), the small things as JSON in the "meta" array.

CHECKPOINTS = "checkpoints"
CHECKPOINT_VERSION = 1


def checkpoint_path(run: str | Path, trial: int) -> Path:
    return Path(run) / CHECKPOINTS / f"trial-{trial}.npz"


def write_checkpoint(run: str | Path, ckpt: Checkpoint) -> Path:
    """Save ``ckpt`` as its trial's checkpoint: written beside, synced, then renamed over
    the last one, so the file is always one whole checkpoint."""
    meta = {"version": CHECKPOINT_VERSION, "trial": ckpt.trial, "round": ckpt.round,
            "workers": {str(r): st for r, st in ckpt.workers.items()},
            "relay_ranks": [rep.rank for rep in ckpt.relay], "down_rng": ckpt.down_rng,
            "totals": ckpt.totals, "elapsed_s": ckpt.elapsed_s}
    arrays = {"meta": _u8(json.dumps(meta).encode()), "w": ckpt.w, "update": _u8(ckpt.update),
              **{f"relay_{i}": _u8(rep.payload) for i, rep in enumerate(ckpt.relay)}}
    if ckpt.replica is not None:
        arrays["replica"] = ckpt.replica
    path = checkpoint_path(run, ckpt.trial)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(run: str | Path, trial: int, d: int) -> Checkpoint | None:
    """Trial ``trial``'s checkpoint (dimension ``d``), or None when it has none; a clear
    RelufitError when the file is not a whole one."""
    path = checkpoint_path(run, trial)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != CHECKPOINT_VERSION or meta.get("trial") != trial:
                raise ValueError("another version or trial")
            w = z["w"]
            replica = z["replica"] if "replica" in z.files else None
            if w.shape != (d,) or (replica is not None and replica.shape != (d,)):
                raise ValueError(f"weights are not of dimension {d}")
            relay = [Reply(int(r), z[f"relay_{i}"].tobytes())
                     for i, r in enumerate(meta["relay_ranks"])]
            return Checkpoint(
                trial, int(meta["round"]), w, replica,
                {int(r): st for r, st in meta["workers"].items()}, z["update"].tobytes(),
                relay, meta["down_rng"], dict(meta["totals"]), float(meta["elapsed_s"]))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise RelufitError(f"{path} is not a whole checkpoint ({e}); delete it to run "
                           f"trial {trial} again from its start") from None


def _u8(b: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(bytes(b), dtype=np.uint8)
