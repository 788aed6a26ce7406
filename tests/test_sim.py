"""The sim backend end to end: the round loop, the run directory, the CLI."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.config import from_dict
from orchestrator.results import load_run
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool, run_trial
from worker import node, relu
from worker.node import TrialSpec

SMALL = {
    "problem": {"d": 20, "n": 400, "seed": 1},
    "train": {"rounds": 300, "batch_size": 16, "lr": 0.5, "target_rel_error": 1e-6},
    "compress": {"scheme": "none"},
    "cluster": {"workers": 3},
}


def exp(**sections):
    data = {k: dict(v) for k, v in SMALL.items()}
    for sec, vals in sections.items():
        data[sec] = {**data.get(sec, {}), **vals}
    return from_dict(data, "t")


def run_rows(e):
    rows = []
    res = run_trial(e.trials()[0].spec, SimPool(), rows.append)
    return res, rows


def by_hand(spec):
    """What a hand-written loop over 3 workers needs: w*, the shards, the batch generators."""
    w_star = relu.planted_weights(spec.d, spec.seed)
    shards = [relu.shard(spec.d, spec.n, spec.seed, r, 3) for r in range(3)]
    return w_star, shards, [relu.batch_rng(spec.seed, r) for r in range(3)]


def test_sim_matches_a_hand_written_sgd_loop():
    e = exp(train={"rounds": 30, "target_rel_error": 0})
    res, rows = run_rows(e)
    spec = e.trials()[0].spec
    w_star, shards, rngs = by_hand(spec)
    w = np.zeros(spec.d)
    for row in rows:
        w32 = w.astype(np.float32).astype(np.float64)
        gs = []
        for (X, y), rng in zip(shards, rngs, strict=True):
            g = relu.gradient(w32, *relu.minibatch(X, y, spec.batch_size, rng))
            gs.append(g.astype(np.float32).astype(np.float64))
        w = w - spec.lr * (sum(gs) / 3)
        assert row.rel_error == pytest.approx(relu.rel_error(w, w_star), rel=1e-12)
    assert res.rounds == 30 and res.status == "completed"


def test_sim_reaches_target_and_stops_early_with_fp32_byte_counts():
    res, rows = run_rows(exp())
    assert res.reached_target and res.status == "completed"
    assert res.rounds < 300 and rows[-1].rel_error <= 1e-6 < rows[-2].rel_error
    assert all(r.bytes_up == 3 * 4 * 20 and r.bytes_down == 3 * 4 * 20 for r in rows)


def test_sim_allgather_converges_and_counts_relayed_bytes():
    res, rows = run_rows(exp(cluster={"topology": "allgather"}))
    assert res.reached_target
    assert rows[0].bytes_down == 0  # nothing to relay before the first gradients
    assert rows[1].bytes_down == 3 * 2 * 4 * 20  # each worker gets the 2 others' gradients


class ReplicaProbe(SimPool):
    """SimPool that records, each round, every worker replica's rel_error after its update."""

    def __init__(self, w_star):
        super().__init__()
        self.w_star, self.seen = w_star, []

    def exchange(self, round_, down, relay):
        ex = super().exchange(round_, down, relay)
        self.seen.append([relu.rel_error(nd.w, self.w_star) for nd in self.nodes])
        return ex


@pytest.mark.parametrize("compress", [
    {"scheme": "none"},
    {"scheme": "qsgd", "levels": 4, "coding": "elias"},
    {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 8},
])
def test_broadcast_replicas_take_the_masters_exact_step(compress):
    e = exp(cluster={"topology": "broadcast"}, compress=compress, train={"lr": 0.3})
    spec = e.trials()[0].spec
    pool, rows = ReplicaProbe(relu.planted_weights(spec.d, spec.seed)), []
    res = run_trial(spec, pool, rows.append)
    assert res.reached_target
    assert rows[0].bytes_down == 0  # no mean before the first gradients
    for r in range(1, len(rows)):
        # in round r every replica holds the master's weights after round r - 1, bit for bit
        assert pool.seen[r] == [rows[r - 1].rel_error] * 3
    if compress["scheme"] == "none":
        assert all(r.bytes_down == 3 * 4 * 20 for r in rows[1:])  # the float32 mean, to each
    else:
        assert all(r.bytes_down < 3 * 4 * 20 for r in rows[1:])  # the downlink is compressed too


