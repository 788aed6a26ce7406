"""benchmarks/scaling.py's bytes per link and benchmarks/model.py's cost model, without netns."""

import json
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


def test_the_allreduce_masters_bytes_do_not_grow_with_the_workers_and_broadcasts_do():
    d, bps = 10_000, 10e6
    link = (1, model.PARAMS.index("kappa"))  # the link's row, bytes / rate

    def busy(topo: str, setting: str, m: int) -> float:
        return model.features(topo, setting, m, d, 128, bps, m)[link]

    ar = [busy("allreduce", "s15b128fixed", m) for m in (2, 8, 64)]
    bc = [busy("broadcast", "s15b128fixed", m) for m in (2, 8, 64)]
    mpi = [busy("mpi-allreduce", "fp32", m) for m in (2, 8, 64)]
    assert max(ar) < 2 * min(ar) and bc[2] == pytest.approx(32 * bc[0])  # M P
    assert mpi[2] == pytest.approx(2 * 63 / 64 * 4 * d * 8e3 / bps)
    cpu = model.features("allreduce", "fp32", 8, d, 128, bps, 9)[2]  # a core each
    assert cpu[3:5].tolist() == [0, 0]  # float32 codes nothing
    # an allreduce worker handles 2 + 4 (M - 1) messages a round, its master 2 M
    assert cpu[model.PARAMS.index("mu_us")] * 1e3 == pytest.approx(2 + 4 * 7 + 16)


def test_an_allreduce_workers_codec_calls_stop_growing_with_m_once_batched():
    def calls(m: int, batched: bool) -> float:
        f = model.features("allreduce", "s15b128fixed", m, 10_000, 128, 10e6, 1e6, False,
                           batched)  # cores to spare: no crowding
        return round(f[2][4] * 1e3, 9)  # the CPU row's calls, x 1e-3

    assert [calls(m, False) for m in (2, 8, 64)] == [5 + 2, 23 + 8, 191 + 64]
    assert [calls(m, True) for m in (2, 8, 64)] == [6 + 2, 10 + 3, 10 + 3]


def modelled_rows(truth: np.ndarray, beta: float, link: str) -> list[dict]:
    """Rows as scaling.py writes them, with the rounds the model gives for ``truth``."""
    rows = []
    for m in (2, 4, 8):
        for topo, setting in (("broadcast", "fp32"), ("broadcast", "s15b128fixed"),
                              ("allreduce", "fp32"), ("allreduce", "s15b128fixed"),
                              ("mpi-allreduce", "fp32")):
            f = model.features(topo, setting, m, 10_000, 128, model.rate_of(link), 2)
            rows.append({"link": link, "d": 10_000, "M": m, "topology": topo,
                         "setting": setting, "round_ms": float(model.round_ms(truth, f, beta)),
                         "batch": 128, "codec": "batched"})
    return rows


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_fit_recovers_known_constants_and_overlap_exactly(beta):
    truth = np.array([1.0, 0.3, 1.2, 5.0, 40.0, 2.0, 0.0, 30.0])
    rows = modelled_rows(truth, beta, "10mbit") + modelled_rows(truth, beta, "100mbit")
    x, got_beta, errs = model.fit_rows(rows, 2)
    assert got_beta == beta
    np.testing.assert_allclose(x, truth, rtol=1e-6, atol=1e-9)
    assert max(abs(e["error"]) for e in errs) < 1e-9


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
    truth = np.array([0.5, 0.2, 1.0, 3.0, 30.0, 0.77, 0.0, 20.0])
    files = []
    for link in ("10mbit", "100mbit"):
        rows = [{**r, "run": "after"} for r in modelled_rows(truth, 0.0, link)]
        rows.append({**rows[0], "round_ms": 1e4, "run": "code before"})  # would spoil the fit
        files.append(tmp_path / f"{link}.json")
        files[-1].write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["model.py", *map(str, files), "--exclude", "before",
                                      "--json", str(tmp_path / "out.json")])
    model.main()
    out = capsys.readouterr().out
    assert "largest error 0% over 30 rows (30 within 20%)" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["params"]["beta"] == 0.0 and len(saved["errors"]) == 30
