"""Faults with real processes on localhost: a SIGKILLed worker (continue, abort), Ctrl-C of
`relufit run`, hostile frames to a live master and to live agents, version mismatch, and
CurveZMQ between separately started processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from orchestrator.config import from_dict
from orchestrator.errors import RunError
from orchestrator.master import ZmqPool, create_curve_keys
from orchestrator.providers import open_pool
from orchestrator.results import load_run, read_metrics
from orchestrator.runner import run_experiment
from worker import node, protocol

BASE = {
    "problem": {"d": 16, "n": 600, "seed": 5},
    "train": {"rounds": 30, "batch_size": 8, "lr": 0.5, "target_rel_error": 0},
    "compress": {"scheme": "qsgd", "levels": 8},
    "cluster": {"workers": 3, "heartbeat_interval": 0.2, "heartbeat_liveness": 3,
                "connect_timeout": 20},
}
QUIET = {"progress": lambda line: None}


def experiment(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for sec, vals in sections.items():
        data[sec] = {**data.get(sec, {}), **vals}
    return from_dict(data, "faults")


def sim_rel_errors(exp, tmp_path):
    with open_pool("sim", exp) as pool:
        path = run_experiment(exp, pool, tmp_path / "sim", "sim", **QUIET)
    return read_metrics(path / "metrics.csv")["rel_error"]


class Hooked:
    """A pool that calls ``before(pool, round)`` ahead of every exchange."""

    def __init__(self, pool, before):
        self.pool, self.before = pool, before

    def start_trial(self, spec, resume=None):
        self.pool.start_trial(spec, resume)

    def states(self, round_):
        return self.pool.states(round_)

    def exchange(self, round_, down, relay):
        self.before(self.pool, round_)
        return self.pool.exchange(round_, down, relay)

    def end_trial(self):
        self.pool.end_trial()


def kill_at(round_, rank):
    def before(pool, r):
        if r == round_:
            os.kill(pool.by_rank[rank].pid, signal.SIGKILL)
    return before


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("policy", ["continue", "abort"])
def test_sigkilled_worker_mid_trial(tmp_path, policy):
    exp = experiment(cluster={"on_worker_loss": policy}, sweep={"repeats": 2})
    with open_pool("local", exp) as pool:
        victim = pool.by_rank[1].pid
        path = run_experiment(exp, Hooked(pool, kill_at(10, 1)), tmp_path, "local", **QUIET)
    run = load_run(path)
    t0, t1 = run["summary"]["trials"]
    events = (path / "events.log").read_text()
    assert "trial 0 round 10: worker 1 lost (silent for" in events
    assert not alive(victim)
    rows = run["metrics"]
    first = rows["trial"] == 0
    if policy == "continue":
        assert t0["status"] == "completed" and t0["rounds"] == 30 and t0["lost_workers"] == [1]
        assert (rows["workers"][first][:10] == 3).all() and (rows["workers"][first][10:] == 2).all()
        # the next trial runs without the lost worker and says so
        assert t1["status"] == "completed" and t1["lost_workers"] == [1]
        assert "trial 1 round 0: worker 1 lost" in events
        assert run["summary"]["status"] == "completed"
    else:
        assert t0["status"] == "failed" and t0["rounds"] == 10
        assert "worker 1 lost in round 10" in t0["reason"] and "abort" in t0["reason"]
        assert first.sum() == 10  # every completed round is on disk
        assert t1["status"] == "failed" and run["summary"]["status"] == "failed"


def children_of(pid):
    """PIDs whose parent is ``pid``, from /proc (no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def test_sigint_to_relufit_run_leaves_no_process_and_keeps_every_round(tmp_path):
    toml = tmp_path / "long.toml"
    toml.write_text(
        "[problem]\nd = 16\nn = 600\n[train]\nrounds = 1000000\ntarget_rel_error = 0\n"
        "lr = 0.1\n[compress]\nscheme = \"none\"\n"
        "[cluster]\nworkers = 3\nheartbeat_interval = 0.2\n"
    )
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(toml), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        metrics = None
        while time.monotonic() < deadline:
            found = list(out.glob("*/metrics.csv"))
            if found and sum(1 for _ in open(found[0])) - 1 > 20:  # rows, not the header
                metrics = found[0]
                break
            time.sleep(0.05)
        assert metrics is not None, "the run never got going"
        kids = children_of(proc.pid)
        assert len(kids) == 3  # the three agents
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert [k for k in kids if alive(k)] == []
    run = load_run(metrics.parent)
    assert run["summary"]["status"] == "interrupted"
    (trial,) = run["summary"]["trials"]
    assert trial["status"] == "interrupted"
    assert trial["rounds"] == len(run["metrics"]["round"]) > 20


V = protocol.VERSION


def junk_frames(rng, i):
    """Random and malformed messages; none of them is a valid message an agent would obey."""
    kind = i % 12
    h = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 300)))]
    if kind == 1:
        return [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(2, 6)))]
    if kind == 2:
        return [rng.choice([b"{}", b"[]", b"null", b'{"v":2}', b'{"v":2,"type":"ROUND"}'])]
    if kind == 3:
        return [h(v=V, type="GRADIENT", trial=0, round=int(rng.integers(0, 40)), us=[0, 0, 0],
                  bytes_peer=0), rng.bytes(64)]
    if kind == 4:
        return [h(v=V, type="ROUND", trial=0, round=int(rng.integers(-2, 1000))), rng.bytes(64)]
    if kind == 5:
        return [h(v=V, type="HEARTBEAT")]
    if kind == 6:
        return [h(v=V, type="TRIAL", trial=0, spec={"d": -1})]
    if kind == 7:
        return [b" " * (protocol.MAX_HEADER + 10)]
    if kind == 8:
        return [b"[" * 50000]
    if kind == 9:
        return [h(v=V, type="ROUND", trial=0, round=1, ranks="x")]
    if kind == 10:
        return [h(v=V, type="READY", trial=99)]
    return [h(v=V, type="WELCOME", rank=999, heartbeat_interval=1, heartbeat_liveness=1)]


