"""``train.lr = "auto"``: the rule (orchestrator/stepsize.py, docs/reference.md "Step size"),
how config resolves it and where the run directory records it, and that its step reaches
rel_error 1e-6 on --backend sim across d, B, M and QSGD levels.

The grid: d in {50, 500, 5000}, B in {1, 16, 128}, M in {1, 4, 16}, s in {2, 4, 16, none} is
108 cells. The rounds a cell needs grow like (1 + beta) d / (2 B M), and no step size cuts
them by more than a small factor (the rule's step is the bound's optimum), so the cost of a
cell, rounds x workers x (a gradient + coding), is about (1 + beta) d / B whatever M is:
d = 5000, B = 1, s = 2 needs ~1e7 rounds, hours of sim; the d = 5000 QSGD cells together
need days. CI runs all 36 cells of d = 50, every other cell whose predicted cost
(``_cost_s``) is at most GRID_CAP_S (21 of d = 500), and one float32 cell at d = 5000
(~20 s) so that every d runs: 58 cells, 2 min on this 2-core machine at a load of 2 (the
slow tests here all together; ~10 min under a load of 8). ``RELUFIT_LR_GRID=full`` runs all
108.
Data: fresh samples every round (n = 0), the setting the rule is derived for exactly, and
no n x d matrix (n/d = 40 at d = 5000 would be 8 GB); finite n is tested on its own below.
Budget: twice the rounds the bound predicts, plus 20 (sim took 0.66-1.1x the prediction).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from orchestrator import stepsize
from orchestrator.config import from_dict, tomllib
from orchestrator.errors import ConfigError
from orchestrator.runner import run_experiment
from orchestrator.trial import SimPool, run_trial
from worker.node import TrialSpec

TARGET = 1e-6
GRID_CAP_S = 10.0  # a cell's predicted seconds on one core, see _cost_s


def _spec(d=50, n=0, batch_size=1, workers=1, levels=None, bucket=0, topology="ps", lr=0.1,
          rounds=100) -> TrialSpec:
    return TrialSpec(d=d, n=n, seed=0, rounds=rounds, batch_size=batch_size, lr=lr,
                     target_rel_error=TARGET, scheme="none" if levels is None else "qsgd",
                     levels=levels or 4, bucket_size=bucket, workers=workers, topology=topology)


def _predicted_rounds(spec: TrialSpec) -> float:
    return stepsize.rounds_to(TARGET, stepsize.for_spec(spec),
                              stepsize.second_moment(**stepsize.shape(spec)))


# ------------------------------------------------------------------ the rule


def test_float32_step_is_of_order_2m_over_d_and_halves_the_largest_stable_one():
    for d, m in [(5000, 1), (5000, 16), (500, 4)]:
        lr = stepsize.auto_lr(d, m, 1)
        assert lr / stepsize.MARGIN == pytest.approx(2 * m / d, rel=0.02)  # "2B/d diverges"
    # a global batch far above d: a ~ 1/4, the step of gradient descent on E[g] = h/2
    assert stepsize.auto_lr(10, 10**6, 1) == pytest.approx(stepsize.MARGIN * 4, rel=1e-4)
    # only the global batch m = B M counts (beyond the 1/4 of the mean gradient itself)
    assert stepsize.auto_lr(100, 4, 8) == pytest.approx(stepsize.auto_lr(100, 32, 1), rel=0.01)


def test_qsgd_divides_the_step_by_its_variance_factor_per_quantization():
    d, s = 400, 4
    beta = min(d / s**2, math.sqrt(d) / s)
    assert stepsize.qsgd_beta(s, d) == beta == 5.0
    fp32 = stepsize.second_moment(d, 8, 1)
    # one worker: every bit of the second moment passes the quantizer
    assert stepsize.second_moment(d, 8, 1, s) == pytest.approx((1 + beta) * fp32)
    for topology, times in [("ps", 1), ("allgather", 1), ("broadcast", 2), ("allreduce", 2)]:
        assert stepsize.quantizations(topology) == times
        spec = _spec(d=d, batch_size=8, workers=3, levels=s, topology=topology)
        once = stepsize.second_moment(d, 8, 3, s, quantized=1)
        assert stepsize.second_moment(**stepsize.shape(spec)) == pytest.approx(
            once * (1 + beta) ** (times - 1))
    # a bucket uses its own size; 0 or >= d means the whole vector
    assert stepsize.second_moment(d, 8, 1, s, bucket=16) == pytest.approx(
        (1 + min(16 / 16, 4 / 4)) * fp32)
    assert stepsize.second_moment(d, 8, 1, s, bucket=d) == stepsize.second_moment(d, 8, 1, s)


def test_a_finite_data_set_caps_the_step_only_once_the_batch_exceeds_it():
    d = 50
    assert stepsize.data_cap(d, 0) == math.inf
    assert stepsize.auto_lr(d, 16, 4, n=2000) == stepsize.auto_lr(d, 16, 4)  # m = 64 < n
    assert stepsize.auto_lr(d, 128, 16, n=200) == pytest.approx(2 / (1 + 2 * d / 200))


def test_the_bound_is_sharp_in_sim_past_the_largest_step_sgd_diverges():
    """lr = 1/a is the edge the rule halves: at 1.3/a the error grows (sim), at the rule's
    step it reaches the target in about the predicted rounds."""
    spec = _spec(d=50, batch_size=1, workers=1, rounds=3000)
    a = stepsize.second_moment(**stepsize.shape(spec))
    over = run_trial(TrialSpec(**{**spec.to_dict(), "lr": 1.3 / a}), SimPool(), lambda r: None)
    assert over.final_rel_error > 1.0 or over.status == "failed"
    auto = TrialSpec(**{**spec.to_dict(), "lr": stepsize.for_spec(spec)})
    res = run_trial(auto, SimPool(), lambda r: None)
    assert res.reached_target and res.rounds <= 1.2 * _predicted_rounds(spec)


# ------------------------------------------------------------------ config and run directory


def _exp(overrides=(), sweep=None, **sections):
    data = {"problem": {"d": 20, "n": 0, "seed": 1},
            "train": {"rounds": 2000, "batch_size": 8, "lr": "auto"},
            "compress": {"scheme": "none"}, "cluster": {"workers": 2}}
    for sec, vals in sections.items():
        data[sec] = {**data[sec], **vals}
    if sweep is not None:
        data["sweep"] = sweep
    return from_dict(data, "auto", list(overrides))


def test_auto_resolves_per_trial_in_sweeps_and_overrides():
    (t,) = _exp().trials()
    assert t.lr_rule == "auto" and t.spec.lr == stepsize.auto_lr(20, 8, 2)
    trials = _exp(sweep={"train.lr": ["auto", 0.1], "cluster.workers": [1, 4]}).trials()
    assert [(x.lr_rule, x.spec.lr) for x in trials] == [
        ("auto", stepsize.auto_lr(20, 8, 1)), ("auto", stepsize.auto_lr(20, 8, 4)),
        ("fixed", 0.1), ("fixed", 0.1)]
    section = _exp(sweep={"train": [{"batch_size": 4, "lr": "auto"}, {"lr": 0.2}]}).trials()
    assert [x.spec.lr for x in section] == [stepsize.auto_lr(20, 4, 2), 0.2]
    (q,) = _exp(["train.lr=auto", "compress.scheme=qsgd", "compress.levels=2",
                 "cluster.topology=broadcast"], train={"lr": 0.3}).trials()
    assert q.spec.lr == stepsize.auto_lr(20, 8, 2, levels=2, quantized=2)
    (f,) = _exp(["train.lr=0.3"]).trials()
    assert f.lr_rule == "fixed" and f.spec.lr == 0.3


@pytest.mark.parametrize("where", ["train", "override", "sweep", "section"])
def test_any_other_word_for_lr_is_an_error_naming_the_key(where):
    args = {"train": dict(train={"lr": "fast"}),
            "override": dict(overrides=["train.lr=Auto"]),
            "sweep": dict(sweep={"train.lr": [0.1, "adaptive"]}),
            "section": dict(sweep={"train": [{"lr": "best"}]})}[where]
    with pytest.raises(ConfigError) as info:
        _exp(**args)
    assert str(info.value).startswith('train.lr: must be a positive number or "auto", got ')


def test_run_directory_records_the_resolved_step(tmp_path):
    exp = _exp(sweep={"train.lr": ["auto", 0.05]})
    run = run_experiment(exp, SimPool(), tmp_path, "sim", progress=lambda s: None)
    summary = json.loads((run / "summary.json").read_text())
    auto, fixed = summary["trials"]
    assert (auto["lr_rule"], auto["lr"]) == ("auto", stepsize.auto_lr(20, 8, 2))
    assert auto["spec"]["lr"] == auto["lr"] and auto["reached_target"]
    assert (fixed["lr_rule"], fixed["lr"]) == ("fixed", 0.05)
    text = (run / "experiment.toml").read_text()
    assert f"#   trial 0: lr = {auto['lr']!r}" in text and "trial 1: lr" not in text
    # the file is still the experiment as given: it resolves again to the same steps
    again = from_dict(tomllib.loads(text), "again").trials()
    assert [t.spec for t in again] == [t.spec for t in exp.trials()]


# ------------------------------------------------------------------ convergence on sim


def _cost_s(d: int, b: int, m: int, s: int | None) -> float:
    """Predicted seconds of a cell in sim: rounds x workers x (0.2 ms of bookkeeping, 40 ns
    per entry of the B x d batch drawn and multiplied, 0.8 ms of QSGD coding), as measured
    on a loaded 2-core machine; QSGD cells take ~0.8x the rounds the bound predicts."""
    rounds = _predicted_rounds(_spec(d=d, batch_size=b, workers=m, levels=s))
    per_worker_ms = 0.2 + 4e-5 * b * d + (0.8 if s else 0.0)
    return rounds * (0.8 if s else 1.0) * m * per_worker_ms / 1e3


GRID = [(d, b, m, s) for d in (50, 500, 5000) for b in (1, 16, 128) for m in (1, 4, 16)
        for s in (None, 2, 4, 16)]
FULL = os.environ.get("RELUFIT_LR_GRID") == "full"
RUN = [c for c in GRID if FULL or c[0] == 50 or _cost_s(*c) <= GRID_CAP_S
       or c == (5000, 16, 16, None)]
TOPOLOGIES = [(50, 16, 4, 2, t, 0) for t in ("allgather", "broadcast", "allreduce")]
BUCKETED = [(500, 16, 4, 2, "ps", 32), (50, 16, 4, 4, "allreduce", 16)]


def _cell_id(c) -> str:
    return "-".join(f"{k}{v}" for k, v in zip("dBMstb", c, strict=False) if v not in (0, "ps"))


def _reaches_target(tmp_path, d, b, m, s, topology="ps", bucket=0, n=0):
    spec = _spec(d=d, n=n, batch_size=b, workers=m, levels=s, bucket=bucket, topology=topology)
    budget = math.ceil(2 * _predicted_rounds(spec)) + 20
    compress = {"scheme": "none"} if s is None else {"scheme": "qsgd", "levels": s,
                                                     "bucket_size": bucket}
    exp = from_dict({"problem": {"d": d, "n": n, "seed": 0},
                     "train": {"rounds": budget, "batch_size": b, "lr": "auto",
                               "target_rel_error": TARGET},
                     "compress": compress, "cluster": {"workers": m, "topology": topology}},
                    "grid")
    run = run_experiment(exp, SimPool(), tmp_path, "sim", progress=lambda s: None)
    (trial,) = json.loads((run / "summary.json").read_text())["trials"]
    assert trial["lr_rule"] == "auto" and trial["lr"] == stepsize.for_spec(spec)
    assert trial["status"] == "completed" and trial["reached_target"], (
        f"rel_error {trial['final_rel_error']:.3g} after {trial['rounds']} of {budget} rounds")


@pytest.mark.slow
@pytest.mark.parametrize("cell", RUN, ids=_cell_id)
def test_auto_reaches_the_target_within_its_budget(tmp_path, cell):
    _reaches_target(tmp_path, *cell)


@pytest.mark.slow
@pytest.mark.parametrize("cell", TOPOLOGIES + BUCKETED, ids=_cell_id)
def test_auto_counts_quantizations_and_buckets(tmp_path, cell):
    d, b, m, s, topology, bucket = cell
    _reaches_target(tmp_path, d, b, m, s, topology, bucket)


def test_the_grid_run_in_ci_covers_every_d_b_m_and_s():
    """What CI leaves out is only the cells too slow for any step size."""
    for i in range(4):
        assert {c[i] for c in RUN} == {c[i] for c in GRID}
    assert len([c for c in RUN if c[0] == 50]) == 36 and len(RUN) in (58, 108)
    left_out = [c for c in GRID if c not in RUN]
    assert all(_cost_s(*c) > GRID_CAP_S for c in left_out)


def test_with_fewer_samples_than_the_global_batch_the_cap_is_what_converges():
    """d = 50, n = 200, m = 2048: the noise rule alone (lr ~1.9) stalls near rel_error 0.2;
    the data set's cap (lr = 1.33) reaches the target."""
    spec = _spec(d=50, n=200, batch_size=128, workers=16, rounds=400)
    assert stepsize.for_spec(spec) == pytest.approx(4 / 3)
    noise_only = stepsize.MARGIN / stepsize.second_moment(**stepsize.shape(spec))
    stalled = run_trial(TrialSpec(**{**spec.to_dict(), "lr": noise_only}), SimPool(),
                        lambda r: None)
    assert not stalled.reached_target
    capped = run_trial(TrialSpec(**{**spec.to_dict(), "lr": stepsize.for_spec(spec)}),
                       SimPool(), lambda r: None)
    assert capped.reached_target
