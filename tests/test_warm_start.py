"""Warm start: a search's sampler knows the finished trials of earlier experiments that fall inside
its space, with their objective as the search defines it, before its first suggestion; the others are
skipped and counted; nothing is retrained or added twice (raystudy.cluster.warm_start)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import yaml
from conftest import WARM_GRID_RADII, final_rows, raystudy_here, smoke_search
from test_searcher import METRIC, searcher_of

from raystudy.cluster import searcher as searcher_module
from raystudy.cluster.experiment import Experiment, _search_setup, history_of
from raystudy.cluster.searcher import KNOWN_EXPERIMENT, KNOWN_TRIAL
from raystudy.cluster.warm_start import (
    OTHER_TARGET_MODELS,
    OTHER_TARGETS,
    KnownTrial,
    _objective_value,
    from_manifest,
    settings_of,
)
from raystudy.config import parse_space
from raystudy.errors import RaystudyError
from raystudy.persist.record import MetricRow, checked_manifest


def search_of(name: str, storage, evaluation: dict | None = None, **search):
    raw = smoke_search(name, **search)
    raw["evaluation"].update(evaluation or {})
    return parse_space(raw, str(storage / f"{name}.yaml")), raw


def created(name: str, storage, capsys, evaluation: dict | None = None, **search) -> tuple[Experiment, str]:
    """A new search experiment beside the warm grid (`evaluation`: changes to smoke_search's), and
    what making it printed."""
    spec, raw = search_of(name, storage, evaluation, **search)
    experiment = Experiment.create(spec, raw, str(storage), local=True)
    return experiment, capsys.readouterr().out


@pytest.mark.parametrize(
    "search, message",
    [
        ({"warm_start": "runs/grid"}, "warm_start='runs/grid' must be a list"),
        ({"warm_start": [3]}, "has the wrong type (int): must be text"),
        ({"warm_start": [""]}, "not empty"),
        ({"warm_start": ["a", "a"]}, "warm_start lists an experiment twice"),
        ({"warm_start": ["a"], "sampler": "random"}, "sampler random draws its samples whatever trials are known"),
        ({"warm_start": ["a"], "sampler": "qmc"}, "warm_start would change nothing; use tpe, cmaes, gp"),
        (
            {"warm_start": ["a"], "sampler": {"name": "cmaes", "use_separable_cma": True}},
            "warm_start needs use_separable_cma: false",
        ),
    ],
)
def test_warm_start_is_checked_on_load_in_one_line(search, message):
    with pytest.raises(RaystudyError) as err:
        parse_space(smoke_search("s", **search), "s.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_plan_maps_back_to_the_searched_values_that_make_it(tmp_path):
    spec, _ = search_of("s", tmp_path)
    values = {"rho": 0.1, "lambda_jr": 0.003}
    plan = spec.plan_for_sample(values)
    assert spec.sample_of_plan(plan) == (values, "")
    other_seed = dataclasses.replace(plan, train=dataclasses.replace(plan.train, seed=7))
    assert spec.sample_of_plan(other_seed) == (values, "")  # the seed is not searched
    assert spec.sample_of_plan(spec.plan_for_sample({"rho": 0.9, "lambda_jr": 0.003})) == (
        None,
        "outside the searched ranges",
    )
    faster = dataclasses.replace(plan, train=dataclasses.replace(plan.train, lr=0.01))
    assert spec.sample_of_plan(faster) == (None, "trained otherwise (lr differ)")
    st = dataclasses.replace(plan, train=dataclasses.replace(plan.train, mechanism="ST", magnitudes=()))
    assert spec.sample_of_plan(st) == (None, "another mechanism")
    # A search over several mechanisms: the mechanism and its magnitudes named as the search names them.
    several, _ = search_of("m", tmp_path, mechanism=["SAM", "SAM&JR"], params={})
    sam = several.plan_for_sample({"mechanism": "SAM", "SAM.rho": 0.1})
    assert several.sample_of_plan(sam) == ({"mechanism": "SAM", "SAM.rho": 0.1}, "")


def objective_of(trial_rows: list[dict], metric: str) -> float:
    return trial_rows[0][metric]


def grid_by_radius(warm_grid) -> dict[float, list[dict]]:
    """The warm grid's SAM&JR trials by radius: their final results."""
    finals = [rows for rows in final_rows(warm_grid).values() if rows and rows[0]["mechanism"] == "SAM&JR"]
    return {rows[0]["record"]["identity"]["magnitudes"]["rho"]: rows for rows in finals}


def test_a_warm_started_search_knows_the_grid_from_its_first_suggestion(warm_grid, capsys, monkeypatch):
    storage = warm_grid.parent
    experiment, printed = created(
        "warm_search", storage, capsys, warm_start=[str(warm_grid)], sampler={"name": "tpe", "n_startup_trials": 2}
    )
    assert (
        f"warm start: 2 of 3 trial(s) of {warm_grid} known to the sampler (not retrained); skipped: 1 another mechanism"
        in printed
    )
    known = from_manifest(experiment.manifest)
    # The grid's SAM&JR trials with the values the search draws and the objective each trial measured.
    grid = grid_by_radius(warm_grid)
    assert sorted(k.params["rho"] for k in known) == sorted(WARM_GRID_RADII)
    for k in known:
        assert k.params["lambda_jr"] == 1e-4 and k.values == (objective_of(grid[k.params["rho"]], METRIC),)

    seen = []

    class Watching:  # the sampler as built, reporting what the study held when each trial began
        def __init__(self, sampler):
            self.sampler = sampler

        def before_trial(self, study, trial):
            seen.append(sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)))
            return self.sampler.before_trial(study, trial)

        def __getattr__(self, name):
            return getattr(self.sampler, name)

    build = searcher_module.build_sampler
    monkeypatch.setattr(searcher_module, "build_sampler", lambda *a, **k: Watching(build(*a, **k)))
    searcher, _ = _search_setup(experiment)
    config = searcher.suggest("ray-trial-0")
    assert seen == [2] and searcher.asked == {"ray-trial-0": 2}  # the first suggestion knew both
    assert 0.01 <= config["rho"] <= 0.5
    trials = searcher.study.get_trials(deepcopy=False)
    assert [t.user_attrs.get(KNOWN_TRIAL) is not None for t in trials] == [True, True, False]
    assert {t.user_attrs[KNOWN_EXPERIMENT] for t in trials[:2]} == {
        experiment.manifest["warm_start"]["trials"][0]["experiment"]
    }
    # A driver that starts the search again (resume before Ray saved it) adds none of them twice.
    again = history_of(experiment)
    assert again.add_known(from_manifest(experiment.manifest)) == 0
    assert len(again.study.get_trials(deepcopy=False)) == 3


