"""Studies on object storage through the S3 API: a local S3 server (moto) on 127.0.0.1, reached the
way a user reaches MinIO (`RAYSTUDY_S3_ENDPOINT` plus the standard AWS variables); no credentials,
no network. Targets, checkpoints, results, the study record, status, analysis and the Optuna
search's history all live in the bucket; a search whose driver dies is resumed from another
working directory and HOME. The targets and the grid run with recognizable fake credentials around
(tests/test_secrets.py): no value is found in Ray's session folder, the bucket, the report or the
MLflow files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    BUCKET,
    RAYSTUDY,
    ROOT,
    bucket_files,
    bucket_keys,
    finals_in_bucket,
    finished_once,
    put_in_bucket,
    put_smoke_targets,
    raystudy_in_env,
    smoke_search,
)
from test_secrets import fake_secrets, files_holding, objects_holding

from raystudy.persist.optuna_history import journal_storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secrets(s3):
    """The S3 environment with fake secrets, a short Ray temp folder (socket paths are short), and
    the driver's working folder of the targets."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    values = fake_secrets()
    yield {**s3, **values, "RAY_TMPDIR": str(ray_tmp)}, list(values.values()), ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


def train_targets(env: dict, values: list[str], work: Path) -> str:
    """`raystudy targets` (the smoke targets) into s3://studies/p, with the secrets around."""
    out = raystudy_in_env(
        env,
        "targets",
        ROOT / "search_spaces" / "smoke_targets.yaml",
        "--storage",
        f"s3://{BUCKET}/p",
        "--num-cpus",
        2,
        cwd=work,
        home=work / "home",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not [v for v in values if v in out.stdout + out.stderr]
    return f"s3://{BUCKET}/p"


def test_targets_grid_status_and_analysis_through_s3_and_no_secret_anywhere(secrets, tmp_path):
    env, values, ray_tmp = secrets
    targets = train_targets(env, values, tmp_path / "targets_driver")
    out = raystudy_in_env(
        env,
        "run",
        ROOT / "search_spaces" / "smoke.yaml",
        "--storage",
        targets,
        "--num-cpus",
        2,
        "--log-to",
        "mlflow",
        cwd=tmp_path,
        home=tmp_path / "h",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = bucket_files(env, "p/")
    assert {"p/smoke_targets/targets/tiny_cnn_s1.pt", "p/smoke/raystudy-study.json"} <= set(files)
    finals = finals_in_bucket(env, "p/smoke")
    assert any("/checkpoint_" in key for key in files)
    assert len(finals) == 5 and all(len(rows) == 1 for rows in finals.values())
    # Another machine (a fresh working directory and HOME) reads it all from the bucket.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status = raystudy_in_env(env, "status", f"{targets}/smoke", cwd=elsewhere, home=elsewhere / "h")
    assert status.returncode == 0 and "5 trials: 5 done" in status.stdout, status.stderr[-2000:]
    report = raystudy_in_env(
        env, "analyze", f"{targets}/smoke", "--out", elsewhere / "report", cwd=elsewhere, home=elsewhere / "h"
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert (elsewhere / "report" / "report.md").is_file() and "5 done" in report.stdout + report.stderr
    # No secret anywhere: the output, Ray's session folder (logs included), the report, the MLflow
    # files and the driver's folder, any object in the bucket.
    assert not [v for v in values if v in out.stdout + out.stderr + status.stdout + report.stdout + report.stderr]
    assert (tmp_path / "mlruns").is_dir()
    assert list(ray_tmp.rglob("runtime_env_agent.log")), "the Ray session folder was not where expected"
    assert files_holding(ray_tmp, values) == []
    assert files_holding(tmp_path, values) == []
    assert objects_holding(env, "p/", values) == []


def ray_state_files(env: dict, experiment: str) -> dict[str, bytes]:
    """Ray's experiment state in the bucket: its trial list and its searcher's files, as objects."""
    names = ("experiment_state-", "search_gen_state-", "searcher-state-")
    return bucket_files(env, experiment + "/", where=lambda key: key[len(experiment) + 1 :].startswith(names))


def trial_folders(env: dict, experiment: str) -> set[str]:
    inside = (key[len(experiment) + 1 :] for key in bucket_keys(env, experiment + "/"))
    return {name.split("/")[0] for name in inside if name.startswith("trial_") and "/" in name}


def lose_the_driver_between_rays_uploads(s3: dict, experiment: str, command: list[str], cwd: Path) -> set[str]:
    """Run `raystudy <command>` and lose its driver between two of Ray's uploads; returns the trials
    finished before. Ray uploads the experiment's trial list and its searcher's files (its own
    counts of the trials) as separate objects, so a driver lost between two uploads leaves them out
    of step. Made certain here: the kill lands once the trial list was uploaded again after the
    second trial began, and the searcher's files are put back as first seen in the bucket (the
    first trial running), which once left the resumed study waiting forever."""
    driver = subprocess.Popen(
        RAYSTUDY + command,
        cwd=cwd,
        # Ray's snapshot every second, not every 10 s: the kill lands soon after the second trial began.
        env={**os.environ, **s3, "HOME": str(cwd / "home"), "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def searchers_and_trial_list() -> tuple[dict, dict]:
        files = ray_state_files(s3, experiment)
        trial_list = {k: v for k, v in files.items() if "experiment_state-" in k}
        return {k: v for k, v in files.items() if k not in trial_list}, trial_list

    first_searcher_files: dict[str, bytes] = {}
    trial_list_at_second = None
    uploaded_again = False
    deadline = time.time() + 300
    while time.time() < deadline and not uploaded_again:
        searcher_files, trial_list = searchers_and_trial_list()
        first_searcher_files = {**searcher_files, **first_searcher_files}
        if len(trial_folders(s3, experiment)) >= 2:
            trial_list_at_second = trial_list_at_second or trial_list
            uploaded_again = trial_list != trial_list_at_second
        time.sleep(0 if uploaded_again else 1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver machine is gone, with its local Ray and files
    driver.wait()
    assert uploaded_again, "Ray did not upload its trial list again after the second trial began"
    assert first_searcher_files and first_searcher_files != searchers_and_trial_list()[0]
    put_in_bucket(s3, first_searcher_files)
    return {name for name, rows in finals_in_bucket(s3, experiment).items() if rows}


def resumed_on_another_machine(s3: dict, experiment: str, tmp_path: Path) -> dict[str, list[dict]]:
    """`raystudy resume` from another working folder and HOME; the finals in the bucket after it."""
    second = tmp_path / "second"
    second.mkdir()
    out = raystudy_in_env(
        s3, "resume", f"s3://{BUCKET}/{experiment}", "--num-cpus", 2, cwd=second, home=second / "home"
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return finals_in_bucket(s3, experiment)


def test_search_survives_losing_its_driver(s3, smoke_storage, tmp_path):
    import optuna

    put_smoke_targets(s3, smoke_storage, "q")  # the session's; training targets on S3 is the test above
    targets = f"s3://{BUCKET}/q"

    space = smoke_search("s3_search", epochs=4)
    path = tmp_path / "s3_search.yaml"
    path.write_text(yaml.safe_dump(space))
    first = tmp_path / "first"
    first.mkdir()
    done_before = lose_the_driver_between_rays_uploads(
        s3,
        "q/s3_search",
        ["search", str(path), "--storage", targets, "--num-cpus", "2", "--max-concurrent", "1"],
        cwd=first,
    )
    assert 1 <= len(done_before) < 4, "the kill should land mid-search"

    finals = resumed_on_another_machine(s3, "q/s3_search", tmp_path)
    assert len(finals) == 4 and all(finished_once(rows) for rows in finals.values())
    # The search's history came back from the bucket: the Optuna study holds the 4 trials, complete.
    segments = bucket_files(s3, "q/s3_search/optuna-journal/")
    assert segments and not bucket_files(s3, "q/s3_search/optuna.db")  # an append-only journal, no database copies
    journal = tmp_path / "journal.log"
    journal.write_bytes(b"".join(body for _, body in sorted(segments.items())))
    study = optuna.load_study(study_name="s3_search", storage=journal_storage(str(journal)))
    states = [t.state for t in study.trials]
    # Every Ray trial's outcome is in the history; one the lost driver asked Optuna for but Ray never
    # recorded is marked failed at the end, so no trial is left running.
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4 and optuna.trial.TrialState.RUNNING not in states
    # Every byte was uploaded once: the segments add up to the journal (O(trials) bytes in all).
    assert sum(len(body) for body in segments.values()) == journal.stat().st_size
    best = json.loads(bucket_files(s3, "q/s3_search/best_config.json")["q/s3_search/best_config.json"])
    assert best["value"] == pytest.approx(max(t.value for t in study.trials if t.value is not None))
