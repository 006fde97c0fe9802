"""Experiments written by raystudy 0.1.0 (tests/data/experiments-0.1.0: a search and a grid, each
interrupted after its first trial) are read and resumed by today's code: Ray's pickled state and
the search's Optuna history name 0.1.0's module paths, which raystudy.migrate maps to today's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import final_rows, run_raystudy

OLD = Path(__file__).resolve().parent / "data" / "experiments-0.1.0" / "storage"


@pytest.fixture
def old_storage(tmp_path) -> Path:
    copy = tmp_path / "storage"
    shutil.copytree(OLD, copy)
    return copy


def test_an_old_experiment_is_analysed_as_written(old_storage, tmp_path):
    from analysis.records import DONE, load_experiment

    experiment = load_experiment(str(old_storage / "legacy_search"), cache=None)
    statuses = sorted(t.status for t in experiment.trials)
    assert statuses.count(DONE) == 1, statuses  # the second trial had not started


@pytest.mark.slow
@pytest.mark.parametrize("study", ["legacy_search", "legacy_grid"])
def test_an_interrupted_0_1_0_experiment_resumes_and_finishes(old_storage, study):
    before = {p.name for p in (old_storage / study).glob("trial_*")}
    done = run_raystudy("resume", old_storage / study, "--num-cpus", 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 of 2 trials finished" in done.stdout
    finals = final_rows(old_storage / study)
    assert set(finals) == before and all(len(rows) >= 1 for rows in finals.values()), finals
    if study == "legacy_search":  # the history holds both trials, told once each
        best = json.loads((old_storage / study / "best_config.json").read_text())
        assert set(best["config"]) == {"rho", "lambda_jr"}
        import optuna

        history = optuna.load_study(study_name=study, storage=f"sqlite:///{old_storage / study / 'optuna.db'}")
        states = [t.state.name for t in history.get_trials(deepcopy=False)]
        assert states == ["COMPLETE", "COMPLETE"], states
