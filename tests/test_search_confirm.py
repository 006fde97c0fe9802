"""The confirm phase of a search: the top_k configurations retrained with fresh seeds beside
baselines, as a grid study that resumes after its driver is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import RAYSTUDY, final_rows, finished_once
from test_search_held_out import search_space

from raystudy.config import parse_space
from raystudy.errors import RaystudyError


def confirm_space(**confirm) -> dict:
    space = search_space(objective_targets=["tiny_cnn_s1"])
    space["name"] = "confirm_smoke"
    space["search"]["confirm"] = {"top_k": 2, "seeds": [1, 2], "baselines": ["ST"], **confirm}
    return space


@pytest.mark.parametrize(
    "confirm, message",
    [
        ({"top_k": 4}, "top_k=4 exceeds num_samples=3"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"seeds": [1, 1]}, "seeds must be distinct"),
        ({"baselines": ["SAM+JR"]}, "unknown mechanism"),
        ({"rounds": 2}, "rounds"),
    ],
)
def test_confirm_settings_are_checked(confirm, message):
    with pytest.raises(RaystudyError, match=message):
        parse_space(confirm_space(**confirm), "confirm.yaml")


def finals(experiment: Path) -> dict[str, list[dict]]:
    return final_rows(experiment)


@pytest.mark.slow
def test_confirm_retrains_top_k_times_seeds_and_resumes_after_a_kill(smoke_storage, tmp_path):
    path = tmp_path / "confirm_smoke.yaml"
    path.write_text(yaml.safe_dump(confirm_space()))
    search, confirm = smoke_storage / "confirm_smoke", smoke_storage / "confirm_smoke_confirm"
    printed = tmp_path / "search.out"
    with open(printed, "w") as stdout:
        driver = subprocess.Popen(
            RAYSTUDY + ["search", str(path), "--storage", str(smoke_storage), "--num-cpus", "2"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.time() + 400
    while time.time() < deadline and sum(bool(rows) for rows in finals(confirm).values()) < 1:
        time.sleep(0.3)
    os.killpg(driver.pid, signal.SIGKILL)  # mid-confirmation
    driver.wait()
    done_before = sum(bool(rows) for rows in finals(confirm).values())
    assert 1 <= done_before < 6, "the kill should land mid-confirmation"
    out = subprocess.run(
        RAYSTUDY + ["resume", str(search), "--num-cpus", "2"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    held_out_search_is_selected_on_its_objective_targets(search, printed.read_text())
    trials = finals(confirm)
    assert len(trials) == 2 * 2 + 1 * 2 and all(finished_once(rows) for rows in trials.values())  # top_k x seeds + ST
    # The confirmed configurations are the search's two best on the objective, retrained with seeds 1 and 2.
    searched = [rows[0] for rows in finals(search).values() if rows]
    best_two = sorted(searched, key=lambda r: -r["asr/pgd/untargeted/8/objective"])[:2]
    wanted = sorted((round(r["config"]["rho"], 9), round(r["config"]["lambda_jr"], 9)) for r in best_two)
    retrained = [rows[0] for rows in trials.values() if rows[0]["mechanism"] == "SAM&JR"]
    assert (
        sorted(
            {
                (
                    round(r["record"]["identity"]["magnitudes"]["rho"], 9),
                    round(r["record"]["identity"]["magnitudes"]["lambda_jr"], 9),
                )
                for r in retrained
            }
        )
        == wanted
    )
    assert sorted(r["seed"] for r in retrained) == [1, 1, 2, 2]
    best = json.loads((search / "best_config.json").read_text())
    rows = best["confirmed"]["rows"]
    assert [r["role"] for r in rows] == ["search #1", "search #2", "baseline"] and all(r["seeds"] == 2 for r in rows)
    for row in rows:
        assert 0 <= row["objective_mean"] <= 1 and row["objective_std"] >= 0 and 0 <= row["held_out_mean"] <= 1
    st = [r for r in trials.values() if r[0]["mechanism"] == "ST"]
    assert rows[2]["objective_mean"] == pytest.approx(sum(r[0]["asr/pgd/untargeted/8/tiny_cnn_s1"] for r in st) / 2)
    report = subprocess.run(
        RAYSTUDY + ["analyze", str(search), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Confirmation (" in text and "Selected on tiny_cnn_s1" in text


def held_out_search_is_selected_on_its_objective_targets(experiment: Path, stdout: str) -> None:
    """The search the confirmation follows optimized its objective target and reported the held-out one."""
    import optuna

    assert "selected on tiny_cnn_s1; tested on tiny_cnn_s2" in stdout
    searched = [rows[-1] for rows in finals(experiment).values() if rows]
    assert len(searched) == 3
    for r in searched:  # the objective is the named target's ASR, not the mean over both
        assert r["asr/pgd/untargeted/8/objective"] == pytest.approx(r["asr/pgd/untargeted/8/tiny_cnn_s1"])
        assert r["asr/pgd/untargeted/8/held_out"] == pytest.approx(r["asr/pgd/untargeted/8/tiny_cnn_s2"])
    # The test can fail: the two targets' ASRs differ, so optimizing the mean would give other values.
    assert any(r["asr/pgd/untargeted/8/tiny_cnn_s1"] != r["asr/pgd/untargeted/8/tiny_cnn_s2"] for r in searched)
    study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    told = sorted(t.value for t in study.trials)
    assert told == pytest.approx(sorted(r["asr/pgd/untargeted/8/objective"] for r in searched))
    best = json.loads((experiment / "best_config.json").read_text())
    assert best["selected_on"] == ["tiny_cnn_s1"] and best["tested_on"] == ["tiny_cnn_s2"]
    winner = max(searched, key=lambda r: r["asr/pgd/untargeted/8/objective"])
    assert best["held_out_value"] == pytest.approx(winner["asr/pgd/untargeted/8/tiny_cnn_s2"])
