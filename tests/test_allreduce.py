"""The ``allreduce`` topology: compressed scatter-reduce + allgather between the workers.

sim: the chunk plan, replicas equal to the master's weights every round, float32 equal to
``broadcast`` float32, the payload sizes. local (real agent processes talking to each other
over ZeroMQ): bit for bit equal to sim in odd cases (M = 3 and 5, d divisible by neither M
nor the bucket, empty chunks), the byte counts against their formula, a worker SIGKILLed
mid-round under both loss policies, and a peer without the run's CurveZMQ keys refused.

The replicas of the local agents are not read directly: each worker takes its gradient at
its own replica, so a replica that parted from the master's weights would change the next
round's gradients and with them ``rel_error``, which is compared with sim's bit for bit.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq
from test_engine_faults import QUIET, alive, experiment, sim_rel_errors

from orchestrator.config import from_dict
from orchestrator.providers import open_pool
from orchestrator.results import load_run, read_metrics
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool, run_trial
from worker import curve, node, peers, protocol, qsgd, relu
from worker.node import TrialSpec


def spec(**kw) -> TrialSpec:
    base = dict(d=23, n=900, seed=4, rounds=40, batch_size=8, lr=0.4, target_rel_error=0,
                scheme="qsgd", levels=8, coding="fixed", bucket_size=0, workers=3,
                topology="allreduce")
    return TrialSpec(**{**base, **kw})


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize("d", [1, 7, 23, 100, 1000])
@pytest.mark.parametrize("bucket", [0, 1, 4, 8, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_chunks_tile_the_vector_on_bucket_boundaries(d, bucket, m):
    for scheme in ("none", "qsgd"):
        b = node.chunk_bounds(spec(d=d, bucket_size=bucket, scheme=scheme), m)
        assert len(b) == m and b[0][0] == 0 and b[-1][1] == d
        assert all(lo <= hi for lo, hi in b) and all(b[i][1] == b[i + 1][0] for i in range(m - 1))
        sizes = [hi - lo for lo, hi in b]
        if scheme == "qsgd" and 0 < bucket < d:
            assert all(lo % bucket == 0 for lo, _ in b)  # cuts on bucket boundaries
            assert max(sizes) - min(sizes) <= bucket  # as even as whole buckets allow
        else:
            assert max(sizes) - min(sizes) <= 1  # even cuts


def test_assemble_refuses_a_payload_that_does_not_fit_its_chunk():
    s = spec(d=10, workers=2, scheme="none")
    good = [np.ones(5, "<f4").tobytes(), np.ones(5, "<f4").tobytes()]
    assert (node.assemble(good, s) == 1).all()
    with pytest.raises(ValueError):
        node.assemble([good[0], np.ones(6, "<f4").tobytes()], s)
    empty = spec(d=8, bucket_size=4, workers=3)  # 2 buckets over 3 members: one empty chunk
    assert [hi - lo for lo, hi in node.chunk_bounds(empty, 3)] == [0, 4, 4]
    with pytest.raises(ValueError, match="empty chunk"):
        node.assemble([b"x", b"", b""], empty)


@pytest.mark.parametrize("coding", ["fixed", "elias", "none"])
def test_assemble_decodes_the_chunks_together_as_one_by_one(coding):
    s = (spec(d=1003, workers=5, scheme="none") if coding == "none" else
         spec(d=1000, workers=5, levels=15, coding=coding, bucket_size=64))
    bounds = node.chunk_bounds(s, 5)
    assert len({hi - lo for lo, hi in bounds}) > 1  # chunks of more than one shape
    rng = np.random.default_rng(1)
    means = [node.encode_gradient(rng.standard_normal(hi - lo), node.chunk_spec(s, lo, hi), rng)
             for lo, hi in bounds]
    want = np.concatenate([node.decode_gradient(p, node.chunk_spec(s, lo, hi))
                           for (lo, hi), p in zip(bounds, means, strict=True)])
    assert node.assemble(means, s).tobytes() == want.tobytes()
    lo, hi = bounds[2]
    kept = means[:2] + [want[lo:hi]] + means[3:]  # our own mean chunk, kept as a vector
    assert node.assemble(kept, s).tobytes() == want.tobytes()


# ---------------------------------------------------------------- sim


class ReplicaProbe(SimPool):
    """Records, each round, every worker replica's weights before the round's gradients."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def exchange(self, round_, down, relay):
        ex = super().exchange(round_, down, relay)
        self.seen.append([nd.w.copy() for nd in self.nodes])
        return ex


