"""Autostop on emulated hosts, the whole path.

netns: `relufit cluster up --provider netns --idle-minutes 0.1` arms a watchdog on each
node; deploy; a run that outlasts the limit three times over does not trip it; once the run
ends, every node's watchdog fires within the limit, and no relufit process is left on the
cluster (the watchdogs included).

hosts (one sshd on 127.0.0.1): the watchdog fires and ends; a deploy's or run's touch starts
it again; `cluster up` again with `--idle-minutes 0` and `cluster down` stop it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import _reap, host_ssh, in_mount_namespace_of, require_emulated_hosts
from test_remote import write_exp

from orchestrator import autostop, deploy, remote
from orchestrator import cluster as model
from orchestrator.cli import cli
from orchestrator.config import load_experiment
from orchestrator.providers import netns
from worker import watchdog

pytestmark = [pytest.mark.sshd, pytest.mark.netns, pytest.mark.slow]

IDLE_MINUTES = 0.1  # 6 s: fractions of a minute are for tests like this one
IDLE_S = IDLE_MINUTES * 60

def relufit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def watchdog_pid(state: netns.NetnsCluster, rank: int) -> str:
    return host_ssh(state, rank, f"cat {watchdog.PID_FILE}").stdout.strip()


def alive_on(state: netns.NetnsCluster, rank: int) -> list[str]:
    """Runs with a live process on node ``rank``, and 'watchdog' while its watchdog lives."""
    script = (watchdog.RUNNING_SCRIPT.replace("true\n", "") + f'cd; ours "$(cat '
              f'{watchdog.PID_FILE} 2>/dev/null)" && echo watchdog; true')
    return host_ssh(state, rank, f"sh -c {shlex.quote(script)}").stdout.split()


def pids_in(state: netns.NetnsCluster, rank: int, text: bytes) -> list[int]:
    """Live processes in node ``rank``'s namespace whose command line holds ``text``."""
    found = []
    for pid in netns._ns_pids(state.hosts[rank].namespace):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text in cmdline and not netns._zombie(pid):
            found.append(pid)
    return found


def python_watchdogs(state: netns.NetnsCluster, rank: int) -> int:
    return sum(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"python3\0")
               for p in pids_in(state, rank, b"watchdog.py"))


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def cluster_name(relufit_home, monkeypatch):
    require_emulated_hosts()
    monkeypatch.setenv("RELUFIT_CACHE", os.environ.get("RELUFIT_CACHE") or
                       str(Path.home() / ".cache" / "relufit-tests"))  # wheels, kept
    name = f"a{secrets.token_hex(3)}"
    state_dir = netns.cluster_dir(name)
    yield name
    state = netns.load_state(name, state_dir)
    netns.down(name, state_dir=state_dir)
    for h in state.hosts if state else ():
        _reap(h.pid)