@pytest.mark.parametrize("compress", [
    {"scheme": "none"},
    {"scheme": "qsgd", "levels": 4, "coding": "elias"},
    {"scheme": "qsgd", "levels": 16, "coding": "fixed", "bucket_size": 8},
])
def test_allgather_replicas_add_their_own_kept_vector_exactly_as_the_master_decodes_it(compress):
    """A worker does not decode its own payload (it keeps encode_exact's vector); the replicas
    still hold the master's weights of the round before, bit for bit."""
    e = exp(cluster={"topology": "allgather"}, compress=compress, train={"lr": 0.3})
    spec = e.trials()[0].spec
    pool, rows = ReplicaProbe(relu.planted_weights(spec.d, spec.seed)), []
    res = run_trial(spec, pool, rows.append)
    assert res.reached_target
    for r in range(1, len(rows)):
        assert pool.seen[r] == [rows[r - 1].rel_error] * 3


def test_a_replica_cannot_apply_its_own_gradient_before_sending_one():
    from worker.node import SpecError, WorkerNode

    nd = WorkerNode(exp(cluster={"topology": "allgather"}).trials()[0].spec, 0)
    with pytest.raises(SpecError, match="before we sent one"):
        nd.apply([None, b"x"])


def test_broadcast_float32_matches_a_hand_written_loop():
    e = exp(cluster={"topology": "broadcast"}, train={"rounds": 30, "target_rel_error": 0})
    _, rows = run_rows(e)
    spec = e.trials()[0].spec
    w_star, shards, rngs = by_hand(spec)
    w = np.zeros(spec.d)
    for row in rows:
        gs = [relu.gradient(w, *relu.minibatch(X, y, spec.batch_size, rng)).astype(np.float32)
              for (X, y), rng in zip(shards, rngs, strict=True)]
        mean = (sum(g.astype(np.float64) for g in gs) / 3).astype(np.float32)  # sent as float32
        w = w - spec.lr * mean.astype(np.float64)
        assert row.rel_error == pytest.approx(relu.rel_error(w, w_star), rel=1e-12)


def test_online_setting_n_zero_converges():
    res, _ = run_rows(exp(problem={"n": 0}))
    assert res.reached_target


def test_divergence_is_a_failed_trial_with_a_reason():
    res, rows = run_rows(exp(train={"lr": 50.0, "rounds": 200}))
    assert res.status == "failed" and "lr" in res.reason


def test_run_directory_contents(tmp_path):
    e = from_dict({**SMALL, "sweep": {"cluster.workers": [1, 2], "repeats": 2}}, "dir")
    path = run_experiment(e, SimPool(), tmp_path, "sim", progress=lambda s: None)
    run = load_run(path)
    summary = run["summary"]
    assert summary["status"] == "completed" and len(summary["trials"]) == 4
    assert [t["spec"]["seed"] for t in summary["trials"]] == [1, 2, 1, 2]
    for t in summary["trials"]:
        assert t["status"] == "completed" and t["final_rel_error"] <= 1e-6
        m = run["metrics"]["trial"] == t["trial"]
        assert m.sum() == t["rounds"]
        assert run["metrics"]["bytes_up"][m].sum() == t["total_bytes_up"]
        assert run["metrics"]["rel_error"][m][-1] == t["final_rel_error"]
    assert (
        "workers = 4" not in run["experiment"] and '"cluster.workers" = [1, 2]' in run["experiment"]
    )
    with open(path / "metrics.csv") as f:
        header = next(csv.reader(f))
    for col in ("trial", "round", "elapsed_s", "rel_error", "loss", "bytes_up", "bytes_down"):
        assert col in header
    assert "run completed" in (path / "events.log").read_text()


def test_interrupted_run_keeps_completed_rounds(tmp_path):
    class Boom(SimPool):
        def exchange(self, round_, down, relay):
            if round_ == 5:
                raise KeyboardInterrupt
            return super().exchange(round_, down, relay)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp(), Boom(), tmp_path, "sim", progress=lambda s: None)
    (path,) = tmp_path.iterdir()
    run = load_run(path)
    assert run["summary"]["status"] == "interrupted"
    assert run["summary"]["trials"][0]["status"] == "interrupted"
    assert run["summary"]["trials"][0]["rounds"] == 5
    assert list(run["metrics"]["round"]) == [0, 1, 2, 3, 4]