def test_trials_measured_otherwise_or_on_other_targets_are_skipped_and_counted(warm_grid, capsys):
    storage = warm_grid.parent
    experiment, printed = created("fewer_images", storage, capsys, {"n_eval": 16}, warm_start=[str(warm_grid)])
    assert experiment.manifest["warm_start"]["trials"] == []
    assert experiment.manifest["warm_start"]["sources"][0]["skipped"] == {
        "measured otherwise (n_eval, evaluation images differ)": 2,
        "another mechanism": 1,
    }
    assert "skipped: 2 measured otherwise (n_eval, evaluation images differ), 1 another mechanism" in printed
    # Objective targets: the mean over them, from the grid's per-target rows.
    one_target, printed = created(
        "one_target", storage, capsys, warm_start=[str(warm_grid)], objective_targets=["tiny_cnn_s1"]
    )
    grid = grid_by_radius(warm_grid)
    for k in from_manifest(one_target.manifest):
        assert k.values == (objective_of(grid[k.params["rho"]], "asr/pgd/untargeted/8/tiny_cnn_s1"),)
    # A metric the grid did not measure, and targets it did not attack.
    untargeted_only, _ = created(
        "targeted",
        storage,
        capsys,
        {"modes": ["targeted"]},
        warm_start=[str(warm_grid)],
        metric="asr/pgd/targeted/8/mean",
    )
    assert untargeted_only.manifest["warm_start"]["sources"][0]["skipped"]["without asr/pgd/targeted/8/mean"] == 2
    spec = untargeted_only.spec
    rows = [MetricRow("asr", v, "pgd", "targeted", 8, target=t) for v, t in ((0.5, "a"), (0.7, "b"), (0.6, "mean"))]
    metric = "asr/pgd/targeted/8/mean"
    assert _objective_value(spec, {"targets": ["a", "b"]}, rows, metric, set()) == (0.6, "")
    assert _objective_value(spec, {"targets": ["a", "c"]}, rows, metric, set()) == (None, "measured on other targets")
    # A black-box target's rows, added to the record after the trial, are not among the hook's targets.
    assert _objective_value(spec, {"targets": ["a"]}, rows, metric, {"b"}) == (0.6, "")
    # This search's black-box targets are not among the hook's either.
    api = [*rows, MetricRow("asr", 0.9, "pgd", "targeted", 8, target="api")]
    assert _objective_value(spec, {"targets": ["a", "b", "api"], "endpoints": ["api"]}, api, metric, {"api"}) == (
        0.6,
        "",
    )
    only_mean = [r for r in rows if r.target == "mean"]
    assert _objective_value(spec, {"targets": ["a", "b"]}, only_mean, metric, set()) == (None, OTHER_TARGETS)
    nan = [dataclasses.replace(r, value=math.nan) for r in rows]
    assert (
        _objective_value(spec, {"targets": ["a", "b"]}, nan, metric, set())[1] == f"with {metric} not a finite number"
    )