def test_the_watchdogs_wait_out_a_run_then_stop_relufit_on_every_node(cluster_name, tmp_path):
    r = relufit("cluster", "up", "--provider", "netns", "--name", cluster_name, "--workers", "1",
                "--idle-minutes", f"{IDLE_MINUTES:g}")
    assert r.returncode == 0, r.stderr
    c, state = model.load_cluster(cluster_name), netns.load_state(cluster_name)
    assert c.extra["idle_minutes"] == IDLE_MINUTES
    r = relufit("cluster", "status", cluster_name)
    assert r.returncode == 0, r.stderr
    block = r.stdout.splitlines()[2:]
    assert block[0].startswith("autostop") and len(block) == 3
    assert all(" in 0m 0" in line and "idle limit 0.1 min" in line for line in block[1:])

    deploy.deploy(deploy.targets(c))  # its last touch starts a watchdog that fired meanwhile
    exp_file = write_exp(tmp_path / "idle.toml", rounds=1_000_000)  # stopped long before
    rr = remote.RemoteRun(c, "idle-run", workers=3)
    rr.start(load_experiment(str(exp_file)), lambda line: None)
    try:
        armed = [watchdog_pid(state, rank) for rank in (0, 1)]
        assert all(armed)
        seen_active: set[int] = set()
        end = time.monotonic() + 3 * IDLE_S
        while time.monotonic() < end:  # the run goes on well past the limit: nobody fires
            states = autostop.node_states(c)
            assert [a.state for a in states if a.state not in ("active", "counting")] == []
            seen_active |= {a.rank for a in states if a.state == "active"}
            time.sleep(0.5)
        assert seen_active == {0, 1}
        assert [watchdog_pid(state, rank) for rank in (0, 1)] == armed
        assert alive_on(state, 0) == ["idle-run", "watchdog"]
        assert alive_on(state, 1) == ["idle-run", "watchdog"]
        assert [python_watchdogs(state, rank) for rank in (0, 1)] == [1, 1]  # never two
    finally:
        rr.stop()
    stopped = time.monotonic()

    def all_fired():
        states = autostop.node_states(c)
        return states if all(a.state == "fired" for a in states) else None

    states = wait_for("every watchdog fired", all_fired, IDLE_S + 10)
    assert time.monotonic() - stopped >= IDLE_S - 1  # not before the limit
    assert all("stopped at" in a.text for a in states)
    wait_for("every watchdog ended", lambda: not alive_on(state, 0) + alive_on(state, 1), 10)
    # nothing of relufit's left on the cluster (the sshds and their sessions do not name it)
    assert [pids_in(state, rank, b"relufit") for rank in (0, 1)] == [[], []]


# ---------------------------------------------------------------- hosts


def host_watchdogs(sshd_host) -> list[int]:
    """The watchdog processes (python, not their sh) the host's sessions started."""
    found = []
    for pid in in_mount_namespace_of(sshd_host.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"python3\0") and b"watchdog.py" in cmdline:
            found.append(pid)
    return found


def hosts_up(f: Path, *more: str):
    res = CliRunner().invoke(cli, ["cluster", "up", "--provider", "hosts", "--hosts-file",
                                   str(f), "--name", "lab", *more])
    assert res.exit_code == 0, res.output
    return model.load_cluster("lab")


@pytest.mark.sshd
def test_hosts_watchdog_fires_restarts_on_a_touch_and_ends_with_down(sshd_host, relufit_home,
                                                                     tmp_path):
    f = tmp_path / "hosts.toml"
    f.write_text(f'user = "{sshd_host.user}"\nkey = "{sshd_host.key_path}"\n[[host]]\n'
                 f'address = "{sshd_host.host}"\nport = {sshd_host.port}\n')
    c = hosts_up(f, "--idle-minutes", "0.05")  # 3 s
    assert len(host_watchdogs(sshd_host)) == 1
    fired = wait_for("the watchdog fired", lambda: [
        a for a in autostop.node_states(c) if a.state == "fired"], 3 + 10)
    assert "(idle limit 0.05 min, stop)" in fired[0].text
    wait_for("the watchdog ended", lambda: not host_watchdogs(sshd_host), 10)

    # a deploy or a run touches the stamp, which starts a stopped watchdog again
    subprocess.run(sshd_host.ssh(watchdog.TOUCH_COMMAND), check=True, timeout=20)
    assert len(host_watchdogs(sshd_host)) == 1
    assert autostop.node_states(c)[0].state == "counting"

    c = hosts_up(f)  # again, with the default limit: the old watchdog gives way to a new one
    assert len(host_watchdogs(sshd_host)) == 1
    assert "(idle limit 30 min)" in autostop.node_states(c)[0].text
    c = hosts_up(f, "--idle-minutes", "0")  # and again without autostop: none left, and
    wait_for("the watchdog stopped", lambda: not host_watchdogs(sshd_host), 10)
    subprocess.run(sshd_host.ssh(watchdog.TOUCH_COMMAND), check=True, timeout=20)
    assert host_watchdogs(sshd_host) == []  # a touch no longer starts it
    c = hosts_up(f)
    res = CliRunner().invoke(cli, ["cluster", "down", "lab"])
    assert res.exit_code == 0, res.output
    wait_for("down stopped the watchdog", lambda: not host_watchdogs(sshd_host), 10)
