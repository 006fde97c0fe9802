"""What a tune phase's results say: trials finished, stopped early or failed, and a search's best
configuration (several objectives: its Pareto front), written to best_config.json."""

from __future__ import annotations

import json
from typing import Any, Sequence

from raystudy.config import StudySpec
from raystudy.config.sampler import search_settings
from raystudy.config.study import TrialPlan
from raystudy.persist import storage
from raystudy.persist.record import is_defended
from raystudy.training.trial import FINAL_KEY

BEST_CONFIG = "best_config.json"


def report(results, experiment: str) -> None:
    errors = [r for r in results if r.error is not None]
    finished = [r for r in results if finished_trial(r)]
    stopped = [r for r in results if r.error is None and stopped_early(r)]
    print(f"{len(finished)} of {len(results)} trials finished; results in {experiment}")
    if stopped:
        print(f"{len(stopped)} trials stopped early by ASHA (no trial-end metrics; pruned in the Optuna study)")
    if len(finished) + len(stopped) + len(errors) < len(results):
        print(
            f"{len(results) - len(finished) - len(stopped) - len(errors)} trials did not finish: "
            f"`raystudy resume {experiment}` goes on"
        )
    for r in errors:
        print(f"  failed: {describe(r.config)}: {str(r.error).strip().splitlines()[-1][:300]}")


def finished_trial(result) -> bool:
    return result.error is None and (result.metrics or {}).get(FINAL_KEY) == 1


def all_finished(results) -> bool:
    """True when every trial ended: with its final (hook) result, or stopped early by the scheduler."""
    return all(r.error is None and (finished_trial(r) or stopped_early(r)) for r in results)


def stopped_early(result) -> bool:
    """A scheduler's STOP marks the trial's last result done without the final one."""
    metrics = result.metrics or {}
    return metrics.get(FINAL_KEY) == 0 and metrics.get("done") is True


def write_best(spec: StudySpec, results, experiment: str) -> None:
    """best_config.json: the best finished trial on the objective (several objectives: the Pareto
    front), with what it was selected on and, with objective targets, its held-out score."""
    search = spec.search
    metrics = search.objective_metrics
    done = [r for r in results if finished_trial(r) and all(m in r.metrics for m in metrics)]
    if not done:
        return
    if search.multi_objective:
        front = pareto_front([[r.metrics[m] for m in metrics] for r in done], search.modes)
        summary = {
            "metrics": list(metrics),
            "modes": list(search.modes),
            "pareto_front": [
                {"config": done[i].config, "values": [done[i].metrics[m] for m in metrics]} for i in front
            ],
        }
        line = f"Pareto front over {', '.join(metrics)}: {len(front)} of {len(done)} trials"
        chosen = [done[i] for i in front]
    else:
        best = max(done, key=lambda r: r.metrics[metrics[0]] * (1 if search.mode == "max" else -1))
        summary = {"config": best.config, "metric": metrics[0], "value": best.metrics[metrics[0]]}
        line = f"best {metrics[0]} = {summary['value']:.4f} with {json.dumps(best.config)}"
        chosen = [best]
    if search.objective_targets:
        held_out = [t for t in _target_names(chosen[0].metrics) if t not in search.objective_targets]
        summary.update(selected_on=list(search.objective_targets), tested_on=held_out)
        summary["held_out_metric"] = search.held_out_metric
        held = [r.metrics.get(search.held_out_metric) for r in chosen]
        if search.multi_objective:
            for entry, value in zip(summary["pareto_front"], held):
                entry["held_out_value"] = value
        else:
            summary["held_out_value"] = held[0]
            line += (
                f"\n  selected on {', '.join(search.objective_targets)}; tested on {', '.join(held_out)}: "
                f"{search.held_out_metric} = {held[0]:.4f}"
            )
    summary["search_settings"] = search_settings(search.sampler, search.seed)
    storage.write_bytes(storage.join(experiment, BEST_CONFIG), json.dumps(summary, indent=1).encode())
    print(f"{line}\n(saved to {storage.join(experiment, BEST_CONFIG)})")


def pareto_front(values: list[list[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points: no other point is at least as good in every objective
    and better in one (max/min per objective)."""
    signed = [[v if mode == "max" else -v for v, mode in zip(point, modes)] for point in values]

    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(signed) if not any(dominates(q, p) for j, q in enumerate(signed) if j != i)]


def _target_names(metrics: dict[str, Any]) -> list[str]:
    """The targets a trial's hook measured (from its support/<target> counts)."""
    names = (k.split("/", 1)[1] for k in metrics if k.startswith("support/"))
    return sorted(name for name in names if not is_defended(name))


def describe(config: dict[str, Any]) -> str:
    """A trial in a line: its mechanism, magnitudes and seed (or target), or a search sample's values."""
    if "plan" in config:
        plan = config["plan"]
        train = plan["train"]
        magnitudes = ", ".join(f"{k}={v:g}" for k, v in dict(train["magnitudes"]).items())
        if plan.get("loaded"):  # trains nothing: its name says who it is, seeds do not apply
            return TrialPlan.from_dict(plan).loaded.describe()
        who = plan.get("target_name") or f"{train['mechanism']} ({magnitudes or 'no magnitude'})"
        return f"{who}, seed {train['seed']}"
    trial = config.get("trial", config)
    return ", ".join(f"{k}={v}" for k, v in trial.items())