def test_cli_run_writes_a_run_directory(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text(
        '[problem]\nd = 10\nn = 200\n[compress]\nscheme = "none"\n[cluster]\nworkers = 2\n'
    )
    r = CliRunner().invoke(
        cli,
        [
            "run",
            str(f),
            "--backend",
            "sim",
            "--out",
            str(tmp_path / "out"),
            "--set",
            "train.rounds=50",
        ],
    )
    assert r.exit_code == 0, r.output
    path = tmp_path / "out" / r.stdout.strip().splitlines()[-1].split("/")[-1]
    summary = json.loads((path / "summary.json").read_text())
    assert summary["trials"][0]["spec"]["rounds"] == 50


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "train.lrr=0.1"], "train.lrr"),
        (["--set", "compress.scheme=zip"], "compress.scheme"),
        (["--set", "cluster.workers=0"], "cluster.workers"),
        (["--set", "oops"], "section.key=value"),
        (["--backend", "cloud9"], "--backend"),
    ],
)
def test_cli_bad_input_is_one_line_naming_the_key(tmp_path, args, needle):
    f = tmp_path / "e.toml"
    f.write_text("[problem]\nd = 10\n")
    r = CliRunner().invoke(cli, ["run", str(f), "--out", str(tmp_path / "out"), *args])
    assert r.exit_code != 0
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_cli_missing_file(tmp_path):
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "no such experiment file" in r.output


def test_a_hostile_qsgd_header_claiming_a_huge_d_is_refused_before_allocating():
    from worker import node, qsgd

    spec = exp(compress={"scheme": "qsgd", "levels": 4}).trials()[0].spec
    q = qsgd.quantize(np.zeros(1000), 4, np.random.default_rng(0))
    payload = qsgd.encode(q)  # an all-zero vector of d = 1000: a tiny payload
    with pytest.raises(ValueError):
        node.decode_gradient(payload, spec)  # spec.d = 20


def test_an_interrupt_swallowed_by_a_c_extension_still_ends_the_trial_at_the_next_round():
    from orchestrator.errors import INTERRUPT_REQUESTED, interrupt_handler
    from orchestrator.trial import TrialInterrupted

    with pytest.raises(KeyboardInterrupt):
        interrupt_handler(2, None)  # what Ctrl-C runs; pyzmq may swallow the exception
    assert INTERRUPT_REQUESTED.is_set()
    rows = []
    try:
        with pytest.raises(TrialInterrupted) as e:
            run_trial(exp().trials()[0].spec, SimPool(), rows.append)
        assert e.value.result.status == "interrupted" and rows == []
    finally:
        INTERRUPT_REQUESTED.clear()


def test_an_interrupt_while_a_row_is_handed_on_keeps_rows_and_count_in_step():
    """Ctrl-C landing inside on_round (say, mid CSV write) waits for the row and its count,
    then ends the trial: the result's rounds equal the rows received."""
    from orchestrator.errors import INTERRUPT_REQUESTED, interrupt_handler
    from orchestrator.trial import TrialInterrupted

    rows = []

    def on_round(row):
        if row.round == 5:
            interrupt_handler(2, None)  # the signal arrives before the row is written
        rows.append(row)

    try:
        with pytest.raises(TrialInterrupted) as e:
            run_trial(exp(train={"target_rel_error": 0}).trials()[0].spec, SimPool(), on_round)
        assert e.value.result.rounds == len(rows) == 6
        assert e.value.result.total_bytes_up == sum(r.bytes_up for r in rows)
    finally:
        INTERRUPT_REQUESTED.clear()


