"""The local backend (ZeroMQ master + agent processes) against sim: same rel_error, bytes
that are the payloads plus a fixed framing overhead, every process stopped cleanly."""

import json

import numpy as np
import pytest

from orchestrator.config import from_dict
from orchestrator.providers import DEFAULT_BACKEND, open_pool
from orchestrator.results import read_metrics
from orchestrator.runner import run_experiment
from worker import protocol

D, N, M = 20, 1000, 3  # 3 workers do not divide n = 1000

BASE = {
    "problem": {"d": D, "n": N, "seed": 3},
    "train": {"rounds": 25, "batch_size": 16, "lr": 0.5, "target_rel_error": 0},
    # liveness 10: a machine busy with other tests must not make a worker look lost here
    "cluster": {"workers": M, "heartbeat_interval": 0.2, "heartbeat_liveness": 10,
                "connect_timeout": 20},
}
SWEEP = {
    "cluster.topology": ["ps", "allgather", "broadcast"],
    "cluster.workers": [M, 2],
    "compress": [
        {"scheme": "none"},
        {"scheme": "qsgd", "levels": 4, "coding": "elias"},
        {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 8},
    ],
}


def experiment(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for sec, vals in sections.items():
        data[sec] = {**data.get(sec, {}), **vals}
    return from_dict(data, "engine")


def run(exp, backend, out):
    with open_pool(backend, exp) as pool:
        path = run_experiment(exp, pool, out, backend, progress=lambda line: None)
        procs = list(getattr(pool, "processes", []))
    return path, procs


def test_local_is_the_default_backend():
    assert DEFAULT_BACKEND == "local"


def test_local_reproduces_sim_for_all_topologies_codings_and_worker_counts(tmp_path):
    exp = experiment(sweep=SWEEP)
    sim_path, _ = run(exp, "sim", tmp_path / "sim")
    loc_path, procs = run(exp, "local", tmp_path / "local")
    sim, loc = read_metrics(sim_path / "metrics.csv"), read_metrics(loc_path / "metrics.csv")
    trials = exp.trials()
    assert len(trials) == 18 and len(loc["rel_error"]) == 18 * 25
    np.testing.assert_array_equal(loc["trial"], sim["trial"])
    np.testing.assert_array_equal(loc["round"], sim["round"])
    np.testing.assert_array_equal(loc["rel_error"], sim["rel_error"])  # bit for bit
    np.testing.assert_array_equal(loc["loss"], sim["loss"])
    assert loc["rel_error"][-1] < 0.1  # and it did learn something

    for t in trials:
        s = t.spec
        rows = loc["trial"] == t.index
        up, down = loc["bytes_up"][rows], loc["bytes_down"][rows]
        sim_up, sim_down = sim["bytes_up"][rows], sim["bytes_down"][rows]
        # up: exactly the payloads plus one fixed-size header per worker
        np.testing.assert_array_equal(up, sim_up + s.workers * protocol.GRADIENT_HEADER)
        if s.scheme == "none":
            assert (up == s.workers * (4 * D + protocol.GRADIENT_HEADER)).all()
        if s.topology == "ps":
            np.testing.assert_array_equal(down, s.workers * (4 * D + protocol.ROUND_HEADER))
        elif s.topology == "broadcast":  # the same update to each, one padded header each
            np.testing.assert_array_equal(down, sim_down + s.workers * protocol.ROUND_HEADER)
            if s.scheme == "qsgd":
                assert (sim_down[1:] < s.workers * 4 * D).all()  # compressed, not float32
        else:  # relayed payloads plus a small header (it lists the ranks)
            overhead = down - sim_down
            assert (overhead > 0).all() and (overhead < s.workers * 100).all()
        assert (loc["t_compute"][rows] > 0).all() and (loc["t_network"][rows] >= 0).all()

    summary = json.loads((loc_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["backend"] == "local"
    assert [tr["status"] for tr in summary["trials"]] == ["completed"] * 18
    # every agent got STOP and exited by itself (not terminated, not killed)
    assert len(procs) == M and [p.returncode for p in procs] == [0] * M


def test_online_setting_and_early_stop_match_sim(tmp_path):
    exp = experiment(problem={"n": 0}, train={"rounds": 400, "target_rel_error": 1e-3},
                     compress={"scheme": "qsgd", "levels": 8})
    sim_path, _ = run(exp, "sim", tmp_path / "sim")
    loc_path, _ = run(exp, "local", tmp_path / "local")
    sim, loc = read_metrics(sim_path / "metrics.csv"), read_metrics(loc_path / "metrics.csv")
    np.testing.assert_array_equal(loc["rel_error"], sim["rel_error"])
    assert loc["rel_error"][-1] <= 1e-3 and len(loc["round"]) < 400


@pytest.mark.parametrize("topology", ["ps", "allreduce"])
def test_online_batches_drawn_ahead_by_the_agents_match_sim(tmp_path, topology):
    """Large enough online batches are drawn a round ahead on the agents (not in sim): the
    runs still agree bit for bit, over two trials one after another (each node closes the
    last trial's drawing thread)."""
    from worker import node

    exp = experiment(problem={"n": 0, "d": 1 << 16}, cluster={"topology": topology},
                     train={"rounds": 6, "batch_size": 16, "lr": 1e-5},
                     sweep={"train.rounds": [6, 3]})
    assert (1 << 16) * 16 >= node.DRAW_AHEAD_MIN
    sim_path, _ = run(exp, "sim", tmp_path / "sim")
    loc_path, _ = run(exp, "local", tmp_path / "local")
    sim, loc = read_metrics(sim_path / "metrics.csv"), read_metrics(loc_path / "metrics.csv")
    assert len(loc["rel_error"]) == 9
    np.testing.assert_array_equal(loc["rel_error"], sim["rel_error"])


def test_a_missing_worker_is_a_clear_error_naming_its_rank(tmp_path):
    from orchestrator.errors import RunError
    from orchestrator.master import ZmqPool

    pool = ZmqPool("tcp://127.0.0.1:*", workers=2, heartbeat_interval=0.1)
    try:
        with pytest.raises(RunError, match=r"2 of 2 workers did not connect .*ranks: 0, 1"):
            pool.wait_for_workers(0.3)
    finally:
        pool.close()


def test_gradients_that_do_not_fit_the_trial_are_refused_before_aggregation():
    from orchestrator.master import check_payload
    from worker.node import TrialSpec
    from worker.protocol import ProtocolError

    fp32 = TrialSpec(d=10, scheme="none")
    check_payload(b"\0" * 40, fp32)
    with pytest.raises(ProtocolError):
        check_payload(b"\0" * 39, fp32)
    q = TrialSpec(d=10, scheme="qsgd", levels=4)
    import numpy as np

    from worker import node

    good = node.encode_gradient(np.ones(10), q, np.random.default_rng(0))
    check_payload(good, q)
    for bad in (b"", b"QSGD", b"XXXX" + good[4:], node.encode_gradient(
            np.ones(11), TrialSpec(d=11, scheme="qsgd", levels=4), np.random.default_rng(0))):
        with pytest.raises(ProtocolError):
            check_payload(bad, q)


def test_an_undecodable_gradient_fails_the_trial_instead_of_crashing_the_run():
    from orchestrator.trial import SimPool, run_trial

    class Corrupting(SimPool):
        def exchange(self, round_, down, relay):
            ex = super().exchange(round_, down, relay)
            if round_ == 3:
                ex.replies[0].payload = ex.replies[0].payload[:24]  # header intact, body cut
            return ex

    spec = experiment(compress={"scheme": "qsgd", "levels": 4}).trials()[0].spec
    res = run_trial(spec, Corrupting(), lambda row: None)
    assert res.status == "failed" and "undecodable gradient in round 3" in res.reason
