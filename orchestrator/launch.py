"""``relufit launch EXP.toml``: up, deploy, run, fetch, report and down in one command.

A composition of what exists, not a second copy of it: ``providers.clusters.up``/``down``
(each provider's own up and down), ``deploy.deploy``, ``remote.run_on_cluster`` (which runs
and fetches, and on Ctrl-C stops the remote processes and fetches what was written) and
``report.make_report``. What launch adds:

- every check of the input (experiment file, cluster flags, matplotlib for the report)
  before anything is made, and the cost stated before anything is made and after ``down``;
- one progress display over every stage (``Display``);
- one Ctrl-C is enough: what was fetched stays, a cluster launch made is removed (``down``
  itself cannot be cut short by a second one), and the paths are printed.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from orchestrator import pricing
from orchestrator.cluster import Cluster
from orchestrator.config import Experiment, load_experiment
from orchestrator.errors import INTERRUPT_REQUESTED, ConfigError, deferred_interrupts
from orchestrator.providers import clusters
from orchestrator.runner import parse_progress

Confirm = Callable[[str], bool]
SIM_TIMED_ROUNDS = 3
SIM_MAX_FLOATS = 20_000_000  # the sim timing builds the data set here: skip it above ~160 MB
MIN_BILLED_S = 60.0  # EC2 bills per second, with one minute at least per instance


def _clock(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Display:
    """The progress of every stage in one place: stage, trial k/K, round, rel_error, elapsed
    and (where there is a price) the cost so far. On a terminal that is one status line
    rewritten in place, with messages printed above it; elsewhere plain lines, each
    prefixed with the status. Call it with any progress line (thread-safe): the run's
    lines (the master's log on a cluster) update the trial, round and rel_error."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.t0 = clock()
        self.stage_name = "check"
        self.stages: dict[str, float] = {}  # stage -> seconds spent in it
        self._stage_t0 = self.t0
        self.run: dict[str, Any] = {}
        self.usd_per_hour: float | None = None
        self.billed_since: float | None = None
        self._lock = threading.RLock()
        self._drawn = False
        self._stop = threading.Event()
        if self.tty:  # elapsed and cost move on while a stage is quiet (EC2 boots, installs)
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self._drawn:
                    self.draw()

    def stage(self, name: str) -> None:
        with self._lock:
            self._end_stage()
            self.stage_name, self._stage_t0, self.run = name, self.clock(), {}
            self.message(f"-- {name}")

    def _end_stage(self) -> None:
        now = self.clock()
        self.stages[self.stage_name] = self.stages.get(self.stage_name, 0.0) + now - self._stage_t0
        self._stage_t0 = now

    def bill(self, usd_per_hour: float | None) -> None:
        """From now on the cluster costs ``usd_per_hour`` (None: nothing to show)."""
        self.usd_per_hour, self.billed_since = usd_per_hour, self.clock()

    def cost_so_far(self) -> float | None:
        if self.usd_per_hour is None or self.billed_since is None:
            return None
        billed = max(self.clock() - self.billed_since, MIN_BILLED_S)
        return self.usd_per_hour * billed / 3600

    def status(self) -> str:
        parts = [self.stage_name, _clock(self.clock() - self.t0)]
        r = self.run
        if r:
            parts.append(f"trial {r['trial']}/{r['trials']}")
            if r.get("round"):
                parts.append(f"round {r['round']}" + (f"/{r['rounds']}" if r.get("rounds") else ""))
            if r.get("rel_error") is not None:
                parts.append(f"rel_error {r['rel_error']:.3e}")
        cost = self.cost_so_far()
        if cost is not None:
            parts.append(f"${cost:.3f} so far")
        return "[" + "  ".join(parts) + "]"

    def __call__(self, line: str) -> None:
        with self._lock:
            parsed = parse_progress(line)
            if parsed is None:
                self.message(line)
                return
            if parsed["trial"] != self.run.get("trial"):
                self.run = {}
            self.run.update({k: v for k, v in parsed.items() if v is not None})
            if "rounds" not in parsed:  # a trial's end line: worth keeping in the log
                self.message(line.strip())
            else:
                self.draw()

    def message(self, line: str) -> None:
        with self._lock:
            if self.tty:
                self._write("\r\x1b[K" + line.rstrip() + "\n")
                self.draw()
            else:
                self._write(f"{self.status()} {line.strip()}\n")

    def draw(self) -> None:
        """The status line: in place on a terminal, a line of its own elsewhere."""
        with self._lock:
            if self.tty:
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self._write("\r\x1b[K" + self.status()[:width])
                self._drawn = True
            else:
                self._write(self.status() + "\n")

    def asking(self, confirm: Confirm) -> Confirm:
        """``confirm`` with the status line out of the way (a question must not be drawn
        over while the user reads it)."""
        def ask(question: str) -> bool:
            with self._lock:
                if self.tty and self._drawn:
                    self._write("\r\x1b[K")
                self._drawn = False  # the ticker leaves the line alone until the next draw
                return confirm(question)
        return ask

    def close(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            self._end_stage()
            if self.tty and self._drawn:
                self._write("\n")
                self._drawn = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@dataclass
class LaunchResult:
    """What a launch did; ``to_json`` is what ``relufit launch --json`` prints."""

    cluster: str
    provider: str
    made: bool
    kept: bool
    run_dir: Path
    report: Path
    usd_per_hour: float | None
    cost_usd: float | None
    elapsed_s: float
    stages: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from orchestrator.results import run_record

        return {
            "cluster": {"name": self.cluster, "provider": self.provider, "made": self.made,
                        "kept": self.kept},
            "run": run_record(self.run_dir),
            "report": str(self.report),
            "cost": {"usd_per_hour": _round(self.usd_per_hour), "spent_usd": _round(self.cost_usd),
                     "prices": _price_source() if self.usd_per_hour is not None else None},
            "elapsed_s": round(self.elapsed_s, 3),
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def _price_source() -> str:
    return f"on-demand list prices of {pricing.PRICES_REGION} as of {pricing.PRICES_AS_OF}"


# ---------------------------------------------------------------- before anything is made

def sim_round_s(exp: Experiment, rounds: int = SIM_TIMED_ROUNDS) -> float | None:
    """Seconds a round of the first trial takes in ``sim`` on this machine, from a few rounds
    (the first, which builds the data, not counted); None when too large to time cheaply."""
    from orchestrator.trial import SimPool, run_trial

    spec = exp.trials()[0].spec
    if spec.d * max(spec.n, spec.batch_size * spec.workers) > SIM_MAX_FLOATS:
        return None
    stamps: list[float] = []
    spec = replace(spec, rounds=rounds + 1, target_rel_error=0.0)
    run_trial(spec, SimPool(), lambda row: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None


def state_cost(exp: Experiment, usd_per_hour: float | None, nodes: int, provider: str,
               say: Callable[[str], None], spot: bool = False) -> None:
    """The cost, before anything is made: per hour for the nodes, and a scale for the run's
    length from a short sim timing here (honestly labelled: it is not the cluster's time)."""
    if provider != "ec2":
        where = "emulated hosts on this machine" if provider == "netns" else "your own machines"
        say(f"Cost: nothing billed ({where}).")
        return
    if usd_per_hour is None:
        say(f"Cost: unknown (an instance type with no price in relufit's table); {nodes} nodes.")
        return
    cheaper = "; spot is usually much cheaper" if spot else ""
    say(f"Cost: ${usd_per_hour:.3f}/hour for {nodes} nodes ({_price_source()}{cheaper}; EC2 "
        "bills per second, at least a minute).")
    per_round = sim_round_s(exp)
    if per_round is None:
        return
    rounds = sum(t.spec.rounds for t in exp.trials())
    sim_s = per_round * rounds
    billed = max(sim_s, MIN_BILLED_S)
    took = f"{sim_s:.1f} s" if sim_s < 60 else _clock(sim_s)
    say(f"Run length, roughly: all {rounds} rounds take ~{took} in sim here "
        f"({per_round * 1e3:.2f} ms a round of trial 1, every worker in one process, no "
        f"network; at most, as trials stop at their target). That is not the cluster's time: "
        f"boot and deploy (minutes) and the network come on top. At ${usd_per_hour:.3f}/hour, "
        f"{_clock(billed)} costs ${usd_per_hour * billed / 3600:.3f}.")


def _flags_given(up_args: dict[str, Any]) -> list[str]:
    """The cluster flags given on the command line, by name (every default is None)."""
    return [{"spec_file": "--spec"}.get(k, "--" + k.replace("_", "-"))
            for k, v in up_args.items() if v is not None]


def _request(exp: Experiment, up_args: dict[str, Any]) -> clusters.UpRequest:
    """The new cluster's request; by default named ``launch-<hex>``, with one worker node per
    worker of the experiment's largest trial."""
    args = {**up_args, "name": up_args.get("name") or f"launch-{secrets.token_hex(3)}"}
    if (args.get("provider") or clusters.DEFAULT_PROVIDER) != "hosts" and not args.get("workers"):
        args["workers"] = max(t.spec.workers for t in exp.trials())
    return clusters.request(**args)


@dataclass(frozen=True)
class _Plan:
    """Everything checked before anything is made: the experiment, and either the request
    for a new cluster or the cluster to reuse."""

    exp: Experiment
    req: clusters.UpRequest | None
    reused: Cluster | None

    @property
    def name(self) -> str:
        return self.reused.name if self.reused else self.req.name

    @property
    def provider(self) -> str:
        return self.reused.provider if self.reused else self.req.provider

    @property
    def region(self) -> str | None:
        return self.reused.region if self.reused else self.req.spec and self.req.spec.region

    def state_cost(self, say: Callable[[str], None]) -> float | None:
        """Say what the cluster costs, before anything is made; the price per hour."""
        usd = clusters.usd_per_hour(self.reused) if self.reused else self.req.usd_per_hour()
        nodes = len(self.reused.nodes) if self.reused else self.req.workers + 1
        spot = bool(self.req and self.req.spec and self.req.spec.spot)
        state_cost(self.exp, usd, nodes, self.provider, say, spot)
        return usd


def _plan(experiment_file: str, overrides: list[str], reuse: str | None,
          up_args: dict[str, Any], resume: str | Path | None = None) -> _Plan:
    """Every check of what the user gave, in the order a user fixes them; nothing is made."""
    from orchestrator.report import check_figures
    from orchestrator.runner import plan_resume

    exp = load_experiment(experiment_file, overrides)
    if resume is not None:
        plan_resume(resume, exp)
    given = _flags_given(up_args)
    if reuse and given:
        raise ConfigError(given[0], "not with --cluster, which reuses a cluster that is up")
    req = None if reuse else _request(exp, up_args)
    check_figures()
    return _Plan(exp, req, clusters.find(reuse) if reuse else None)


# ---------------------------------------------------------------- the launch

def launch(experiment_file: str, overrides: list[str], *, reuse: str | None,
           up_args: dict[str, Any], out: str | Path = "results", keep: bool = False,
           from_index: bool = False, confirm: Confirm = lambda q: True,
           display: Display | None = None, resume: str | Path | None = None) -> LaunchResult:
    """Up (unless ``reuse`` names a cluster that is up), deploy, run, fetch, report, and down
    (a cluster launch made, unless ``keep``). ``up_args`` are ``clusters.request``'s
    keywords (the flags of ``cluster up``). Ctrl-C or a failure at any stage keeps what was
    fetched, removes a cluster launch made (unless ``keep``), and re-raises. ``resume``: a
    local run directory of the experiment to go on with (``relufit run --resume``)."""
    from orchestrator import remote

    disp = display or Display()
    INTERRUPT_REQUESTED.clear()  # a request of an earlier command in this process is spent
    try:
        plan = _plan(experiment_file, overrides, reuse, up_args, resume)
        usd = plan.state_cost(disp.message)
        if resume is not None:
            out, run_id = Path(resume).parent, Path(resume).name
        else:
            run_id = remote.free_run_id(plan.exp.name, out)
    except BaseException:
        disp.close()
        raise
    end = _End(disp, plan.name, keep=keep, reused=bool(reuse), region=plan.region)
    try:
        disp.bill(usd)  # from the start of `up`; for a reused cluster, this launch's share
        cluster = plan.reused
        if plan.req is not None:
            disp.stage("up")
            cluster = clusters.up(plan.req, confirm=disp.asking(confirm), progress=disp)
            end.made = True
        dest, report = _deploy_run_report(cluster, plan.exp, out, run_id, from_index, disp,
                                          resume)
    except BaseException:
        if (Path(out) / run_id).exists():
            disp.message(f"Kept what was fetched: {Path(out) / run_id}")
        end.after_failure()
        raise
    end.finish()
    disp.message(f"Run directory: {dest}")
    disp.message(f"Report: {report}")
    disp.close()
    return LaunchResult(end.name, plan.provider, end.made, end.made and keep, dest, report,
                        usd, end.spent, disp.clock() - disp.t0, dict(disp.stages))


def _deploy_run_report(cluster: Cluster, exp: Experiment, out: str | Path, run_id: str,
                       from_index: bool, disp: Display,
                       resume: str | Path | None = None) -> tuple[Path, Path]:
    from orchestrator import deploy, remote
    from orchestrator.report import make_report

    disp.stage("deploy")
    deploy.deploy(deploy.targets(cluster), from_index, progress=disp)
    disp.stage("run")
    dest = remote.run_on_cluster(exp, cluster, out, disp, run_id=run_id, resume=resume)
    disp.stage("report")
    return dest, make_report([dest]) / "summary.md"


@dataclass
class _End:
    """The end of a launch, whatever happened: down (a cluster launch made, unless told to
    keep it) and the cost spent."""

    disp: Display
    name: str
    keep: bool
    reused: bool
    region: str | None
    made: bool = False
    spent: float | None = None

    def finish(self) -> None:
        if self.made and not self.keep:
            self.disp.stage("down")
            self.disp.message("Removing the cluster (a further Ctrl-C waits for this)")
            with deferred_interrupts():  # half a teardown would leave instances billing
                clusters.down(self.name, self.region, self.disp)
                self._say_cost()
        elif self.made or self.reused:
            if self.made:
                self.disp.message(f"Cluster {self.name} kept: `relufit cluster down "
                                  f"{self.name}` removes it")
            self._say_cost()

    def after_failure(self) -> None:
        """``finish`` while an error or Ctrl-C is on its way up: a failing ``down`` is said,
        not raised, so the original error is the one reported."""
        try:
            self.finish()
        except Exception as e:
            self.disp.message(f"Could not remove cluster {self.name} ({e}): run `relufit "
                              f"cluster down {self.name}`")
        finally:
            self.disp.close()

    def _say_cost(self) -> None:
        self.spent = self.disp.cost_so_far()
        if self.spent is None:
            return
        rate = f"${self.disp.usd_per_hour:.3f}/hour"
        up_s = self.disp.clock() - (self.disp.billed_since or self.disp.clock())
        billed = _clock(up_s) + (" billed as 1:00" if up_s < MIN_BILLED_S else "")
        if self.made and not self.keep:
            self.disp.message(f"Cost spent: ~${self.spent:.3f} ({rate} x {billed}, "
                              f"{_price_source()})")
        else:
            self.disp.message(f"Cost of this launch: ~${self.spent:.3f} ({rate} x {billed}); "
                              f"the cluster goes on costing {rate} while it is up")