@pytest.mark.parametrize("compress", [
    {"scheme": "none"},
    {"scheme": "qsgd", "levels": 16, "coding": "elias", "bucket_size": 128},
    {"scheme": "qsgd", "levels": 15, "coding": "fixed", "bucket_size": 128},
])
def test_decoding_on_threads_adds_the_same_bits_as_decoding_in_turn(monkeypatch, compress):
    import os

    from worker import node

    spec = exp(problem={"d": 3000}, compress=compress, cluster={"workers": 5}).trials()[0].spec
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(spec.d) * 10.0 ** -k for k in range(5)]
    payloads = [node.encode_gradient(g, spec, np.random.default_rng(k))
                for k, g in enumerate(grads)]
    payloads[2] = node.encode_exact(grads[2], spec, np.random.default_rng(2))[1]  # a kept vector
    monkeypatch.setattr(node, "PARALLEL_DECODE_MIN_BYTES", {"elias": 10**9, "fixed": 10**9})
    serial = node.aggregate(payloads, spec)
    one_by_one = np.zeros(spec.d)  # what the batched decode of small payloads must add up to
    for p in payloads:
        one_by_one += p if isinstance(p, np.ndarray) else node.decode_gradient(p, spec)
    assert serial.tobytes() == (one_by_one / len(payloads)).tobytes()
    monkeypatch.undo()  # back to the real thresholds: payloads of a few kB stay in turn
    pools, real = [], node._decoder
    monkeypatch.setattr(node, "_decoder", lambda: pools.append(real()) or pools[-1])
    node.aggregate(payloads, spec)
    assert pools == []
    monkeypatch.setattr(node, "PARALLEL_DECODE_MIN_BYTES", {"elias": 1, "fixed": 1})
    threaded = node.aggregate(payloads, spec)
    assert threaded.tobytes() == serial.tobytes()
    assert len(pools) == (compress["scheme"] == "qsgd")  # float32 is never threaded
    if pools and len(os.sched_getaffinity(0)) > 1:
        assert pools[0][0] is not None and pools[0][1] > 1  # a pool of threads did the work
    bad = list(payloads)
    bad[3] = bytes(payloads[3][:-7]) if compress["scheme"] == "qsgd" else b"\0" * 5
    with pytest.raises(ValueError):
        node.aggregate(bad, spec)


def test_a_forked_child_decodes_on_threads_of_its_own():
    """The decoding threads do not survive fork(); a child that inherited the pool would
    wait on it forever, so it starts without one."""
    import os
    import select
    import signal
    import time

    from worker import node

    spec = exp(problem={"d": 2000}, compress={"scheme": "qsgd", "levels": 4, "coding": "elias"},
               cluster={"workers": 3}).trials()[0].spec
    rng = np.random.default_rng(1)
    payloads = [node.encode_gradient(rng.standard_normal(spec.d), spec, rng) for _ in range(3)]
    saved = dict(node.PARALLEL_DECODE_MIN_BYTES)
    node.PARALLEL_DECODE_MIN_BYTES.update(elias=1)
    try:
        want = node.aggregate(payloads, spec)  # the parent's pool exists from here on
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: aggregate again, send the bytes back, leave at once
            try:
                os.write(w, node.aggregate(payloads, spec).tobytes())
            finally:
                os._exit(0)
        os.close(w)
        got, deadline = b"", time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                if select.select([r], [], [], 0.5)[0]:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        break
                    got += chunk
            else:
                pytest.fail("the forked child hung on the parent's decoding threads")
        finally:
            os.close(r)
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still there: ours to end
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert got == want.tobytes()
    finally:
        node.PARALLEL_DECODE_MIN_BYTES.clear()
        node.PARALLEL_DECODE_MIN_BYTES.update(saved)


def test_online_batches_drawn_ahead_on_a_lower_priority_thread_are_the_same_batches():
    """An agent's node draws round r + 1's online batch while round r runs: the gradients
    are bit for bit those of a node that draws each batch when it needs it, also when a
    round is skipped (a batch drawn ahead for another round is dropped)."""
    import os
    import threading

    s = TrialSpec(d=1 << 16, n=0, seed=3, rounds=8, batch_size=16, lr=0.1, scheme="none",
                  workers=2, topology="ps")
    assert s.d * s.batch_size >= node.DRAW_AHEAD_MIN
    ahead, plain = node.WorkerNode(s, 1, draw_ahead=True), node.WorkerNode(s, 1)
    try:
        assert plain.drawer is None and ahead.drawer is not None
        w = np.random.default_rng(0).standard_normal(s.d) * 1e-3
        for r in (0, 1, 2, 5, 6, 7):
            assert ahead.gradient(w, r).tobytes() == plain.gradient(w, r).tobytes()
            want = r + 1 if r + 1 < s.rounds else None
            assert (ahead.ahead[0] if ahead.ahead else None) == want
        me = os.getpriority(os.PRIO_PROCESS, 0)
        nice = ahead.drawer.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        assert nice == min(19, me + 10)
    finally:
        ahead.close()
    assert ahead.drawer is None
    small = TrialSpec(d=100, n=0, seed=3, rounds=8, batch_size=16, workers=2)
    assert node.WorkerNode(small, 0, draw_ahead=True).drawer is None  # not worth a thread
    huge = TrialSpec(d=1 << 20, n=0, seed=3, rounds=8, batch_size=64, workers=2)
    assert huge.d * huge.batch_size > node.DRAW_AHEAD_MAX  # 512 MB a batch: not twice
    assert node.WorkerNode(huge, 0, draw_ahead=True).drawer is None
