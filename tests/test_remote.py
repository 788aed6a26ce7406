"""Remote runs end to end on emulated hosts (network namespaces, own sshd, empty tmpfs home,
system python3, no package index): deploy, run with the master on node 0, fetch, compare
with ``--backend sim``; a node killed mid-run; Ctrl-C during a run.

One cluster (node 0 + 2 workers) is deployed once for the whole module: the deploy is the
slow part (the wheelhouse upload), every test after it runs in seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import _reap, host_ssh, require_emulated_hosts

from orchestrator import cluster as model
from orchestrator import deploy, remote
from orchestrator.config import load_experiment
from orchestrator.providers import netns
from orchestrator.results import load_run
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool

pytestmark = [pytest.mark.sshd, pytest.mark.netns]

EXPERIMENT = """
name = "remote"
[problem]
d = 40
n = 1200
seed = 3
[train]
rounds = {rounds}
batch_size = 16
lr = 0.5
target_rel_error = 0
[compress]
scheme = "qsgd"
levels = 4
[cluster]
workers = 3
on_worker_loss = "{policy}"
heartbeat_interval = 0.2
heartbeat_liveness = 3
connect_timeout = 30
{sweep}
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A 3-node emulated cluster with relufit deployed on every node."""
    require_emulated_hosts()
    home = tmp_path_factory.mktemp("relufit-home")
    saved = {k: os.environ.get(k) for k in ("RELUFIT_HOME", "RELUFIT_CACHE")}
    os.environ["RELUFIT_HOME"] = str(home)
    os.environ.setdefault("RELUFIT_CACHE", str(Path.home() / ".cache" / "relufit-tests"))
    name = f"r{secrets.token_hex(3)}"
    state = None
    try:
        state = netns.up(name, 2)
        c = model.load_cluster(name)
        reports = deploy.deploy(deploy.targets(c))
        assert [r.version for r in reports] == ["relufit, version 0.1.0"] * 3
        yield c, state
    finally:
        netns.down(name)
        for h in state.hosts if state else ():
            _reap(h.pid)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_exp(path: Path, rounds: int = 60, policy: str = "continue", sweep: str = "",
              checkpoint_rounds: int = 0) -> Path:
    text = EXPERIMENT.format(rounds=rounds, policy=policy, sweep=sweep)
    path.write_text(text.replace("target_rel_error = 0\n", "target_rel_error = 0\n"
                                 f"checkpoint_rounds = {checkpoint_rounds}\n"))
    return path


def relufit(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL, **kw)


def start_relufit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def runs_on(state) -> set[str]:
    return set(host_ssh(state, 0, "ls relufit-runs 2>/dev/null; true").stdout.split())


def remote_rows(state, timeout: float, at_least: int, before: set[str]) -> str:
    """Wait until a run not in ``before`` has ``at_least`` metrics rows on node 0; its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = sorted(runs_on(state) - before)
        if new:
            rows = host_ssh(state, 0, f"cat relufit-runs/{new[0]}/out/*/metrics.csv "
                                      "2>/dev/null | wc -l").stdout.strip()
            if int(rows or 0) > at_least:
                return new[0]
        time.sleep(0.2)
    raise AssertionError(f"the remote run did not reach {at_least} rounds in {timeout} s")


