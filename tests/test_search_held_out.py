"""Held-out targets in a search: the objective averages over the named targets only; every trial
still measures all of them, and the winner is reported on the held-out ones apart."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import final_rows, smoke_search

from raystudy.cluster.experiment import find_targets
from raystudy.config import parse_space
from raystudy.errors import RaystudyError
from raystudy.persist.record import MetricRow, objective_rows


def asr(target: str, value: float, budget: int = 8) -> MetricRow:
    return MetricRow("asr", value, "pgd", "untargeted", budget, target=target)


def test_objective_and_held_out_average_only_their_targets():
    rows = [asr("a", 0.9), asr("b", 0.7), asr("c", 0.2), asr("d", 0.0), asr("mean", 0.45), asr("a", 0.1, budget=4)]
    objective, held_out = objective_rows(rows, "asr/pgd/untargeted/8/mean", ["a", "b"])
    assert (objective.key, objective.value) == ("asr/pgd/untargeted/8/objective", pytest.approx(0.8))
    assert (held_out.key, held_out.value) == ("asr/pgd/untargeted/8/held_out", pytest.approx(0.1))


def run_search(space: dict, storage: Path, tmp_path: Path) -> tuple[str, list[dict]]:
    """`raystudy search` on a study file written from `space`: its output and each trial's final result."""
    path = tmp_path / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space))
    out = subprocess.run(
        [sys.executable, "-m", "raystudy", "search", str(path), "--storage", str(storage), "--num-cpus", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, [rows[-1] for rows in final_rows(storage / space["name"]).values() if rows]


def search_space(**search) -> dict:
    return smoke_search("held_out_smoke", **{"num_samples": 3, **search})


@pytest.mark.parametrize(
    "search, message",
    [
        ({"objective_targets": ["tiny_cnn_s1"], "metric": "acc"}, "needs a metric averaged over targets"),
        ({"objective_targets": ["tiny_cnn_s1", "tiny_cnn_s1"]}, "names a target twice"),
        ({"objective_targets": "tiny_cnn_s1"}, "objective_targets"),
    ],
)
def test_objective_targets_are_checked_on_load(search, message):
    with pytest.raises(RaystudyError, match=message):
        parse_space(search_space(**search), "held_out.yaml")


@pytest.mark.parametrize(
    "objective, message",
    [
        (["tiny_cnn_s3"], "tiny_cnn_s3 not among the targets of 'smoke_targets': tiny_cnn_s1, tiny_cnn_s2"),
        (["tiny_cnn_s1", "tiny_cnn_s2"], "hold at least one out"),
    ],
)
def test_objective_targets_must_exist_and_leave_one_out(tmp_path, objective, message):
    folder = tmp_path / "smoke_targets" / "targets"
    folder.mkdir(parents=True)
    for name in ("tiny_cnn_s1", "tiny_cnn_s2"):
        (folder / f"{name}.pt").write_bytes(b"")
    spec = parse_space(search_space(objective_targets=objective), "held_out.yaml")
    with pytest.raises(RaystudyError, match=message):
        find_targets(spec, str(tmp_path), [])


def test_any_mechanism_search_draws_magnitudes_from_the_registry():
    spec = parse_space(search_space(mechanism="any", params={}), "any.yaml")
    assert spec.search.conditional and "SAM&JR" in spec.search.mechanisms and len(spec.search.mechanisms) == 12
    at, co = spec.search.magnitude_params("AT", "cifar10"), spec.search.magnitude_params("CO", "cifar10")
    assert (at[0].name, at[0].low, at[0].high, at[0].log) == ("AT.epsilon", 0.01, 1.0, True)  # geometric grid
    assert (co[0].name, co[0].low, co[0].high, co[0].log, co[0].integer) == ("CO.size", 8, 24, False, True)
    plan = spec.plan_for_sample({"mechanism": "MU", "MU.p": 0.3, "LS.p": 0.2})
    assert plan.train.mechanism == "MU" and dict(plan.train.magnitudes) == {"p": 0.3}
    assert spec.plan_for_sample({"mechanism": "ST"}).train.mechanism == "ST"
    listed = parse_space(search_space(mechanism=["MU", "LS"], params={}), "list.yaml")
    assert listed.search.mechanisms == ("MU", "LS") and listed.search.mechanism == "MU|LS"
    with pytest.raises(RaystudyError, match=re.escape("unknown mechanism 'SAM+JR'; valid: ST, MU")):
        parse_space(search_space(mechanism=["MU", "SAM+JR"], params={}), "bad.yaml")


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    from raystudy.cluster.outcome import pareto_front

    points = [[0.9, 0.1], [0.5, 0.5], [0.4, 0.4], [0.1, 0.9], [0.5, 0.5], [0.2, 0.95]]
    # [0.4, 0.4] is dominated by [0.5, 0.5], [0.1, 0.9] by [0.2, 0.95]; equal points dominate neither other
    assert pareto_front(points, ["max", "max"]) == [0, 1, 4, 5]
    assert pareto_front(points, ["max", "min"]) == [0]  # the most ASR with the least of the other


def test_multi_objective_settings_are_checked():
    spec = parse_space(search_space(metric=["asr/pgd/untargeted/8/mean", "acc"], mode=["max", "max"]), "mo.yaml")
    assert spec.search.multi_objective and spec.search.objective_metrics == ("asr/pgd/untargeted/8/mean", "acc")
    held = parse_space(
        search_space(
            metric=["asr/pgd/untargeted/8/mean", "acc"], mode=["max", "max"], objective_targets=["tiny_cnn_s1"]
        ),
        "mo.yaml",
    )
    assert held.search.objective_metrics == ("asr/pgd/untargeted/8/objective", "acc")
    with pytest.raises(RaystudyError, match="2 metric.s. but 1 mode"):
        parse_space(search_space(metric=["asr/pgd/untargeted/8/mean", "acc"], mode="max"), "mo.yaml")


@pytest.mark.slow
def test_a_two_objective_search_over_several_mechanisms(smoke_storage, tmp_path):
    """One search, two subjects: the mechanism is searched (each sample's magnitudes inside its own
    registered range), and two objectives make a Pareto front of non-dominated trials."""
    from raystudy.cluster.outcome import pareto_front

    space = search_space(mechanism=["ST", "MU", "LS", "CO"], params={}, num_samples=5)
    space["search"].update(metric=["asr/pgd/untargeted/8/mean", "acc"], mode=["max", "max"])
    space["name"] = "pareto_smoke"
    space["train"]["epochs"] = 1
    _, finals = run_search(space, smoke_storage, tmp_path)
    assert len(finals) == 5
    identities = [r["record"]["identity"] for r in finals]
    assert len({i["mechanism"] for i in identities}) >= 2
    ranges = {"MU": ("p", 0.1, 0.9), "LS": ("p", 0.1, 0.5), "CO": ("size", 8, 24)}
    for identity in identities:
        if identity["mechanism"] in ranges:
            name, low, high = ranges[identity["mechanism"]]
            assert low <= identity["magnitudes"][name] <= high
            assert identity["mechanism"] != "CO" or float(identity["magnitudes"]["size"]).is_integer()
    experiment = smoke_storage / "pareto_smoke"
    table = [[r["asr/pgd/untargeted/8/mean"], r["acc"]] for r in finals]
    expected = sorted(table[i] for i in pareto_front(table, ["max", "max"]))
    best = json.loads((experiment / "best_config.json").read_text())
    assert sorted(entry["values"] for entry in best["pareto_front"]) == expected
    for a in best["pareto_front"]:  # checked against the whole trial table: nothing dominates a front trial
        assert not any(b[0] >= a["values"][0] and b[1] >= a["values"][1] and b != a["values"] for b in table)
    report = subprocess.run(
        [sys.executable, "-m", "raystudy", "analyze", str(experiment), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "optuna_pareto_pareto_smoke.png").is_file()
    assert "Pareto front over asr/pgd/untargeted/8/mean, acc" in (tmp_path / "report" / "report.md").read_text()
