"""Emulated hosts (providers/netns.py): names, up/down, SSH, homes, shaping, kill -9 (link
rates are tests/test_rates.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError, RunError
from orchestrator.providers import netns

# ----------------------------------------------------------------- pure: names


def test_names_fit_linux_and_never_match_another_cluster():
    a, a1 = netns.names_for("a"), netns.names_for("a-1")
    long = netns.names_for("x" * 40)
    for n in (a, long):
        assert len(n.bridge) <= 15 and len(n.veth(255)) <= 15 and len(n.peer(255)) <= 15
    assert a.is_namespace("rf-a-0") and not a.is_namespace("rf-a-1-0")
    assert a1.is_namespace("rf-a-1-0") and not a1.is_namespace("rf-a-0")
    assert not a.is_link("eth0") and not a.is_link(a1.bridge)
    for bad in ("", "UPPER", "-x", "a_b", "x" * 41, "a/b"):
        with pytest.raises(ConfigError):
            netns.names_for(bad)


def test_a_name_whose_link_names_collide_is_refused(tmp_path):
    a, b = "c0", "c1"
    (tmp_path / a).mkdir()
    (tmp_path / a / netns.STATE_FILE).write_text(
        json.dumps({"name": a, "bridge": netns.names_for(b).bridge}))  # as if the tags matched
    with pytest.raises(ConfigError, match="shares its link names with netns cluster 'c0'"):
        netns._check_no_collision(netns.names_for(b), tmp_path / b)
    netns._check_no_collision(netns.names_for(a), tmp_path / a)  # itself is no collision


def test_not_root_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RunError, match="need root"):
        netns.check_requirements()


def test_missing_tool_is_named(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda t: None if t == "tc" else "/bin/" + t)
    with pytest.raises(RunError, match="`tc` not found; install iproute2"):
        netns.check_requirements()


# ----------------------------------------------------------------- emulated hosts


def _leftover_processes(c: netns.NetnsCluster) -> list[int]:
    return [h.pid for h in c.hosts if h.pid and netns._is_our_sshd(h.pid, h.namespace)]


def test_three_hosts_each_reachable_with_its_own_empty_home(netns_cluster, host_ssh):
    c = netns_cluster(workers=2)
    assert [h.rank for h in c.hosts] == [0, 1, 2] and c.complete
    assert len({h.address for h in c.hosts}) == 3
    for h in c.hosts:
        out = host_ssh(c, h.rank, "echo $RELUFIT_HOST; command -v python3; ls -A ~ | wc -l;"
                                  "cat /etc/pip.conf; ls -A /etc/xdg/pip | wc -l;"
                                  "test -e ~/.config/pip || echo no-user-pip-config")
        assert out.returncode == 0, out.stderr
        # Its own host, the system python, an empty home, no pip configuration of this machine.
        assert out.stdout.split() == [h.namespace, "/usr/bin/python3", "0", "0",
                                      "no-user-pip-config"]
    assert host_ssh(c, 1, "echo only-here > ~/mark").returncode == 0
    assert host_ssh(c, 1, "cat ~/mark").stdout == "only-here\n"
    assert host_ssh(c, 2, "test -e ~/mark || echo absent").stdout == "absent\n"
    # Each has its own name, and knows the others' names.
    out = host_ssh(c, 1, f"hostname; getent hosts {c.hosts[2].namespace}")
    assert out.stdout.split() == [c.hosts[1].namespace, c.hosts[2].address, c.hosts[2].namespace]
    # Hosts reach each other through the bridge, and nothing beyond it (no package index).
    probe = ("import socket,sys\n"
             "socket.create_connection((sys.argv[1], 22), timeout=3).close()\n"
             "try: socket.create_connection(('1.1.1.1', 443), timeout=3)\n"
             "except OSError as e: print('no route out:', e.errno)\n")
    out = host_ssh(c, 1, f"python3 -c \"{probe}\" {c.hosts[2].address}")
    assert out.returncode == 0 and "no route out" in out.stdout, out.stderr


def test_saved_as_a_cluster_like_any_other(netns_cluster):
    from orchestrator.cluster import load_cluster, read_cluster

    c = netns_cluster(workers=2)
    saved = load_cluster(c.name)
    assert saved.provider == "netns" and saved.key_path == c.key_path
    assert [(n.rank, n.role, n.address, n.port, n.user) for n in saved.nodes] == [
        (h.rank, "master" if h.rank == 0 else "worker", h.address, 22, "root") for h in c.hosts]
    assert saved.known_hosts == c.known_hosts  # pinned already: deploy checks, never trusts
    assert os.stat(c.key_path).st_mode & 0o077 == 0
    from click.testing import CliRunner

    from orchestrator.cli import cli

    env = {"AWS_REGION": "", "AWS_DEFAULT_REGION": "", "AWS_PROFILE": "relufit-no-such"}
    listed = CliRunner().invoke(cli, ["cluster", "list"], env=env)
    assert listed.exit_code == 0, listed.output  # no AWS region: local clusters still listed
    assert c.name in listed.output and "netns" in listed.output and "EC2 not searched" in (
        listed.output)
    netns.down(c.name)
    assert read_cluster(c.name) is None
    status = CliRunner().invoke(cli, ["cluster", "status", c.name], env=env)
    assert status.exit_code == 1 and "is down" in status.output, status.output


def test_host_key_is_checked(netns_cluster, host_ssh, tmp_path):
    c = netns_cluster(workers=1)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{c.hosts[0].address} {' '.join(c.hosts[1].host_key.split()[:2])}\n")
    c_wrong = dataclasses.replace(c, known_hosts=str(wrong))
    out = host_ssh(c_wrong, 0, "true")
    assert out.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in out.stderr


def test_down_removes_everything_and_is_idempotent(netns_cluster):
    c = netns_cluster(workers=2)
    assert len(netns.leftovers(c.name)) == 3 + 1 + 3 + 3  # namespaces, bridge, veths, sshds
    netns.down(c.name)
    assert netns.leftovers(c.name) == []
    assert _leftover_processes(c) == []
    assert not [ns for ns in netns._namespaces() if ns.startswith(f"rf-{c.name}-")]
    netns.down(c.name)  # twice is fine
    assert not netns.load_state(c.name).complete


def test_up_refuses_a_cluster_that_is_up(netns_cluster):
    c = netns_cluster(workers=1)
    with pytest.raises(RunError, match="already up"):
        netns.up(c.name, 1)


def test_same_name_from_another_relufit_home_is_refused(netns_cluster, tmp_path, monkeypatch,
                                                        host_ssh):
    c = netns_cluster(workers=1)
    monkeypatch.setenv("RELUFIT_HOME", str(tmp_path / "another-home"))
    with pytest.raises(RunError, match="were not made from"):
        netns.up(c.name, 1)
    with pytest.raises(RunError, match="with that RELUFIT_HOME"):
        netns.down(c.name)
    assert host_ssh(c, 1, "true").returncode == 0  # the first cluster is untouched


def test_master_and_worker_links_are_shaped_separately(netns_cluster):
    c = netns_cluster(workers=1, bandwidth="20mbit", master_bandwidth="40mbit")
    for h, rate in ((c.hosts[0], "40Mbit"), (c.hosts[1], "20Mbit")):
        inside = subprocess.run(["ip", "netns", "exec", h.namespace, "tc", "qdisc", "show",
                                 "dev", "eth0"], capture_output=True, text=True).stdout
        outside = subprocess.run(["tc", "qdisc", "show", "dev", h.veth],
                                 capture_output=True, text=True).stdout
        assert "tbf" in inside and f"rate {rate}" in inside
        assert f"rate {rate}" in outside


# A bounded transfer: the receiver listens, prints its port, then prints bytes and seconds
# from its first byte to EOF; the sender sends exactly N bytes. Both time out.
_RECEIVER = """
import socket, sys, time
srv = socket.create_server((sys.argv[1], 0)); srv.settimeout(10)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(10)
got, t0 = 0, None
while True:
    d = conn.recv(1 << 20)
    if not d: break
    t0 = t0 or time.monotonic()
    got += len(d)
