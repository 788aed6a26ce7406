"""Plots and tables from run directories: ``relufit report RUN_DIR... [--out DIR]``.

``make_report`` reads one or more run directories (``results.load_run``), reduces every
trial to a few numbers (``trial_stats``), groups trials into settings (the swept params,
seeds/repeats merged), and writes figures (PNG + SVG), ``summary.md`` (tables) and
``report.json`` (the same numbers, machine readable) into the output directory.

Conventions (also written into every summary):

- Round ``k`` is the state after ``k`` SGD steps: metrics row ``round = k - 1``.
- "Bits sent" is the uplink only: cumulative ``bytes_up * 8`` over all workers, i.e. the
  gradients the compression acts on. The downlink (float32 weights in ``ps``) is the same for
  every scheme; the tables give bytes up + down as well.
- Across seeds, curves show the geometric mean of ``rel_error`` and a min-max band; a trial
  that stopped early keeps its final ``rel_error`` (its weights no longer change).
- The geometric rate is ``exp(slope)`` of a least-squares line through ``ln rel_error``
  against round, from the first round at or below ``RATE_START`` to the first round at or
  below the target (or the last round). It is the per-round contraction factor.

matplotlib is imported lazily (the ``report`` extra), and only its object API is used:
no pyplot, no global backend switch, so a notebook's backend is left alone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import rates
from orchestrator.errors import RelufitError
from orchestrator.results import flat_params, load_run

TARGET = 1e-6
RATE_START = 1e-1
MAX_CURVES = 12  # more settings than this on one figure is unreadable; the figure is skipped
SEED_KEYS = ("repeat", "problem.seed")  # params that only change the seed: merged in a setting
UNSHAPED_BACKENDS = {"sim", "local"}  # cluster.link shapes nothing there
DIVERGED_YLIM = 10.0  # curves above this are cut off so a diverged trial does not hide the rest


# ---------------------------------------------------------------- numbers


@dataclass(frozen=True)
class RateFit:
    """A geometric phase: ``rel_error ~ C * rate**round`` over rounds first..last."""

    rate: float
    slope: float  # d ln(rel_error) / d round
    r2: float
    first_round: int
    last_round: int
    points: int


def fit_geometric_rate(
    rounds: np.ndarray, rel_error: np.ndarray, start: float = RATE_START, stop: float = TARGET
) -> RateFit | None:
    """Least-squares fit of ``ln rel_error`` against round over the geometric phase (from the
    first value <= ``start`` to the first value <= ``stop``, or the end); None with < 3 points."""
    rounds = np.asarray(rounds, dtype=float)
    err = np.asarray(rel_error, dtype=float)
    below = np.flatnonzero(err <= start)
    if below.size == 0:
        return None
    i = below[0]
    done = np.flatnonzero(err[i:] <= stop)
    j = i + done[0] if done.size else err.size - 1
    x, y = rounds[i : j + 1], np.log(np.maximum(err[i : j + 1], 1e-300))
    if x.size < 3 or not np.all(np.isfinite(y)):
        return None
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(np.sum((y - (slope * x + intercept)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return RateFit(math.exp(slope), float(slope), r2, int(x[0]), int(x[-1]), int(x.size))


def compression_label(spec: dict[str, Any]) -> str:
    if spec.get("scheme") == "none":
        return "fp32"
    if spec.get("scheme") != "qsgd":
        return "?"
    label = f"qsgd s={spec.get('levels')} {spec.get('coding')}"
    return label + (f" b={spec['bucket_size']}" if spec.get("bucket_size") else "")


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def context_of(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The swept params other than compression and seeds: what a setting is, besides its scheme."""
    flat = flat_params(params)
    return tuple(
        (k, v) for k, v in flat.items() if not k.startswith("compress.") and k not in SEED_KEYS
    )


def context_label(context: Iterable[tuple[str, Any]], drop: Sequence[str] = ()) -> str:
    return " ".join(f"{k.rpartition('.')[2]}={_short(v)}" for k, v in context if k not in drop)


