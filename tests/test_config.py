"""Experiment files: sweep expansion (the right trials, each its own seed), overrides, and
one-line errors that name the bad key."""

import pytest

from orchestrator.config import from_dict, load_experiment, parse_override
from orchestrator.errors import ConfigError

BASE = {"problem": {"d": 10, "n": 100, "seed": 3}, "cluster": {"workers": 2}}


def exp(sweep=None, overrides=(), **sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for sec, vals in sections.items():
        data[sec] = {**data.get(sec, {}), **vals}
    if sweep is not None:
        data["sweep"] = sweep
    return from_dict(data, "t", list(overrides))


def error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        exp(*args, **kwargs).trials()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_no_sweep_is_one_trial_with_the_base_seed():
    (t,) = exp().trials()
    assert t.index == 0 and t.params == {} and t.spec.seed == 3 and t.spec.trial == 0


def test_dotted_sweep_is_the_cartesian_product_in_order():
    trials = exp({"compress.levels": [2, 4, 16], "train.batch_size": [8, 32]}).trials()
    assert [(t.spec.levels, t.spec.batch_size) for t in trials] == [
        (2, 8), (2, 32), (4, 8), (4, 32), (16, 8), (16, 32)]
    assert [t.index for t in trials] == [t.spec.trial for t in trials] == list(range(6))
    assert trials[3].params == {"compress.levels": 4, "train.batch_size": 32}
    assert {t.spec.seed for t in trials} == {3}  # without repeats every setting sees seed 3


def test_repeats_give_each_trial_its_own_seed_within_a_setting():
    trials = exp({"compress.levels": [2, 8], "repeats": 3}).trials()
    assert len(trials) == 6
    assert [(t.spec.levels, t.spec.seed, t.params["repeat"]) for t in trials] == [
        (2, 3, 0), (2, 4, 1), (2, 5, 2), (8, 3, 0), (8, 4, 1), (8, 5, 2)]
    # the same seeds across settings: paired comparisons on the same data
    assert [t.spec.seed for t in trials[:3]] == [t.spec.seed for t in trials[3:]]


def test_section_sweep_sets_several_keys_per_trial():
    trials = exp({"compress": [{"scheme": "none"}, {"scheme": "qsgd", "levels": 2,
                                                     "coding": "fixed"}]}).trials()
    assert [(t.spec.scheme, t.spec.levels, t.spec.coding) for t in trials] == [
        ("none", 4, "elias"), ("qsgd", 2, "fixed")]
    assert trials[1].params == {"compress": {"scheme": "qsgd", "levels": 2, "coding": "fixed"}}


def test_n_ratio_sets_n_from_each_d():
    trials = exp({"problem.d": [10, 40], "problem.n_ratio": [0.5, 2.0], "repeats": 2}).trials()
    assert [(t.spec.d, t.spec.n, t.spec.seed) for t in trials] == [
        (10, 5, 3), (10, 5, 4), (10, 20, 3), (10, 20, 4),
        (40, 20, 3), (40, 20, 4), (40, 80, 3), (40, 80, 4)]


def test_swept_seeds_combine_with_repeats_when_far_enough_apart():
    trials = exp({"problem.seed": [0, 10], "repeats": 2}).trials()
    assert [t.spec.seed for t in trials] == [0, 1, 10, 11]


def test_overrides_set_keys_and_sweeps():
    e = exp(overrides=["train.lr=0.25", "sweep.compress.levels=[2, 4]", "sweep.repeats=2",
                       "compress.coding=fixed"])
    trials = e.trials()
    assert e.train.lr == 0.25 and len(trials) == 4
    assert all(t.spec.coding == "fixed" and t.spec.lr == 0.25 for t in trials)
    assert [t.spec.seed for t in trials] == [3, 4, 3, 4]
    e = exp(overrides=['sweep.compress=[{scheme = "none"}, {levels = 8}]'])
    assert [t.spec.scheme for t in e.trials()] == ["none", "qsgd"]


def test_override_values_are_toml_or_bare_strings():
    assert parse_override("compress.scheme=none") == ("compress.scheme", "none")
    assert parse_override("train.lr = 1e-2") == ("train.lr", 0.01)
    assert parse_override("sweep.problem.d=[10, 20]") == ("sweep.problem.d", [10, 20])
    assert exp(overrides=["problem.d=1e2"]).problem.d == 100  # an integral float is an int


def test_resolved_toml_reloads_to_the_same_trials(tmp_path):
    e = exp({"compress": [{"scheme": "none"}, {"levels": 2}], "problem.n_ratio": [1.5, 3.0],
             "repeats": 2}, cluster={"link": "100mbit"})
    f = tmp_path / "resolved.toml"
    f.write_text(e.to_toml())
    again = load_experiment(f)
    assert [t.spec for t in again.trials()] == [t.spec for t in e.trials()]
    assert [t.params for t in again.trials()] == [t.params for t in e.trials()]
    assert again.cluster.link == "100mbit"


@pytest.mark.parametrize("sweep, overrides, needle", [
    ({"compress.levls": [2]}, (), "compress.levls: unknown key (did you mean 'levels'?)"),
    ({"compres.levels": [2]}, (), "compres.levels: unknown section (did you mean 'compress'?)"),
    ({"compress": [{"levls": 2}]}, (), "compress.levls: unknown key"),
    ({"compress.levels": 4}, (), "sweep.compress.levels: must be a non-empty list"),
    ({"compress.levels": []}, (), "sweep.compress.levels: must be a non-empty list"),
    ({"compress": ["qsgd"]}, (), 'sweep.compress: a sweep key is "section.key"'),
    ({"foo": [1]}, (), 'sweep.foo: a sweep key is "section.key"'),
    ({"compress.levels": [2, 0]}, (), "compress.levels: must be >= 1, got 0"),
    ({"compress.levels": [2.5]}, (), "compress.levels: must be int, got 2.5"),
    ({"compress.scheme": ["qsgd", "qsdg"]}, (), "compress.scheme: must be one of none, qsgd"),
    ({"train.lr": [0.1, -1]}, (), "train.lr: must be a positive number, got -1.0"),
    ({"train.lr": [float("nan")]}, (), "train.lr: must be a positive number, got nan"),
    ({"cluster.workers": [True]}, (), "cluster.workers: must be int, got True"),
    ({"repeats": 0}, (), "sweep.repeats: must be >= 1, got 0"),
    ({"repeats": 1.5}, (), "sweep.repeats: must be int, got 1.5"),
    ([1, 2], (), "sweep: must be a table"),
    (None, ["train.lr"], "an override is section.key=value"),
    (None, ["train.lrr=1"], "train.lrr: unknown key (did you mean 'lr'?)"),
])
def test_bad_sweeps_and_overrides_name_the_key(sweep, overrides, needle):
    assert needle in error(sweep, overrides)


def test_a_combination_that_cannot_run_names_its_swept_values():
    msg = error({"problem.d": [10, 40], "problem.n_ratio": [0.1, 2.0]})
    assert msg.startswith("trial 0 (problem.d=10, problem.n_ratio=0.1): n must be 0 or at least")


def test_a_key_swept_twice_is_an_error():
    msg = error({"compress.levels": [2, 4], "compress": [{"levels": 8}]})
    assert "sweep.compress: sweeps compress.levels, already swept by sweep.compress.levels" in msg


@pytest.mark.parametrize("sweep", [{"compress.levels": [2, 2]},
                                   {"problem.seed": [0, 1], "repeats": 2}])
def test_identical_trials_are_an_error(sweep):
    assert "are identical" in error(sweep)


def test_bad_sections_and_files(tmp_path):
    with pytest.raises(ConfigError, match="problem: must be a table"):
        from_dict({"problem": 3}, "t")
    with pytest.raises(ConfigError, match="repeats: unknown section"):
        from_dict({"repeats": 3}, "t")  # repeats belongs in [sweep]
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[problem\nd = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(bad)


def test_paper_experiments_load_and_expand():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.glob("experiments/**/*.toml"))
    assert {f.stem for f in files} >= {"quickstart", "convergence", "samples", "qsgd",
                                       "workers", "bandwidth"}
    for f in files:
        trials = load_experiment(f).trials()  # raises on any bad key or duplicate trial
        assert trials and len({repr(t.params) for t in trials}) == len(trials)