print(got, time.monotonic() - t0, flush=True)
"""
_SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
n, buf = int(sys.argv[3]), b"x" * 65536
while n > 0:
    n -= s.send(buf[:min(n, 65536)])
s.close()
"""


def _transfer_rate(receiver_ns: str | None, receiver_addr: str, sender_ns: str | None,
                   nbytes: int) -> float:
    def argv(ns, code, *args):
        cmd = [netns.SYSTEM_PYTHON, "-c", code, *args]
        return ["ip", "netns", "exec", ns, *cmd] if ns else cmd

    rx = subprocess.Popen(argv(receiver_ns, _RECEIVER, receiver_addr), stdout=subprocess.PIPE,
                          text=True)
    try:
        port = rx.stdout.readline().strip()
        subprocess.run(argv(sender_ns, _SENDER, receiver_addr, port, str(nbytes)), timeout=15,
                       check=True)
        got, seconds = rx.communicate(timeout=15)[0].split()
    finally:
        rx.kill()
        rx.wait()
    assert int(got) == nbytes
    return int(got) * 8 / float(seconds)


def test_tbf_link_runs_at_its_set_rate_both_ways(netns_cluster):
    rate = 20_000_000
    c = netns_cluster(workers=1, bandwidth="20mbit")
    w = c.hosts[1]
    nbytes = rate // 8 * 2  # ~2 s at the set rate
    up = _transfer_rate(None, c.bridge_address, w.namespace, nbytes)  # host -> root ns
    down = _transfer_rate(w.namespace, w.address, None, nbytes)  # root ns -> host
    for measured in (up, down):
        assert abs(measured - rate) / rate < 0.15, (up, down)


