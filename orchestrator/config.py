"""Experiment files: TOML -> frozen dataclasses. Every check of user input lives here.

``load_experiment(path, overrides)`` returns an ``Experiment`` or raises
``ConfigError`` naming the key and why, before anything runs. ``Experiment.trials()``
expands ``[sweep]`` (the cartesian product of dotted keys, times ``repeats`` seeds)
into validated ``TrialSpec``s, with ``train.lr = "auto"`` resolved per trial
(``orchestrator.stepsize``).
"""

from __future__ import annotations

import difflib
import itertools
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from orchestrator import stepsize
from orchestrator.errors import ConfigError
from worker.node import CODINGS, SCHEMES, TOPOLOGIES, SpecError, TrialSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Problem:
    d: int = 100
    n: int = 4000
    seed: int = 0
    n_ratio: float = 0.0  # when > 0, n = round(n_ratio * d): sweeps over n/d at several d


@dataclass(frozen=True)
class Train:
    rounds: int = 300
    batch_size: int = 32
    lr: float | str = 0.5  # a positive number, or "auto" (LR_RULES)
    target_rel_error: float = 1e-6
    # a checkpoint every this many rounds (0: about every trial.CHECKPOINT_S seconds), for
    # `relufit run --resume`
    checkpoint_rounds: int = 0


@dataclass(frozen=True)
class Compress:
    scheme: str = "qsgd"
    levels: int = 4
    coding: str = "elias"
    bucket_size: int = 0


@dataclass(frozen=True)
class Cluster:
    workers: int = 4
    topology: str = "ps"
    on_worker_loss: str = "continue"
    heartbeat_interval: float = 1.0  # seconds between heartbeats, both ways
    heartbeat_liveness: int = 3  # missed intervals before a peer is declared lost
    connect_timeout: float = 60.0  # seconds to wait for all workers to say HELLO
    link: str = ""  # netns: link preset or rate for shaped links (e.g. "100mbit", "c5.large")