def test_hostile_frames_to_a_live_master(tmp_path):
    exp = experiment(train={"rounds": 40})
    want = sim_rel_errors(exp, tmp_path)
    sent = []

    def attack(endpoint):
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(endpoint)
        rng = np.random.default_rng(1)
        h = lambda **kw: json.dumps(kw).encode()  # noqa: E731
        extra = [[h(v=V, type="HELLO", pid=1, rank=None)], [h(v=V, type="HELLO", pid=1, rank=0)],
                 [h(v=V, type="HELLO", pid=1, rank=77)], [h(v=9, type="HELLO", pid=1)]]
        for i in range(1000):
            frames = extra[i % 4] if i % 50 == 0 else junk_frames(rng, i)
            s.send_multipart(frames)
            sent.append(i)
        s.close()
        ctx.term()

    with open_pool("local", exp) as pool:
        thread = threading.Thread(target=attack, args=(pool.endpoint,))
        thread.start()
        path = run_experiment(exp, pool, tmp_path, "local", **QUIET)
        thread.join()
        dropped = pool.dropped
    run = load_run(path)
    assert len(sent) == 1000 and dropped > 100
    assert run["summary"]["trials"][0]["status"] == "completed"
    np.testing.assert_array_equal(run["metrics"]["rel_error"], want)


@pytest.mark.parametrize("topology", ["allgather", "broadcast"])
def test_hostile_frames_to_live_agents(tmp_path, topology):
    exp = experiment(train={"rounds": 20}, cluster={"topology": topology})
    want = sim_rel_errors(exp, tmp_path)
    rng = np.random.default_rng(2)

    def before(pool, round_):
        if round_ < 10:
            for w in pool.by_rank.values():
                for i in range(100):
                    pool.sock.send_multipart([w.identity, *junk_frames(rng, i + round_)])

    with open_pool("local", exp) as pool:
        path = run_experiment(exp, Hooked(pool, before), tmp_path, "local", **QUIET)
        procs = pool.processes
    run = load_run(path)
    assert run["summary"]["trials"][0]["status"] == "completed"
    np.testing.assert_array_equal(run["metrics"]["rel_error"], want)
    assert [p.returncode for p in procs] == [0, 0, 0]  # alive to the end, then STOPped


