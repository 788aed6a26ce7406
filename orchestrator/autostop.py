"""Autostop on idle, the user's side: arm the nodes' watchdogs, and read how long they have.

The watchdog itself is ``worker/watchdog.py`` (its docstring has the rule). Each node runs
its own and judges itself from local facts, so no node needs credentials or an IAM role,
and no node needs to reach another:

- EC2: the user-data installs it and starts it as root at boot (``providers.ec2``), before
  relufit is deployed; when it fires the instance halts, and EC2 terminates it.
- netns and hosts: ``arm`` uploads it over SSH and starts it detached as the SSH user;
  when it fires it stops relufit's processes on its node and ends; the machine stays up.
  Deploy and every run start it again there if it had stopped (``TOUCH_SCRIPT``).

``providers.clusters.up`` (``cluster up`` and ``launch``) calls ``apply`` after making a
cluster; ``providers.clusters.status`` calls ``node_states``.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import cluster as model
from orchestrator.cluster import Cluster, check_idle_minutes
from orchestrator.errors import SSHError
from worker import watchdog

if TYPE_CHECKING:  # deploy imports paramiko: the EC2 user-data needs none of it
    from orchestrator.deploy import Session, SSHTarget

Progress = Callable[[str], None]

REMOTE_WATCHDOG = ".relufit/watchdog.py"  # netns, hosts (EC2: /opt/relufit/watchdog.py)
READ_TIMEOUT_S = 10.0  # status: a node that does not answer by then is reported unknown
# RELUFIT_STATUS_SSH=0: status reads no node (tests against moto_server, whose instances
# exist only as records: their addresses are made up and must not be contacted)
_START_WAIT_S = 10


def watchdog_source() -> bytes:
    """The watchdog as shipped to the nodes: the module file itself (works from a wheel)."""
    return Path(watchdog.__file__).read_bytes()


def packed_source() -> str:
    """The watchdog gzipped and base64'd (deterministic: a retried RunInstances must send
    the same user-data), so that EC2 user-data stays well under its 16 KB limit."""
    return base64.encodebytes(gzip.compress(watchdog_source(), mtime=0)).decode()


def watchdog_args(idle_minutes: float, action: str) -> str:
    return f"--idle-seconds {idle_minutes * 60:g} --action {action}"


# ---------------------------------------------------------------- netns and hosts


def apply(c: Cluster, idle_minutes: float | None, progress: Progress) -> Cluster:
    """After ``up``: arm cluster ``c``'s watchdogs (netns, hosts; EC2's came with the
    user-data), or with ``idle_minutes`` 0 disarm them (a hosts cluster may be made again
    over one that had them). The cluster as saved."""
    minutes = check_idle_minutes(idle_minutes, c.provider)
    if c.provider == "ec2":
        return c
    if minutes:
        return arm(c, minutes, progress)
    disarm(c, progress)
    c = replace(c, extra={**c.extra, "idle_minutes": 0.0})
    model.save_cluster(c)
    return c


def arm(c: Cluster, idle_minutes: float, progress: Progress) -> Cluster:
    """Start (or restart) the watchdog on every node of ``c``, with ``stop`` as its action;
    records the limit in the local cluster state."""
    from orchestrator import deploy, remote

    # its command line names relufit (the path), so `ours` knows it as relufit's
    start = remote.detach_command(".relufit", "watchdog", f'python3 "$HOME/{REMOTE_WATCHDOG}" '
                                  f'{watchdog_args(idle_minutes, "stop")} --home "$HOME"')
    state = watchdog.STATE_FILE

    def one(t: SSHTarget) -> None:
        with deploy.Session(t, timeout=30) as s:
            s.mkdir(".relufit")
            _stop_watchdog(s)
            s.put_bytes(watchdog_source(), REMOTE_WATCHDOG, 0o644)
            s.put_bytes(start.encode(), watchdog.START_FILE, 0o644)
            # started once its first check is written, else its log says why not
            rc, out = s.run_rc(
                f"rm -f {state}; sh {watchdog.START_FILE} || exit 1; i=0; "
                f"while [ ! -s {state} ] && [ $i -lt {_START_WAIT_S * 10} ]; do sleep 0.1; "
                f"i=$((i+1)); done; test -s {state} || {{ cat .relufit/watchdog.log; exit 1; }}")
            if rc != 0:
                raise SSHError(t.name, f"the autostop watchdog did not start ({out.strip()}); "
                                       "--idle-minutes 0 makes a cluster without it")

    deploy.on_all(deploy.targets(c), one, progress)
    c = replace(c, extra={**c.extra, "idle_minutes": idle_minutes})
    model.save_cluster(c)
    progress(f"Autostop: each node stops relufit's processes after {idle_minutes:g} min "
             "with no run")
    return c


def _stop_watchdog(s: Session) -> None:
    """End a watchdog running on this node (TERM to its process group), if any."""
    s.run(f"cd .relufit 2>/dev/null || exit 0; sh -c {shlex.quote(watchdog.SIGNAL_SCRIPT)} "
          "sh TERM 3 watchdog.pid >/dev/null; true")


def disarm(c: Cluster, progress: Progress) -> None:
    """Stop the watchdogs of ``c`` and keep deploy and run from starting them again."""
    from orchestrator import deploy

    def one(t: SSHTarget) -> None:
        with deploy.Session(t, timeout=30) as s:
            s.run(f"rm -f {watchdog.START_FILE}")
            _stop_watchdog(s)

    deploy.on_all(deploy.targets(c), one, progress)


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class NodeAutostop:
    """What is known of one node's autostop."""

    rank: int
    state: str  # counting | active | fired | off | stalled | unknown
    seconds_left: float | None  # known only while counting
    text: str