class MasterWeights(SimPool):
    """Also records the master's weights each round, from the mean chunks it receives."""

    def __init__(self, s):
        super().__init__()
        self.w, self.spec, self.history = np.zeros(s.d), s, []

    def exchange(self, round_, down, relay):
        ex = super().exchange(round_, down, relay)
        self.history.append(self.w.copy())  # the weights this round's gradients were taken at
        self.w = self.w - self.spec.lr * node.assemble([r.payload for r in ex.replies],
                                                        self.spec)
        return ex


@pytest.mark.parametrize("kw", [
    {"scheme": "none"},
    {"coding": "elias", "levels": 4},
    {"coding": "fixed", "levels": 16, "bucket_size": 4},
    {"coding": "fixed", "levels": 16, "bucket_size": 8, "workers": 5},  # empty chunks
])
def test_replicas_hold_the_masters_weights_every_round(kw):
    s = spec(**kw)
    probe = MasterWeights(s)
    rows = []
    res = run_trial(s, probe, rows.append)
    assert res.status == "completed" and rows[-1].rel_error < 0.05
    w_star = relu.planted_weights(s.d, s.seed)
    for r, row in enumerate(rows):
        assert relu.rel_error(probe.w if r == len(rows) - 1 else probe.history[r + 1],
                              w_star) == row.rel_error
    replicas = ReplicaProbe()
    run_trial(s, replicas, lambda row: None)
    for r in range(1, len(rows)):
        for w in replicas.seen[r]:  # taken at the master's weights after round r - 1
            np.testing.assert_array_equal(w, probe.history[r])


def test_float32_allreduce_is_float32_broadcast_bit_for_bit():
    """Same sum (rank order), same mean, same float32 rounding: only the path differs."""
    a, b = [], []
    run_trial(spec(scheme="none"), SimPool(), a.append)
    run_trial(spec(scheme="none", topology="broadcast"), SimPool(), b.append)
    assert [r.rel_error for r in a] == [r.rel_error for r in b]


@pytest.mark.parametrize("m", [3, 5])
def test_sim_bytes_are_the_payloads(m):
    s = spec(workers=m, scheme="none")
    rows = []
    run_trial(s, SimPool(), rows.append)
    # float32: the master gets the d coordinates once; each worker sends every other one its
    # part of that one's chunk, and its mean chunk to every other one: 2 (M - 1) 4d in all
    assert all(r.bytes_up == 4 * s.d and r.bytes_down == 0 for r in rows)
    assert all(r.bytes_peer == 2 * (m - 1) * 4 * s.d for r in rows)
    q = spec(d=400, workers=m, bucket_size=16, rounds=5)
    rows = []
    run_trial(q, SimPool(), rows.append)
    chunk = sum(qsgd.fixed_payload_bytes(hi - lo, q.levels, q.bucket_size)
                for lo, hi in node.chunk_bounds(q, m) if hi > lo)
    assert all(r.bytes_up == chunk and r.bytes_peer == 2 * (m - 1) * chunk for r in rows)
    assert chunk < 4 * q.d  # compressed


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_the_masters_link_carries_at_most_125_percent_of_one_compressed_gradient(m):
    """Issue 12's target, from the sim's payloads and the fixed headers every backend adds:
    the M mean chunks up (a GRADIENT header each) and a plan-less ROUND down per worker."""
    q = spec(d=10_000, n=0, workers=m, levels=15, bucket_size=128, rounds=3)
    rows = []
    run_trial(q, SimPool(), rows.append)
    one = qsgd.fixed_payload_bytes(q.d, q.levels, q.bucket_size)
    master = [r.bytes_up + r.bytes_down + m * (protocol.GRADIENT_HEADER + protocol.ROUND_HEADER)
              for r in rows[1:]]  # round 0's ROUND carries the plan (JSON, once a trial)
    assert max(master) <= 1.25 * one
    assert protocol.GRADIENT_HEADER + protocol.ROUND_HEADER == 52