def test_version_mismatch_agent_side_is_refused_by_the_master():
    pool = ZmqPool("tcp://127.0.0.1:*", workers=1, heartbeat_interval=0.1)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        s.connect(pool.endpoint)
        s.send_multipart([json.dumps({"v": 99, "type": "HELLO", "pid": 4242}).encode()])
        with pytest.raises(RunError, match=r"agent \(pid 4242\) speaks version 99, this master "
                                           rf"speaks {protocol.VERSION}"):
            pool.wait_for_workers(5)
        reply = protocol.parse(s.recv_multipart())
        assert reply.type == protocol.ERROR and "99" in reply.get("message")
    finally:
        s.close()
        ctx.term()
        pool.close()


def agent_cmd(endpoint, *extra):
    return [sys.executable, "-m", "orchestrator.cli", "agent", "--master", endpoint, *extra]


def test_version_mismatch_master_side_gives_the_agent_a_one_line_error():
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 1000)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen(agent_cmd(f"tcp://127.0.0.1:{port}", "--timeout", "10"),
                            stderr=subprocess.PIPE, text=True)
    try:
        assert r.poll(10000)
        ident, header = r.recv_multipart()
        hello = protocol.parse([header])
        assert hello.type == protocol.HELLO and hello.get("v") == protocol.VERSION
        # what a master of another version answers
        r.send_multipart([ident, json.dumps({"v": 2, "type": "ERROR", "message":
                          "protocol version mismatch: the agent speaks version 1, this master "
                          "speaks 2"}).encode()])
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        r.close()
        ctx.term()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "version 1, this master speaks 2" in lines[0]


def test_agent_exits_when_the_master_goes_silent():
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen(agent_cmd(f"tcp://127.0.0.1:{port}"), stderr=subprocess.PIPE,
                            text=True)
    try:
        assert r.poll(10000)
        ident, _ = r.recv_multipart()
        r.send_multipart([ident, *protocol.build(protocol.WELCOME, rank=0, heartbeat_interval=0.1,
                                                 heartbeat_liveness=2)])
        _, err = proc.communicate(timeout=10)  # then silence
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        r.close()
        ctx.term()
    assert proc.returncode == 3 and "silent" in err


def test_curve_between_a_listening_master_and_separately_started_agents(tmp_path):
    keys = create_curve_keys(tmp_path / "keys")
    assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(
        "[problem]\nd = 16\nn = 600\nseed = 5\n[train]\nrounds = 15\ntarget_rel_error = 0\n"
        "batch_size = 8\n[compress]\nscheme = \"qsgd\"\nlevels = 8\n"
        "[cluster]\nworkers = 2\nheartbeat_interval = 0.2\nconnect_timeout = 20\n"
    )
    from tests.conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    master = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(exp_file), "--backend", "listen",
         "--bind", endpoint, "--curve-dir", str(keys), "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agents = [subprocess.Popen(agent_cmd(endpoint, "--curve-dir", str(keys)),
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    # an agent without keys never gets in, and says why
    intruder = subprocess.Popen(agent_cmd(endpoint, "--timeout", "3"), stderr=subprocess.PIPE,
                                text=True)
    try:
        out, err = master.communicate(timeout=60)
        codes = [a.wait(timeout=10) for a in agents]
        _, intruder_err = intruder.communicate(timeout=20)
    finally:
        for p in [master, *agents, intruder]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert master.returncode == 0, err
    assert codes == [0, 0]
    # refused at the handshake while the master ran; silent if it had ended before
    assert intruder.returncode in (1, 3), intruder_err
    if intruder.returncode == 1:
        assert "security mechanism (the agent has no --curve-dir)" in intruder_err
    assert "CurveZMQ" in err and "secret" not in err.lower()
    run = load_run(out.strip())
    exp = from_dict({"problem": {"d": 16, "n": 600, "seed": 5},
                     "train": {"rounds": 15, "target_rel_error": 0, "batch_size": 8},
                     "compress": {"scheme": "qsgd", "levels": 8}, "cluster": {"workers": 2}},
                    "x")
    np.testing.assert_array_equal(run["metrics"]["rel_error"], sim_rel_errors(exp, tmp_path))


