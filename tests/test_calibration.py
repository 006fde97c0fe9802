"""The GPU calibration script, dry-run on the CPU with tiny models and synthetic data: every step
runs (plans, targets, surrogates, throughput, report, verdicts) and writes what a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from raystudy.config import load_space

ROOT = Path(__file__).resolve().parents[1]


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
    costs = json.loads((tmp_path / "out" / "throughput_h100.json").read_text())
    measured = {(r["mechanism"], r["penalty_gradient"]) for r in costs["mechanisms"]}
    assert {("SAM&JR", "exact"), ("SAM&JR", "finite_difference"), ("AT", "exact")} <= measured
    report = tmp_path / "out" / "calibration_h100"
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
    assert yaml.safe_load((ROOT / "search_spaces" / "calibration.yaml").read_text())["resources"]["gpu"] == 0.25