def test_the_mean_chunk_is_quantized_from_its_own_generator():
    """The second quantization of chunk j in round r draws from (seed, r, j) alone, so any
    worker that owns the chunk makes the same payload."""
    s = spec(d=40, workers=2, levels=2)
    a, b = node.WorkerNode(s, 0), node.WorkerNode(s, 1)
    pa, _ = a.scatter(np.zeros(s.d), 0, [0, 1])
    pb, _ = b.scatter(np.zeros(s.d), 0, [0, 1])
    m1 = a.reduce(7, [0, 1], [None, pb[0]])
    m2 = a.reduce(7, [0, 1], [None, pb[0]])
    m3 = a.reduce(8, [0, 1], [None, pb[0]])
    assert m1 == m2 and m1 != m3


# ---------------------------------------------------------------- local: real processes


ODD = {
    "problem": {"d": 23, "n": 900, "seed": 4},
    "train": {"rounds": 20, "batch_size": 8, "lr": 0.4, "target_rel_error": 0},
    "cluster": {"workers": 5, "topology": "allreduce", "heartbeat_interval": 0.2,
                "heartbeat_liveness": 10, "connect_timeout": 20},
    "sweep": {
        "cluster.workers": [3, 5],
        "compress": [
            {"scheme": "none"},
            {"scheme": "qsgd", "levels": 4, "coding": "elias"},
            {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 8},
        ],
    },
}


def test_local_allreduce_reproduces_sim_in_odd_cases_and_counts_its_bytes(tmp_path):
    exp = from_dict(ODD, "allreduce")
    paths = {}
    for backend in ("sim", "local"):
        with open_pool(backend, exp) as pool:
            paths[backend] = run_experiment(exp, pool, tmp_path / backend, backend, **QUIET)
            procs = list(getattr(pool, "processes", []))
    sim = read_metrics(paths["sim"] / "metrics.csv")
    loc = read_metrics(paths["local"] / "metrics.csv")
    assert len(loc["rel_error"]) == 6 * 20
    np.testing.assert_array_equal(loc["rel_error"], sim["rel_error"])  # bit for bit
    assert loc["rel_error"][-1] < 0.5
    for t in exp.trials():
        s, rows = t.spec, loc["trial"] == t.index
        k = sum(hi > lo for lo, hi in node.chunk_bounds(s, s.workers))  # non-empty chunks
        if s.bucket_size and s.workers == 5:
            assert k == 3  # 23 coordinates are 3 buckets of 8: two members own nothing
        np.testing.assert_array_equal(
            loc["bytes_up"][rows], sim["bytes_up"][rows] + s.workers * protocol.GRADIENT_HEADER)
        # round 0's ROUND also carries the plan (ranks, epoch 0), the others only the round
        plan = protocol.build(protocol.ROUND, pad=protocol.ROUND_HEADER, trial=t.index,
                              round=0, ranks=list(range(s.workers)), epoch=0)
        down = loc["bytes_down"][rows]
        assert down[0] == s.workers * len(plan[0])
        assert (down[1:] == s.workers * protocol.ROUND_HEADER).all()
        # PARTs to the k owners from the others, MEANs from the k owners to the others
        np.testing.assert_array_equal(
            loc["bytes_peer"][rows],
            sim["bytes_peer"][rows] + 2 * k * (s.workers - 1) * protocol.PEER_HEADER)
    summary = load_run(paths["local"])["summary"]
    assert [tr["status"] for tr in summary["trials"]] == ["completed"] * 6
    assert summary["trials"][0]["total_bytes_peer"] == int(loc["bytes_peer"][loc["trial"] == 0]
                                                           .sum())
    assert [p.returncode for p in procs] == [0] * 5  # every agent got STOP and left