@dataclass(frozen=True)
class TrialStats:
    """One trial reduced to the numbers the report shows; ``curve`` holds its arrays."""

    run: str
    trial: int
    compression: str
    scheme: str
    context: tuple[tuple[str, Any], ...]
    d: int
    n: int
    workers: int
    seed: int
    link: str
    bandwidth_bps: float | None
    status: str
    rounds: int
    final_rel_error: float
    rounds_to: int | None  # rounds to reach the report's target
    bits_up_to: float | None
    bytes_to: float | None  # up + down
    time_to: float | None  # elapsed_s at that round (includes the trial's start-up)
    time_per_round: float  # mean seconds per round, first round (start-up) excluded
    fit: RateFit | None
    success_threshold: float
    succeeded: bool
    curve: dict[str, np.ndarray] = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return " ".join(x for x in (self.compression, context_label(self.context)) if x)


def trial_stats(
    run: str, entry: dict[str, Any], link: str = "", target: float = TARGET
) -> TrialStats:
    """Reduce one trial of ``load_run(...)["trials"]``."""
    m, spec = entry["metrics"], entry.get("spec", {})
    params = flat_params(entry.get("params", {}))
    link = str(params.get("cluster.link", link) or "")
    err = m["rel_error"].astype(float)
    bits_up = np.cumsum(m["bytes_up"]).astype(float) * 8
    total = np.cumsum(m["bytes_up"] + m["bytes_down"]).astype(float)
    elapsed = m["elapsed_s"].astype(float)
    rounds = m["round"].astype(float) + 1
    hit = np.flatnonzero(err <= target)
    k = int(hit[0]) if hit.size else None
    thr = float(spec.get("target_rel_error") or 0) or target
    status = str(entry.get("status", "incomplete"))
    return TrialStats(
        run=run, trial=int(entry["trial"]), compression=compression_label(spec),
        scheme=str(spec.get("scheme", "?")), context=context_of(entry.get("params", {})),
        d=int(spec.get("d", 0)), n=int(spec.get("n", 0)), workers=int(spec.get("workers", 0)),
        seed=int(spec.get("seed", 0)), link=link, bandwidth_bps=bandwidth_bps(link),
        status=status, rounds=int(err.size),
        final_rel_error=float(err[-1]) if err.size else math.nan,
        rounds_to=int(rounds[k]) if k is not None else None,
        bits_up_to=float(bits_up[k]) if k is not None else None,
        bytes_to=float(total[k]) if k is not None else None,
        time_to=float(elapsed[k]) if k is not None else None,
        time_per_round=float((elapsed[-1] - elapsed[0]) / (err.size - 1))
        if err.size > 1 else math.nan,
        fit=fit_geometric_rate(rounds, err, RATE_START, target),
        success_threshold=thr,
        succeeded=bool(err.size and err.min() <= thr and status != "failed"),
        curve={"round": rounds, "rel_error": err, "bits_up": bits_up, "elapsed_s": elapsed},
    )


def bandwidth_bps(link: str) -> float | None:
    """Bits per second of a link such as ``100mbit`` or an instance preset; None if unknown."""
    if not link:
        return None
    try:
        return float(rates.parse_rate(link))
    except RelufitError:
        return None


def _run_link(run: dict[str, Any]) -> str:
    """A run-level link: summary metadata if the backend recorded one, else experiment.toml."""
    summary = run["summary"]
    for key in ("link", "bandwidth"):
        if summary.get(key):
            return str(summary[key])
    from orchestrator.config import tomllib

    try:
        return str(tomllib.loads(run["experiment"]).get("cluster", {}).get("link", ""))
    except tomllib.TOMLDecodeError:
        return ""


@dataclass
class Setting:
    """Trials of one run that differ only by seed."""

    run: str
    compression: str
    scheme: str
    context: tuple[tuple[str, Any], ...]
    trials: list[TrialStats]

    @property
    def label(self) -> str:
        parts = (self.run, self.compression, context_label(self.context))
        return " ".join(x for x in parts if x)

    def numbers(self) -> dict[str, Any]:
        ts = [t for t in self.trials if t.rounds]
        reached = [t for t in ts if t.rounds_to is not None]
        fits = [t.fit for t in ts if t.fit is not None]
        slope = _mean([f.slope for f in fits])
        finals = [t.final_rel_error for t in ts if t.final_rel_error > 0]
        return {
            "setting": self.label, "run": self.run, "compression": self.compression,
            "context": dict(self.context), "trials": len(ts), "reached": len(reached),
            "rounds_to": _mean([t.rounds_to for t in reached]),
            "bits_up_to": _mean([t.bits_up_to for t in reached]),
            "bytes_to": _mean([t.bytes_to for t in reached]),
            "time_to": _mean([t.time_to for t in reached]),
            "time_per_round": _mean([t.time_per_round for t in ts]),
            "bits_up_per_round": _mean([t.curve["bits_up"][-1] / t.rounds for t in ts]),
            "slope": slope, "rate": math.exp(slope) if slope is not None else None,
            "r2": _mean([f.r2 for f in fits]), "fits": len(fits),
            "final_rel_error_gmean": math.exp(_mean(np.log(finals))) if finals else None,
        }


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def group_settings(stats: list[TrialStats]) -> list[Setting]:
    groups: dict[tuple, Setting] = {}
    for t in stats:
        key = (t.run, t.compression, t.context)
        if key not in groups:
            groups[key] = Setting(t.run, t.compression, t.scheme, t.context, [])
        groups[key].trials.append(t)
    return list(groups.values())