def test_only_the_settings_a_metric_depends_on_must_agree(warm_grid, capsys):
    assert "target_classes" not in settings_of("asr/pgd/untargeted/8/mean")
    assert "target_classes" in settings_of("asr/pgd/targeted/8/mean")
    assert "autoattack_steps" in settings_of("asr/autoattack/untargeted/8/mean")
    assert "autoattack_steps" not in settings_of("asr/pgd/untargeted/8/mean")
    assert settings_of("test_acc") == () and "power_iterations" in settings_of("smoothness/mean")
    # How targeted classes are chosen does not change an untargeted objective: the grid's trials count.
    next_classes, _ = created(
        "next_classes", warm_grid.parent, capsys, {"target_classes": "next"}, warm_start=[str(warm_grid)]
    )
    assert len(from_manifest(next_classes.manifest)) == 2


def test_the_targets_must_be_the_same_models_not_only_the_same_names(warm_grid, tmp_path, capsys):
    """A search in another storage with a byte-for-byte copy of the targets takes the grid's trials;
    with other target files of the same names, none."""
    for changed in (False, True):
        root = tmp_path / f"changed_{changed}"
        shutil.copytree(warm_grid.parent / "smoke_targets", root / "smoke_targets")
        if changed:
            target = next((root / "smoke_targets" / "targets").glob("*.pt"))
            target.write_bytes(target.read_bytes() + b"\0")
        experiment, printed = created("elsewhere", root, capsys, warm_start=[str(warm_grid)])
        skipped = experiment.manifest["warm_start"]["sources"][0]["skipped"]
        assert len(from_manifest(experiment.manifest)) == (0 if changed else 2)
        assert skipped == ({OTHER_TARGET_MODELS: 2, "another mechanism": 1} if changed else {"another mechanism": 1})


def test_an_experiment_named_twice_is_one_line(warm_grid, capsys):
    with pytest.raises(RaystudyError, match="are the same experiment: name it once"):
        created("twice", warm_grid.parent, capsys, warm_start=[str(warm_grid), str(warm_grid) + "/"])


def test_a_restarted_driver_of_a_search_on_a_storage_uri_adds_nothing_twice(tmp_path):
    """The history mirrored into the experiment (a storage URI): a driver that starts the search
    again goes on with it rather than a fresh one, so the known trials are there once."""
    space = {"name": "s", "kind": "search", "targets": "t", "search": {"mechanism": "SAM", "num_samples": 4}}
    space["search"]["params"] = {"rho": {"low": 0.01, "high": 0.5, "log": True}}
    experiment = Experiment(parse_space(space, "s.yaml"), space, f"file://{tmp_path}/s", {})
    known = [KnownTrial("/grid", f"t{i}", {"rho": 0.05 * (i + 1)}, (0.1 * i,)) for i in range(3)]
    for asked in (2, 0):  # the first driver is lost after asking two trials
        searcher = history_of(experiment)
        searcher.start()
        searcher.add_known(known)
        for i in range(asked):
            searcher.suggest(f"r{i}")
    trials = history_of(experiment).study.get_trials(deepcopy=False)
    assert [t.user_attrs.get(KNOWN_TRIAL) for t in trials] == ["t0", "t1", "t2", None, None]