def test_local_allreduce_runs_ahead_and_quietly_drops_the_round_a_stopped_trial_left(
        tmp_path, capfd, caplog):
    """The master announces round r + 1 as soon as round r's replies are in. A trial that
    stops at its target so leaves one round started: the next trial is not disturbed, its
    results equal sim's, and nobody logs the late messages as foreign."""
    raw = {**ODD, "train": {**ODD["train"], "rounds": 400, "target_rel_error": 0.05},
           "sweep": {"compress": ODD["sweep"]["compress"]}}
    raw["cluster"] = {**ODD["cluster"], "workers": 3}
    exp = from_dict(raw, "ahead")
    caplog.set_level("WARNING")
    runs = {}
    for backend in ("sim", "local"):
        with open_pool(backend, exp) as pool:
            runs[backend] = load_run(run_experiment(exp, pool, tmp_path / backend, backend,
                                                    **QUIET))
            abandoned = getattr(pool, "abandoned", None)
    assert abandoned is not None and abandoned[0] == 2  # the last trial stopped ahead too
    sim, loc = runs["sim"], runs["local"]
    assert [t["reached_target"] for t in loc["summary"]["trials"]] == [True] * 3
    np.testing.assert_array_equal(loc["metrics"]["rel_error"], sim["metrics"]["rel_error"])
    assert 3 < len(loc["metrics"]["rel_error"]) < 3 * 400
    assert "dropped" not in capfd.readouterr().err  # the agents'
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]  # the master's


class KillMidRound:
    """A pool that SIGKILLs ``rank``'s agent while round ``round_`` is under way."""

    def __init__(self, pool, round_, rank):
        self.pool, self.round, self.rank = pool, round_, rank

    @property
    def run_ahead(self):
        return self.pool.run_ahead

    @run_ahead.setter
    def run_ahead(self, value):  # the pool goes ahead as in a real run
        self.pool.run_ahead = value

    def start_trial(self, s, resume=None):
        self.pool.start_trial(s, resume)

    def states(self, round_):
        return self.pool.states(round_)

    def exchange(self, round_, down, relay):
        if round_ == self.round:
            pid = self.pool.by_rank[self.rank].pid
            threading.Timer(0.002, os.kill, (pid, signal.SIGKILL)).start()
        return self.pool.exchange(round_, down, relay)

    def end_trial(self):
        self.pool.end_trial()


@pytest.mark.parametrize("policy", ["continue", "abort"])
def test_a_worker_sigkilled_mid_round(tmp_path, policy):
    exp = experiment(cluster={"on_worker_loss": policy, "topology": "allreduce"},
                     problem={"d": 200, "n": 3000}, train={"batch_size": 32, "lr": 0.2},
                     sweep={"repeats": 2})
    with open_pool("local", exp) as pool:
        victim = pool.by_rank[1].pid
        t = time.monotonic()
        path = run_experiment(exp, KillMidRound(pool, 10, 1), tmp_path, "local", **QUIET)
        took = time.monotonic() - t
    assert took < 60  # nobody hung
    run = load_run(path)
    t0, t1 = run["summary"]["trials"]
    events = (path / "events.log").read_text()
    # The workers run one round ahead of the master: round 10 may be done when the kill
    # lands (2 ms after exchange(10) is called), and then the loss cuts round 11 short.
    k = next(r for r in (10, 11) if f"trial 0 round {r}: worker 1 lost" in events)
    assert not alive(victim)
    rows = run["metrics"]
    first = rows["trial"] == 0
    np.testing.assert_array_equal(rows["rel_error"][first][:k],
                                  sim_rel_errors(exp, tmp_path)[:k])
    if policy == "continue":
        assert t0["status"] == "completed" and t0["rounds"] == 30 and t0["lost_workers"] == [1]
        assert (rows["workers"][first][:k] == 3).all() and (rows["workers"][first][k:] == 2).all()
        # round k was cut short and run again over ranks 0 and 2, from the master's weights
        assert rows["bytes_down"][first][k] >= 2 * 8 * 200
        assert rows["rel_error"][first][-1] < rows["rel_error"][first][k - 1]  # still learning
        assert t1["status"] == "completed" and t1["lost_workers"] == [1]
    else:
        assert t0["status"] == "failed" and t0["rounds"] == k
        assert f"worker 1 lost in round {k}" in t0["reason"] and "abort" in t0["reason"]
        assert first.sum() == k
        assert t1["status"] == "failed"