def test_heartbeats_flow_while_numpy_computes(tmp_path):
    # Building a shard of 128 rows x 2e5 (0.5 s alone, longer with three at once) takes
    # longer than the 0.2 s after which a silent peer is lost: the agents keep heartbeating
    # from their socket thread. (A 0.1 s window lost a worker to a scheduling stall now and
    # then on 2 cores.)
    exp = experiment(problem={"d": 200_000, "n": 384}, train={"rounds": 3, "lr": 1e-4},
                     compress={"scheme": "none"},
                     cluster={"heartbeat_interval": 0.05, "heartbeat_liveness": 4})
    want = sim_rel_errors(exp, tmp_path)
    with open_pool("local", exp) as pool:
        path = run_experiment(exp, pool, tmp_path, "local", **QUIET)
    run = load_run(path)
    assert run["summary"]["trials"][0]["lost_workers"] == []
    np.testing.assert_array_equal(run["metrics"]["rel_error"], want)


def test_an_agent_started_before_its_master_connects_when_the_master_comes_up():
    from tests.conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(agent_cmd(endpoint, "--rank", "0", "--timeout", "20"))
    pool = None
    try:
        time.sleep(0.5)  # the agent retries the connection with its capped backoff
        pool = ZmqPool(endpoint, workers=1, heartbeat_interval=0.2)
        pool.wait_for_workers(15)
        assert pool.by_rank[0].pid == proc.pid
    finally:
        if pool is not None:
            pool.close()
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0


def test_an_agent_whose_heartbeat_queue_is_full_keeps_going():
    """With no master for a long while the heartbeat connection's queue fills; a heartbeat
    that cannot be queued is skipped (liveness decides what happens), not a crash."""
    from worker.agent import Agent, AgentOptions

    class Full:
        def send_multipart(self, frames, flags=0):
            raise zmq.Again()

        def close(self, linger=None):
            pass

    agent = Agent(AgentOptions(master="tcp://127.0.0.1:9"))
    real, agent.hb = agent.hb, Full()
    try:
        later = agent.live.last_sent + 5.0
        agent._heartbeat(later)
        assert agent.live.last_sent == later
    finally:
        real.close(linger=0)
        agent.sock.close(linger=0)
        agent.bell.close(linger=0)
        agent.ctx.term()


@pytest.fixture
def keyed_master(tmp_path):
    """A master-side ROUTER with a run's keys, as ZmqPool binds it: (endpoint, keys dir)."""
    from worker import curve

    keys = create_curve_keys(tmp_path / "keys")
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    auth = curve.set_server(r, ctx, keys)
    yield f"tcp://127.0.0.1:{r.bind_to_random_port('tcp://127.0.0.1')}", keys
    auth.stop()
    r.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("agent_keys", ["none", "other"])
