"""Experiments written by raystudy 0.1.0 (tests/data/experiments-0.1.0: a search and a grid, each
interrupted after its first trial): both are analysed; the grid resumes (Ray's pickled state names
0.1.0's module paths, which raystudy.persist.migrate maps to today's); the search is refused in
one line that says how to finish it (its pickled searcher is 0.1.0's class)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import final_rows, finished_once, run_raystudy

from raystudy.errors import RaystudyError
from raystudy.persist.migrate import MANIFEST_FORMAT

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
def test_an_interrupted_0_1_0_grid_resumes_and_finishes(old_storage):
    study = old_storage / "legacy_grid"
    (kept,) = final_rows(study).values()  # the trial that finished before the interruption
    done = run_raystudy("resume", study, "--num-cpus", 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 of 2 trials finished" in done.stdout
    finals = final_rows(study)  # Ray's trial ids as 0.1.0 named them: the second trial went on, not anew
    assert set(finals) == {"trial_6ab62_00000", "trial_6ab62_00001"} and all(finished_once(r) for r in finals.values())
    assert finals["trial_6ab62_00000"][0]["record"] == kept[0]["record"]  # not trained again
    manifest = json.loads((study / "raystudy-study.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["phases_done"] == ["tune"]


def test_a_0_1_0_search_is_refused_in_one_line_saying_how_to_finish_it(old_storage):
    from raystudy.cluster.experiment import Experiment

    with pytest.raises(RaystudyError, match=r"started by raystudy 0.1.0.*git checkout v0.1.0.*raystudy analyze"):
        Experiment.open(str(old_storage / "legacy_search"))
    assert not list((old_storage / "legacy_search").glob("trial_*/raystudy-final.json"))[1:]  # nothing ran


def test_old_module_paths_resolve_only_while_restoring():
    import sys

    from raystudy.persist import migrate

    assert "raystudy.study" not in sys.modules
    with migrate.old_module_paths():
        assert sys.modules["raystudy.study"].trial_dirname.__module__ == "raystudy.cluster.experiment"
    assert "raystudy.study" not in sys.modules
