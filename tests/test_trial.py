"""A trial runs without Ray (raystudy.training.trial.run_one_trial): trained, measured, reported through a
callback and kept, a second run reporting the kept result; the Ray trainable only adapts it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from raystudy.config import TrainConfig, parse_space
from raystudy.core.data import dataset_for
from raystudy.errors import RaystudyError
from raystudy.persist import storage
from raystudy.persist.record import FINAL_FILE
from raystudy.training.loop import train
from raystudy.training.trial import FINAL_KEY, TrialContext, run_one_trial


def test_a_trial_runs_without_ray_and_a_second_run_reports_what_it_kept(tmp_path):
    smoke = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    smoke["train"].update(epochs=1, n_train=128, n_test=64)
    smoke["evaluation"].update(n_eval=16, budgets=[8], smoothness_samples=4)
    spec = parse_space(smoke, "smoke.yaml")
    storage_path = str(tmp_path / "runs")
    targets = tmp_path / "runs" / "smoke_targets" / "targets"
    targets.mkdir(parents=True)
    target = TrainConfig.from_preset("faithful", **{**smoke["train"], "dataset": "synthetic", "model": "tiny_cnn"})
    train(target, out_dir=tmp_path / "t1", log=None)
    (targets / "t1.pt").write_bytes((tmp_path / "t1" / "model.pt").read_bytes())
    plan = spec.plans[0]
    folder = storage.join(storage_path, "smoke", "trial_0")
    context = TrialContext(spec, storage_path, folder, tmp_path / "work", torch.device("cpu"))
    (tmp_path / "work").mkdir()
    reported: list[tuple[dict, Path | None]] = []
    run_one_trial(plan, context, dataset_for(plan.train), lambda metrics, state: reported.append((metrics, state)))
    epochs, (final, state) = reported[:-1], reported[-1]
    assert [m[FINAL_KEY] for m, _ in epochs] == [0] and epochs[0][1] is not None  # the last epoch's checkpoint
    assert final[FINAL_KEY] == 1 and state is None and final["record"]["plan"] == plan.to_dict()
    rows = {(r["name"], r.get("target")) for r in final["record"]["metrics"]}
    assert {("asr", "t1"), ("similarity", "t1"), ("smoothness", None), ("acc", None)} <= rows
    assert json.loads(Path(folder, FINAL_FILE).read_text()) == final  # kept in the experiment first
    again: list = []
    run_one_trial(plan, context, dataset_for(plan.train), lambda metrics, state: again.append(metrics))
    assert again == [final]  # restarted after it finished: the kept result, not a new training


def test_targets_the_experiment_found_are_read_by_name_and_endpoints_alone_are_no_error(tmp_path):
    from raystudy.training.trial import load_targets

    # Only endpoints (black-box targets, no model file): the experiment found that when it was made.
    assert load_targets(str(tmp_path), "t", tmp_path / "work", torch.device("cpu"), known=()) == ({}, [])
    with pytest.raises(RaystudyError, match="no targets under"):  # looked for, and none
        load_targets(str(tmp_path), "t", tmp_path / "work", torch.device("cpu"))


def _measured(experiment: Path) -> dict[str, dict[str, float]]:
    """Per trial label, its final record's metrics other than the timings."""
    out = {}
    for path in experiment.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        record = next(r["record"] for r in reversed(rows) if r.get(FINAL_KEY) == 1)
        out[record["identity"]["label"]] = {
            json.dumps({k: v for k, v in m.items() if k != "value"}, sort_keys=True): m["value"]
            for m in record["metrics"]
            if m["name"] not in ("seconds", "images_per_s")
        }
    return out


def test_a_trial_measures_the_same_after_other_trials_in_its_process(smoke_storage):
    """What Ray's reuse of trial processes (`reuse_actors=True`) relies on: a trial run after others
    in the same process (other mechanisms, which leave their own RNG draws, BN passes and caches
    behind) reports every metric exactly as it does on its own."""
    from conftest import SMOKE
    from world import write_experiment

    small = {"epochs": 1, "n_train": 128}
    alone = dict(SMOKE, name="reuse_alone", trials=[{"mechanism": "SAM&JR"}], train={**SMOKE["train"], **small})
    after = dict(alone, name="reuse_after", trials=[{"mechanism": "MU"}, {"mechanism": "CO"}, {"mechanism": "SAM&JR"}])
    first = _measured(write_experiment(after, smoke_storage))
    # On its own: in a new interpreter, where nothing ran before it.
    code = "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from world import "
    code += "write_experiment; write_experiment(json.loads(sys.argv[2]), Path(sys.argv[3]))"
    here = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", code, here, json.dumps(alone), str(smoke_storage)], check=True, timeout=600)
    second = _measured(smoke_storage / "reuse_alone")
    (label,) = second
    # Equal to float32 rounding: this test process ran other tests before (they may leave torch
    # with other kernel choices than a new interpreter's), which moves a reduction by an ulp; a
    # leaked draw, BN statistic or setting moves the metrics by far more. (Between Ray's reused
    # trial actors, which run raystudy trials only, the smoke study's metrics were bit-identical.)
    assert len(second[label]) > 40 and first[label].keys() == second[label].keys()
    assert first[label] == {k: pytest.approx(v, rel=1e-5, abs=1e-7) for k, v in second[label].items()}
