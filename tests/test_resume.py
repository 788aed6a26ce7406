"""Resumable runs: checkpoints (weights, step state, every worker's generators) and
`relufit run --resume`. A resumed run's rows equal the uninterrupted run's in every column
but the times: in sim at every checkpoint of every topology and coding, over the local
backend's sockets, and after `kill -9` of `relufit run` itself at several points."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import differences, from_dict, load_experiment
from orchestrator.errors import RelufitError
from orchestrator.providers import open_pool
from orchestrator.results import (
    checkpoint_path,
    read_checkpoint,
    read_metrics,
    read_summary,
    write_checkpoint,
)
from orchestrator.runner import plan_resume, run_experiment
from orchestrator.trial import COLUMNS, Checkpoint, Reply, SimPool, run_trial
from worker import protocol
from worker.node import SpecError, TrialSpec, WorkerNode, check_states

TIMES = ("elapsed_s", "t_compute", "t_encode", "t_network", "t_decode", "t_update")
SAME = tuple(c for c in COLUMNS if c not in TIMES)  # what a resume reproduces exactly
QUIET = {"progress": lambda line: None}
TOPOLOGIES = ("ps", "allgather", "broadcast", "allreduce")


def spec(topology: str, scheme: str = "qsgd", coding: str = "elias", **kw) -> TrialSpec:
    base = dict(d=23, n=300, workers=3, rounds=40, lr=0.2, batch_size=8, bucket_size=8,
                target_rel_error=0, topology=topology, scheme=scheme, coding=coding)
    return TrialSpec(**{**base, **kw})


def rows_of(rows) -> list[tuple]:
    return [tuple(getattr(r, c) for c in SAME) for r in rows]


def run_with_checkpoints(s: TrialSpec, pool, every: int):
    rows, saved = [], []
    res = run_trial(s, pool, rows.append, on_checkpoint=lambda c: saved.append(copy.deepcopy(c)),
                    checkpoint_rounds=every)
    return rows, saved, res


# ---------------------------------------------------------------- the worker's state


def test_a_restored_worker_draws_what_the_original_draws_next():
    s = spec("allgather")
    a = WorkerNode(s, 1)
    for r in range(3):
        a.step(np.full(s.d, 0.1 * r), r)
    b = WorkerNode(s, 1)
    b.restore(json.loads(json.dumps(a.generator_states())))  # as it crosses JSON
    w = np.linspace(-1, 1, s.d)
    assert a.step(w, 3).payload == b.step(w, 3).payload
    assert WorkerNode(s, 1).step(w, 3).payload != a.step(w, 4).payload  # not a fresh one


@pytest.mark.parametrize("bad", [
    None, {}, {"batch": {}}, {"batch": 1, "quant": 2},
    {"batch": {"bit_generator": "MT19937", "state": {"state": 1, "inc": 1},
               "has_uint32": 0, "uinteger": 0}},
    {"batch": {"bit_generator": "PCG64", "state": {"state": -1, "inc": 1},
               "has_uint32": 0, "uinteger": 0}},
    {"batch": {"bit_generator": "PCG64", "state": {"state": 1 << 128, "inc": 1},
               "has_uint32": 0, "uinteger": 0}},
    {"batch": {"bit_generator": "PCG64", "state": {"state": 1, "inc": 1},
               "has_uint32": 2, "uinteger": 0}},
])
def test_malformed_generator_states_are_refused(bad):
    good = WorkerNode(spec("ps"), 0).generator_states()
    states = {**good, **bad} if isinstance(bad, dict) and bad else bad
    with pytest.raises(SpecError):
        check_states(states)


def test_a_replica_of_the_wrong_size_is_refused():
    nd = WorkerNode(spec("broadcast"), 0)
    with pytest.raises(SpecError, match="replica"):
        nd.restore(nd.generator_states(), np.zeros(5))


# ---------------------------------------------------------------- the round loop


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("scheme, coding", [("qsgd", "elias"), ("qsgd", "fixed"),
                                            ("none", "elias")])
def test_sim_resumed_from_any_checkpoint_equals_the_uninterrupted_trial(topology, scheme,
                                                                        coding):
    s = spec(topology, scheme, coding)
    rows, saved, res = run_with_checkpoints(s, SimPool(), 7)
    assert [c.round for c in saved] == [7, 14, 21, 28, 35]
    for ckpt in saved:
        again = []
        res2 = run_trial(s, SimPool(), again.append, resume=ckpt)
        assert rows_of(again) == rows_of(rows[ckpt.round:])
        assert (res2.rounds, res2.final_rel_error, res2.total_bytes_up, res2.total_bytes_down,
                res2.total_bytes_peer) == (res.rounds, res.final_rel_error, res.total_bytes_up,
                                           res.total_bytes_down, res.total_bytes_peer)


def test_checkpoints_are_taken_on_time_when_no_round_count_is_given(monkeypatch):
    import orchestrator.trial as trial

    monkeypatch.setattr(trial, "CHECKPOINT_S", 0.0)  # every round is "10 s later"
    _, saved, _ = run_with_checkpoints(spec("ps", rounds=6), SimPool(), 0)
    assert [c.round for c in saved] == [1, 2, 3, 4, 5]  # none after the last round
    monkeypatch.setattr(trial, "CHECKPOINT_S", 3600.0)
    assert run_with_checkpoints(spec("ps", rounds=6), SimPool(), 0)[1] == []


def test_no_checkpoint_once_a_worker_is_lost():
    class Losing(SimPool):
        def exchange(self, round_, down, relay):
            ex = super().exchange(round_, down, relay)
            if round_ == 9:
                ex.lost = [(2, "test")]
            return ex

    _, saved, res = run_with_checkpoints(spec("ps"), Losing(), 5)
    assert res.lost_workers == [2] and [c.round for c in saved] == [5]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_local_agents_resume_from_a_checkpoint_bit_for_bit_bytes_included(topology):
    """Over sockets the master sends the states and replicas in TRIAL and collects the
    generators with SAVE/STATE; the rows after a resume are the uninterrupted run's, the
    bytes counted on the sockets too."""
    exp = from_dict({"cluster": {"workers": 3, "topology": topology}}, "resume")
    s = spec(topology, rounds=30)
    sim, _, _ = run_with_checkpoints(s, SimPool(), 0)
    with open_pool("local", exp) as pool:
        rows, saved, res = run_with_checkpoints(s, pool, 11)
        assert [c.round for c in saved] == [11, 22]
        assert [r.rel_error for r in rows] == [r.rel_error for r in sim]
        for ckpt in saved:
            again = []
            res2 = run_trial(s, pool, again.append, resume=ckpt)
            assert rows_of(again) == rows_of(rows[ckpt.round:])
            assert res2.total_bytes_down == res.total_bytes_down


def test_save_and_trial_resume_frames_are_checked():
    hdr = {"v": protocol.VERSION, "type": "TRIAL", "trial": 0, "spec": {}}
    ok = dict(hdr, resume={"round": 3, "states": {}})
    assert protocol.parse([json.dumps(ok).encode(), b"", b""]).get("resume")["round"] == 3
    for bad, frames in [(dict(hdr, resume={"round": 0, "states": {}}), [b"", b""]),
                        (dict(hdr, resume={"round": 3}), [b"", b""]),
                        (dict(hdr, resume={"round": 3, "states": {}}), [b""]),
                        (hdr, [b"", b""])]:
        with pytest.raises(protocol.ProtocolError):
            protocol.parse([json.dumps(bad).encode(), *frames])
    with pytest.raises(protocol.ProtocolError):
        protocol.parse([json.dumps({"v": protocol.VERSION, "type": "STATE", "trial": 0,
                                    "round": 1, "states": [1]}).encode()])


# ---------------------------------------------------------------- the checkpoint file


def test_a_checkpoint_file_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(1)
    states = {r: WorkerNode(spec("allgather"), r).generator_states() for r in range(3)}
    ckpt = Checkpoint(4, 17, rng.standard_normal(23), rng.standard_normal(23), states,
                      b"\x00upd", [Reply(0, b"abc"), Reply(2, b"")],
                      np.random.default_rng(2).bit_generator.state,
                      {"up": 10, "down": 20, "peer": 0}, 1.5)
    path = write_checkpoint(tmp_path, ckpt)
    assert path == checkpoint_path(tmp_path, 4) and not list(path.parent.glob("*.tmp"))
    back = read_checkpoint(tmp_path, 4, 23)
    assert back.w.tobytes() == ckpt.w.tobytes() and back.replica.tobytes() == ckpt.replica.tobytes()
    assert (back.round, back.workers, back.update, back.down_rng, back.totals, back.elapsed_s) == (
        17, states, b"\x00upd", ckpt.down_rng, ckpt.totals, 1.5)
    assert [(r.rank, r.payload) for r in back.relay] == [(0, b"abc"), (2, b"")]
    assert read_checkpoint(tmp_path, 5, 23) is None
    with pytest.raises(RelufitError, match="dimension 24"):
        read_checkpoint(tmp_path, 4, 24)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with pytest.raises(RelufitError, match="not a whole checkpoint"):
        read_checkpoint(tmp_path, 4, 23)


# ---------------------------------------------------------------- run --resume


EXP = {
    "problem": {"d": 30, "n": 500, "seed": 2},
    "train": {"rounds": 60, "lr": 0.1, "batch_size": 8, "checkpoint_rounds": 5,
              "target_rel_error": 0},
    "cluster": {"workers": 3, "topology": "broadcast", "heartbeat_interval": 0.2,
                "connect_timeout": 20},
    "sweep": {"compress.levels": [2, 4, 8]},
}


class StopAt(SimPool):
    """Ctrl-C when ``trial`` reaches ``round``."""

    def __init__(self, trial: int, round_: int):
        super().__init__()
        self.at = (trial, round_)

    def exchange(self, round_, down, relay):
        if (self.nodes[0].spec.trial, round_) == self.at:
            raise KeyboardInterrupt
        return super().exchange(round_, down, relay)


def same_rows(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    for c in SAME:
        np.testing.assert_array_equal(ma[c], mb[c], err_msg=c)


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    exp = from_dict(EXP, "x")
    whole = run_experiment(exp, SimPool(), tmp_path / "a", "sim", **QUIET)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, StopAt(1, 33), tmp_path / "b", "sim", **QUIET)
    [cut] = (tmp_path / "b").iterdir()
    assert read_summary(cut)["status"] == "interrupted"
    with open(cut / "metrics.csv", "a") as f:
        f.write("1,34,0.12")  # a row cut short by a crash mid-write: dropped
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["trial-1.npz"]
    lines = []
    assert run_experiment(exp, SimPool(), tmp_path, "sim", progress=lines.append,
                          resume=cut) == cut
    assert "1 of 3 trial(s) kept, trial 2 from round 30" in lines[0]
    same_rows(whole, cut)
    summary = read_summary(cut)
    assert summary["status"] == "completed" and summary["resumed"] == 1
    assert [t["trial"] for t in summary["trials"]] == [0, 1, 2]
    assert [t["total_bytes_up"] for t in summary["trials"]] == \
        [t["total_bytes_up"] for t in read_summary(whole)["trials"]]
    assert not (cut / "checkpoints").exists()  # done: nothing left to resume from
    with pytest.raises(RelufitError, match="nothing to resume"):
        plan_resume(cut, exp)


def test_a_resume_with_another_experiment_is_refused_naming_the_key(tmp_path):
    exp = from_dict(EXP, "x")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, StopAt(0, 12), tmp_path, "sim", **QUIET)
    [cut] = tmp_path.iterdir()
    before = (cut / "metrics.csv").read_text()
    changed = from_dict({**EXP, "train": {**EXP["train"], "lr": 0.2}}, "x")
    assert differences(exp, changed) == ["train.lr: 0.1 != 0.2"]
    with pytest.raises(RelufitError, match=r"differs from the run's at train\.lr: 0\.1 != 0\.2"):
        run_experiment(changed, SimPool(), tmp_path, "sim", resume=cut, **QUIET)
    resweep = from_dict({**EXP, "sweep": {"compress.levels": [2, 4]}}, "x")
    with pytest.raises(RelufitError, match="sweep.compress.levels"):
        plan_resume(cut, resweep)
    assert (cut / "metrics.csv").read_text() == before  # nothing lost


def test_a_trial_failed_on_a_lost_worker_runs_again_a_diverged_one_stands(tmp_path):
    exp = from_dict({**EXP, "sweep": {"train.lr": [0.1, 1e4]}}, "x")  # 1e4 diverges

    class LoseOnce(SimPool):
        def exchange(self, round_, down, relay):
            ex = super().exchange(round_, down, relay)
            if (self.nodes[0].spec.trial, round_) == (0, 20):
                ex.lost = [(1, "test")]
            return ex

    exp_abort = from_dict({**EXP, "sweep": {"train.lr": [0.1, 1e4]},
                           "cluster": {**EXP["cluster"], "on_worker_loss": "abort"}}, "x")
    first = run_experiment(exp_abort, LoseOnce(), tmp_path, "sim", **QUIET)
    trials = read_summary(first)["trials"]
    assert [t["status"] for t in trials] == ["failed", "failed"]
    assert "lost" in trials[0]["reason"] and trials[1]["reason"].startswith("diverged")
    plan = plan_resume(first, exp_abort)
    assert plan.kept == {1: "failed"} and plan.checkpoints[0].round == 20
    run_experiment(exp_abort, SimPool(), tmp_path, "sim", resume=first, **QUIET)
    whole = run_experiment(exp, SimPool(), tmp_path / "whole", "sim", **QUIET)
    same_rows(whole, first)


# ---------------------------------------------------------------- kill -9 of `relufit run`


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_when(proc: subprocess.Popen, metrics: Path | None, out: Path, rows: int) -> Path:
    """SIGKILL `relufit run` (``proc``) once its metrics.csv has more than ``rows`` rows,
    as a crash or a power cut would; its agents then go (their master is silent) or are
    killed here. The run directory."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = metrics or next(iter(out.glob("*/metrics.csv")), None)
        if found is not None and found.exists() and \
                len(found.read_text().splitlines()) > rows + 1:
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    else:
        raise AssertionError(f"the run did not reach {rows} rows")
    agents = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in agents) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in agents:
        if not gone(p):
            os.kill(p, signal.SIGKILL)
    return found.parent


