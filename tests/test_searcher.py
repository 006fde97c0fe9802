"""The Optuna searcher on Ray's public Searcher interface, called as Ray calls it (no Ray running)."""

from __future__ import annotations

import pickle

import pytest

optuna = pytest.importorskip("optuna")

from raystudy.cluster.experiment import Experiment, history_of  # noqa: E402
from raystudy.config import parse_space  # noqa: E402

METRIC = "asr/pgd/untargeted/8/mean"


def searcher_of(tmp_path, **search):
    space = {"name": "s", "kind": "search", "targets": "t", "search": {"mechanism": "SAM", "num_samples": 4}}
    space["search"].update({"params": {"rho": {"low": 0.01, "high": 0.5, "log": True}}}, **search)
    spec = parse_space(space, "s.yaml")
    searcher = history_of(Experiment(spec, space, str(tmp_path / "s"), {}))
    searcher.start()
    return searcher


def states(searcher) -> list[str]:
    return [t.state.name for t in searcher.study.get_trials(deepcopy=False)]


def test_each_trial_is_told_once_complete_failed_or_pruned(tmp_path):
    searcher = searcher_of(tmp_path)
    configs = [searcher.suggest(name) for name in "abc"]
    assert all(set(c) == {"rho"} and 0.01 <= c["rho"] <= 0.5 for c in configs)
    searcher.on_trial_result("a", {METRIC: 0.9, "config": configs[0]})  # per-epoch results tell nothing
    assert states(searcher) == ["RUNNING"] * 3
    searcher.on_trial_complete("a", {METRIC: 0.7, "final": 1, "config": configs[0]})
    searcher.on_trial_complete("b", {"epoch": 2, "final": 0, "config": configs[1]})  # stopped by ASHA
    searcher.on_trial_complete("c", None, error=True)
    assert states(searcher) == ["COMPLETE", "PRUNED", "FAIL"]
    searcher.on_trial_complete("a", {METRIC: 0.1, "final": 1, "config": configs[0]})  # a restarted trial's kept result
    assert searcher.study.get_trials(deepcopy=False)[0].values == [0.7]


def test_ray_restores_it_from_its_pickled_state_and_it_goes_on(tmp_path):
    searcher = searcher_of(tmp_path)
    first = searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    again = pickle.loads(pickle.dumps(searcher))  # as tuner.pkl holds it: no live study inside
    assert again._study is None
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_complete("a", {METRIC: 0.4, "final": 1, "config": first})
    assert states(again) == ["COMPLETE"]
    # A trial asked after Ray's last snapshot of the searcher is found among the running ones by its values.
    late = searcher.suggest("late")
    again.on_trial_complete("late", {METRIC: 0.2, "final": 1, "config": late})
    assert states(again) == ["COMPLETE", "COMPLETE"]


def test_a_search_over_mechanisms_draws_only_the_chosen_ones_magnitudes(tmp_path):
    searcher = searcher_of(tmp_path, mechanism=["SAM", "MU"], params={})
    drawn = [searcher.suggest(str(i)) for i in range(12)]
    for config in drawn:
        expected = {"mechanism", "SAM.rho"} if config["mechanism"] == "SAM" else {"mechanism", "MU.p"}
        assert set(config) == expected, config
    assert {c["mechanism"] for c in drawn} == {"SAM", "MU"}


def test_several_objectives_are_told_as_optuna_directions(tmp_path):
    searcher = searcher_of(tmp_path, metric=[METRIC, "test_acc"], mode=["max", "max"])
    config = searcher.suggest("a")
    searcher.on_trial_complete("a", {METRIC: 0.5, "test_acc": 0.8, "final": 1, "config": config})
    trial = searcher.study.get_trials(deepcopy=False)[0]
    assert trial.values == [0.5, 0.8] and len(searcher.study.directions) == 2
