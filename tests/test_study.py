"""The Ray Tune study end to end on a local 2-CPU Ray: validation, smoke run, Optuna, resume, divergence."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    RAYSTUDY,
    ROOT,
    SMOKE,
    WARM_GRID_RADII,
    final_rows,
    finished_once,
    raystudy_here,
    run_raystudy,
    smoke_search,
)

from raystudy.config import load_space, parse_space
from raystudy.config.sampler import SamplerSpec
from raystudy.errors import RaystudyError

SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_search_space_validates(path):
    spec = load_space(path)
    assert spec.name == path.stem


def variant(**changes):
    values = json.loads(json.dumps(SMOKE))
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    return values


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"trials": [{"mechanism": "SAM+JR"}]}, "unknown mechanism 'SAM+JR'; valid: ST"),
        ({"trials": [{"mechanism": "MU", "magnitudes": {"p": "high"}}]}, "magnitude p='high' must be a number"),
        ({"trials": [{"mechanism": "MU", "magnitudes": {"p": 3}}]}, "p=3 is outside"),
        ({"trials": [{"mechanism": "IR", "magnitudes": {"rho": 0.1}}]}, "IR has no magnitude 'rho'"),
        ({"model": "resnet19"}, "unknown model 'resnet19'"),
        ({"resources": {"cpu": 1, "gpu": 1.5}}, "gpu=1.5 must be a fraction"),
        ({"resources": {"cpus": 1}}, "unknown key(s) 'cpus'"),
        ({"trials": None}, "missing key 'trials'"),
        ({"targets": None}, "missing key 'targets'"),
        ({"trails": []}, "unknown key(s) 'trails'"),
        ({"preset": "quick"}, "preset='quick'; known: faithful, fast"),
        ({"train": {"epochs": "ten"}}, "wrong type"),
        ({"evaluation": {"attacks": ["fgsm"]}}, "unknown attack(s) fgsm"),
        ({"seeds": [0, 0]}, "repeats a seed"),
    ],
)
def test_broken_search_spaces_fail_with_the_expected_message(changes, message):
    with pytest.raises(RaystudyError) as err:
        parse_space(variant(**changes), "broken.yaml")
    assert message in str(err.value) and str(err.value).startswith("broken.yaml")


def test_validate_command_reports_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(variant(trials=[{"mechanism": "XX"}])))
    out = raystudy_here("validate", broken)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "unknown mechanism 'XX'" in out.stderr
    assert raystudy_here("validate", *SPACES).returncode == 0


@pytest.fixture(scope="module")
def storage(smoke_storage):
    """Storage with the smoke targets trained and the smoke study written (see conftest)."""
    assert sorted(p.name for p in (smoke_storage / "smoke_targets" / "targets").iterdir()) == [
        "tiny_cnn_s1.pt",
        "tiny_cnn_s2.pt",
    ]
    return smoke_storage


def final_results(experiment: Path) -> dict[str, list[dict]]:
    """Every trial folder's reported results that carry the hook's metrics (final == 1)."""
    return final_rows(experiment)


def write_space(tmp_path, name, **changes) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(variant(name=name, **changes)))
    return path


def test_run_refuses_without_targets(tmp_path):
    out = raystudy_here("run", ROOT / "search_spaces" / "smoke.yaml", "--storage", tmp_path / "empty")
    assert out.returncode == 2 and "raystudy targets search_spaces/smoke_targets.yaml" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_smoke_study_through_the_command_line_reports_the_hook_metrics_for_every_trial(storage, tmp_path):
    # The README's first command, on the session's targets: Ray runs every trial, then `status`.
    root = tmp_path / "storage"
    shutil.copytree(storage / "smoke_targets", root / "smoke_targets")
    out = run_raystudy("run", ROOT / "search_spaces" / "smoke.yaml", "--storage", root, "--num-cpus", 2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finals = final_results(root / "smoke")
    assert len(finals) == 5 and all(len(rows) == 1 for rows in finals.values())
    mechanisms = sorted(rows[0]["mechanism"] for rows in finals.values())
    assert mechanisms == ["MU", "MU", "SAM", "SAM&JR", "ST"]
    for rows in finals.values():
        r = rows[0]
        for key in (
            "acc",
            "smoothness/mean",
            "smoothness/max",
            "similarity/tiny_cnn_s1",
            "similarity/mean",
            "asr/pgd/untargeted/8/mean",
            "asr/pgd/targeted/16/tiny_cnn_s2",
            "asr_all/pgd/untargeted/4/mean",
            "fooling/pgd/untargeted/8",
            "test_acc",
            "record",
        ):
            assert key in r, key
        assert math.isfinite(r["smoothness/mean"])
        # The trial's record: identity, the resolved training config as nested data, versions, metric rows.
        record = r["record"]
        assert (
            record["format"] == "raystudy-trial/1"
            and record["identity"]["seed"] == r["seed"] == record["plan"]["train"]["seed"]
        )
        assert record["identity"]["mechanism"] == r["mechanism"] and "torch" in record["versions"]
        assert isinstance(record["plan"]["train"]["magnitudes"], dict) and record["study"]["preset"] == "faithful"
        asr = [
            m for m in record["metrics"] if m["name"] == "asr" and m.get("target") == "mean" and m.get("budget") == 8
        ]
        by_mode = {m["mode"]: m["value"] for m in asr if m["attack"] == "pgd"}
        assert by_mode["untargeted"] == r["asr/pgd/untargeted/8/mean"] and set(by_mode) == {"untargeted", "targeted"}
    record = json.loads((root / "smoke" / "raystudy-study.json").read_text())
    assert len(record["eval_indices"]) == 64 and record["targets"] == ["tiny_cnn_s1", "tiny_cnn_s2"]
    assert record["phases_done"] == ["tune"]
    status = run_raystudy("status", root / "smoke")
    assert status.returncode == 0 and "5 trials: 5 done" in status.stdout
    again = run_raystudy("run", ROOT / "search_spaces" / "smoke.yaml", "--storage", root)
    assert again.returncode == 2 and "raystudy resume" in again.stderr


@pytest.mark.slow
def test_optuna_search_finds_a_best_config_inside_the_bounds(storage, warm_grid, tmp_path):
    import optuna

    # The smoke search with ASHA on a proxy; the grid's two SAM&JR trials are known to its sampler
    # before it suggests anything.
    space = tmp_path / "optuna_smoke.yaml"
    search = smoke_search("optuna_smoke", proxy_every=1, proxy_n_eval=20, grace_period=1, warm_start=[str(warm_grid)])
    space.write_text(yaml.safe_dump(search))
    out = run_raystudy("search", space, "--storage", storage, "--num-cpus", 2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    best = json.loads((storage / "optuna_smoke" / "best_config.json").read_text())
    assert 0.01 <= best["config"]["rho"] <= 0.5 and 1e-6 <= best["config"]["lambda_jr"] <= 1.0
    # What drew the samples is recorded with the search: the sampler's every setting, seed, Optuna version.
    manifest = json.loads((storage / "optuna_smoke" / "raystudy-study.json").read_text())
    assert best["search_settings"] == manifest["search_settings"]
    assert best["search_settings"]["sampler"] == SamplerSpec().to_dict()  # written out: test_sampler
    assert best["search_settings"]["seed"] == 0 and best["search_settings"]["optuna"] == optuna.__version__
    assert "best asr/pgd/untargeted/8/mean" in out.stdout
    study = optuna.load_study(study_name="optuna_smoke", storage=f"sqlite:///{storage / 'optuna_smoke' / 'optuna.db'}")
    # The warm start's trials come first, complete and marked; Ray trained only the search's four.
    assert "warm start: 2 of 3 trial(s)" in out.stdout and "skipped: 1 another mechanism" in out.stdout
    known, searched = study.trials[:2], study.trials[2:]
    assert all(t.user_attrs.get("warm_start_trial") for t in known) and not any(t.user_attrs for t in searched)
    assert sorted(t.params["rho"] for t in known) == sorted(WARM_GRID_RADII)
    states = [t.state for t in searched]
    complete = [t for t in searched if t.state == optuna.trial.TrialState.COMPLETE]
    # Every trial is in the study: complete, or pruned where ASHA stopped it on the proxy.
    assert len(searched) == 4 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert complete and all(0.01 <= t.params["rho"] <= 0.5 and 1e-6 <= t.params["lambda_jr"] <= 1 for t in study.trials)
    assert best["value"] == pytest.approx(max(t.value for t in complete))
    assert sum(bool(rows) for rows in final_results(storage / "optuna_smoke").values()) == len(complete)
    # ASHA's proxy: a small-sample PGD ASR in every epoch's result, a probability.
    epochs = [
        json.loads(line)
        for f in (storage / "optuna_smoke").glob("trial_*/result.json")
        for line in f.read_text().splitlines()
        if line.strip() and json.loads(line).get("final") == 0
    ]
    assert epochs and all(0 <= r["proxy/asr"] <= 1 for r in epochs)


@pytest.mark.slow
def test_killed_driver_resumes_and_every_trial_finishes_exactly_once(storage, tmp_path):
    trials = [
        {"mechanism": "ST"},
        {"mechanism": "SAM"},
        {"mechanism": "MU", "magnitudes": {"p": 0.5}},
        {"mechanism": "LS"},
        {"mechanism": "CO"},
        {"mechanism": "JR"},
    ]
    space = write_space(tmp_path, "resume_smoke", trials=trials, train={**SMOKE["train"], "epochs": 4})
    experiment = storage / "resume_smoke"
    # --max-concurrent: the 2 cores run 2 trials at once anyway, and the grid's plans are held back.
    driver = subprocess.Popen(
        RAYSTUDY + ["run", str(space), "--storage", str(storage), "--num-cpus", "2", "--max-concurrent", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill once two trials have finished and an unfinished one has a checkpoint (when the first two
    # finish together, the next two may not have reached theirs yet: wait for one).
    first_searcher_files: dict[Path, bytes] = {}
    deadline = time.time() + 300
    while time.time() < deadline and not (
        sum(bool(r) for r in final_results(experiment).values()) >= 2 and unfinished_checkpoints(experiment)
    ):
        first_searcher_files = {**rays_searcher_files(experiment), **first_searcher_files}
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started, as in a crash
    driver.wait()
    done_before = {name for name, rows in final_results(experiment).items() if rows}
    assert 2 <= len(done_before) < 6, "the kill should land mid-study"
    # Ray saves the plans its grid has handed out and its running trials apart from its trial list,
    # and a driver lost between the two left them out of step: here they are put back as first
    # seen (two trials running), which once left the resumed grid waiting forever.
    assert first_searcher_files and first_searcher_files != rays_searcher_files(experiment)
    for path, body in first_searcher_files.items():
        path.write_bytes(body)
    # Ray's retention (num_to_keep) may delete the checkpoint the dead driver's last snapshot names
    # before a newer snapshot is written: make that certain here (only the newest is kept, under a
    # name no snapshot knows), so the resume must find it by itself.
    stale_named = 0
    for trial, complete in unfinished_checkpoints(experiment).items():
        if trial.name not in done_before:
            newest = max(complete, key=lambda c: (c / "checkpoint.pt").stat().st_mtime)
            newest.rename(trial / "checkpoint_000099")
            for old in trial.glob("checkpoint_0000[0-8]*"):
                shutil.rmtree(old)
            stale_named += 1
    assert stale_named >= 1
    out = run_raystudy("resume", experiment, "--num-cpus", 2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finals = final_results(experiment)
    assert len(finals) == 6 and all(finished_once(rows) for rows in finals.values()), {
        k: len(v) for k, v in finals.items()
    }
    assert sorted(rows[0]["mechanism"] for rows in finals.values()) == ["CO", "JR", "LS", "MU", "SAM", "ST"]


def rays_searcher_files(experiment: Path) -> dict[Path, bytes]:
    """Ray's saved searcher state in the experiment: raystudy's searcher and Ray's wrappers of it
    (or, before raystudy handed out a grid's plans, Ray's grid)."""
    names = ("search_gen_state-", "searcher-state-", "basic-variant-state-")
    found = {}
    for path in experiment.glob("*"):
        if path.name.startswith(names):
            try:
                found[path] = path.read_bytes()
            except FileNotFoundError:  # replaced while read
                continue
    return found


def unfinished_checkpoints(experiment: Path) -> dict[Path, list[Path]]:
    """Unfinished trials' folders -> their checkpoints whose state file loads whole (the kill may cut
    the last one short, and a cut one is not the one this test hands to the resume)."""
    import torch

    def loads(folder: Path) -> bool:
        try:
            torch.load(folder / "checkpoint.pt", weights_only=True)
        except Exception:  # missing, or cut short by the kill
            return False
        return True

    done = {name for name, rows in final_results(experiment).items() if rows}
    found = {}
    for trial in experiment.glob("trial_*"):
        if trial.name not in done:
            complete = [c for c in trial.glob("checkpoint_*") if loads(c)]
            if complete:
                found[trial] = complete
    return found


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_an_lgv_trial_attacks_with_its_ensemble(storage, tmp_path):
    # One grid: Ray's failure handling (one trial's error, the others go on) and the LGV phase.
    space = write_space(
        tmp_path,
        "diverge_lgv_smoke",
        max_failures=0,
        trials=[{"mechanism": "SAM", "train": {"lr": 1.0e12}}, {"mechanism": "SAM", "lgv": True}],
        train={**SMOKE["train"], "epochs": 1},
        evaluation={"n_eval": 32, "budgets": [8], "smoothness_samples": 8},
    )
    out = run_raystudy("run", space, "--storage", storage, "--num-cpus", 2)
    assert out.returncode == 1
    assert "1 of 2 trials finished" in out.stdout and "diverged" in out.stdout
    assert "LGV: 10 epochs at lr 0.05 with SAM, 4 models per epoch" in out.stdout + out.stderr
    finals = final_results(storage / "diverge_lgv_smoke")
    assert sorted(len(rows) for rows in finals.values()) == [0, 1]
    (lgv,) = [rows[0] for rows in finals.values() if rows]
    assert lgv["record"]["plan"]["lgv"] and "asr/pgd/untargeted/8/mean" in lgv
    status = run_raystudy("status", storage / "diverge_lgv_smoke")
    assert "1 done, 1 failed" in status.stdout and "training diverged" in status.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"metric": "asr/pgd/untargeted/4/mean"}, "the evaluation computes no budget '4'"),
        ({"metric": "asr/mi/untargeted/8/mean"}, "the evaluation computes no attack 'mi'"),
        ({"metric": "asr/pgd/targeted/8/mean"}, "the evaluation computes no mode 'targeted'"),
        ({"metric": "accuracy"}, "is not a metric the hook reports"),
        ({"proxy_budget": 16}, "proxy_budget=16 is not one of the evaluation budgets [8]"),
        ({"params": {"rho": {"low": 0.0, "high": 0.5}}}, "rho=0 is outside"),
    ],
)
def test_a_search_is_checked_against_what_the_evaluation_computes(change, message):
    values = yaml.safe_load((ROOT / "search_spaces" / "sam_jr_optuna.yaml").read_text())
    values["search"].update(change)
    with pytest.raises(RaystudyError) as err:
        parse_space(values, "search.yaml")
    assert message in str(err.value) and str(err.value).startswith("search.yaml")


def test_grid_plans_are_resolved_once_at_load():
    spec = load_space(ROOT / "search_spaces" / "table.yaml")
    assert len(spec.plans) == 48 and len({plan.key() for plan in spec.plans}) == 48
    sam_jr = next(p for p in spec.plans if p.train.mechanism == "SAM&JR")
    assert dict(sam_jr.train.magnitudes) == {"rho": 0.1, "lambda_jr": 1e-4}
    assert (sam_jr.train.epochs, sam_jr.train.batch_size, sam_jr.train.weight_decay) == (40, 128, 1e-4)
    from raystudy.config import TrialPlan

    assert TrialPlan.from_dict(sam_jr.to_dict()) == sam_jr  # what Ray passes reads back as the same plan
    search = load_space(ROOT / "search_spaces" / "sam_jr_optuna.yaml")
    plan = search.plan_from_ray({"rho": 0.2, "lambda_jr": 0.001})
    assert dict(plan.train.magnitudes) == {"rho": 0.2, "lambda_jr": 0.001} and plan.train.seed == 0


def test_two_targets_that_would_share_a_file_are_refused():
    values = yaml.safe_load((ROOT / "search_spaces" / "smoke_targets.yaml").read_text())
    values["trials"] = [{"model": "tiny_cnn"}, {"model": "tiny_cnn", "train": {"lr": 0.01}}]
    with pytest.raises(RaystudyError, match="two targets would be saved as tiny_cnn_s1, tiny_cnn_s2"):
        parse_space(values, "targets.yaml")


def test_a_relative_data_path_becomes_absolute_at_load(tmp_path, monkeypatch):
    from raystudy.config.study import read_space

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    space = ROOT / "search_spaces" / "smoke.yaml"
    # Trials run in their own folders (and maybe on other nodes): `--data data` must not stay relative.
    assert read_space(space, "data")[0].data == str(tmp_path / "data")
    assert read_space(space, "s3://bucket/data")[0].data == "s3://bucket/data"
    assert read_space(space)[0].data is None