def test_kill_9_of_the_master_at_several_points_then_resume_is_bit_identical(tmp_path):
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(f"""
name = "kill9"
[problem]
d = 100
n = 1000
[train]
rounds = 350
batch_size = 16
lr = 0.1
target_rel_error = 0
checkpoint_rounds = 40
[compress]
levels = 4
bucket_size = 32
[cluster]
workers = 3
heartbeat_interval = 0.2
heartbeat_liveness = 3
[sweep]
"cluster.topology" = {json.dumps(list(TOPOLOGIES))}
""")
    out = tmp_path / "out"
    start = [sys.executable, "-m", "orchestrator.cli", "run", str(exp_file)]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
             "stdin": subprocess.DEVNULL}
    run = kill_when(subprocess.Popen([*start, "--out", str(out)], **popen), None, out, 100)
    for rows in (500, 1300):  # in trial 2, then in trial 4
        run = kill_when(subprocess.Popen([*start, "--resume", str(run)], **popen),
                        run / "metrics.csv", out, rows)
        assert "kept" in (run / "events.log").read_text()
    done = cli("run", "--resume", str(run), "--json")  # the experiment file may be left out
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["status"] == "completed"
    assert json.loads(done.stdout)["resumed"] == 3

    exp = load_experiment(exp_file)
    sim = run_experiment(exp, SimPool(), tmp_path / "sim", "sim", **QUIET)
    ref, got = read_metrics(sim / "metrics.csv"), read_metrics(run / "metrics.csv")
    for c in ("trial", "round", "rel_error", "loss", "workers"):
        np.testing.assert_array_equal(got[c], ref[c], err_msg=c)
    # the bytes after a resume: test_local_agents_resume_from_a_checkpoint_bit_for_bit...


def test_run_resume_refuses_before_starting_anything(tmp_path):
    exp = from_dict(EXP, "x")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, StopAt(0, 12), tmp_path, "sim", **QUIET)
    [cut] = tmp_path.iterdir()
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text((cut / "experiment.toml").read_text())
    bad = cli("run", str(exp_file), "--resume", str(cut), "--set", "problem.seed=9")
    assert bad.returncode != 0 and "problem.seed: 2 != 9" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert cli("run", "--resume", str(tmp_path / "nope")).returncode != 0
    missing = cli("run")
    assert missing.returncode != 0 and "--resume RUN_DIR" in missing.stderr