def baseline_for(s: Setting, settings: list[Setting]) -> Setting | None:
    """The float32 setting with the same run and swept context (else the same context in
    another run, if exactly one)."""
    fp = [b for b in settings if b.scheme == "none" and b.context == s.context]
    same_run = [b for b in fp if b.run == s.run]
    if same_run:
        return same_run[0]
    return fp[0] if len(fp) == 1 else None


def ratios(settings: list[Setting]) -> list[dict[str, Any]]:
    """QSGD / float32 on each number, per QSGD setting that has a float32 baseline."""
    out = []
    for s in settings:
        base = baseline_for(s, settings) if s.scheme == "qsgd" else None
        if base is None:
            continue
        q, f = s.numbers(), base.numbers()
        row = {"setting": s.label, "baseline": base.label}
        for key in ("rounds_to", "bits_up_to", "bytes_to", "time_to", "time_per_round",
                    "bits_up_per_round", "slope"):
            row[key] = q[key] / f[key] if q[key] is not None and f[key] else None
        out.append(row)
    return out


def samples_table(stats: list[TrialStats]) -> list[dict[str, Any]]:
    """Success counts per (run, compression, d, n/d) over finished trials with n > 0."""
    cells: dict[tuple, list[TrialStats]] = {}
    for t in stats:
        if t.n > 0 and t.d > 0 and t.status in ("completed", "failed"):
            key = (t.run, t.compression, t.d, round(t.n / t.d, 4))
            cells.setdefault(key, []).append(t)
    rows = []
    for (run, comp, d, ratio), ts in sorted(cells.items(), key=lambda kv: kv[0]):
        ok = [t for t in ts if t.succeeded]
        rows.append({
            "run": run, "compression": comp, "d": d, "n_ratio": ratio, "n": ts[0].n,
            "trials": len(ts), "successes": len(ok), "success_rate": len(ok) / len(ts),
            "threshold": max(t.success_threshold for t in ts),
            "rounds_median": float(np.median([t.rounds for t in ok])) if ok else None,
        })
    return rows


def scaling_table(stats: list[TrialStats], axis: str) -> list[dict[str, Any]]:
    """Median time per round and time to target per line and x: ``axis`` is ``workers`` or
    ``bandwidth`` (Mbit/s)."""
    drop = ("cluster.workers",) if axis == "workers" else ("cluster.link",)
    cells: dict[tuple, list[TrialStats]] = {}
    for t in stats:
        x = t.workers if axis == "workers" else t.bandwidth_bps and t.bandwidth_bps / 1e6
        if not x or not t.rounds:
            continue
        run = t.run if axis == "workers" else ""
        line = " ".join(p for p in (run, t.compression, context_label(t.context, drop)) if p)
        cells.setdefault((line, x), []).append(t)
    rows = []
    for (line, x), ts in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        reached = [t.time_to for t in ts if t.time_to is not None]
        rows.append({
            "line": line, axis: x, "trials": len(ts),
            "time_per_round": float(np.median([t.time_per_round for t in ts])),
            "time_to": float(np.median(reached)) if reached else None,
            "reached": len(reached),
        })
    return rows


# ---------------------------------------------------------------- figures


def check_figures() -> None:
    """A clear RelufitError now, rather than after a run, if figures cannot be drawn here."""
    _figure_class()


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RelufitError(
            "relufit report needs matplotlib: pip install 'relufit[report]'"
        ) from None
    return Figure