def test_a_peer_nobody_can_reach_fails_the_trial_with_its_address_instead_of_a_hang(tmp_path):
    """Agent 1 announces a peer address where it does not listen (as behind a firewall):
    the others cannot connect to it, say so within --timeout, and the trial fails naming
    the endpoint, where it used to wait for its parts forever."""
    import subprocess

    from orchestrator.master import ZmqPool
    from orchestrator.providers.local import agent_argv, stop_processes

    exp = experiment(cluster={"topology": "allreduce", "on_worker_loss": "abort"},
                     problem={"d": 40, "n": 600})
    pool = ZmqPool.for_experiment(exp, "tcp://127.0.0.1:*")
    procs = []
    try:
        for rank in range(exp.cluster.workers):
            extra = ["--peer-host", "127.0.0.3"] if rank == 1 else []  # it binds 127.0.0.1
            procs.append(subprocess.Popen(agent_argv(pool.endpoint, rank, 3) + extra,
                                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          start_new_session=True))
        pool.processes = procs
        pool.wait_for_workers(20)
        t = time.monotonic()
        path = run_experiment(exp, pool, tmp_path, "local", **QUIET)
        took = time.monotonic() - t
    finally:
        pool.close()
        stop_processes(procs)
    assert took < 30  # the 3 s --timeout, not a hang
    trial = load_run(path)["summary"]["trials"][0]
    assert trial["status"] == "failed"
    assert "cannot connect to peer(s) 1 at tcp://127.0.0.3:" in trial["reason"]
    assert "5556-5655" in trial["reason"]
    # agents 0 and 2 both try to reach 1; whichever gives up first fails the trial (the
    # master may stop the other before its own deadline)
    said = [(p.returncode, p.stderr.read().decode()) for p in (procs[0], procs[2])]
    told = [(code, err) for code, err in said
            if "cannot connect to peer(s) 1 at tcp://127.0.0.3:" in err]
    assert told and all(code == 4 for code, _ in told), said  # EXIT_PEER_UNREACHABLE


# ---------------------------------------------------------------- peer sockets


