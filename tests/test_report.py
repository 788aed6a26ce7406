"""relufit report: figures and tables from small real runs (sim backend), the numbers
checked against the metrics they come from; load_run's per-trial API and its errors."""

import json
import math
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.config import from_dict
from orchestrator.errors import RelufitError
from orchestrator.report import fit_geometric_rate, make_report
from orchestrator.results import load_run
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {
    "problem": {"d": 10, "n": 200, "seed": 1},
    "train": {"rounds": 200, "batch_size": 16, "lr": 0.4, "target_rel_error": 1e-6},
    "compress": {"scheme": "none"},
    "cluster": {"workers": 2},
}


def run(tmp, name, sweep, **sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for sec, vals in sections.items():
        data[sec] = {**data.get(sec, {}), **vals}
    data["sweep"] = sweep
    return run_experiment(from_dict(data, name), SimPool(), tmp, "sim", progress=lambda _: None)


@pytest.fixture(scope="module")
def qsgd_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("runs"), "qsgd", {
        "compress": [{"scheme": "none"}, {"scheme": "qsgd", "levels": 8}], "repeats": 2})


@pytest.fixture(scope="module")
def qsgd_report(qsgd_run, tmp_path_factory):
    out = make_report([qsgd_run], tmp_path_factory.mktemp("report"))
    return out, json.loads((out / "report.json").read_text())