def _figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    fig = _figure_class()(figsize=(6.4 * ncols, 4.2), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _null_locator() -> Any:
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _save(fig: Any, out: Path, name: str) -> list[str]:
    fig.savefig(out / f"{name}.png", dpi=90)
    fig.savefig(out / f"{name}.svg", metadata={"Date": None})  # reproducible bytes
    return [f"{name}.png", f"{name}.svg"]


def _padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack ragged per-seed arrays; a trial that stopped early keeps its last value."""
    length = max(a.size for a in arrays)
    return np.stack([np.concatenate([a, np.full(length - a.size, a[-1])]) for a in arrays])


CURVES = {
    "round": ("rel_error_vs_round", "round"),
    "bits_up": ("rel_error_vs_bits", "bits sent up (workers to master, cumulative)"),
    "elapsed_s": ("rel_error_vs_time", "wall time (s)"),
}


def curve_figures(settings: list[Setting], out: Path, target: float) -> list[str]:
    drawn = [s for s in settings if any(t.rounds for t in s.trials)]
    files = []
    for xkey, (name, xlabel) in CURVES.items():
        fig, (ax,) = _figure()
        for s in drawn:
            ts = [t for t in s.trials if t.rounds]
            err = np.log(np.maximum(_padded([t.curve["rel_error"] for t in ts]), 1e-300))
            x = _padded([t.curve[xkey] for t in ts]).mean(axis=0)
            failed = sum(t.status == "failed" for t in ts)
            label = f"{s.label} ({len(ts)}" + (f", {failed} diverged)" if failed else ")")
            (line,) = ax.plot(x, np.exp(err.mean(axis=0)), label=label)
            if len(ts) > 1:
                ax.fill_between(x, np.exp(err.min(axis=0)), np.exp(err.max(axis=0)),
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")  # x stays linear: a geometric rate is a straight line
        if ax.get_ylim()[1] > DIVERGED_YLIM:
            ax.set_ylim(top=DIVERGED_YLIM)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rel_error  ||w - w*|| / ||w*||")
        ax.set_title("geometric mean over seeds (n), band: min-max", fontsize=9)
        ax.legend(fontsize=7)
        files += _save(fig, out, name)
    return files


def samples_figure(rows: list[dict[str, Any]], out: Path) -> list[str]:
    fig, (ax,) = _figure()
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["run"], r["compression"], r["d"]), []).append(r)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("v", ":"), ("D", "-")]
    for i, ((run, comp, d), rs) in enumerate(lines.items()):
        label = " ".join(x for x in (run, comp, f"d={d}") if x)
        seeds = sorted({r["trials"] for r in rs})
        marker, style = styles[i % len(styles)]
        ax.plot([r["n_ratio"] for r in rs], [r["success_rate"] for r in rs], marker=marker,
                linestyle=style, markersize=9 - 2 * (i % 3), alpha=0.85,
                label=f"{label} ({'-'.join(map(str, seeds[::max(1, len(seeds) - 1)]))} seeds)")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ratios_ = sorted({r["n_ratio"] for r in rows})
    ax.set_xticks(ratios_, [f"{x:g}" for x in ratios_])
    ax.xaxis.set_minor_locator(_null_locator())
    ax.set_xlabel("n / d  (samples per dimension; n < d is not identifiable)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"success: rel_error <= {max(r['threshold'] for r in rows):g} "
                 "within the round budget", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, "success_vs_samples")


def scaling_figure(rows: list[dict[str, Any]], axis: str, out: Path, target: float) -> list[str]:
    fig, axes = _figure(2)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["line"], []).append(r)
    for line, rs in lines.items():
        x = [r[axis] for r in rs]
        axes[0].plot(x, [r["time_per_round"] * 1e3 for r in rs], marker="o", label=line)
        pts = [(r[axis], r["time_to"]) for r in rs if r["time_to"] is not None]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=line)
    xlabel = "workers" if axis == "workers" else "link bandwidth (Mbit/s)"
    axes[0].set_ylabel("time per round (ms, median over seeds)")
    axes[1].set_ylabel(f"time to rel_error <= {target:g} (s)")
    xs = sorted({r[axis] for r in rows})
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.set_xscale("log", base=2 if axis == "workers" else 10)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_locator(_null_locator())
        ax.legend(fontsize=7)
    return _save(fig, out, f"time_vs_{axis}")


# ---------------------------------------------------------------- summary


def _f(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def summary_markdown(rep: dict[str, Any]) -> str:
    target = rep["target"]
    lines = ["# relufit report", "", f"Runs: {len(rep['runs'])}. Target rel_error {target:g}.", ""]
    lines += _table(["run", "experiment", "backend", "trials", "status"], [
        [r["run_id"], r["experiment"], r["backend"], str(r["trials"]), r["status"]]
        for r in rep["runs"]])
    lines += [f"## Convergence per setting (mean over seeds that reached {target:g})", ""]
    lines += _table(
        ["setting", "reached", "rounds", "bits up", "bytes up+down", "time (s)", "ms/round",
         "rate", "R²", "final rel_error (gmean)"],
        [[s["setting"], f"{s['reached']}/{s['trials']}", _f(s["rounds_to"], ".1f"),
          _f(s["bits_up_to"]), _f(s["bytes_to"]), _f(s["time_to"]),
          _f(s["time_per_round"] and s["time_per_round"] * 1e3), _f(s["rate"], ".4f"),
          _f(s["r2"], ".4f"), _f(s["final_rel_error_gmean"], ".2e")]
         for s in rep["settings"]])
    if rep["ratios"]:
        lines += ["## QSGD / float32 (same run and swept params)", "",
                  "Below 1 means QSGD needs less; `slope` is the ratio of ln(rate): 1 = the same "
                  "per-round progress, 0.5 = half as fast.", ""]
        lines += _table(
            ["setting", "baseline", "rounds", "bits up", "bytes up+down", "time",
             "time/round", "bits up/round", "slope"],
            [[r["setting"], r["baseline"], *(_f(r[k]) for k in (
                "rounds_to", "bits_up_to", "bytes_to", "time_to", "time_per_round",
                "bits_up_per_round", "slope"))] for r in rep["ratios"]])
    if rep["samples"]:
        lines += ["## Samples: success rate against n/d", "",
                  "A trial succeeds when its rel_error reaches the threshold (the trial's "
                  "target_rel_error, or --target when that is 0) within its round budget and it "
                  "did not diverge. With n < d "
                  "the problem is not identifiable (infinitely many w fit the data).", ""]
        lines += _table(
            ["run", "compression", "d", "n/d", "n", "successes", "rate", "threshold",
             "median rounds (successes)"],
            [[r["run"] or "—", r["compression"], str(r["d"]), _f(r["n_ratio"], "g"), str(r["n"]),
              f"{r['successes']}/{r['trials']}", _f(r["success_rate"], ".2f"),
              _f(r["threshold"], "g"), _f(r["rounds_median"], ".0f")]
             for r in rep["samples"]])
    for axis, title in (("workers", "workers"), ("bandwidth", "bandwidth (Mbit/s)")):
        if rep[axis]:
            lines += [f"## Time against {title}", ""]
            lines += _table(
                ["line", title, "trials", "ms/round", f"time to {target:g} (s)", "reached"],
                [[r["line"], _f(r[axis], "g"), str(r["trials"]), _f(r["time_per_round"] * 1e3),
                  _f(r["time_to"]), str(r["reached"])] for r in rep[axis]])
    lines += ["## Figures", "", *(f"- [{f}]({f})" for f in rep["figures"] if f.endswith(".png")),
              "", "## Notes", "", *(f"- {n}" for n in rep["notes"]), ""]
    return "\n".join(lines)


CONVENTIONS = [
    "rounds: the number of SGD steps taken (metrics row round = k - 1 is the state after k).",
    "bits up: cumulative bytes_up * 8 over all workers (the compressed uplink); bytes up+down "
    "adds the downlink (float32 weights in ps, relayed gradients in allgather, the "
    "compressed mean in broadcast).",
    "time: elapsed_s at the round the target is reached (includes trial start-up); ms/round: "
    "mean over rounds after the first.",
    f"rate: exp(slope) of a least-squares fit of ln rel_error against round, from the first "
    f"round at or below {RATE_START:g} to the first at or below the target (or the last round); "
    "mean slope over seeds, mean R².",
    "curves: geometric mean over seeds with a min-max band; a trial that stopped early keeps "
    "its final rel_error.",
]


# ---------------------------------------------------------------- entry point


def _run_label(runs: list[dict[str, Any]], run: dict[str, Any]) -> str:
    """"" for one run; else the experiment's name, with the backend if that tells runs apart,
    else the run id."""
    if len(runs) == 1:
        return ""

    def names(r: dict[str, Any]) -> list[str]:
        exp, backend = r["summary"].get("experiment", ""), r["summary"].get("backend", "")
        return [exp, f"{exp} ({backend})" if exp and backend else ""]

    for i, name in enumerate(names(run)):
        if name and [names(r)[i] for r in runs].count(name) == 1:
            return name
    return str(run["path"].name)


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    first = Path(run_dirs[0])
    if len(run_dirs) == 1:
        return first / "report"
    return first.parent / f"report-{time.strftime('%Y%m%d-%H%M%S')}"


def make_report(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, target: float = TARGET
) -> Path:
    """Write figures, summary.md and report.json for ``run_dirs`` into ``out``; return it."""
    if not run_dirs:
        raise RelufitError("relufit report needs at least one run directory")
    if not (target > 0 and math.isfinite(target)):
        raise RelufitError(f"--target must be a positive number, got {target}")
    runs = [load_run(p) for p in run_dirs]
    _figure()  # fail on a missing matplotlib before writing anything
    out = Path(out) if out is not None else default_out(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    stats = [
        trial_stats(_run_label(runs, run), entry, _run_link(run), target)
        for run in runs for entry in run["trials"]
    ]
    settings = group_settings(stats)
    rep: dict[str, Any] = {
        "target": target, "rate_window": [RATE_START, target],
        "runs": [{"run_id": r["path"].name, "path": str(r["path"]),
                  "experiment": str(r["summary"].get("experiment", "")),
                  "backend": str(r["summary"].get("backend", "")),
                  "trials": len(r["trials"]), "status": str(r["summary"].get("status", "?"))}
                 for r in runs],
        "settings": [s.numbers() for s in settings], "ratios": ratios(settings),
        "samples": [], "workers": [], "bandwidth": [], "figures": [], "notes": [],
    }
    rep["figures"], rep["notes"] = _figures(rep, stats, settings, out, target)
    rep["notes"] += CONVENTIONS
    rep["trials"] = [_trial_json(t) for t in stats]
    (out / "report.json").write_text(json.dumps(_finite(rep), indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(rep))
    return out


def _figures(
    rep: dict[str, Any], stats: list[TrialStats], settings: list[Setting], out: Path,
    target: float,
) -> tuple[list[str], list[str]]:
    """Make the figures the data supports; a note for each one skipped."""
    files: list[str] = []
    notes: list[str] = []
    if not any(t.rounds for t in stats):
        notes.append("no metrics rows: no figures")
    elif len(settings) > MAX_CURVES:
        notes.append(f"rel_error curves skipped: {len(settings)} settings (more than "
                     f"{MAX_CURVES}) on one figure is unreadable; see the tables")
    else:
        files += curve_figures(settings, out, target)
    samples = samples_table(stats)
    if len({r["n_ratio"] for r in samples}) > 1:
        rep["samples"] = samples
        files += samples_figure(samples, out)
    else:
        notes.append("success-rate figure skipped: n/d takes fewer than 2 values")
    for axis in ("workers", "bandwidth"):
        rows = scaling_table(stats, axis)
        if len({r[axis] for r in rows}) > 1:
            rep[axis] = rows
            files += scaling_figure(rows, axis, out, target)
            unshaped = sorted({r["backend"] for r in rep["runs"]} & UNSHAPED_BACKENDS)
            if axis == "bandwidth" and unshaped:
                notes.append(f"links are not shaped on backend {', '.join(unshaped)}: there "
                             "cluster.link is only a label and times do not depend on it")
        else:
            why = "cluster.workers" if axis == "workers" else (
                "the link bandwidth (cluster.link swept, or the runs' link metadata)")
            notes.append(f"time-vs-{axis} figure skipped: {why} takes fewer than 2 values")
    if any(t.status not in ("completed", "failed") for t in stats):
        notes.append("interrupted or incomplete trials are drawn but left out of success rates")
    return files, notes


def _finite(v: Any) -> Any:
    """NaN and infinities as null: report.json stays strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _trial_json(t: TrialStats) -> dict[str, Any]:
    d = {k: v for k, v in asdict(t).items() if k not in ("curve", "context")}
    d["context"] = dict(t.context)
    d["label"] = t.label
    return d
