"""The analysis half of benchmarks/bandwidth.py (no netns needed): the sweep it asks
relufit for, how it names settings back, time to target, speed-ups and the crossover."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import from_dict

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bandwidth.py"
_spec = importlib.util.spec_from_file_location("bandwidth_bench", _PATH)
bw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bw)


def _toml_inline(text):
    """The value of relufit's --set sweep.compress=TEXT, as TOML reads it."""
    import tomllib

    return tomllib.loads(f"v = {text}")["v"]


def test_every_setting_round_trips_through_the_sweep_relufit_runs():
    names = list(bw.SETTINGS)
    exp = from_dict({"problem": {"d": 1000, "n": 0}, "compress": {"scheme": "none"},
                     "sweep": {"compress": _toml_inline(bw.sweep_toml(names))}}, "bw")
    assert [bw.setting_name(t.params) for t in exp.trials()] == names


def test_time_to_target_counts_from_the_end_of_round_0():
    m = {"round": np.arange(5), "elapsed_s": np.array([3.0, 3.1, 3.2, 3.3, 3.4]),
         "rel_error": np.array([1, 0.1, 1e-3, 1e-7, 1e-8]), "t_compute": np.full(5, 0.01),
         "t_encode": np.zeros(5), "t_decode": np.zeros(5), "t_network": np.full(5, 0.05),
         "bytes_up": np.full(5, 100), "bytes_down": np.full(5, 50)}
    s = bw.summarize({"metrics": m}, 1e-6)
    assert s["rounds"] == 4 and s["t_target"] == pytest.approx(0.3)  # start-up (3 s) left out
    assert s["mb"] == pytest.approx(4 * 150 / 1e6) and s["round_ms"] == pytest.approx(100)
    assert bw.summarize({"metrics": m}, 1e-9)["t_target"] is None


def row(link, topo, setting, t):
    return {"link": link, "d": 10, "topology": topo, "setting": setting, "t_target": t}


def test_speedups_and_crossover():
    rows = [row("100mbit", "allgather", "fp32", 70.0), row("100mbit", "allgather", "q", 20.0),
            row("100mbit", "ps", "fp32", 24.0), row("100mbit", "mpi-allreduce", "fp32", 10.0),
            row("1gbit", "allgather", "fp32", 12.0), row("1gbit", "allgather", "q", 16.0),
            row("1gbit", "ps", "fp32", 11.0), row("1gbit", "ps", "q", None)]
    bw.add_speedups(rows)
    q100 = rows[1]
    assert q100["speedup"] == pytest.approx(3.5) and q100["vs_mpi"] == pytest.approx(0.5)
    assert q100["vs_best_fp32"] == pytest.approx(24 / 20)  # MPI is not relufit's float32
    assert rows[-1]["speedup"] is None  # never reached the target
    lines = bw.crossover(rows, ["100mbit", "1gbit"])
    assert "allgather: best QSGD speed-up 100mbit: 3.50x, 1gbit: 0.75x -> crossover between "\
           "100mbit and 1gbit" in lines
    assert not any(line.startswith("mpi") for line in lines)