def assert_valid_figure(path_png):
    import matplotlib.image

    data = path_png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    img = matplotlib.image.imread(path_png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # not a blank canvas
    svg = ET.parse(path_png.with_suffix(".svg")).getroot()
    assert svg.tag.endswith("svg") and len(list(svg.iter())) > 50


def test_geometric_rate_fit_recovers_a_known_rate():
    rng = np.random.default_rng(0)
    rounds = np.arange(1, 301)
    err = 0.9 * 0.85 ** rounds * np.exp(rng.normal(0, 0.05, rounds.size))
    err[:5] = 0.95  # a plateau before the geometric phase is left out of the fit
    fit = fit_geometric_rate(rounds, err, start=1e-1, stop=1e-6)
    assert fit.rate == pytest.approx(0.85, abs=2e-3) and fit.r2 > 0.99
    assert err[fit.first_round - 1] <= 1e-1 < err[fit.first_round - 2]
    assert err[fit.last_round - 1] <= 1e-6 < err[fit.last_round - 2]  # stops at the target
    exact = fit_geometric_rate(rounds, 0.5 ** rounds)
    assert exact.rate == pytest.approx(0.5, rel=1e-9) and exact.r2 == pytest.approx(1.0)


def test_geometric_rate_fit_needs_a_geometric_phase():
    rounds = np.arange(1, 50)
    assert fit_geometric_rate(rounds, np.full(49, 0.5)) is None  # never below 1e-1
    assert fit_geometric_rate(rounds[:2], np.array([0.05, 0.01])) is None  # too few points
    stalled = fit_geometric_rate(rounds, np.full(49, 0.05))
    assert stalled.rate == pytest.approx(1.0)


def test_report_writes_valid_figures_and_a_summary(qsgd_report):
    out, rep = qsgd_report
    assert sorted(rep["figures"]) == sorted(
        f"rel_error_vs_{x}.{ext}" for x in ("round", "bits", "time") for ext in ("png", "svg"))
    for name in rep["figures"]:
        if name.endswith(".png"):
            assert_valid_figure(out / name)
    md = (out / "summary.md").read_text()
    assert "| fp32 | 2/2 |" in md and "| qsgd s=8 elias | 2/2 |" in md
    assert any("success-rate figure skipped" in n for n in rep["notes"])
    assert any("time-vs-workers figure skipped" in n for n in rep["notes"])


def test_summary_numbers_match_the_metrics(qsgd_run, qsgd_report):
    out, rep = qsgd_report
    loaded = load_run(qsgd_run)
    by_label = {s["setting"]: s for s in rep["settings"]}
    assert set(by_label) == {"fp32", "qsgd s=8 elias"}
    for label, scheme in (("fp32", "none"), ("qsgd s=8 elias", "qsgd")):
        trials = [t for t in loaded["trials"] if t["spec"]["scheme"] == scheme]
        assert [t["spec"]["seed"] for t in trials] == [1, 2]
        rounds, bits, times, slopes = [], [], [], []
        for t in trials:
            m = t["metrics"]
            k = int(np.argmax(m["rel_error"] <= 1e-6))
            assert m["rel_error"][k] <= 1e-6 and k == len(m["round"]) - 1  # stopped there
            rounds.append(k + 1)
            bits.append(8 * m["bytes_up"][: k + 1].sum())
            times.append(m["elapsed_s"][k])
            i = int(np.argmax(m["rel_error"] <= 0.1))
            slopes.append(np.polyfit(np.arange(i, k + 1), np.log(m["rel_error"][i: k + 1]), 1)[0])
        s = by_label[label]
        assert s["rounds_to"] == pytest.approx(np.mean(rounds))
        assert s["bits_up_to"] == pytest.approx(np.mean(bits))
        assert s["time_to"] == pytest.approx(np.mean(times))
        assert s["rate"] == pytest.approx(math.exp(np.mean(slopes)), rel=1e-9)
        assert s["reached"] == s["trials"] == 2
    (ratio,) = rep["ratios"]
    q, f = by_label["qsgd s=8 elias"], by_label["fp32"]
    assert ratio["baseline"] == "fp32"
    assert ratio["rounds_to"] == pytest.approx(q["rounds_to"] / f["rounds_to"])
    assert ratio["bits_up_to"] == pytest.approx(q["bits_up_to"] / f["bits_up_to"])
    assert ratio["bits_up_to"] < 1  # fewer bits than fp32, even at d = 10 with its header
    md = (out / "summary.md").read_text()
    assert f"| fp32 | 2/2 | {f['rounds_to']:.1f} | {f['bits_up_to']:.3g} |" in md
    assert f"| {ratio['rounds_to']:.3g} | {ratio['bits_up_to']:.3g} |" in md


def test_samples_workers_and_bandwidth_figures(tmp_path):
    samples = run(tmp_path, "samples", {"problem.d": [6, 10], "problem.n_ratio": [0.5, 4.0],
                                        "repeats": 2}, train={"rounds": 400})
    scaling = run(tmp_path, "scaling", {"cluster.workers": [1, 2],
                                        "cluster.link": ["10mbit", "1gbit"]}, problem={"n": 0})
    out = make_report([samples, scaling], tmp_path / "rep")
    rep = json.loads((out / "report.json").read_text())
    for name in ("success_vs_samples", "time_vs_workers", "time_vs_bandwidth"):
        assert_valid_figure(out / f"{name}.png")
    loaded = load_run(samples)
    for row in rep["samples"]:
        ts = [t for t in loaded["trials"] if t["spec"]["d"] == row["d"]
              and t["spec"]["n"] == row["n"]]
        ok = sum(t["metrics"]["rel_error"].min() <= 1e-6 for t in ts)
        assert (row["trials"], row["successes"]) == (2, ok)
        assert row["n_ratio"] == pytest.approx(row["n"] / row["d"])
    assert {r["n_ratio"] for r in rep["samples"]} == {0.5, 4.0}
    assert all(r["successes"] == 0 for r in rep["samples"] if r["n_ratio"] < 1)  # n < d
    assert {r["workers"] for r in rep["workers"]} == {1, 2}
    assert {r["bandwidth"] for r in rep["bandwidth"]} == {10.0, 1000.0}
    assert any("not shaped on backend sim" in n for n in rep["notes"])
    # two runs on one figure: settings are labelled by their experiment
    assert {s["run"] for s in rep["settings"]} == {"samples", "scaling"}


def test_too_many_settings_skip_the_curves_with_a_note(tmp_path, monkeypatch):
    import orchestrator.report as report

    path = run(tmp_path, "many", {"train.lr": [0.3, 0.4]}, train={"rounds": 30})
    monkeypatch.setattr(report, "MAX_CURVES", 1)
    rep = json.loads((make_report([path], tmp_path / "r") / "report.json").read_text())
    assert rep["figures"] == [] and any("curves skipped" in n for n in rep["notes"])


def test_load_run_splits_trials_and_keeps_a_killed_trial(qsgd_run, tmp_path):
    loaded = load_run(qsgd_run)
    assert [t["trial"] for t in loaded["trials"]] == [0, 1, 2, 3]
    for t in loaded["trials"]:
        assert len(t["metrics"]["round"]) == t["rounds"]
        assert list(t["metrics"]["round"]) == list(range(t["rounds"]))
        assert t["metrics"]["bytes_up"].sum() == t["total_bytes_up"]
    copy = shutil.copytree(qsgd_run, tmp_path / "killed")
    summary = json.loads((copy / "summary.json").read_text())
    summary["trials"].pop()  # as if killed -9 during the last trial
    (copy / "summary.json").write_text(json.dumps(summary))
    last = load_run(copy)["trials"][-1]
    assert last["status"] == "incomplete" and last["spec"] == loaded["trials"][-1]["spec"]
    assert last["params"] == loaded["trials"][-1]["params"]


def corrupt(path, what):
    if what == "missing":
        return path / "nope"
    bad = shutil.copytree(path, path.parent / f"bad-{what}")
    if what == "no summary":
        (bad / "summary.json").unlink()
    elif what == "summary not json":
        (bad / "summary.json").write_text("{ truncated")
    elif what == "summary wrong shape":
        (bad / "summary.json").write_text('{"trials": 3}')
    elif what == "no metrics":
        (bad / "metrics.csv").unlink()
    elif what == "metrics columns":
        (bad / "metrics.csv").write_text("a,b\n1,2\n")
    elif what == "metrics not numeric":
        text = (bad / "metrics.csv").read_text().splitlines()
        (bad / "metrics.csv").write_text("\n".join([text[0], "0,0,x" + text[1][5:]]))
    return bad


CORRUPT = ["missing", "no summary", "summary not json", "summary wrong shape", "no metrics",
           "metrics columns", "metrics not numeric"]


@pytest.mark.parametrize("what", CORRUPT)
def test_a_missing_or_corrupt_run_is_a_one_line_error(qsgd_run, what, tmp_path):
    bad = corrupt(qsgd_run, what)
    with pytest.raises(RelufitError):
        load_run(bad)
    res = CliRunner().invoke(cli, ["report", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written for a bad run


def test_cli_report_prints_the_summary_path(qsgd_run, tmp_path):
    res = CliRunner().invoke(cli, ["report", str(qsgd_run), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(tmp_path / "o" / "summary.md")
    res = CliRunner().invoke(cli, ["report"])
    assert res.exit_code == 2  # usage: at least one run directory


def test_diverged_and_one_round_trials_give_strict_json(tmp_path):
    path = run(tmp_path, "edge", {"train": [{"lr": 50.0}, {"rounds": 1}]})
    rep = json.loads((make_report([path], tmp_path / "r") / "report.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    diverged, single = rep["trials"]
    assert diverged["status"] == "failed" and not diverged["succeeded"]
    assert single["rounds"] == 1 and single["time_per_round"] is None
    assert "rel_error_vs_round.png" in rep["figures"]