def test_an_agent_whose_handshake_the_master_turns_down_says_why_and_exits_at_once(
        tmp_path, keyed_master, agent_keys):
    # ZeroMQ drops a connection whose handshake failed on the mechanism or the key, and
    # does not retry: the agent must not wait out its timeout, let alone block in a send.
    endpoint, keys = keyed_master
    extra = ["--timeout", "30"]
    if agent_keys == "other":  # the right server key, a client pair that is not the run's
        other = create_curve_keys(tmp_path / "other")
        (other / "server.key").write_bytes((keys / "server.key").read_bytes())
        extra += ["--curve-dir", str(other)]
    t0 = time.monotonic()
    proc = subprocess.run(agent_cmd(endpoint, *extra), capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relufit agent: the master at tcp://")
    if agent_keys == "none":
        assert "security mechanism (the agent has no --curve-dir)" in lines[0]
    else:
        assert "refused this agent's CurveZMQ key" in lines[0]
    assert elapsed < 25  # not the 30 s timeout


def test_a_send_after_a_failed_handshake_reports_it_instead_of_blocking(keyed_master):
    # The race CI once lost: the handshake failed before HELLO was queued, and a blocking
    # send on a DEALER with no connection left waited for ever.
    from worker.agent import Agent, AgentOptions, _Refused

    agent = Agent(AgentOptions(master=keyed_master[0], timeout=5))
    try:
        agent._connect()
        assert agent.handshake.poll(5000)  # the failure is reported before we send
        hello = protocol.build(protocol.HELLO, rank=None, pid=os.getpid(), peer_port=0,
                               peer_host=None)
        t0 = time.monotonic()
        with pytest.raises(_Refused, match="security mechanism") as e:
            # ZeroMQ takes messages into the dropped queue until the socket has processed
            # the news (on a later send); then a send finds no connection, where a blocking
            # send used to wait for ever
            for _ in range(40):
                agent._send(hello)
                time.sleep(0.05)
        assert e.value.code == 1 and time.monotonic() - t0 < 4.5  # not the 5 s timeout
    finally:
        agent.close()


def test_an_agent_with_the_wrong_server_key_is_told_so_when_it_gives_up(tmp_path,
                                                                       keyed_master):
    # A client that does not hold the master's public key cannot complete the handshake;
    # ZeroMQ retries, so the agent waits out --timeout and then names the likely cause.
    endpoint, keys = keyed_master
    other = create_curve_keys(tmp_path / "other")
    for name in ("client.key", "client.key_secret"):
        (other / name).write_bytes((keys / name).read_bytes())
    proc = subprocess.run(agent_cmd(endpoint, "--timeout", "2", "--curve-dir", str(other)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "secure handshake(s) with it failed: is server.key in --curve-dir" in proc.stderr


@pytest.mark.parametrize("topology", ["broadcast", "allreduce"])
@pytest.mark.parametrize("inline", [True, False])
def test_a_rounds_small_work_runs_on_the_socket_thread_and_large_work_on_the_compute_thread(
        tmp_path, monkeypatch, topology, inline):
    """Agents in this process, so the thread each round's work runs on can be seen: under
    the inline bounds on the socket thread (no hand-off), past them on the compute thread;
    either way the run equals sim bit for bit."""
    from worker import agent as agent_mod

    if not inline:
        monkeypatch.setattr(agent_mod, "INLINE_MAX_D", 0)
    where: list[str] = []
    for name in ("step", "scatter", "reduce"):
        original = getattr(agent_mod._Work, name)

        def spy(self, *a, _original=original, **kw):
            where.append(threading.current_thread().name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(agent_mod._Work, name, spy)
    exp = experiment(train={"rounds": 12}, cluster={"topology": topology})
    want = sim_rel_errors(exp, tmp_path)
    pool = ZmqPool.for_experiment(exp, "tcp://127.0.0.1:*")
    agents = [agent_mod.Agent(agent_mod.AgentOptions(master=pool.endpoint, rank=r, timeout=20))
              for r in range(3)]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda a=a: codes.append(a.run()), name=f"agent-{r}")
               for r, a in enumerate(agents)]
    try:
        for t in threads:
            t.start()
        pool.wait_for_workers(20)
        path = run_experiment(exp, pool, tmp_path / "run", "local", **QUIET)
    finally:
        pool.close()
        for t in threads:
            t.join(30)
    assert codes == [0, 0, 0]
    np.testing.assert_array_equal(load_run(path)["metrics"]["rel_error"], want)
    assert len(where) >= 3 * 12
    expected = {f"agent-{r}" for r in range(3)} if inline else {"relufit-compute"}
    assert set(where) == expected


@pytest.mark.parametrize("sched, policy", [("batch", "SCHED_BATCH"), (None, "SCHED_OTHER"),
                                           ("normal", "SCHED_OTHER")])
def test_an_agent_runs_every_thread_under_batch_scheduling_when_asked(sched, policy):
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k != node.SCHED_ENV}
    if sched is not None:
        env[node.SCHED_ENV] = sched
    proc = subprocess.Popen(agent_cmd(f"tcp://127.0.0.1:{port}", "--timeout", "10"), env=env)
    try:
        assert r.poll(10000)  # its HELLO: the socket loop and ZeroMQ's threads are up
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) >= 3  # the socket loop, the compute thread, ZeroMQ's I/O thread
        assert {os.sched_getscheduler(t) for t in tids} == {getattr(os, policy)}
    finally:
        proc.kill()
        proc.wait()
        r.close()
        ctx.term()


def test_the_local_backend_asks_for_batch_scheduling_only_when_processes_outnumber_cores(
        monkeypatch):
    from orchestrator.providers.local import agent_env

    monkeypatch.delenv(node.SCHED_ENV, raising=False)
    assert agent_env(8, cpus=2)[node.SCHED_ENV] == "batch"
    assert agent_env(2, cpus=2)[node.SCHED_ENV] == "batch"  # 2 agents and the master
    assert node.SCHED_ENV not in agent_env(1, cpus=2)
    assert node.SCHED_ENV not in agent_env(8, cpus=16)
    assert agent_env(1, cpus=2)["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv(node.SCHED_ENV, "normal")  # a benchmark's baseline wins
    assert agent_env(8, cpus=2)[node.SCHED_ENV] == "normal"