def test_the_compute_floor_script_times_real_worker_processes(tmp_path):
    """benchmarks/floor.py at a tiny size: two forked workers, the parent their barrier; the
    three kinds of work, each with a positive median round for rank 0 alone and for all."""
    import subprocess
    import sys

    script = _PATH.parent / "floor.py"
    out = subprocess.run([sys.executable, str(script), "--d", "64", "--n", "256", "--batch", "8",
                          "--workers", "2", "--rounds", "30", "--repeats", "2",
                          "--json", str(tmp_path / "floor.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()
            if line.startswith("| ") and "work per worker" not in line]
    assert [r[0].strip() for r in rows] == ["gradient", "+ qsgd encode", "+ qsgd, decode 1",
                                            "+ qsgd, decode M",
                                            "allreduce: scatter, reduce, gather"]
    ms = [[float(c.split()[0]) for c in r[1:3]] for r in rows]  # "median [min-max]"
    assert all(v > 0 for pair in ms for v in pair)
    assert "2 workers" in out.stdout and "bits per coordinate" in out.stdout
    saved = json.loads((tmp_path / "floor.json").read_text())
    assert saved["workers"] == 2 and set(saved["all_s"]) == {"gradient", "encode", "broadcast",
                                                             "allgather", "allreduce"}
    assert saved["all_s"]["encode"] == pytest.approx(float(rows[1][2].split()[0]) / 1e3,
                                                     abs=6e-6)  # the table's row, in seconds


def _row(topology, setting, t, rounds, link="100mbit", d=10_000):
    return {"link": link, "d": d, "topology": topology, "setting": setting, "t_target": t,
            "rounds": rounds, "per_round": False, "round_ms": 1.0, "compute_ms": 0.5,
            "coding_ms": 0.1, "network_ms": 0.4, "mb": 1.0, "final": 1e-7}


FLOOR = {"link": "-", "d": 10_000, "topology": "floor", "setting": "s15b128fixed",
         "workers": 4, "cpus": 2, "alone_s": {}, "all_s": {"gradient": 4.46e-3,
                                                           "encode": 5.2e-3}}


def test_the_floor_verdict_divides_the_goal_by_the_best_qsgd_rows_rounds():
    rows = [_row("broadcast", "fp32", 23.64, 1741), _row("ps", "fp32", 23.86, 1741),
            _row("broadcast", "s15b128fixed", 16.38, 1866),
            _row("allgather", "s15b128fixed", 18.64, 1801),
            _row("mpi-allreduce", "fp32", 9.16, 1741)]
    head, four, mpi = bw.floor_verdict(rows, FLOOR)
    assert "4.46 ms" in head and "5.20 ms" in head
    assert "<= 3.17 ms" in four and "1866 rounds" in four and "out of reach" in four
    assert "<= 4.91 ms" in mpi and "out of reach" in mpi
    near = {**FLOOR, "all_s": {"gradient": 4e-3, "encode": 4.5e-3}}
    assert "at the floor: 9% left" in bw.floor_verdict(rows, near)[2]
    fast = {**FLOOR, "all_s": {"gradient": 1e-3, "encode": 2e-3}}
    assert all("within reach" in line for line in bw.floor_verdict(rows, fast)[1:])


def test_the_report_keeps_the_floor_row_out_of_the_table(capsys):
    rows = [_row("broadcast", "fp32", 23.64, 1741),
            _row("broadcast", "s15b128fixed", 16.38, 1866), dict(FLOOR)]
    bw.report(rows, argparse.Namespace(d=10_000, plot=None))
    out = capsys.readouterr().out
    assert "| floor |" not in out and "out of reach on this machine" in out
    assert "| 100mbit | 1e+04 | broadcast | s15b128fixed |" in out


def test_the_floor_s_allreduce_member_decodes_parts_and_means_of_its_rounds_sizes():
    spec_ = importlib.util.spec_from_file_location("floor_bench", _PATH.parent / "floor.py")
    floor = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(floor)
    from worker import node, relu

    args = argparse.Namespace(d=300, n=300, batch=8, workers=3, rounds=5)
    nd = node.WorkerNode(floor.spec_for(args, "s15b128fixed"), 1)
    w = relu.planted_weights(args.d, 1) * 0.1
    members, parts, means = floor.allreduce_stand_ins(nd, w)
    bounds = node.chunk_bounds(nd.spec, 3)
    assert members == [0, 1, 2] and parts[1] is None and means[1] is None
    lo, hi = bounds[1]  # every part is one of rank 1's chunk, every mean its owner's
    for p in (parts[0], parts[2]):
        assert node.decode_gradient(p, node.chunk_spec(nd.spec, lo, hi)).shape == (hi - lo,)
    for j in (0, 2):
        got = node.decode_gradient(means[j], node.chunk_spec(nd.spec, *bounds[j]))
        assert got.shape == (bounds[j][1] - bounds[j][0],)
    nd.scatter(w, 0, members)
    assert len(nd.reduce(0, members, parts)) > 0
    assert nd.own_mean.shape == (hi - lo,)
    nd.gather(means)  # decodes the others' mean chunks (the floor's spec steps with lr 0)
