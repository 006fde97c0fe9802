"""The GPU calibration script, dry-run on the CPU with tiny models and synthetic data: every step
runs (plans, targets, surrogates, throughput, report, verdicts) and writes what a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from conftest import ROOT

from raystudy.config import load_space


def test_calibration_studies_are_the_documented_ones():
    targets = load_space(ROOT / "search_spaces" / "calibration_targets.yaml")
    surrogates = load_space(ROOT / "search_spaces" / "calibration.yaml")
    assert surrogates.targets == targets.name and len(targets.plans) == 2
    labels = sorted((p.train.mechanism, json.dumps(dict(p.train.magnitudes), sort_keys=True)) for p in surrogates.plans)
    assert [m for m, _ in labels] == ["AT", "AT", "MU", "SAM", "SAM&JR", "ST"]
    assert {json.loads(g).get("epsilon") for m, g in labels if m == "AT"} == {0.03, 1.0}


@pytest.mark.slow
def test_the_calibration_script_dry_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "STORAGE": str(tmp_path / "storage")}
    out = subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_calibration.sh"], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    costs = json.loads((tmp_path / "out" / "throughput_cpu.json").read_text())  # named after the device
    measured = {(r["mechanism"], r["penalty_gradient"]) for r in costs["mechanisms"]}
    assert {("SAM&JR", "exact"), ("SAM&JR", "finite_difference"), ("AT", "exact")} <= measured
    assert all(r["planned_step_bytes"] > 0 and "peak_step_bytes" in r for r in costs["mechanisms"])  # None on a CPU
    assert set(costs["packing_gain"]) == {"ST"} and costs["packing_gain"]["ST"]["2"] > 0
    report = tmp_path / "out" / "calibration_cpu"
    assert {"report.md", "report.html", "trials.csv", "findings.json", "COMMANDS.md"} <= {
        p.name for p in report.iterdir()
    }
    assert [v["finding"] for v in json.loads((report / "findings.json").read_text())] == [f"F{i}" for i in range(1, 8)]
    assert "F1  " in out.stdout and "total:" in out.stdout  # the verdicts and the plans were printed
    # A rerun resumes the finished experiments instead of refusing them.
    again = subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_calibration.sh"], capture_output=True, text=True, env=env, timeout=900
    )
    assert again.returncode == 0 and "raystudy resume" in again.stdout, again.stderr[-3000:]
    assert "step costs kept from an earlier run" in again.stdout  # measured once
    assert yaml.safe_load((ROOT / "search_spaces" / "calibration.yaml").read_text())["resources"]["gpu"] == 0.25


def test_the_calibration_script_says_in_one_line_where_no_gpu_is_seen(tmp_path):
    env = {**os.environ, "DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out")}
    out = subprocess.run(["bash", ROOT / "benchmarks" / "gpu_calibration.sh"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "gpu_calibration.sh: torch sees no CUDA device here; run it on the GPU machine (or SMOKE=1 for a CPU dry run)"
    ]
    wrong = subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_calibration.sh", "--datta", "x"], capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "unknown argument --datta" in wrong.stderr
