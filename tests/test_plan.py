"""`raystudy plan`: a study's cost from per-mechanism step costs, with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_cli import one_line_error, run

from raystudy.config import load_space
from raystudy.errors import RaystudyError
from raystudy.plan import packing_gain, plan_costs, quoted_h100, read_costs, render_plan, wall_seconds

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def test_plan_of_the_table_sums_its_trials_at_the_quoted_rates():
    spec = load_space(SPACES / "table.yaml")
    trials = plan_costs(spec, quoted_h100())
    assert len(trials) == len(spec.plans) == 48
    by_label = {(t.plan.train.mechanism, t.plan.train.seed): t for t in trials}
    # fast = 40 of the 200 epochs: a fifth of the quoted 14.3 GPU-minutes for ST, 120.6 for AT.
    assert by_label[("ST", 0)].train_seconds == pytest.approx(14.3 * 60 / 5)
    assert by_label[("AT", 2)].train_seconds == pytest.approx(120.6 * 60 / 5)
    text = render_plan(spec, quoted_h100(), gpus=2)
    total = sum(t.seconds for t in trials) / 3600
    assert f"total: {total:.2f} GPU-hours" in text
    assert "quoted" in text and "not measured here" in text


def write_space(tmp_path: Path, epochs: int, gpu: float = 0.25) -> Path:
    raw = yaml.safe_load((SPACES / "table.yaml").read_text())
    raw["train"] = {"epochs": epochs}
    raw["resources"] = {"cpu": 4, "gpu": gpu}
    path = tmp_path / f"table_{epochs}_{gpu}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_doubling_epochs_doubles_training_time(tmp_path):
    short = plan_costs(load_space(write_space(tmp_path, 20)), quoted_h100())
    long = plan_costs(load_space(write_space(tmp_path, 40)), quoted_h100())
    for a, b in zip(short, long):
        assert b.train_seconds == pytest.approx(2 * a.train_seconds)
        assert b.hook_seconds == pytest.approx(a.hook_seconds)  # the hook does not depend on epochs


def test_packing_uses_the_measured_gain_not_the_trial_count(tmp_path):
    gains = {1: 1.0, 4: 2.36}
    assert packing_gain(gains, 1) == 1.0 and packing_gain(gains, 4) == 2.36 and packing_gain(gains, 8) == 2.36
    assert packing_gain(gains, 2) == pytest.approx(1.0 + 1.36 / 3)
    spec = load_space(write_space(tmp_path, 40, gpu=0.25))
    trials = plan_costs(spec, quoted_h100())
    wall, per_gpu, gain = wall_seconds(trials, spec, quoted_h100(), gpus=4)
    assert (per_gpu, gain) == (4, 2.36)
    assert wall == pytest.approx(sum(t.seconds for t in trials) / (4 * 2.36))
    alone = load_space(write_space(tmp_path, 40, gpu=1.0))
    wall_alone, _, _ = wall_seconds(plan_costs(alone, quoted_h100()), alone, quoted_h100(), gpus=4)
    assert wall_alone > wall  # packing helps, by 2.36x rather than 4x
    assert wall_alone / wall == pytest.approx(2.36)


def benchmark_json(tmp_path: Path, with_fd: bool) -> Path:
    rows = []
    for mechanism, seconds in (("ST", 0.01), ("IR", 0.04), ("SAM&JR", 0.08), ("AT", 0.1)):
        rows.append(
            {"mechanism": mechanism, "penalty_gradient": "exact", "preset": "fast", "seconds_per_step": seconds}
        )
    if with_fd:
        rows.append(
            {"mechanism": "IR", "penalty_gradient": "finite_difference", "preset": "fast", "seconds_per_step": 0.02}
        )
    data = {
        "model": "resnet18",
        "device": "test GPU",
        "batch_size": 256,
        "mechanisms": rows,
        "hook": {
            "n_eval": 500,
            "seconds": {"accuracy": 1.0, "smoothness": 10.0, "similarity": 2.0, "pgd": 30.0},
            "evaluation": {"budgets": [4, 8, 16], "modes": ["untargeted", "targeted"], "attacks": ["pgd"]},
        },
    }
    path = tmp_path / f"costs_{with_fd}.json"
    path.write_text(json.dumps(data))
    return path


def test_measured_costs_scale_per_image_and_use_the_finite_difference_rows(tmp_path):
    costs = read_costs(benchmark_json(tmp_path, with_fd=True))
    raw = yaml.safe_load((SPACES / "table.yaml").read_text())
    raw["trials"] = [{"mechanism": "ST"}, {"mechanism": "IR"}]
    raw["seeds"] = [0]
    raw["train"] = {"penalty_gradient": "finite_difference"}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    st, ir = plan_costs(load_space(path), costs)
    steps = 40 * (50_000 // 128)
    assert st.train_seconds == pytest.approx(steps * 0.01 * 128 / 256)  # measured at batch 256
    assert ir.train_seconds == pytest.approx(steps * 0.02 * 128 / 256) and ir.note == ""
    # The hook: 1000 evaluation images (twice the benchmark's), the same 6 attack runs.
    assert st.hook_seconds == pytest.approx(2 * (1.0 + 10.0 + 2.0 + 30.0))
    exact_only = read_costs(benchmark_json(tmp_path, with_fd=False))
    _, ir_exact = plan_costs(load_space(path), exact_only)
    assert ir_exact.train_seconds == pytest.approx(steps * 0.04 * 128 / 256) and "exact's used" in ir_exact.note


def test_costs_without_a_mechanism_of_the_study_are_refused(tmp_path):
    with pytest.raises(RaystudyError, match="have no MU; they have ST, AT, IR, SAM&JR"):
        plan_costs(load_space(SPACES / "table.yaml"), read_costs(benchmark_json(tmp_path, with_fd=False)))


def test_plan_command(tmp_path):
    out = run("plan", str(SPACES / "sam_jr_optuna.yaml"), "--gpus", "2")
    assert out.returncode == 0, out.stderr
    assert "SAM&JR" in out.stdout and "wall time on 2 GPU(s)" in out.stdout
    one_line_error(run("plan", str(SPACES / "table.yaml"), "--costs", str(tmp_path / "none.json")), "no such file")
    (tmp_path / "bad.json").write_text("{}")
    one_line_error(run("plan", str(SPACES / "table.yaml"), "--costs", str(tmp_path / "bad.json")), "not a benchmarks")
    one_line_error(run("plan", str(tmp_path / "missing.yaml")), "missing.yaml")