def test_a_peer_without_the_runs_keys_cannot_inject(tmp_path):
    """An agent's peer ROUTER with CurveZMQ: the run's agent keys get a PART through; a
    client with other keys, or none, gets nothing through."""
    keys = curve.create_keys(tmp_path / "run")
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    for name in (curve.SERVER_PUBLIC, curve.CLIENT_SECRET):
        (agent_dir / name).write_bytes((keys / name).read_bytes())
        (agent_dir / name).chmod(0o600)
    other = curve.create_keys(tmp_path / "other")
    ctx, sender_ctx = zmq.Context(), zmq.Context()  # two agents: a context each
    receiver = peers.Peers(ctx, "tcp://127.0.0.1:*", 1 << 20, str(agent_dir))
    sender = peers.Peers(sender_ctx, "tcp://127.0.0.1:*", 1 << 20, str(agent_dir))
    intruders = []
    try:
        endpoint = f"tcp://127.0.0.1:{receiver.port}"
        sender.connect(1, [endpoint, None])
        for key_dir in (other, None):  # someone else's keys; no keys at all
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, b"p1-0-intruder")
            if key_dir is not None:
                pub, sec = curve.load_key(key_dir / curve.CLIENT_SECRET, secret=True)
                s.curve_secretkey, s.curve_publickey = sec, pub
                s.curve_serverkey = curve.load_key(agent_dir / curve.CLIENT_SECRET, True)[0]
            s.connect(endpoint)
            intruders.append(s)
        frames = lambda tag: protocol.build(  # noqa: E731
            protocol.PART, [tag], trial=0, round=0, epoch=0, rank=1)
        for s in intruders:
            s.send_multipart(frames(b"evil"), flags=zmq.NOBLOCK)
        assert sender.send(0, frames(b"good")) > 0
        got, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and len(got) < 3:
            if receiver.router.poll(100):
                got += receiver.receive()
        assert [(rank, bytes(m.payloads[0])) for rank, m in got] == [(1, b"good")]
    finally:
        for s in intruders:
            s.close(linger=0)
        sender.close()
        receiver.close()
        ctx.term()
        sender_ctx.term()


def test_a_peer_message_claiming_another_rank_is_dropped():
    ctx = zmq.Context()
    receiver = peers.Peers(ctx, "tcp://127.0.0.1:*", 1 << 20)
    liar = ctx.socket(zmq.DEALER)
    try:
        liar.setsockopt(zmq.ROUTING_ID, b"p2-1-x")
        liar.connect(f"tcp://127.0.0.1:{receiver.port}")
        for rank, payload in ((0, b"lie"), (2, b"truth")):
            liar.send_multipart(protocol.build(protocol.MEAN, [payload], trial=0, round=0,
                                               epoch=0, rank=rank))
        liar.send_multipart([b"not json", b"x"])
        got, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and not got:
            if receiver.router.poll(100):
                got += receiver.receive()
        assert [(r, bytes(m.payloads[0])) for r, m in got] == [(2, b"truth")]
    finally:
        liar.close(linger=0)
        receiver.close()
        ctx.term()


@pytest.mark.parametrize("bind, want", [
    ("tcp://127.0.0.1:*", ("127.0.0.1", None, None)),
    ("tcp://0.0.0.0:5556-5655", ("0.0.0.0", 5556, 5655)),
    ("tcp://10.0.0.5:6000", ("10.0.0.5", 6000, 6000)),
])
def test_peer_bind_parses(bind, want):
    assert peers.parse_bind(bind) == want


@pytest.mark.parametrize("bind", ["udp://x:1", "tcp://h:0", "tcp://h:9-3", "tcp://h:70000",
                                  "tcp://a b:1"])
def test_bad_peer_bind_is_a_clear_error(bind):
    with pytest.raises(peers.PeerBindError, match="--peer-bind"):
        peers.parse_bind(bind)


def test_peers_listen_on_loopback_for_a_loopback_master_and_in_relufits_ports_otherwise():
    assert peers.default_bind("tcp://127.0.0.1:40000") == "tcp://127.0.0.1:*"
    assert peers.default_bind("tcp://10.1.2.3:5555") == "tcp://0.0.0.0:5556-5655"


def test_every_worker_lost_fails_the_trial_instead_of_planning_over_no_one(tmp_path):
    exp = experiment(cluster={"workers": 2, "topology": "allreduce"})
    with open_pool("local", exp) as pool:
        for w in pool.by_rank.values():
            os.kill(w.pid, signal.SIGKILL)
        path = run_experiment(exp, pool, tmp_path, "local", **QUIET)
    [trial] = load_run(path)["summary"]["trials"]
    assert trial["status"] == "failed" and "no worker left" in trial["reason"]