def test_cmaes_takes_known_trials_of_a_space_with_choices(tmp_path):
    """CMA-ES searches the numeric values and draws the choices apart: its source trials are the
    known trials without their choices."""
    params = {"rho": {"low": 0.01, "high": 0.5, "log": True}, "lr": {"choices": [0.01, 0.05]}}
    searcher = searcher_of(tmp_path, sampler="cmaes", params=params)
    searcher.add_known(
        [KnownTrial("/g", f"t{i}", {"rho": 0.01 + 0.04 * i, "lr": 0.05}, (float(i),)) for i in range(10)]
    )
    config = searcher.suggest("r0")
    assert 0.01 <= config["rho"] <= 0.5 and config["lr"] in (0.01, 0.05)


def test_the_known_trials_are_checked_where_they_are_read_back(tmp_path):
    base = {"study": {}, "warm_start": {"sources": [], "trials": []}}
    good = {"experiment": "/x", "trial_id": "t1", "params": {"rho": 0.1}, "values": [0.5]}
    assert checked_manifest({**base, "warm_start": {"trials": [good]}}, "m.json")
    for bad in (
        {**good, "values": [math.nan]},
        {**good, "values": [10**400]},
        {**good, "params": {"rho": True}},
        {**good, "values": []},
        {**good, "params": {"rho": [1]}},
        {**good, "trial_id": 3},
        "t1",
    ):
        with pytest.raises(RaystudyError, match="its warm_start is not one"):
            checked_manifest({**base, "warm_start": {"trials": [bad]}}, "m.json")
    with pytest.raises(RaystudyError, match="a source's counts"):
        checked_manifest(
            {**base, "warm_start": {"sources": [{"experiment": "/x", "trials": -1, "added": 0}]}}, "m.json"
        )
    # A value the manifest holds that the search cannot draw: one line, not Optuna's traceback.
    searcher = searcher_of(tmp_path)
    with pytest.raises(RaystudyError, match="does not fit this search"):
        searcher.add_known([KnownTrial("/x", "t1", {"rho": 5.0}, (0.5,))])
    with pytest.raises(RaystudyError, match="2 objective values for 1 objective"):
        searcher.add_known([KnownTrial("/x", "t2", {"rho": 0.1}, (0.5, 0.7))])


def test_cmaes_draws_its_first_generation_from_the_known_trials(tmp_path):
    """WS-CMA-ES (Optuna's source_trials): known trials best near rho = 0.02 move the first draws
    there; without them CMA-ES starts from the middle of the (log) range."""
    known = [
        KnownTrial("/grid", f"t{i}", {"rho": rho}, (-abs(math.log(rho / 0.02)),))
        for i, rho in enumerate([0.011, 0.015, 0.018, 0.02, 0.022, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    ]

    def first_draws(folder, trials) -> list[float]:
        searcher = searcher_of(folder, sampler="cmaes")
        searcher.add_known(trials)
        return [searcher.suggest(f"r{i}")["rho"] for i in range(4)]

    warm, cold = first_draws(tmp_path / "warm", known), first_draws(tmp_path / "cold", [])
    middle = math.sqrt(0.01 * 0.5)
    assert sum(abs(math.log(r / 0.02)) for r in warm) < sum(abs(math.log(r / 0.02)) for r in cold)
    assert all(abs(math.log(r / 0.02)) < abs(math.log(middle / 0.02)) for r in warm)


def test_a_warm_start_that_is_no_experiment_is_one_line(warm_grid, tmp_path):
    space = tmp_path / "s.yaml"
    for source in (tmp_path / "nothing", warm_grid.parent / "smoke_targets"):
        space.write_text(yaml.safe_dump(smoke_search("no_warm_start", warm_start=[str(source)])))
        out = raystudy_here("search", space, "--storage", warm_grid.parent)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert ("is not a raystudy experiment" if source.name == "nothing" else "is a targets study") in out.stderr
    assert not (warm_grid.parent / "no_warm_start").exists()  # nothing made


def test_the_report_marks_the_known_trials(warm_grid, capsys):
    from analysis.records import load_experiment
    from analysis.report import _warm_start_statement, _warm_start_table

    created("reported", warm_grid.parent, capsys, warm_start=[str(warm_grid)])
    experiment = load_experiment(str(warm_grid.parent / "reported"), cache=None)
    table = _warm_start_table(experiment)
    assert len(table) == 2 and list(table[METRIC]) == sorted(table[METRIC], reverse=True)
    text = _warm_start_statement(experiment, len(table))
    assert f"{warm_grid}: 2 of 3 (skipped: 1 another mechanism)" in text and "not retrained" in text
    assert json.dumps(experiment.record["warm_start"])  # plain data