@contextmanager
def cluster_run(c, state, exp_file: Path, out: Path, rows: int):
    """``relufit run --cluster`` in a subprocess; yields (process, run id) once the run has
    ``rows`` rounds on node 0. The process is gone when the block ends."""
    before = runs_on(state)
    proc = start_relufit("run", str(exp_file), "--cluster", c.name, "--out", str(out))
    try:
        yield proc, remote_rows(state, 60, rows, before)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def processes_with(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (no procps needed)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


def alive_relufit(state, node: int, run_id: str) -> list[str]:
    """Pidfiles of run ``run_id`` on ``node`` whose process group still has a process."""
    script = remote.OURS_FN + 'for f in *.pid; do [ -f $f ] && ours "$(cat $f)" && echo $f; done'
    out = host_ssh(state, node, f"cd relufit-runs/{run_id} 2>/dev/null || exit 0; "
                   f"sh -c {shlex.quote(script)}; true")
    return out.stdout.split()


def test_run_on_cluster_matches_sim_and_brings_results_home(deployed, tmp_path):
    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", sweep='[sweep]\n"cluster.topology" = '
                                                      '["ps", "allgather", "allreduce"]')
    out = tmp_path / "results"
    proc = relufit("run", str(exp_file), "--cluster", c.name, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    dest = Path(proc.stdout.strip().splitlines()[-1])
    assert dest.parent == out
    assert "waiting for 3 agents" in proc.stderr and "(CurveZMQ)" in proc.stderr  # streamed
    run = load_run(dest)
    assert [t["status"] for t in run["summary"]["trials"]] == ["completed"] * 3

    sim = run_experiment(load_experiment(exp_file), SimPool(), tmp_path / "sim", "sim",
                         progress=lambda line: None)
    ref = load_run(sim)["metrics"]
    got = run["metrics"]
    assert len(got["rel_error"]) == len(ref["rel_error"]) == 180
    np.testing.assert_allclose(got["rel_error"], ref["rel_error"], rtol=1e-9, atol=0)
    assert got["bytes_up"].sum() > 0
    # allreduce: the workers' bytes went worker to worker, over their CurveZMQ peer sockets
    peer = got["bytes_peer"][got["trial"] == 2]
    assert (peer > 0).all() and (got["bytes_peer"][got["trial"] < 2] == 0).all()

    # node logs come home, by rank; ranks round-robin over the two worker nodes
    placement = json.loads((dest / "nodes" / "placement.json").read_text())
    assert placement["master"].startswith("node0 ")
    assert [placement[str(r)].split()[0] for r in range(3)] == ["node1", "node2", "node1"]
    assert "completed" in (dest / "nodes" / "master" / "master.log").read_text()
    assert all((dest / "nodes" / str(r) / "agent.exit").read_text().strip() == "0"
               for r in range(3))
    # nothing left running; the secrets were private on the nodes
    for node in range(3):
        assert alive_relufit(state, node, dest.name) == []
    modes = host_ssh(state, 1, f"stat -c %a relufit-runs/{dest.name}/keys-agent/*").stdout.split()
    assert modes == ["600", "600"]

    # later: logs and fetch by run id
    logs = relufit("logs", c.name, dest.name)
    assert logs.returncode == 0 and "completed" in logs.stdout
    assert relufit("logs", c.name, dest.name, "--rank", "1").returncode == 0
    followed = relufit("logs", c.name, "--follow")  # the latest run, which has ended
    assert followed.returncode == 0 and followed.stdout == logs.stdout
    missing = relufit("logs", c.name, dest.name, "--rank", "7")
    assert missing.returncode == 1 and "no agent-7.log" in missing.stderr
    again = relufit("fetch", c.name, dest.name, "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / dest.name / "metrics.csv").read_text() == \
        (dest / "metrics.csv").read_text()


@pytest.mark.parametrize("policy, topology", [("continue", "ps"), ("abort", "ps"),
                                              ("continue", "allreduce"),
                                              ("abort", "allreduce")])
def test_node_killed_mid_run_follows_the_loss_policy(deployed, tmp_path, policy, topology):
    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", rounds=600, policy=policy,
                         sweep=f'[sweep]\n"cluster.topology" = ["{topology}"]')
    out = tmp_path / "results"
    with cluster_run(c, state, exp_file, out, 30) as (proc, run_id):
        # SIGKILL the agent of rank 1 (on node 2), as a crashed machine would
        killed = host_ssh(state, 2, f"kill -9 -- -$(cat relufit-runs/{run_id}/agent-1.pid)")
        assert killed.returncode == 0, killed.stderr
        stdout, stderr = proc.communicate(timeout=120)
    [trial] = json.loads((out / run_id / "summary.json").read_text())["trials"]
    assert trial["lost_workers"] == [1]
    if policy == "continue":
        assert proc.returncode == 0, stderr[-2000:]
        assert trial["status"] == "completed" and trial["rounds"] == 600
        workers = load_run(out / run_id)["metrics"]["workers"]
        assert workers[0] == 3 and workers[-1] == 2
    else:
        assert trial["status"] == "failed" and "worker 1 lost" in trial["reason"]
        assert trial["rounds"] < 600
    assert "lost" in (out / run_id / "events.log").read_text()
    for node in range(3):
        assert alive_relufit(state, node, run_id) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_remote_processes_and_fetches_partial_results(deployed, tmp_path, sig):
    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", rounds=100000)
    out = tmp_path / "results"
    with cluster_run(c, state, exp_file, out, 20) as (proc, run_id):
        assert sorted(alive_relufit(state, 1, run_id)) == ["agent-0.pid", "agent-2.pid"]
        # no secret in any process list: the run's secret keys are only in 0600 files
        keyfile = host_ssh(state, 1, f"cat relufit-runs/{run_id}/keys-agent/client.key_secret")
        secret = keyfile.stdout.split('secret-key = "')[1].split('"')[0]
        assert len(secret) == 40 and processes_with(secret) == []
        proc.send_signal(sig)  # SIGTERM: `kill PID`, or Ctrl-C of a job where SIGINT is ignored
        _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopping the remote processes" in stderr
    for node in range(3):
        assert alive_relufit(state, node, run_id) == [], f"node {node} still runs relufit"
    run = load_run(out / run_id)  # partial results came home
    assert 20 <= len(run["metrics"]["rel_error"]) < 100000
    [trial] = run["summary"]["trials"]
    assert trial["status"] == "interrupted"
    assert (out / run_id / "nodes" / "master" / "master.log").exists()


def test_a_dropped_ssh_connection_is_remade_and_the_run_followed_to_its_end(deployed,
                                                                            tmp_path):
    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", rounds=1000)
    out = tmp_path / "results"
    with cluster_run(c, state, exp_file, out, 20) as (proc, run_id):
        # the emulated hosts share this PID space: kill the sshd serving the log's tail
        deadline = time.monotonic() + 30  # the log's follower may start after round 20
        while not (tails := processes_with(f"relufit-runs/{run_id} && tail")):
            assert time.monotonic() < deadline, "no tail of the master's log"
            time.sleep(0.1)
        [tail] = tails
        session = int(Path(f"/proc/{tail}/stat").read_text().split(") ")[1].split()[1])
        os.kill(session, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "reconnecting" in stderr
    [trial] = load_run(out / run_id)["summary"]["trials"]
    assert trial["status"] == "completed" and trial["rounds"] == 1000


def test_stop_command_ends_a_detached_run(deployed, tmp_path):
    c, state = deployed
    before = runs_on(state)
    rr = remote.RemoteRun(c, f"manual-{secrets.token_hex(3)}", workers=3)
    exp = load_experiment(write_exp(tmp_path / "exp.toml", rounds=100000))
    rr.start(exp, lambda line: None)  # started, not followed: as after a lost connection
    assert remote_rows(state, 60, 5, before) == rr.run_id
    assert alive_relufit(state, 0, rr.run_id) == ["master.pid"]
    assert remote.running(c) == [rr.run_id]  # what `relufit stop NAME` would stop
    proc = relufit("stop", c.name, rr.run_id)
    assert proc.returncode == 0 and proc.stdout.strip() == rr.run_id, proc.stderr
    assert remote.running(c) == []
    for node in range(3):
        assert alive_relufit(state, node, rr.run_id) == []


def test_placement_round_robin():
    assert remote.placement(5, 3) == {0: 1, 1: 2, 2: 1, 3: 2, 4: 1}
    assert remote.placement(2, 1) == {0: 0, 1: 0}  # a lone node runs everything


def test_spawn_command_backgrounds_only_the_process():
    cmd = remote.spawn_command("relufit-runs/x", "agent-0", ["agent", "--rank", "0"])
    assert " && " not in cmd.split("sh -c")[0]  # `a && b &` would background a subshell
    assert "< /dev/null & " in cmd and cmd.endswith("test -s agent-0.pid")
    assert "agent-0.pid" in cmd and "agent-0.exit" in cmd


def test_heartbeats_cross_a_slow_link_while_a_round_is_in_flight(deployed, tmp_path):
    """Every link of the cluster shaped to 2 Mbit/s for this test; d = 1e5 float32 in ps:
    each round moves 800 kB through the master's link each way (~3.2 s), against a liveness
    window of 0.2 s x 3. On one connection the heartbeats waited behind that message and
    every worker was declared lost in round 0 (an earlier guard refused such runs); on a
    connection of their own nobody is lost."""
    c, state = deployed
    exp_file = tmp_path / "slow.toml"
    exp_file.write_text(
        'name = "slow"\n[problem]\nd = 100000\nn = 0\n[train]\nrounds = 2\n'
        'batch_size = 4\nlr = 0.0001\ntarget_rel_error = 0\n[compress]\nscheme = "none"\n'
        "[cluster]\nworkers = 2\nheartbeat_interval = 0.2\nheartbeat_liveness = 3\n"
        "connect_timeout = 30\n")
    try:
        for h in state.hosts:
            netns._shape(h, 2_000_000)
        res = relufit("run", str(exp_file), "--cluster", c.name, "--out", str(tmp_path / "out"))
    finally:
        for h in state.hosts:  # back to unshaped for the module's other tests
            subprocess.run(["ip", "netns", "exec", h.namespace, "tc", "qdisc", "del", "dev",
                            "eth0", "root"], capture_output=True)
            subprocess.run(["tc", "qdisc", "del", "dev", h.veth, "root"], capture_output=True)
    assert res.returncode == 0, res.stderr[-2000:]
    [run_dir] = (tmp_path / "out").iterdir()
    run = load_run(run_dir)
    [trial] = run["summary"]["trials"]
    assert trial["status"] == "completed" and trial["rounds"] == 2
    assert trial["lost_workers"] == []
    elapsed = run["metrics"]["elapsed_s"]
    assert elapsed[1] - elapsed[0] > 5 * 0.2 * 3  # a round outlasted the window 5 times over


def peer_ports(state, node: int) -> list[int]:
    """TCP ports in relufit's peer range that host ``node`` listens on (its agents')."""
    out = subprocess.run(["ip", "netns", "exec", state.hosts[node].namespace, "ss", "-Hltn"],
                         capture_output=True, text=True, check=True).stdout
    ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line}
    return sorted(p for p in ports if 5556 <= p <= 5655)


def test_allreduce_peers_refuse_whoever_lacks_the_runs_keys(deployed, tmp_path):
    """During an allreduce run, clients with another key pair and with no keys at all
    connect to every agent's peer port and send PARTs and MEANs for the run's own trial and
    rounds: the CurveZMQ handshake keeps them out, and the run ends exactly as sim's."""
    import zmq

    from worker import curve, protocol

    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", rounds=300,
                         sweep='[sweep]\n"cluster.topology" = ["allreduce"]')
    other = curve.create_keys(tmp_path / "other")
    ctx = zmq.Context()
    socks = []
    try:
        with cluster_run(c, state, exp_file, tmp_path / "results", 10) as (proc, run_id):
            targets = [(h.address, p) for i, h in enumerate(state.hosts[1:], 1)
                       for p in peer_ports(state, i)]
            theirs = tmp_path / "agent-key"  # the agents' public key is no secret: use it
            theirs.mkdir()
            (theirs / curve.CLIENT_SECRET).write_text(host_ssh(
                state, 1, f"cat relufit-runs/{run_id}/keys-agent/{curve.CLIENT_SECRET}").stdout)
            (theirs / curve.CLIENT_SECRET).chmod(0o600)
            agents_public = curve.load_key(theirs / curve.CLIENT_SECRET, secret=True)[0]
            assert len(targets) == 3  # ranks 0 and 2 on node 1, rank 1 on node 2
            for (address, port), keyed in itertools.product(targets, (True, False)):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.ROUTING_ID, b"p1-0-intruder")
                if keyed:  # a well-formed Curve client, but not with the run's keys
                    pub, sec = curve.load_key(other / curve.CLIENT_SECRET, secret=True)
                    s.curve_secretkey, s.curve_publickey = sec, pub
                    s.curve_serverkey = agents_public
                s.connect(f"tcp://{address}:{port}")
                socks.append(s)
            for r in range(10, 300):
                for s, t in itertools.product(socks, (protocol.PART, protocol.MEAN)):
                    try:
                        s.send_multipart(protocol.build(t, [b"\x00" * 64], trial=0, round=r,
                                                        epoch=0, rank=1), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
            _, stderr = proc.communicate(timeout=120)
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    assert proc.returncode == 0, stderr[-2000:]
    run = load_run(tmp_path / "results" / run_id)
    sim = run_experiment(load_experiment(exp_file), SimPool(), tmp_path / "sim", "sim",
                         progress=lambda line: None)
    np.testing.assert_array_equal(run["metrics"]["rel_error"],
                                  load_run(sim)["metrics"]["rel_error"])


def test_master_killed_on_node_0_then_resume_on_the_cluster_is_bit_identical(deployed,
                                                                            tmp_path):
    """The master's machine dies mid-sweep (kill -9 of its process group on node 0):
    `relufit run --cluster --resume` takes the sweep up from node 0's last checkpoint, and
    the run equals sim's, and a local run's bytes, in every column but the times."""
    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", rounds=300, checkpoint_rounds=20,
                         sweep='[sweep]\n"cluster.topology" = ["broadcast", "allreduce"]')
    out = tmp_path / "results"
    with cluster_run(c, state, exp_file, out, 400) as (proc, run_id):
        killed = host_ssh(state, 0, f"kill -9 -- -$(cat relufit-runs/{run_id}/master.pid)")
        assert killed.returncode == 0, killed.stderr
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "exited with code" in stderr
    local = out / run_id
    assert (local / "checkpoints" / "trial-1.npz").exists()  # fetched with the rest
    resumed = relufit("run", str(exp_file), "--cluster", c.name, "--resume", str(local))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert Path(resumed.stdout.strip().splitlines()[-1]) == local
    assert "1 of 2 trial(s) kept, trial 2 from round" in resumed.stderr
    run = load_run(local)
    assert run["summary"]["status"] == "completed" and run["summary"]["resumed"] == 1
    # the killed master's log is kept beside the new one's, on node 0 and in the fetch
    logs = local / "nodes" / "master"
    assert "trial 1" in (logs / "master.log.1").read_text()
    assert (logs / "master.log").read_text() != (logs / "master.log.1").read_text()
    sim = load_run(run_experiment(load_experiment(exp_file), SimPool(), tmp_path / "sim",
                                  "sim", progress=lambda line: None))["metrics"]
    for col in ("trial", "round", "rel_error", "loss", "workers"):
        np.testing.assert_array_equal(run["metrics"][col], sim[col], err_msg=col)
    whole = relufit("run", str(exp_file), "--out", str(tmp_path / "local"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    ref = load_run(whole.stdout.strip())["metrics"]
    for col in ("bytes_up", "bytes_down", "bytes_peer"):
        np.testing.assert_array_equal(run["metrics"][col], ref[col], err_msg=col)
    for node in range(3):
        assert alive_relufit(state, node, run_id) == []


def test_a_run_interrupted_elsewhere_resumes_on_a_cluster_that_never_ran_it(deployed,
                                                                           tmp_path):
    """The local copy goes up to node 0 (`launch --resume` onto a new cluster does this)."""
    c, state = deployed
    exp_file = write_exp(tmp_path / "exp.toml", rounds=40, checkpoint_rounds=10)
    exp = load_experiment(exp_file)

    class Stop(SimPool):
        def exchange(self, round_, down, relay):
            if round_ == 25:
                raise KeyboardInterrupt
            return super().exchange(round_, down, relay)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, Stop(), tmp_path / "results", "sim", progress=lambda line: None)
    [cut] = (tmp_path / "results").iterdir()
    assert cut.name not in runs_on(state)
    resumed = relufit("run", "--resume", str(cut), "--cluster", c.name)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "uploaded" in resumed.stderr and "trial 1 from round 20" in resumed.stderr
    sim = run_experiment(exp, SimPool(), tmp_path / "sim", "sim", progress=lambda line: None)
    np.testing.assert_array_equal(load_run(cut)["metrics"]["rel_error"],
                                  load_run(sim)["metrics"]["rel_error"])
    assert load_run(cut)["summary"]["status"] == "completed"
