"""`raystudy plan`: a study's cost from per-mechanism step costs, with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_cli import one_line_error, run

from raystudy.budget.costs import packing_gain, plan_costs, quoted_h100, read_costs, render_plan, wall_seconds
from raystudy.config import TrainConfig, load_space
from raystudy.errors import RaystudyError

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
    gains = {1: 1.0, 4: 2.36}  # ST's (quoted); every mechanism of the table packs with it
    assert packing_gain(gains, 1) == 1.0 and packing_gain(gains, 4) == 2.36 and packing_gain(gains, 8) == 2.36
    assert packing_gain(gains, 2) == pytest.approx(1.0 + 1.36 / 3)
    spec = load_space(write_space(tmp_path, 40, gpu=0.25))
    trials = plan_costs(spec, quoted_h100())
    # On 2 GPUs the 48 trials balance (on more, the longest trial's packed time would set the wall).
    wall, per_gpu, gain = wall_seconds(trials, spec, quoted_h100(), gpus=2)
    assert per_gpu == 4 and gain == pytest.approx(2.36)
    assert wall == pytest.approx(sum(t.seconds for t in trials) / (2 * 2.36))
    alone = load_space(write_space(tmp_path, 40, gpu=1.0))
    wall_alone, _, _ = wall_seconds(plan_costs(alone, quoted_h100()), alone, quoted_h100(), gpus=2)
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
    # Each of the 40 epochs ends with a forward pass over the 10,000 test images: a third of ST's step per image.
    test_pass = 40 * 10_000 / 3 * (0.01 * 128 / 256) / 128
    assert st.train_seconds == pytest.approx(steps * 0.01 * 128 / 256 + test_pass)  # measured at batch 256
    assert ir.train_seconds == pytest.approx(steps * 0.02 * 128 / 256 + test_pass) and ir.cost_source == "measured"
    assert st.cost_source == "measured"  # ST has no penalty: its one step, whatever penalty_gradient says
    # The hook: 1000 evaluation images (twice the benchmark's), the same 6 attack runs.
    assert st.hook_seconds == pytest.approx(2 * (1.0 + 10.0 + 2.0 + 30.0))
    # Targeted attacks of 300 steps (`targeted_steps`): each targeted run 15 times a measured 20-step run.
    raw["evaluation"] = {**raw["evaluation"], "targeted_steps": 300}
    path.write_text(yaml.safe_dump(raw))
    long_targeted = plan_costs(load_space(path), costs)[0]
    assert long_targeted.hook_seconds == pytest.approx(2 * (1.0 + 10.0 + 2.0 + 30.0 * (20 + 300) / 40))
    # Costs without finite-difference rows: estimated at the quoted 2.5 ST steps, and said so.
    exact_only = read_costs(benchmark_json(tmp_path, with_fd=False))
    _, ir_estimated = plan_costs(load_space(path), exact_only)
    assert ir_estimated.train_seconds == pytest.approx(steps * 2.5 * 0.01 * 128 / 256 + test_pass)
    assert ir_estimated.cost_source.startswith("estimated")
    # A smaller test split costs less per epoch; the quoted per-surrogate minutes include the pass.
    raw["train"] = {"penalty_gradient": "finite_difference", "n_test": 1000}
    path.write_text(yaml.safe_dump(raw))
    st_small, _ = plan_costs(load_space(path), costs)
    assert st.train_seconds - st_small.train_seconds == pytest.approx(test_pass * 9 / 10)
    quoted = plan_costs(load_space(path), quoted_h100())[0]
    assert quoted.train_seconds == pytest.approx(steps * quoted_h100().seconds[("ST", "exact")])


def twin(tmp_path: Path, name: str, penalty_gradient: str) -> Path:
    raw = yaml.safe_load((SPACES / f"{name}.yaml").read_text())
    raw["train"] = {**raw.get("train", {}), "penalty_gradient": penalty_gradient}
    raw["name"] = f"{name}_{penalty_gradient}"
    path = tmp_path / f"{name}_{penalty_gradient}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["table", "regularization", "sam_jr_optuna"])
def test_a_finite_difference_study_costs_less_than_its_exact_twin(tmp_path, name):
    def total(path: Path) -> float:
        return sum(t.seconds for t in plan_costs(load_space(path), quoted_h100()))

    exact, fd = total(twin(tmp_path, name, "exact")), total(twin(tmp_path, name, "finite_difference"))
    assert fd < 0.9 * exact
    assert total(SPACES / f"{name}.yaml") == pytest.approx(fd)  # the fast preset takes finite differences


def test_measured_fd_ratio_estimates_a_missing_fd_step_and_rows_fold_seeds(tmp_path):
    costs = read_costs(benchmark_json(tmp_path, with_fd=True))  # IR: FD 0.02 = half its exact 0.04
    raw = yaml.safe_load((SPACES / "table.yaml").read_text())
    raw.update(trials=[{"mechanism": "ST"}, {"mechanism": "SAM&JR"}], train={"penalty_gradient": "finite_difference"})
    path = tmp_path / "fd.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_space(path)
    trials = plan_costs(spec, costs)
    sam_jr = [t for t in trials if t.plan.train.mechanism == "SAM&JR"]
    test_pass = 40 * 10_000 / 3 * (0.01 * 128 / 256) / 128  # each epoch's test accuracy, at ST's step
    assert sam_jr[0].train_seconds == pytest.approx(40 * (50_000 // 128) * 0.08 * 0.5 * 128 / 256 + test_pass)
    assert "estimated (exact x 0.50)" == sam_jr[0].cost_source
    text = render_plan(spec, costs, gpus=1)
    rows = [line for line in text.splitlines() if line.startswith(("ST ", "SAM&JR"))]
    assert len(rows) == 2 and all(" 3 " in row for row in rows)  # one row per setting, its 3 seeds folded


def test_each_mechanism_packs_with_its_own_gain(tmp_path):
    path = benchmark_json(tmp_path, with_fd=True)
    data = json.loads(path.read_text())
    data["packing_gain"] = {"ST": {"4": 3.0}, "AT": {"4": 1.5}}
    path.write_text(json.dumps(data))
    costs = read_costs(path)
    config = lambda m, g="exact": TrainConfig.from_preset("fast", mechanism=m, penalty_gradient=g)  # noqa: E731
    assert costs.gain(config("ST"), 4) == (3.0, "measured") and costs.gain(config("AT"), 4) == (1.5, "measured")
    assert costs.gain(config("IR"), 4) == (3.0, "estimated (ST's)")
    data["packing_gain"]["IR:finite_difference"] = {"4": 2.0}
    path.write_text(json.dumps(data))
    assert read_costs(path).gain(config("IR", "finite_difference"), 4) == (2.0, "measured")
    raw = yaml.safe_load((SPACES / "table.yaml").read_text())
    raw.update(trials=[{"mechanism": "ST"}, {"mechanism": "AT"}], seeds=[0])
    space = tmp_path / "two.yaml"
    space.write_text(yaml.safe_dump(raw))
    spec = load_space(space)
    st, at = plan_costs(spec, costs)
    wall, per_gpu, _ = wall_seconds([st, at], spec, costs, gpus=1)
    assert per_gpu == 4
    assert wall == pytest.approx(max(st.seconds / 3.0 + at.seconds / 1.5, 4 * at.seconds / 1.5))


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
