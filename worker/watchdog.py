"""Autostop on idle, on the node itself: which relufit processes live here, and the watchdog.

One self-contained file, standard library only: EC2 user-data writes it to the node and runs
it with the system python3 before relufit is even installed; ``cluster up`` of netns and
hosts clusters uploads it over SSH. Every node runs its own watchdog and judges itself from
local facts only (no credentials, no other node)::

    python3 watchdog.py --idle-seconds S --action poweroff|stop --home HOME

Active, for this node: a relufit master or agent alive here (a process group named by a
pidfile under ``HOME/relufit-runs/<run>/``, with a live relufit process), or the activity
stamp ``HOME/.relufit/activity`` touched (deploy and the start of every run touch it on
every node), or the watchdog's own start. Once nothing has been active for S seconds it
fires: ``poweroff`` halts the machine (EC2 instances are launched to terminate on halt);
``stop`` stops what relufit still runs here and ends the watchdog, leaving the machine up.
Each check writes ``HOME/.relufit/watchdog.json``, which ``relufit cluster status`` reads.

The shell snippets below are also what ``orchestrator.remote`` runs over SSH: one notion
of "a relufit process of this run is alive" on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

STATE_FILE = ".relufit/watchdog.json"  # relative to the home, as every path here
STAMP_FILE = ".relufit/activity"
PID_FILE = ".relufit/watchdog.pid"  # netns and hosts: the watchdog's process group
START_FILE = ".relufit/watchdog.cmd"  # netns and hosts: how to start it again
RUNS_DIR = "relufit-runs"
STATE_VERSION = 1
STOP_GRACE_S = 15  # the master records its interrupted trial and STOPs its agents

# `ours G`: true while process group G has a live (not zombie) relufit process. kill -0
# alone would also count zombies that init has not reaped yet, and a dead group leader hides
# a live member; reading /proc needs no procps on the node. `kill -s 0` first only skips the
# /proc scan for a group with no process at all (most pidfiles, once their runs are over):
# the watchdog checks every run's pidfiles every 30 s.
OURS_FN = r"""
ours() {
  g=$1
  kill -s 0 -- "-$g" 2>/dev/null || return 1
  for d in /proc/[0-9]*; do
    read -r st 2>/dev/null < "$d/stat" || continue
    set -- ${st##*) }
    [ "$3" = "$g" ] && [ "$1" != Z ] && grep -q relufit "$d/cmdline" 2>/dev/null && return 0
  done
  return 1
}
"""

# Signal every process group named by a pidfile (while it is ours), wait up to $2 seconds
# for them to end, print the ones still alive. $1: the signal; the rest: pidfiles.
SIGNAL_SCRIPT = OURS_FN + r"""
sig=$1; wait_s=$2; shift 2
pids=""
for f in "$@"; do
  [ -f "$f" ] || continue
  p=$(cat "$f" 2>/dev/null) || continue
  case "$p" in ''|*[!0-9]*) continue ;; esac
  ours "$p" || continue
  kill -s "$sig" -- "-$p" 2>/dev/null && pids="$pids $p"
done
end=$(( $(date +%s) + wait_s ))
for p in $pids; do
  while ours "$p" && [ "$(date +%s)" -lt "$end" ]; do sleep 0.2; done
done
for p in $pids; do ours "$p" && echo "alive $p"; done
true
"""

# The runs in ~/relufit-runs with a live process behind one of their pidfiles (run from
# the home). Builtins only for a finished run: no process is forked per pidfile.
RUNNING_SCRIPT = OURS_FN + r"""
cd relufit-runs 2>/dev/null || exit 0
for r in */; do
  for f in "$r"*.pid; do
    [ -f "$f" ] && read -r p < "$f" && ours "$p" && { echo "${r%/}"; break; }
  done
