"""The Optuna searcher on Ray's public Searcher interface, called as Ray calls it (no Ray running)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna")

from ray.tune.search import ConcurrencyLimiter, Searcher  # noqa: E402

from raystudy.cluster.experiment import Experiment, history_of  # noqa: E402
from raystudy.cluster.searcher import OptunaSearcher  # noqa: E402
from raystudy.cluster.trial_count import RayTrials  # noqa: E402
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
    searcher = searcher_of(tmp_path, mechanism=["SAM", "MU"], params={}, num_samples=12)
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


def running_trials(*ids: str, finished: tuple[str, ...] = (), plans: dict | None = None) -> list:
    """Ray's trial list as a Tune callback sees it (what `RayTrials` reads): `plans`, a grid's
    trials' plans by id."""
    configs = {i: {"plan": plan} for i, plan in (plans or {}).items()}
    return [SimpleNamespace(trial_id=i, is_finished=lambda i=i: i in finished, config=configs.get(i, {})) for i in ids]


class CountedByRay(OptunaSearcher):
    """The searcher as it was: Ray's limiter keeps the count of running trials itself."""

    set_max_concurrency = Searcher.set_max_concurrency


def test_a_resumed_search_is_not_held_by_a_trial_ray_never_recorded(tmp_path):
    """Ray saves the limiter's running set with the searcher and uploads the trial list apart: a
    driver lost between the two uploads left a limiter that waits for a trial Ray never runs."""

    def restored(searcher_type, trial_list: list):
        searcher = searcher_of(tmp_path / searcher_type.__name__)
        searcher.__class__ = searcher_type
        limiter = ConcurrencyLimiter(searcher, max_concurrent=1)  # as Ray wraps it for max_concurrent_trials
        assert limiter.suggest("a") is not None and limiter.suggest("b") is None
        saved, path = limiter.get_state(), str(tmp_path / f"{searcher_type.__name__}.pkl")
        searcher.save(path)
        again = pickle.loads(pickle.dumps(searcher))  # the new driver: tuner.pkl, then Ray's restore
        again_limiter = ConcurrencyLimiter(again, max_concurrent=1)
        again_limiter.set_state(saved)
        again.restore(path)
        RayTrials("s").on_step_begin(0, trial_list)
        return again_limiter

    assert restored(CountedByRay, []).suggest("b") is None  # Ray would ask again forever
    assert restored(OptunaSearcher, []).suggest("b") is not None  # Ray knows no running trial: go on
    assert restored(OptunaSearcher, running_trials("a")).suggest("b") is None  # it does: wait for it


def test_the_limit_counts_rays_unfinished_trials_and_this_drivers_suggestions(tmp_path):
    searcher = searcher_of(tmp_path, num_samples=8)
    limiter = ConcurrencyLimiter(searcher, max_concurrent=2)
    steps = RayTrials("s")
    steps.on_step_begin(0, running_trials("r"))  # a resumed trial, not yet reporting
    assert limiter.suggest("a") is not None and limiter.suggest("b") is None
    steps.on_step_begin(1, running_trials("r", "a", finished=("a",)))
    limiter.on_trial_complete("a", None, error=True)
    assert limiter.suggest("b") is not None and limiter.suggest("c") is None
    steps.on_step_begin(2, running_trials("r", "a", "b", finished=("a", "r")))
    assert limiter.suggest("c") is not None and limiter.suggest("d") is None
    # Without Ray's steps (called directly): its own suggestions that did not complete.
    alone = searcher_of(tmp_path / "alone")
    alone.set_max_concurrency(1)
    assert alone.suggest("x") is not None and alone.suggest("y") is None
    alone.on_trial_complete("x", None, error=True)
    assert alone.suggest("y") is not None


def test_the_search_ends_at_num_samples_of_the_trials_ray_holds(tmp_path):
    """Ray's own count of suggestions is saved apart from its trial list: restored, it ran one trial
    more or fewer than asked. The searcher counts the trials Ray holds (num_samples: 4)."""
    searcher = searcher_of(tmp_path)
    steps = RayTrials("s")
    steps.on_step_begin(0, running_trials("a", "b", finished=("a", "b")))  # two done before the loss
    assert searcher.suggest("c") is not None and searcher.suggest("d") is not None
    assert searcher.suggest("e") is Searcher.FINISHED
    steps.on_step_begin(1, running_trials("a", "b", "c", finished=("a", "b")))  # d: lost with a driver
    assert searcher.suggest("e") is not None and searcher.suggest("f") is Searcher.FINISHED
