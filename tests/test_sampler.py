"""A search's sampler, named in its study file with every setting raystudy relies on written out:
parsed in one line per mistake, the same seeded samples on every run, recorded with the search."""

from __future__ import annotations

import importlib.util
import math

import pytest
from test_searcher import METRIC, searcher_of

from raystudy.config import parse_space
from raystudy.config.sampler import SAMPLER_OPTIONS, SamplerSpec, parse_sampler, search_settings
from raystudy.errors import RaystudyError

SAMPLERS = tuple(SAMPLER_OPTIONS)


def objective(config: dict) -> float:
    """A smooth made-up ASR with its best inside the bounds (rho = 0.1)."""
    return 1 - (math.log10(config["rho"]) + 1) ** 2


def drawn(tmp_path, sampler: str, seed: int, n: int = 12) -> list[float]:
    """The rho values a seeded search draws, each told its objective before the next is drawn."""
    searcher = searcher_of(tmp_path, sampler=sampler, seed=seed, num_samples=n)
    values = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        values.append(config["rho"])
        searcher.on_trial_complete(f"t{i}", {METRIC: objective(config)})
    return values


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_seeded_search_draws_the_same_samples_every_time(tmp_path, sampler):
    first = drawn(tmp_path / "a", sampler, seed=0)
    assert drawn(tmp_path / "b", sampler, seed=0) == first
    assert drawn(tmp_path / "c", sampler, seed=1) != first  # the seed is used
    assert all(0.01 <= rho <= 0.5 for rho in first)


def test_the_defaults_are_written_out_and_recorded():
    tpe = parse_sampler(None, "s.yaml: search")
    assert tpe == SamplerSpec() and tpe.to_dict() == {
        "name": "tpe",
        "n_startup_trials": 10,
        "n_ei_candidates": 24,
        "multivariate": True,
        "constant_liar": True,
        "group": False,
    }
    assert parse_sampler("gp", "w").to_dict() == {
        "name": "gp",
        "n_startup_trials": 10,
        "deterministic_objective": False,
    }
    chosen = parse_sampler({"name": "qmc", "qmc_type": "halton"}, "w")
    assert dict(chosen.options) == {"qmc_type": "halton", "scramble": True}
    settings = search_settings(chosen, 7)
    assert settings["sampler"]["name"] == "qmc" and settings["seed"] == 7
    assert settings["optuna"] == importlib.metadata.version("optuna")
    assert settings["importance_evaluator"] == {
        "name": "PED-ANOVA",
        "target_quantile": 0.1,
        "region_quantile": 1.0,
        "evaluate_on_local": True,
    }


def test_the_sampler_is_built_with_the_written_out_settings():
    import optuna

    from raystudy.cluster.searcher import build_sampler

    tpe = build_sampler(SamplerSpec(), 3)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert (tpe._n_startup_trials, tpe._n_ei_candidates, tpe._constant_liar, tpe._multivariate) == (10, 24, True, True)
    cmaes = build_sampler(parse_sampler({"name": "cmaes", "popsize": 6}, "w"), 3)
    assert isinstance(cmaes, optuna.samplers.CmaEsSampler) and cmaes._popsize == 6


def search_file(**search) -> dict:
    space = {"name": "s", "kind": "search", "targets": "t", "search": {"mechanism": "SAM", "num_samples": 4}}
    space["search"].update({"params": {"rho": {"low": 0.01, "high": 0.5, "log": True}}}, **search)
    return space


@pytest.mark.parametrize(
    "sampler, message",
    [
        ("nsga2", "unknown sampler 'nsga2'; valid: tpe, cmaes, gp, random, qmc"),
        ({"name": "tpe", "n_startup": 5}, "sampler tpe: unknown option(s) n_startup; valid: n_startup_trials"),
        ({"name": "random", "seed": 3}, "sampler random: unknown option(s) seed; valid: none"),
        ({"name": "tpe", "constant_liar": "yes"}, "constant_liar='yes' must be bool"),
        ({"name": "tpe", "n_startup_trials": 0}, "n_startup_trials must be at least 1"),
        ({"name": "gp", "n_startup_trials": 2.5}, "n_startup_trials=2.5 must be int"),
        ({"name": "cmaes", "popsize": -1}, "popsize=-1 must be positive"),
        ({"name": "qmc", "qmc_type": "lhs"}, "qmc_type='lhs'; valid: sobol, halton"),
        (["tpe"], "search: sampler=['tpe'] must be str/dict"),
        ({"name": ["tpe"]}, "unknown sampler ['tpe']; valid: tpe"),
        ({"name": "tpe", "group": True, "multivariate": False}, "group needs multivariate: true"),
    ],
)
def test_a_bad_sampler_is_one_line(sampler, message):
    with pytest.raises(RaystudyError, match="^s.yaml: search") as err:
        parse_space(search_file(sampler=sampler), "s.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_sampler_that_cannot_search_the_space_is_refused():
    two = {"metric": [METRIC, "acc"], "mode": ["max", "max"]}
    with pytest.raises(RaystudyError, match="sampler cmaes optimizes one objective; use tpe, gp, random or qmc"):
        parse_space(search_file(sampler="cmaes", **two), "s.yaml")
    parse_space(search_file(sampler="gp", **two), "s.yaml")  # GP: log EHVI
    several = {"mechanism": ["MU", "SAM"], "params": {}}
    with pytest.raises(RaystudyError, match="sampler qmc needs a fixed space"):
        parse_space(
            {**search_file(sampler="qmc"), "search": {**search_file()["search"], **several, "sampler": "qmc"}}, "s.yaml"
        )


def test_cmaes_without_its_extra_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else real(name))
    with pytest.raises(RaystudyError, match=r"s.yaml: search: the sampler cmaes needs cmaes.*raystudy\[cmaes\]"):
        parse_space(search_file(sampler="cmaes"), "s.yaml")