done
true
"""

# Run from the home by deploy and by every run on every node: a touch of the activity
# stamp, and (netns, hosts) the watchdog started again if it has stopped since.
TOUCH_SCRIPT = OURS_FN + f"""
mkdir -p .relufit && touch {STAMP_FILE}
[ -f {START_FILE} ] || exit 0
[ -f {PID_FILE} ] && ours "$(cat {PID_FILE})" && exit 0
sh {START_FILE} >/dev/null 2>&1 || true  # best effort: a run never waits on it
"""
TOUCH_COMMAND = f"sh -c {shlex.quote(TOUCH_SCRIPT)}"


# ---------------------------------------------------------------- the rule (pure)


@dataclass(frozen=True)
class Facts:
    """What the node knows at one check."""

    running: tuple[str, ...]  # runs with a relufit master or agent alive here
    stamp: float | None  # mtime of the activity stamp (a deploy, a run starting), if any


@dataclass(frozen=True)
class Verdict:
    last_active: float  # the latest moment this node was known active
    deadline: float  # when it fires unless something happens
    fire: bool


def judge(now: float, last_active: float, facts: Facts, idle_s: float) -> Verdict:
    """The watchdog's rule. Active now if a run is alive; else as of the later of the last
    activity seen and the stamp (a stamp in the future, a clock set back, counts as now).
    Fire once ``idle_s`` seconds have passed since."""
    if facts.running:
        last = now
    elif facts.stamp is not None:
        last = max(last_active, min(facts.stamp, now))
    else:
        last = last_active
    return Verdict(last, last + idle_s, now >= last + idle_s)


def check_interval(idle_s: float) -> float:
    """Seconds between checks: 30 s for long limits, finer for short ones (tests)."""
    return max(0.2, min(30.0, idle_s / 20))


# ---------------------------------------------------------------- the facts


def _sh(script: str, home: Path, *args: str) -> str:
    out = subprocess.run(["sh", "-c", script, "sh", *args], cwd=home, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, check=False)
    return out.stdout


def gather(home: Path) -> Facts:
    """This node's facts: runs alive under ``home``, and the activity stamp's time."""
    try:
        stamp: float | None = (home / STAMP_FILE).stat().st_mtime
    except OSError:
        stamp = None
    return Facts(tuple(_sh(RUNNING_SCRIPT, home).split()), stamp)


def stop_runs(home: Path, runs: tuple[str, ...]) -> None:
    """What ``relufit stop`` does, here: Ctrl-C each master, then TERM and KILL the rest."""
    for run in runs:
        rdir = home / RUNS_DIR / run
        for sig, wait_s, pidfiles in (("INT", STOP_GRACE_S, ["master.pid"]),
                                      ("TERM", 3, sorted(p.name for p in rdir.glob("*.pid")))):
            if _sh(SIGNAL_SCRIPT, rdir, sig, str(wait_s), *pidfiles).strip():  # still alive
                _sh(SIGNAL_SCRIPT, rdir, "KILL", "2", *pidfiles)


# ---------------------------------------------------------------- the loop (thin)


@dataclass(frozen=True)
class State:
    """What each check writes to STATE_FILE (times are this node's clock, epoch seconds)."""

    version: int
    idle_s: float
    action: str
    interval_s: float
    started: float
    checked: float
    running: tuple[str, ...]
    last_active: float
    deadline: float
    fired: float | None
    pid: int


def write_state(home: Path, state: State) -> None:
    path = home / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(state)) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)  # a reader never sees half a state


def fire(action: str, home: Path, idle_s: float) -> None:
    if action == "poweroff":  # EC2: InstanceInitiatedShutdownBehavior=terminate
        subprocess.run(["shutdown", "-h", "now",
                        f"relufit: idle for {idle_s / 60:g} min, autostop"], check=False)
    else:  # netns, hosts: never power off someone's machine. Nothing ran a moment ago;
        stop_runs(home, gather(home).running)  # a run that started since is stopped


def watch(home: Path, idle_s: float, action: str, clock: Callable[[], float] = time.time,
          sleep: Callable[[float], None] = time.sleep) -> State:
    """Check every ``check_interval`` until the rule fires; then act. The last state."""
    started = clock()
    interval = check_interval(idle_s)
    state = State(STATE_VERSION, idle_s, action, interval, started, started, (), started,
                  started + idle_s, None, os.getpid())
    while True:
        facts, now = gather(home), clock()
        verdict = judge(now, state.last_active, facts, idle_s)
        state = replace(state, checked=now, running=facts.running,
                        last_active=verdict.last_active, deadline=verdict.deadline,
                        fired=now if verdict.fire else None)
        if verdict.fire:
            write_state(home, state)
            print(f"relufit watchdog: idle since {time.ctime(verdict.last_active)}; "
                  f"{action}", flush=True)
            fire(action, home, idle_s)
            return state
        write_state(home, state)
        sleep(min(interval, max(0.0, verdict.deadline - now)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="watchdog.py", description=__doc__.split("\n")[0])
    p.add_argument("--idle-seconds", type=float, required=True)
    p.add_argument("--action", choices=("poweroff", "stop"), required=True)
    p.add_argument("--home", type=Path, default=Path.home())
    args = p.parse_args(argv)
    if args.idle_seconds <= 0:
        p.error("--idle-seconds must be positive")
    watch(args.home.resolve(), args.idle_seconds, args.action)
    return 0


if __name__ == "__main__":
    sys.exit(main())