SECTIONS: dict[str, type] = {
    "problem": Problem,
    "train": Train,
    "compress": Compress,
    "cluster": Cluster,
}
ON_WORKER_LOSS = ("continue", "abort")
LR_RULES = ("auto",)  # train.lr given as a word: the step comes from a rule (stepsize.py)


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its index, the swept values, and the full spec."""

    index: int
    params: dict[str, Any]
    spec: TrialSpec
    lr_rule: str = "fixed"  # "auto": spec.lr was resolved by stepsize.for_spec


@dataclass(frozen=True)
class Experiment:
    name: str
    problem: Problem = Problem()
    train: Train = Train()
    compress: Compress = Compress()
    cluster: Cluster = Cluster()
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    repeats: int = 1
    description: str = ""

    def trials(self) -> list[Trial]:
        """The cartesian product of the sweep, each combination ``repeats`` times with seeds
        ``seed, seed+1, ...``; each one validated."""
        keys = list(self.sweep)
        out: list[Trial] = []
        seen: dict[tuple, int] = {}  # resolved trial -> index: two equal trials are a mistake
        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            point = apply_values(self, dict(zip(keys, combo, strict=True)))
            for rep in range(self.repeats):
                seed = point.problem.seed + rep
                params = dict(zip(keys, combo, strict=True))
                if self.repeats > 1:
                    params["repeat"] = rep
                try:
                    spec = point.trial_spec(len(out), seed)
                except ConfigError as e:
                    raise ConfigError(f"{e.key} ({_describe(params)})", e.why) from None
                same = (replace(point.problem, seed=seed), point.train, point.compress,
                        point.cluster)
                if same in seen:
                    raise ConfigError("sweep", f"trials {seen[same]} and {len(out)} are identical"
                                      f" ({_describe(params)}, seed {seed}): a value listed twice,"
                                      " or problem.seed swept less than repeats apart")
                seen[same] = len(out)
                rule = point.train.lr if isinstance(point.train.lr, str) else "fixed"
                out.append(Trial(len(out), params, spec, rule))
        return out

    def trial_spec(self, index: int, seed: int) -> TrialSpec:
        p, t, c, k = self.problem, self.train, self.compress, self.cluster
        n = round(p.n_ratio * p.d) if p.n_ratio > 0 else p.n
        spec = TrialSpec(
            trial=index, d=p.d, n=n, seed=seed, rounds=t.rounds, batch_size=t.batch_size,
            lr=1.0 if isinstance(t.lr, str) else t.lr, target_rel_error=t.target_rel_error,
            scheme=c.scheme, levels=c.levels, coding=c.coding, bucket_size=c.bucket_size,
            workers=k.workers, topology=k.topology,
        )
        try:
            spec.validate()  # before the rule: it divides by the batch and the workers
            if t.lr == "auto":
                spec = replace(spec, lr=stepsize.for_spec(spec))
                spec.validate()
        except SpecError as e:
            raise ConfigError(f"trial {index}", str(e)) from e
        return spec

    def to_toml(self) -> str:
        """The fully resolved experiment, as TOML (saved next to every result)."""
        lines = [f"name = {_toml_value(self.name)}"]
        if self.description:
            lines.append(f"description = {_toml_value(self.description)}")
        for sec in SECTIONS:
            lines.append(f"\n[{sec}]")
            obj = getattr(self, sec)
            lines += [f"{f.name} = {_toml_value(getattr(obj, f.name))}" for f in fields(obj)]
        lines.append("\n[sweep]")
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in self.sweep.items()]
        lines.append(f"repeats = {self.repeats}")
        return "\n".join(lines + self._resolved_lr()) + "\n"

    def _resolved_lr(self) -> list[str]:
        """Comment lines with the step each trial's ``lr = "auto"`` resolved to: the file
        stays the experiment as given (it resolves again the same way), and says the numbers."""
        auto = [t for t in self.trials() if t.lr_rule != "fixed"]
        if not auto:
            return []
        return ['\n# train.lr = "auto" resolved per trial (docs/reference.md, "Step size"):',
                *(f"#   trial {t.index}: lr = {t.spec.lr!r}" for t in auto)]


def differences(a: Experiment, b: Experiment) -> list[str]:
    """The dotted keys on which two experiments differ, each as ``key: A != B``
    (``name``, ``description``, every section's keys, ``sweep.KEY``, ``sweep.repeats``)."""
    def flat(e: Experiment) -> dict[str, Any]:
        out = {"name": e.name, "description": e.description, "sweep.repeats": e.repeats}
        for sec in SECTIONS:
            obj = getattr(e, sec)
            out.update({f"{sec}.{f.name}": getattr(obj, f.name) for f in fields(obj)})
        out.update({f"sweep.{k}": v for k, v in e.sweep.items()})
        return out

    fa, fb = flat(a), flat(b)
    return [f"{k}: {_toml_value(fa[k]) if k in fa else '(none)'} != "
            f"{_toml_value(fb[k]) if k in fb else '(none)'}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, None) != fb.get(k, None)
            or (k in fa) != (k in fb)]


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_toml_value(v)}" for k, v in params.items()) or "no swept keys"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(choices)})"