# ----------------------------------------------------------------- crashes

RELUFIT = [sys.executable, "-c", "from orchestrator.cli import main; main()"]  # `relufit`


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return False


def _kill_up_halfway(name: str, env: dict) -> None:
    """Start `relufit cluster up --provider netns`; kill -9 it once its first namespace exists."""
    argv = [*RELUFIT, "cluster", "up", "--provider", "netns",
            "--name", name, "--workers", "6", "--bandwidth", "100mbit"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = Path("/run/netns") / f"rf-{name}-0"
        assert _wait_for(lambda: first.exists() or proc.poll() is not None, 20)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        err = proc.communicate(timeout=10)[1]
    assert proc.returncode == -signal.SIGKILL, err  # killed, not finished
    state = netns.load_state(name)
    assert state is not None and not state.complete
    assert netns.leftovers(name)  # the kill left something behind for down to find


def test_down_after_kill_9_of_up_leaves_nothing(relufit_home):
    from conftest import require_emulated_hosts
    require_emulated_hosts()
    name = f"tk{secrets.token_hex(3)}"
    env = {**os.environ, "RELUFIT_HOME": str(relufit_home)}
    try:
        _kill_up_halfway(name, env)
        out = subprocess.run([*RELUFIT, "cluster", "down", name],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert netns.leftovers(name) == []
        # A re-run of `up` after a kill cleans up too, then builds the cluster.
        _kill_up_halfway(name, env)
        c = netns.up(name, 1)
        assert c.complete and len(netns.leftovers(name)) == 2 + 1 + 2 + 2
    finally:
        netns.down(name)
    assert netns.leftovers(name) == []
    assert not [p for p in os.listdir("/proc") if p.isdigit()
                and netns._is_our_sshd(int(p), f"rf-{name}-0")]


def test_sshd_host_fixture(sshd_host):
    ok = subprocess.run(sshd_host.ssh("echo $HOME; ls -A ~ | wc -l; echo x > ~/f"),
                        capture_output=True, text=True, timeout=20)
    assert ok.returncode == 0 and ok.stdout.split() == ["/root", "0"], ok.stderr
    assert sshd_host.home("f").read_text() == "x\n"  # its private home, seen from the test
    assert not Path("/root/f").exists() or Path("/root/f").read_text() != "x\n"
    bad = subprocess.run(sshd_host.ssh("true", key=sshd_host.new_key()), capture_output=True,
                         text=True, timeout=20)
    assert bad.returncode == 255 and "Permission denied" in bad.stderr
    sshd_host.rotate_host_key()
    changed = subprocess.run(sshd_host.ssh("true"), capture_output=True, text=True, timeout=20)
    assert changed.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in changed.stderr
    sshd_host.start_later(0.5)
    assert subprocess.run(sshd_host.ssh("true"), capture_output=True, timeout=20).returncode == 255
    time.sleep(1.0)
    assert sshd_host.pid and Path(f"/proc/{sshd_host.pid}").exists()


@pytest.mark.parametrize("args, message", [
    (["--provider", "netns"], "--name: an emulated cluster needs a name"),
    (["--provider", "netns", "--name", "x", "--bandwidth", "10mb"], "--bandwidth: '10mb'"),
    (["--provider", "netns", "--name", "x", "--master-bandwidth", "fast"], "--master-bandwidth"),
    (["--provider", "netns", "--name", "x", "--instance-type", "c5.large"],
     "--instance-type: only with --provider ec2"),
    (["--provider", "netns", "--name", "x", "--dry-run"], "--dry-run: only with --provider ec2"),
    (["--provider", "ec2", "--name", "x", "--bandwidth", "1gbit"], "only with --provider netns"),
])
def test_cli_names_the_bad_option_before_anything_starts(args, message, relufit_home):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    r = CliRunner().invoke(cli, ["cluster", "up", *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (relufit_home / "clusters").exists()
