"""benchmarks/scaling.py's bytes per link and benchmarks/model.py's cost model, without netns."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import model, scaling  # noqa: E402


def test_link_bytes_split_the_master_and_a_worker():
    m = {"bytes_up": np.full(10, 4000.0), "bytes_down": np.full(10, 400.0),
         "bytes_peer": np.full(10, 24000.0)}
    got = scaling.link_bytes(m, 4)
    assert got["master_kb"] == pytest.approx(4.4)
    assert got["worker_kb"] == pytest.approx((4000 + 24000) / 4 / 1e3)
    assert got["total_kb"] == pytest.approx(28.4)
    assert got["busiest_kb"] == pytest.approx(7.0)


TC_TBF = """qdisc tbf 8001: root refcnt 2 rate 10Mbit burst 32Kb lat 50ms
 Sent 98120 bytes 131 pkt (dropped {}, overlimits 40 requeues 0)
 backlog 0b 0p requeues 0
"""


def test_drops_are_read_from_tc_and_counted_per_round():
    assert scaling.qdisc_drops(TC_TBF.format(7)) == 7
    assert scaling.qdisc_drops(TC_TBF.format(7) + TC_TBF.format(1205)) == 1212
    assert scaling.qdisc_drops("") == 0
    got = scaling.drop_figures({0: 100, 1: 5, 2: 0}, {0: 400, 1: 5, 2: 60}, 60)
    assert got == {"drops": 6.0, "master_drops": 5.0}


def test_drops_parse_this_machines_tc():
    out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", "lo"], capture_output=True,
                         text=True, check=True).stdout
    assert "dropped" in out and scaling.qdisc_drops(out) >= 0


def test_the_allreduce_masters_bytes_do_not_grow_with_the_workers_and_broadcasts_do():
    d, bps = 10_000, 10e6
    kappa = model.PARAMS.index("kappa")  # bytes / rate: the link's row (MPI's: the first)

    def busy(topo: str, setting: str, m: int) -> float:
        f = model.features(topo, setting, m, d, 128, bps, m)
        return f[0][kappa] + f[1][kappa]

    ar = [busy("allreduce", "s15b128fixed", m) for m in (2, 8, 64)]
    bc = [busy("broadcast", "s15b128fixed", m) for m in (2, 8, 64)]
    mpi = [busy("mpi-allreduce", "fp32", m) for m in (2, 8, 64)]
    assert max(ar) < 2 * min(ar) and bc[2] == pytest.approx(32 * bc[0])  # M P
    assert mpi[2] == pytest.approx(2 * 63 / 64 * 4 * d * 8e3 / bps)
    cpu = model.features("allreduce", "fp32", 8, d, 128, bps, 9)[2]  # a core each
    coding = [model.PARAMS.index(k) for k in ("enc_ns", "dec_ns", "call_us")]
    assert cpu[coding].tolist() == [0, 0, 0]  # float32 codes nothing
    # an allreduce worker handles 2 + 4 (M - 1) messages a round, its master 2 M
    assert cpu[model.PARAMS.index("mu_us")] * 1e3 == pytest.approx(2 + 4 * 7 + 16)


def test_an_allreduce_workers_codec_calls_stop_growing_with_m_once_batched():
    def calls(m: int, batched: bool) -> float:
        f = model.features("allreduce", "s15b128fixed", m, 10_000, 128, 10e6, 1e6, False,
                           batched)  # cores to spare: no crowding
        return round(f[2][model.PARAMS.index("call_us")] * 1e3, 9)  # the CPU row's, x 1e-3

    assert [calls(m, False) for m in (2, 8, 64)] == [5 + 2, 23 + 8, 191 + 64]
    assert [calls(m, True) for m in (2, 8, 64)] == [6 + 2, 10 + 3, 10 + 3]


def modelled_rows(truth: np.ndarray, beta: float, link: str) -> list[dict]:
    """Rows as scaling.py writes them, with the rounds the model gives for ``truth``; a
    float32 broadcast drops packets (more with M), the others none."""
    rows = []
    for m in (2, 4, 8):
        for topo, setting in (("broadcast", "fp32"), ("broadcast", "s15b128fixed"),
                              ("allreduce", "fp32"), ("allreduce", "s15b128fixed"),
                              ("mpi-allreduce", "fp32")):
            drops = 10.0 * m * m if (topo, setting) == ("broadcast", "fp32") else 0.0
            f = model.features(topo, setting, m, 10_000, 128, model.rate_of(link), 2,
                               drops=drops)
            rows.append({"link": link, "d": 10_000, "M": m, "topology": topo,
                         "setting": setting, "round_ms": float(model.round_ms(truth, f, beta)),
                         "batch": 128, "codec": "batched", "drops": drops})
    return rows


TRUTH = np.array([1.0, 0.3, 1.2, 5.0, 3.0, 40.0, 2.0, 0.0, 30.0, 1.5])  # PARAMS' order


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_fit_recovers_known_constants_and_overlap_exactly(beta):
    rows = modelled_rows(TRUTH, beta, "10mbit") + modelled_rows(TRUTH, beta, "100mbit")
    pinned = {model.PARAMS.index(k): TRUTH[model.PARAMS.index(k)]
              for k in ("enc_ns", "dec_ns", "delta_ns")}
    x, got_beta, errs = model.fit_rows(rows, 2, pinned)
    assert got_beta == beta
    np.testing.assert_allclose(x, TRUTH, rtol=1e-6, atol=1e-9)
    assert max(abs(e["error"]) for e in errs) < 1e-9


def test_a_stars_directions_overlap_only_for_messages_that_fit_the_queue():
    bps = 100e6
    queue = model.queue_bytes(bps)  # the emulated link's own: 50 ms and its bucket
    assert queue == pytest.approx(625_000 + 50_000)
    assert model.queue_bytes(10e6) == pytest.approx(62_500 + 32 * 1024)
    small, big = 40_000, 40 * queue
    assert model.star_bytes(4 * small, 4 * small, small, bps) == 4 * small  # one direction
    assert model.star_bytes(4 * big, 4 * big, big, bps) == pytest.approx(4 * big * 1.975)
    assert model.star_bytes(5.0, 9.0, queue, bps) == 9.0


def test_crowding_shares_the_workers_and_the_allreduce_master_but_not_a_stars():
    assert model.crowding("broadcast", 2, 2) == (1.0, 1.0)  # a core each
    assert model.crowding("broadcast", 8, 2) == (4.0, 1.0)  # the workers wait for it
    assert model.crowding("allreduce", 8, 2) == (4.0, 0.5)
    assert model.crowding("mpi-allreduce", 8, 2) == (4.0, 0.0)
    assert model.crowding("allreduce", 8, 9) == (1.0, 1.0)


def test_drops_cost_link_time_and_an_mpi_ring_follows_its_compute():
    drop = model.PARAMS.index("resend")
    f = model.features("broadcast", "fp32", 4, 10_000, 128, 10e6, 2, drops=30.0)
    # 30 full frames again at 10 Mbit/s, in ms
    assert f[1][drop] == pytest.approx(30 * 1514 * 8 / 10e6 * 1e3)
    assert f[0][drop] == f[2][drop] == 0
    mpi = model.features("mpi-allreduce", "fp32", 4, 10_000, 128, 10e6, 2, drops=5.0)
    assert mpi[1].tolist() == [0.0] * len(model.PARAMS)  # nothing beside the CPU
    assert mpi[0][model.PARAMS.index("kappa")] == pytest.approx(8e3 * 1.5 * 40_000 / 10e6)
    x = np.ones(len(model.PARAMS))
    both, cpu = float(mpi[0] @ x), float(mpi[2] @ x)
    assert model.round_ms(x, mpi, 0.0) == pytest.approx(both + cpu)  # paid one after another


def test_an_mpi_ring_of_long_steps_moves_only_while_its_ranks_run():
    kappa = model.PARAMS.index("kappa")

    def ring(m: int, d: int, cores: float) -> float:
        return model.features("mpi-allreduce", "fp32", m, d, 16, 100e6, cores)[0][kappa]

    bytes_ms = 8e3 * 2 * 3 / 4 * 4e6 / 100e6
    assert ring(4, 1_000_000, 2) == pytest.approx(2 * bytes_ms)  # 1 MB steps, 2 ranks a core
    assert ring(4, 1_000_000, 5) == pytest.approx(bytes_ms)  # a core each
    assert ring(4, 10_000, 2) == pytest.approx(bytes_ms / 100)  # 10 kB steps: the kernel's
    assert 4 * 10_000 / 4 < model.MPI_EAGER < 4 * 1_000_000 / 4


def test_other_runs_are_checked_only_where_their_drops_are_known_or_none():
    fitted = [{"link": "10mbit", "d": 10_000, "M": 8, "topology": "broadcast",
               "setting": "fp32", "drops": 134.7},
              {"link": "10mbit", "d": 10_000, "M": 8, "topology": "allreduce",
               "setting": "fp32", "drops": 0.0}]
    other = [{**fitted[0]}, {**fitted[1]}, {**fitted[0], "M": 2}]
    for r in other:
        del r["drops"]
    got = model.checkable(fitted, other + [{**fitted[0], "drops": 100.0}])
    assert [(r["topology"], r["M"], r.get("drops")) for r in got] == [
        ("allreduce", 8, None), ("broadcast", 2, None), ("broadcast", 8, 100.0)]


def test_a_codec_call_and_a_message_are_timed_alone():
    got = model.measure_calls_alone(repeats=2, n=4 * model.BURST)
    assert set(got) == {"call_us", "mu_us"} and all(0 < v < 1e5 for v in got.values())


def test_the_pinned_constants_are_timed_alone():
    got = model.measure_alone(d=20_000, batch=4, repeats=3)
    assert set(got) == {"enc_ns", "dec_ns", "draw_ns", "delta_ns"}
    assert all(0 < v < 1e4 for v in got.values())


def test_a_round_is_bound_by_the_longer_of_link_and_cpu():
    f = np.zeros((3, len(model.PARAMS)))
    f[0, 0], f[1, 2], f[2, 7] = 1.0, 10.0, 4.0  # fixed, bytes / rate, messages
    x = np.ones(len(model.PARAMS))
    assert model.round_ms(x, f, 0.0) == 1 + 10
    assert model.round_ms(x, f, 0.5) == 1 + 10 + 2
    assert model.round_ms(x, f, 1.0) == 1 + 10 + 4


def test_nnls_keeps_constants_non_negative():
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([3.0, 2.0, 1.0])  # the unconstrained slope is negative
    x = model.nnls(a, b)
    assert (x >= 0).all() and x[1] == 0 and x[0] == pytest.approx(2.0)


def test_rounds_are_held_beyond_the_largest_measured_m_and_scaled_with_d():
    rows = [{"topology": "allreduce", "setting": "fp32", "M": m, "rounds": r, "d": 10_000}
            for m, r in ((2, 3000), (4, 2000), (8, 1800))]
    assert model.rounds_for(rows, "allreduce", "fp32", 4, 10_000) == 2000
    assert model.rounds_for(rows, "allreduce", "fp32", 64, 10_000) == 1800
    assert model.rounds_for(rows, "allreduce", "fp32", 64, 1_000_000) == 180_000
    assert model.rounds_for(rows, "broadcast", "fp32", 4, 10_000) is None


def test_the_command_fits_several_files_and_leaves_out_the_excluded_runs(tmp_path, monkeypatch,
                                                                           capsys):
    truth = np.array([0.5, 0.2, 1.0, 12.7, 4.6, 30.0, 0.77, 0.0, 20.0, 1.2])
    files = []
    for link in ("10mbit", "100mbit"):
        rows = [{**r, "run": "after"} for r in modelled_rows(truth, 0.0, link)]
        rows.append({**rows[0], "round_ms": 1e4, "run": "code before"})  # would spoil the fit
        files.append(tmp_path / f"{link}.json")
        files[-1].write_text(json.dumps(rows))
    other = tmp_path / "4mbit.json"  # another run: checked, not fitted
    other.write_text(json.dumps(modelled_rows(truth, 0.0, "4mbit")))
    monkeypatch.setattr(sys, "argv", ["model.py", *map(str, files), "--exclude", "before",
                                      "--json", str(tmp_path / "out.json"), "--check",
                                      str(other)])
    model.main()
    out = capsys.readouterr().out
    assert "largest error 0% over 30 rows (30 within 20%)" in out
    assert "largest error 0% over 15 rows of other runs (15 within 20%)" in out
    table = [line for line in out.splitlines() if line.startswith("| c5")
             and line.count("|") == len(model.MS) + 4]  # preset, d, each M, where
    assert len(table) == 2 * 2 * len(model.PRESETS)  # fitted, and with the alone costs
    assert "With a codec call at 50 us and a message at 8.9 us" in out
    assert all(line.rstrip(" |").split("| ")[-1] == "nowhere" or "M = " in line
               for line in table)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["params"]["beta"] == 0.0 and len(saved["errors"]) == 30


def test_master_bytes_measures_real_local_agents(tmp_path, monkeypatch, capsys):
    from benchmarks import master_bytes

    monkeypatch.chdir(tmp_path)  # the script runs relufit, installed beside this python
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    got = master_bytes.master_bytes(3, 2000, 4, tmp_path)
    one = model.SETTING_BYTES["s15b128fixed"](2000)
    # 3 mean chunks with their QSGD headers, a GRADIENT and a plan-less ROUND header each
    from worker import protocol

    assert one < got <= one + 3 * (protocol.GRADIENT_HEADER + protocol.ROUND_HEADER + 64)
    monkeypatch.setattr(sys, "argv", ["master_bytes.py", "--workers", "2", "--d", "2000",
                                      "--rounds", "3"])
    master_bytes.main()
    assert "| 2 | " in capsys.readouterr().out