def _coerce(key: str, value: Any, want: type) -> Any:
    """Check one value's type; ints are accepted where floats are expected."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # "1e6" from --set or TOML floats like 1e4 for d
    if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
        raise ConfigError(key, f"must be {want.__name__}, got {value!r}")
    return value


# "float | str" is train.lr, whose words (LR_RULES) _check_value takes before the type check
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "float | str": float}


def _check_value(key: str, value: Any) -> Any:
    """Type- and range-check one dotted key; returns the coerced value."""
    sec, _, name = key.partition(".")
    if sec not in SECTIONS:
        raise ConfigError(key, "unknown section" + _suggest(sec, list(SECTIONS)))
    ftypes = {f.name: f.type for f in fields(SECTIONS[sec])}
    if name not in ftypes:
        raise ConfigError(key, "unknown key" + _suggest(name, list(ftypes)))
    if key == "train.lr" and isinstance(value, str):
        if value not in LR_RULES:
            raise ConfigError(key, f'must be a positive number or "auto", got {value!r}')
        return value
    value = _coerce(key, value, _TYPES[ftypes[name]])
    choices = {
        "compress.scheme": SCHEMES, "compress.coding": CODINGS,
        "cluster.topology": TOPOLOGIES, "cluster.on_worker_loss": ON_WORKER_LOSS,
    }
    if key in choices and value not in choices[key]:
        raise ConfigError(key, f"must be one of {', '.join(choices[key])}, got {value!r}")
    minimum = {
        "problem.d": 1, "problem.n": 0, "problem.seed": 0, "problem.n_ratio": 0,
        "train.rounds": 1, "train.batch_size": 1, "train.target_rel_error": 0,
        "train.checkpoint_rounds": 0,
        "compress.levels": 1, "compress.bucket_size": 0, "cluster.workers": 1,
        "cluster.heartbeat_liveness": 1,
    }
    if key in minimum and value < minimum[key]:
        raise ConfigError(key, f"must be >= {minimum[key]}, got {value!r}")
    positive = ("train.lr", "cluster.heartbeat_interval", "cluster.connect_timeout")
    if key in positive and not (math.isfinite(value) and value > 0):
        raise ConfigError(key, f"must be a positive number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return value


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """A section sweep's inline table ``{"compress": {"levels": 2}}`` as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if "." not in key and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def apply_values(exp: Experiment, values: dict[str, Any]) -> Experiment:
    """A copy of ``exp`` with dotted keys set (values checked)."""
    for key, value in _flatten(values).items():
        value = _check_value(key, value)
        sec, _, name = key.partition(".")
        exp = replace(exp, **{sec: replace(getattr(exp, sec), **{name: value})})
    return exp


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with a TOML value; a bare word is taken as a string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or "." not in key:
        raise ConfigError(text, "an override is section.key=value, e.g. --set train.lr=0.1")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def from_dict(data: dict[str, Any], name: str, overrides: list[str] = ()) -> Experiment:
    data = dict(data)
    exp = Experiment(name=str(data.pop("name", name)), description=str(data.pop("description", "")))
    sweep = data.pop("sweep", {})
    values: dict[str, Any] = {}
    for sec, table in data.items():
        if sec not in SECTIONS:
            raise ConfigError(sec, "unknown section" + _suggest(sec, [*SECTIONS, "sweep"]))
        if not isinstance(table, dict):
            raise ConfigError(sec, "must be a table ([section])")
        values.update({f"{sec}.{k}": v for k, v in table.items()})
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("sweep."):
            sweep = {**sweep, key[len("sweep."):]: value}
        else:
            values[key] = value
    exp = apply_values(exp, values)
    return _with_sweep(exp, sweep)


def _with_sweep(exp: Experiment, sweep: Any) -> Experiment:
    if not isinstance(sweep, dict):
        raise ConfigError("sweep", "must be a table of dotted keys to lists")
    sweep = dict(sweep)
    repeats = _coerce("sweep.repeats", sweep.pop("repeats", 1), int)
    if repeats < 1:
        raise ConfigError("sweep.repeats", f"must be >= 1, got {repeats}")
    grid: dict[str, list[Any]] = {}
    owner: dict[str, str] = {}  # dotted key -> the sweep key that sets it
    for key, vals in sweep.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"sweep.{key}", "must be a non-empty list of values")
        if "." not in key:  # a section sweep: each value is an inline table of that section
            if key not in SECTIONS or not all(isinstance(v, dict) and v for v in vals):
                raise ConfigError(
                    f"sweep.{key}",
                    'a sweep key is "section.key" = [values], or "section" = [{key = value}, ...]',
                )
            grid[key] = [{k: _check_value(f"{key}.{k}", x) for k, x in v.items()} for v in vals]
            sets = {f"{key}.{k}" for v in vals for k in v}
        else:
            grid[key] = [_check_value(key, v) for v in vals]
            sets = {key}
        for dotted in sorted(sets):
            if owner.setdefault(dotted, key) != key:
                raise ConfigError(f"sweep.{key}", f"sweeps {dotted}, already swept by "
                                  f"sweep.{owner[dotted]}; sweep each key once")
    exp = replace(exp, sweep=grid, repeats=repeats)
    exp.trials()  # every combination must be a valid trial, checked now
    return exp


def load_experiment(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read, resolve and validate an experiment file; ConfigError on any problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "no such experiment file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    return from_dict(data, path.stem, overrides)
