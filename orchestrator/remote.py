"""Run an experiment on a cluster: the master on node 0, agents on the other nodes.

``run_on_cluster`` validates the experiment (the caller has loaded it), makes a CurveZMQ
key pair for the run, ships the resolved experiment and the keys (mode 0600) over SFTP,
and starts, as background processes that outlive the SSH session (own session, pidfile
and log in the remote run directory ``~/relufit-runs/<run-id>/``):

- on node 0: ``relufit run experiment.toml --backend listen --bind tcp://0.0.0.0:PORT``;
- on the other nodes: ``relufit agent --master tcp://<node 0's private address>:PORT
  --rank R``, ranks round-robin over the worker nodes (all on node 0 if it is alone).

It streams the master's log back as progress. When the master ends, or on Ctrl-C (the
remote processes are stopped first), the run directory comes back to
``results/<run-id>/``, with each node's log under ``nodes/<rank>/`` (the master's under
``nodes/master/``). ``fetch``, ``logs`` and ``stop`` work on any run later.

Remote run directory::

    ~/relufit-runs/<run-id>/
        experiment.toml     the fully resolved experiment
        keys-master/        server.key_secret, client.key      (node 0)
        keys-agent/         server.key, client.key_secret      (nodes with agents)
        master.pid .log .exit    agent-<rank>.pid .log .exit
        master.log.1 ...    logs of the processes a resumed run replaced (fetched too)
        out/<id>/           the master's run directory (metrics.csv, summary.json, ...)
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from orchestrator import deploy
from orchestrator.cluster import Cluster
from orchestrator.config import Experiment
from orchestrator.deploy import REMOTE_VENV, Session, SSHTarget
from orchestrator.errors import RunError, SSHError
from orchestrator.results import new_run_id
from worker.watchdog import (
    OURS_FN,
    RUNNING_SCRIPT,
    RUNS_DIR,
    SIGNAL_SCRIPT,
    STOP_GRACE_S,
    TOUCH_COMMAND,
)

Progress = Callable[[str], None]

class Unreachable(RunError):
    """Node 0 cannot be reached any more; the run may go on there without us."""


MASTER_PORT = 5555  # inside the range EC2 opens within the cluster's security group
THREADS = "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Background jobs of a non-interactive sh start with SIGINT ignored, and an ignored signal
# stays ignored across exec: Python would then never raise KeyboardInterrupt. Reset it.
_LAUNCH = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
           "os.execv(sys.argv[1], sys.argv[1:])")


def _curve_keys() -> dict[str, bytes]:
    """A fresh CurveZMQ server and client key pair for one run, as file contents; the
    secrets only ever exist in a private temporary directory here and 0600 files there."""
    from orchestrator.master import create_curve_keys

    with tempfile.TemporaryDirectory(prefix="relufit-curve-") as tmp:
        keys = create_curve_keys(Path(tmp) / "keys")
        return {n: (keys / n).read_bytes() for n in
                ("server.key", "server.key_secret", "client.key", "client.key_secret")}


def placement(workers: int, nodes: int) -> dict[int, int]:
    """rank -> node index: round-robin over nodes 1..N-1, or node 0 when it is alone."""
    hosts = list(range(1, nodes)) or [0]
    return {rank: hosts[rank % len(hosts)] for rank in range(workers)}


def run_dir(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise RunError(f"{run_id!r} is not a run id")
    return f"{RUNS_DIR}/{run_id}"


def spawn_command(rdir: str, name: str, args: list[str]) -> str:
    """Shell command that starts ``relufit ARGS`` in ``rdir`` in its own session, detached
    from the SSH session; ``name``.pid holds its process group, ``name``.exit its code."""
    relufit = f'"$HOME/{REMOTE_VENV}/bin/relufit"'
    py = f'"$HOME/{REMOTE_VENV}/bin/python"'
    return detach_command(rdir, name, f"env {THREADS} {py} -c {shlex.quote(_LAUNCH)} {relufit} "
                                      f"{' '.join(shlex.quote(a) for a in args)}")


def detach_command(rdir: str, name: str, command: str) -> str:
    """Shell command that runs shell text ``command`` in ``rdir`` in its own session,
    detached from the SSH session, logging to ``name``.log; ``name``.pid holds its process
    group, ``name``.exit its code. A log left by an earlier start in ``rdir`` (the master or
    agents a resumed run replaces) is kept as ``name``.log.1, .2, ..."""
    inner = f"echo $$ > {name}.pid; {command}; echo $? > {name}.exit"
    keep = (f"if [ -s {name}.log ]; then n=1; while [ -e {name}.log.$n ]; do n=$((n+1)); done; "
            f"mv {name}.log {name}.log.$n; fi; ")
    # `a && b &` would background a subshell that holds the SSH channel open until the
    # process ends: only the setsid command itself goes to the background.
    # Then wait (at most 10 s) for the pidfile, so whoever follows or stops it finds it.
    return (f"cd {shlex.quote(rdir)} || exit 1; rm -f {name}.exit {name}.pid; {keep}"
            f"setsid nohup sh -c {shlex.quote(inner)} > {name}.log 2>&1 < /dev/null & "
            f"i=0; while [ ! -s {name}.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
            f"test -s {name}.pid")


def _signal(s: Session, rdir: str, sig: str, wait_s: float, pidfiles: str) -> list[int]:
    """Send ``sig`` to the groups of ``pidfiles`` (a shell glob in ``rdir``); the pids
    still alive after ``wait_s`` seconds."""
    out = s.run(f"cd {shlex.quote(rdir)} 2>/dev/null || exit 0; "
                f"sh -c {shlex.quote(SIGNAL_SCRIPT)} sh {sig} {int(wait_s)} {pidfiles}")
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("alive ")]


class RemoteRun:
    """One run on one cluster: where each process is, and how to start, follow and stop it."""

    def __init__(self, cluster: Cluster, run_id: str, workers: int = 0,
                 port: int = MASTER_PORT):
        self.cluster, self.run_id, self.port = cluster, run_id, port
        self.rdir = run_dir(run_id)
        self.targets = deploy.targets(cluster)
        self.ranks = placement(workers, len(cluster.nodes))
        self.created = False

    @property
    def master(self) -> SSHTarget:
        return self.targets[0]

    def agent_nodes(self) -> dict[int, list[int]]:
        """node index -> ranks it runs."""
        out: dict[int, list[int]] = {}
        for rank, node in self.ranks.items():
            out.setdefault(node, []).append(rank)
        return out

    # -------------------------------------------------------------- start

    def start(self, exp: Experiment, progress: Progress, resume: Path | None = None) -> None:
        """Check the nodes, make the run directory, ship files, start master and agents.
        ``resume``: the local copy of this run, to go on with; node 0's own copy, when it
        has one, is the one taken up (``run_on_cluster`` fetched it first)."""
        self._check_installed(progress)
        with Session(self.master) as s:  # exclusive: two runs never share a directory
            mkdir = "mkdir -p -m 700" if resume else "mkdir -m 700"
            rc, out = s.run_rc(f"mkdir -p {RUNS_DIR} && {mkdir} {shlex.quote(self.rdir)}")
            if rc != 0:
                raise SSHError(self.master.name, f"cannot create {self.rdir}: {out.strip()}")
            args = []
            if resume is not None:
                name = self.remote_out(s)
                if name is None:  # a cluster that never ran it: the local copy goes up
                    name = self.run_id
                    count = s.put_tree(resume, f"{self.rdir}/out/{name}", skip=("nodes",))
                    progress(f"uploaded {count} file(s) of run {self.run_id} to "
                             f"{self.master.name}")
                args = ["--resume", f"out/{name}"]
        self.created = True  # from here on, a failure has something to stop and fetch
        self._ship(exp.to_toml(), _curve_keys(), progress)
        with Session(self.master) as s:
            s.run(spawn_command(self.rdir, "master", [
                "run", "experiment.toml", "--backend", "listen", "--out", "out",
                "--bind", f"tcp://0.0.0.0:{self.port}", "--curve-dir", "keys-master", *args]))
        progress(f"master started on {self.master.name} (port {self.port})")
        self._spawn_agents(exp.cluster.connect_timeout, progress)

    def remote_out(self, s: Session) -> str | None:
        """The name of the master's run directory under the run's ``out/`` on node 0."""
        outs = sorted(s.listdir_sizes(f"{self.rdir}/out"))
        return outs[0] if outs else None

    def _ship(self, experiment: str, keys: dict[str, bytes], progress: Progress) -> None:
        """The experiment to node 0; to each node the CurveZMQ keys its processes need."""
        uses = self.agent_nodes()
        wanted = {"keys-master": ("server.key_secret", "client.key"),
                  "keys-agent": ("server.key", "client.key_secret")}

        def ship(t: SSHTarget) -> None:
            i = self.targets.index(t)
            with Session(t) as s:
                s.mkdir(self.rdir)
                if i == 0:
                    s.put_bytes(experiment.encode(), f"{self.rdir}/experiment.toml", 0o644)
                for sub in ("keys-master",) * (i == 0) + ("keys-agent",) * (i in uses):
                    s.mkdir(f"{self.rdir}/{sub}")
                    for name in wanted[sub]:
                        s.put_bytes(keys[name], f"{self.rdir}/{sub}/{name}", 0o600)

        deploy.on_all([self.targets[i] for i in sorted({0, *uses})], ship, progress)

    def _spawn_agents(self, timeout: float, progress: Progress) -> None:
        uses = self.agent_nodes()
        endpoint = f"tcp://{self.cluster.master.private_address}:{self.port}"

        def launch(t: SSHTarget) -> None:
            i = self.targets.index(t)
            with Session(t) as s:
                for rank in uses[i]:  # peers (allreduce) reach it at its private address
                    s.run(spawn_command(self.rdir, f"agent-{rank}", [
                        "agent", "--master", endpoint, "--rank", str(rank),
                        "--timeout", f"{timeout:g}", "--curve-dir", "keys-agent",
                        "--peer-host", self.cluster.nodes[i].private_address]))

        deploy.on_all([self.targets[i] for i in sorted(uses)], launch, progress)
        progress(f"{len(self.ranks)} agent(s) started on {len(uses)} node(s), "
                 f"connecting to {endpoint}")

    def _check_installed(self, progress: Progress) -> None:
        """Check relufit is on every node, and restart every node's idle clock (autostop):
        nodes this run gives no agent count this start as activity too."""
        def check(t: SSHTarget) -> None:
            with Session(t) as s:
                rc, _ = s.run_rc(f'test -x "$HOME/{REMOTE_VENV}/bin/relufit" && {TOUCH_COMMAND}')
            if rc != 0:
                raise SSHError(t.name, f"relufit is not installed; run `relufit deploy "
                                       f"{self.cluster.name}` first")

        deploy.on_all(self.targets, check, progress)

    # -------------------------------------------------------------- follow

    def follow(self, on_line: Callable[[str], None]) -> int:
        """Hand each line of the master's log to ``on_line`` until the master ends; its exit
        code (-1 if unknown). A lost connection is re-made and the log picked up where it
        was; a node 0 unreachable for the whole connect timeout raises ``Unreachable``."""
        d, seen = shlex.quote(self.rdir), 0

        def count(line: str) -> None:
            nonlocal seen
            seen += 1
            on_line(line)

        while True:
            try:
                session = Session(self.master)
            except SSHError as e:
                raise Unreachable(
                    f"{e}; the run may still go on there: `relufit logs {self.cluster.name} "
                    f"{self.run_id}`, `relufit fetch ...` or `relufit stop ...` later") from None
            with session as s:
                try:
                    s.stream(f"cd {d} && tail -n +{seen + 1} -F master.log "
                             f"--pid=$(cat master.pid) 2>/dev/null", count)
                    check = (OURS_FN + "cat master.exit 2>/dev/null || "
                             "{ ours \"$(cat master.pid)\" && echo running; }")
                    code = s.run(f"cd {d} && sh -c {shlex.quote(check)}", check=False).strip()
                    if code != "running":  # else only the tail ended: follow on
                        return int(code) if code.lstrip("-").isdigit() else -1
                except SSHError as e:
                    on_line(f"{e}; reconnecting")

    # -------------------------------------------------------------- stop

    def stop(self, progress: Progress = lambda line: None) -> None:
        """Ctrl-C the master (it records the interrupted trial and STOPs its agents), then
        TERM and at last KILL whatever is left on every node."""
        try:
            with Session(self.master, timeout=30) as s:
                if _signal(s, self.rdir, "INT", STOP_GRACE_S, "master.pid"):
                    _signal(s, self.rdir, "KILL", 2, "master.pid")
        except SSHError as e:
            progress(f"  {e}")

        def finish(t: SSHTarget) -> None:
            with Session(t, timeout=30) as s:
                if _signal(s, self.rdir, "TERM", 3, "*.pid"):
                    _signal(s, self.rdir, "KILL", 2, "*.pid")

        deploy.on_all(self.targets, finish, progress)
        progress(f"stopped run {self.run_id} on {len(self.targets)} node(s)")

    # -------------------------------------------------------------- fetch

    def fetch(self, out: str | Path, progress: Progress = lambda line: None) -> Path:
        """Copy the run back: the master's run directory to ``out/<run-id>/``, node logs to
        ``out/<run-id>/nodes/<rank>/`` (``nodes/master/`` for the master)."""
        dest = Path(out) / self.run_id
        with Session(self.master) as s:
            name = self.remote_out(s)
            count = s.get_tree(f"{self.rdir}/out/{name}", dest) if name else 0
        self.fetch_logs(dest)
        if not name:
            raise RunError(f"run {self.run_id} wrote no run directory (the master failed "
                           f"before its first trial); see {dest}/nodes/master/master.log")
        progress(f"fetched {count} file(s) and the node logs to {dest}")
        return dest

    def fetch_logs(self, dest: Path) -> None:
        def get(t: SSHTarget) -> dict[str, int]:
            found: dict[str, int] = {}
            with Session(t) as s:
                for name in s.listdir_sizes(self.rdir):
                    m = re.fullmatch(r"(master|agent-(\d+))\.(log|log\.\d+|exit)", name)
                    if not m:
                        continue
                    who = "master" if m.group(1) == "master" else m.group(2)
                    local = dest / "nodes" / who / ("agent" if who != "master" else "master")
                    local = local.with_suffix("." + m.group(3))
                    local.parent.mkdir(parents=True, exist_ok=True)
                    s.sftp.get(f"{self.rdir}/{name}", str(local))
                    if m.group(3) == "log":
                        found[who] = self.targets.index(t)
            return found

        where: dict[str, str] = {}
        for i, found in enumerate(deploy.on_all(self.targets, get)):
            where.update({who: self.targets[i].name for who in found})
        (dest / "nodes").mkdir(parents=True, exist_ok=True)
        (dest / "nodes" / "placement.json").write_text(json.dumps(where, indent=1) + "\n")


def free_run_id(name: str, out: str | Path) -> str:
    """A new run id for experiment ``name`` whose directory under ``out`` does not exist."""
    run_id = new_run_id(name)
    while (Path(out) / run_id).exists():
        run_id += "-2"
    return run_id


def run_on_cluster(exp: Experiment, cluster: Cluster, out: str | Path = "results",
                   progress: Progress = print, port: int = MASTER_PORT,
                   run_id: str | None = None, resume: str | Path | None = None) -> Path:
    """Run ``exp`` on ``cluster`` and bring the results home to ``out/<run_id>`` (default: a
    fresh id); the local run directory. Ctrl-C stops the remote processes, fetches what was
    written, and re-raises. ``resume``: a local run directory to go on with, under the same
    run id (``_prepare_resume``)."""
    workers = max(t.spec.workers for t in exp.trials())
    port = int(cluster.extra.get("master_port", port))  # a hosts file may choose it
    if resume is not None:
        resume = Path(resume)
        out, run_id = resume.parent, resume.name
    run_id = run_id or free_run_id(exp.name, out)
    rr = RemoteRun(cluster, run_id, workers, port)
    if resume is not None:
        _prepare_resume(rr, exp, resume, progress)
    progress(f"run {run_id} on cluster {cluster.name}: master on {rr.master.name}, "
             f"{workers} agent(s) on {len(rr.agent_nodes())} node(s)")
    try:
        rr.start(exp, progress, resume)
        code = rr.follow(progress)
    except Unreachable:
        raise  # nothing to stop or fetch from here
    except BaseException as e:
        if not rr.created:
            raise  # failed before anything was made on the nodes
        if isinstance(e, KeyboardInterrupt):
            progress("interrupted: stopping the remote processes, then fetching what was "
                     "written")
        _stop_and_fetch(rr, out, progress)
        raise
    rr.stop()  # agents normally exit on STOP; make sure nothing lingers
    dest = rr.fetch(out, progress)
    if code != 0:
        raise RunError(f"the master on {rr.master.name} exited with code {code}; "
                       f"see {dest}/nodes/master/master.log")
    return dest


def _prepare_resume(rr: RemoteRun, exp: Experiment, resume: Path, progress: Progress) -> None:
    """Before a run goes on on a cluster: it must not be running there still, and node 0's
    copy, when there is one, is fetched first: it may be ahead of ours (we stopped
    following it, and it went on until its master died)."""
    from orchestrator.runner import plan_resume

    if rr.run_id in running(rr.cluster):
        raise RunError(f"run {rr.run_id} is still running on cluster {rr.cluster.name}; "
                       f"`relufit stop {rr.cluster.name} {rr.run_id}` first, or follow it "
                       f"with `relufit logs -f {rr.cluster.name} {rr.run_id}`")
    with Session(rr.master) as s:
        there = rr.remote_out(s) is not None
    if there:
        progress(f"fetching run {rr.run_id} from {rr.master.name}: its copy goes on")
        rr.fetch(resume.parent, progress)
    plan_resume(resume, exp)  # refuses before anything starts


def _stop_and_fetch(rr: RemoteRun, out: str | Path, progress: Progress) -> None:
    """After a failure or Ctrl-C: stop, then fetch what there is, saying what could not be
    done rather than hiding the original error."""
    for step in (lambda: rr.stop(progress), lambda: rr.fetch(out, progress)):
        try:
            step()
        except (SSHError, RunError) as e:
            progress(f"  {e}")


# ---------------------------------------------------------------- later: fetch, logs, stop

def list_runs(cluster: Cluster) -> list[str]:
    """Run ids on node 0, least recently changed first."""
    with Session(deploy.targets(cluster)[0]) as s:
        try:
            found = s.sftp.listdir_attr(RUNS_DIR)
        except FileNotFoundError:
            return []
    return [a.filename for a in sorted(found, key=lambda a: (a.st_mtime, a.filename))]


def latest_run(cluster: Cluster) -> str:
    runs = list_runs(cluster)
    if not runs:
        raise RunError(f"no runs on cluster {cluster.name}")
    return runs[-1]


def fetch(cluster: Cluster, run_id: str, out: str | Path = "results",
          progress: Progress = print) -> Path:
    dest = Path(out) / run_id
    if dest.exists():
        shutil.rmtree(dest)  # a re-fetch replaces the old copy: the node has the truth
    return RemoteRun(cluster, run_id).fetch(out, progress)


def logs(cluster: Cluster, run_id: str | None, rank: int | None,
         on_line: Callable[[str], None], follow: bool = False) -> None:
    """The master's log of a run (default: the latest), or agent ``rank``'s, line by line;
    with ``follow``, until that process ends (Ctrl-C to stop watching)."""
    run_id = run_id or latest_run(cluster)
    rdir = shlex.quote(run_dir(run_id))
    who = "master" if rank is None else f"agent-{rank}"

    def has(t: SSHTarget) -> bool:
        with Session(t) as s:
            return s.run_rc(f"test -f {rdir}/{who}.log")[0] == 0

    targets = deploy.targets(cluster)
    targets = targets if rank is not None else targets[:1]
    where = [t for t, ok in zip(targets, deploy.on_all(targets, has), strict=True) if ok]
    if not where:
        raise RunError(f"no {who}.log for run {run_id} on cluster {cluster.name}")
    tail = f"tail -n +1 -F {who}.log --pid=$(cat {who}.pid)" if follow else f"cat {who}.log"
    with Session(where[0]) as s:
        s.stream(f"cd {rdir} && {tail} 2>/dev/null", on_line)


def stop(cluster: Cluster, run_id: str | None = None, progress: Progress = print) -> list[str]:
    """Stop one run (or every run still running) on the cluster; the run ids stopped."""
    ids = [run_id] if run_id else running(cluster)
    for rid in ids:
        RemoteRun(cluster, rid).stop(progress)
    return ids


def running(cluster: Cluster) -> list[str]:
    """Run ids with relufit processes still alive on any node of the cluster."""
    def live(t: SSHTarget) -> list[str]:
        with Session(t, timeout=30) as s:
            return s.run(f"sh -c {shlex.quote(RUNNING_SCRIPT)}").split()

    return sorted({r for found in deploy.on_all(deploy.targets(cluster), live) for r in found})