def _minutes(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m}m {s:02d}s" if m < 120 else f"{m / 60:.1f} h"


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S UTC")


def describe(rank: int, state: dict | None, node_now: float) -> NodeAutostop:
    """One node's autostop from its watchdog state file (None: no file) and its clock."""
    if state is None:
        return NodeAutostop(rank, "off", None, "off (no watchdog on this node)")
    limit = f"idle limit {state['idle_s'] / 60:g} min"
    if state.get("fired") is not None:
        return NodeAutostop(rank, "fired", 0.0,
                            f"stopped at {_clock(state['fired'])} ({limit}, {state['action']})")
    if node_now - state["checked"] > 3 * state["interval_s"] + 10:
        return NodeAutostop(rank, "stalled", None, f"watchdog not running: last check "
                            f"{_minutes(node_now - state['checked'])} ago ({limit})")
    if state["running"]:
        return NodeAutostop(rank, "active", None, f"a run is active ({limit} once it ends)")
    left = max(0.0, state["deadline"] - node_now)
    return NodeAutostop(rank, "counting", left, f"in {_minutes(left)} ({limit})")


def from_tags(rank: int, idle_minutes: float | None, launched: datetime,
              now: datetime) -> NodeAutostop:
    """What EC2's tags alone tell of a node that SSH does not reach: the limit, and the
    earliest it can fire (launch + limit, if nothing ever ran)."""
    if idle_minutes is None:
        return NodeAutostop(rank, "unknown", None, "unknown (node not reachable)")
    if not idle_minutes:
        return NodeAutostop(rank, "off", None, "off (idle-minutes 0)")
    earliest = launched.timestamp() + idle_minutes * 60
    when = ("any time now" if earliest <= now.timestamp()
            else f"not before {_clock(earliest)}")
    return NodeAutostop(rank, "unknown", None, f"unknown (node not reachable): idle limit "
                        f"{idle_minutes:g} min, {when}")


_READ = f"cat {watchdog.STATE_FILE} 2>/dev/null; echo; date +%s"


def read_state(t: SSHTarget, timeout: float = READ_TIMEOUT_S,
               ) -> tuple[dict | None, float] | None:
    """A node's watchdog state (None: no file) and its clock; None if it cannot be read."""
    from orchestrator import deploy

    try:
        with deploy.Session(t, timeout=timeout) as s:
            out = s.run(_READ, timeout=timeout).strip().splitlines()
    except (SSHError, OSError):
        return None
    try:
        state = json.loads(out[0]) if len(out) > 1 and out[0].startswith("{") else None
        return state, float(out[-1])
    except (ValueError, IndexError):
        return None


def node_states(c: Cluster, launched: dict[int, tuple[float | None, datetime]] | None = None,
                ) -> list[NodeAutostop]:
    """Each node's autostop, read over SSH in parallel. EC2 passes ``launched``: rank ->
    (its ``relufit:idle-minutes`` tag, launch time), which says what it can of a node that
    SSH does not reach (``from_tags``) or whose watchdog has not written yet (booting)."""
    from orchestrator import deploy

    ssh = Path(c.key_path).exists() and os.environ.get("RELUFIT_STATUS_SSH") != "0"

    def read(t: SSHTarget) -> tuple[dict | None, float] | None:
        return read_state(t) if ssh else None

    now = datetime.now(timezone.utc)
    out = []
    for n, found in zip(c.nodes, deploy.on_all(deploy.targets(c), read), strict=True):
        limit, at = (launched or {}).get(n.rank, (None, now))
        if found is None:
            out.append(from_tags(n.rank, limit, at, now) if launched else
                       NodeAutostop(n.rank, "unknown", None, "unknown (node not reachable)"))
        elif found[0] is None and limit:
            out.append(NodeAutostop(n.rank, "unknown", None, f"idle limit {limit:g} min; its "
                                    "watchdog has not checked yet (still booting?)"))
        else:
            out.append(describe(n.rank, *found))
    return out


def echo_lines(nodes: list[dict]) -> list[str]:
    """``cluster status``'s autostop block, from its node records (``autostop`` as
    ``providers.clusters.status`` gives it)."""
    known = [f"{n['rank']:>4}  {n['autostop']['text']}" for n in nodes if n.get("autostop")]
    return ["autostop (each node judges its own idleness):", *known] if known else []
