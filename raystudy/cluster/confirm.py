"""What the confirm phase of a search computes: its best configurations retrained with fresh seeds, beside baselines.

A search selects its winner on one seed (and, without objective targets, on the very targets it is
scored on), so the winner's score is optimistic. With `search: {confirm: {top_k, seeds, baselines}}`
the top_k finished configurations (several objectives: the Pareto front first) are retrained with
each of `seeds`, and the baseline mechanisms (default magnitudes) with the same seeds, as an
ordinary grid study `<search>_confirm` beside the search: resumable like any study
(`raystudy resume <search experiment>` finishes the search, then the confirmation). Its summary,
mean ± std over the seeds on the objective and the held-out targets, goes into the search's
best_config.json under "confirmed" and into the report.

The phase itself (start or resume the grid, then record the summary) is raystudy.cluster.phases.
No Ray here.
"""

from __future__ import annotations

import copy
import json
import statistics
from typing import Any

from raystudy.cluster.outcome import BEST_CONFIG, finished_trial, pareto_front
from raystudy.config import StudySpec, parse_space
from raystudy.config.study import SEARCHABLE_TRAIN_KEYS, TrialPlan, averaged_over_targets
from raystudy.persist import storage
from raystudy.persist.record import checked_best_config, objective_rows, rows_of

CONFIRM_SUFFIX = "_confirm"


def confirm_experiment(search_experiment: str) -> str:
    return search_experiment.rstrip("/") + CONFIRM_SUFFIX


def top_plans(spec: StudySpec, results) -> list[TrialPlan]:
    """The search's top_k finished configurations, best first (several objectives: the Pareto front
    by its first objective, then the rest)."""
    search = spec.search
    metrics = search.objective_metrics
    done = [r for r in results if finished_trial(r) and all(m in r.metrics for m in metrics)]
    sign = 1 if search.modes[0] == "max" else -1
    done.sort(key=lambda r: -sign * r.metrics[metrics[0]])
    if search.multi_objective:
        front = set(pareto_front([[r.metrics[m] for m in metrics] for r in done], search.modes))
        done = [r for i, r in enumerate(done) if i in front] + [r for i, r in enumerate(done) if i not in front]
    return [spec.plan_for_sample(r.config) for r in done[: search.confirm.top_k]]


def confirm_raw(spec: StudySpec, raw: dict[str, Any], plans: list[TrialPlan]) -> dict[str, Any]:
    """The confirmation as a grid study file: the search's settings, the plans and the baselines as
    trials, the confirm seeds."""
    confirm = spec.search.confirm
    out = copy.deepcopy(raw)
    out.pop("search", None)
    searched = {p.name for p in spec.search.params} & set(SEARCHABLE_TRAIN_KEYS)
    trials, seen = [], set()
    for plan in plans:
        entry = {"mechanism": plan.train.mechanism, "magnitudes": dict(plan.train.magnitudes)}
        if searched:
            entry["train"] = {k: getattr(plan.train, k) for k in sorted(searched)}
        trials.append(entry)
        seen.add(json.dumps(entry, sort_keys=True))
    for name in confirm.baselines:
        entry = {"mechanism": name}
        if json.dumps(entry, sort_keys=True) not in seen:
            trials.append(entry)
    out.update(
        name=spec.name + CONFIRM_SUFFIX,
        kind="grid",
        seeds=list(confirm.seeds),
        trials=trials,
        description=f"confirmation of search {spec.name!r}: its top {len(plans)} and baselines, "
        f"seeds {list(confirm.seeds)}",
    )
    return out


def confirm_spec(spec: StudySpec, grid_raw: dict[str, Any]) -> StudySpec:
    return parse_space(grid_raw, f"{spec.source} (confirm)", spec.data)


def record_summary(spec: StudySpec, plans: list[TrialPlan], confirmed, search_experiment: str, experiment: str):
    """The confirmation's summary, into the search's best_config.json (and printed)."""
    summary = summarize(spec, plans, confirmed)
    location = storage.join(search_experiment, BEST_CONFIG)
    best = storage.read_json(location, limit=16 << 20, missing_ok=True)
    best = {} if best is None else checked_best_config(best, location)
    best["confirmed"] = {"experiment": experiment, "seeds": list(spec.search.confirm.seeds), "rows": summary}
    storage.write_bytes(location, json.dumps(best, indent=1).encode())
    print(render(summary))


def summarize(spec: StudySpec, plans: list[TrialPlan], confirmed) -> list[dict[str, Any]]:
    """Per configuration (top ones first, then baselines): mean ± std over the seeds of the
    objective (on the objective targets) and of the held-out targets' score."""
    search = spec.search
    metric = next(filter(averaged_over_targets, search.metrics), search.metric)
    top = [_key(p.train.mechanism, dict(p.train.magnitudes)) for p in plans]
    groups: dict[str, dict[str, Any]] = {}
    for result in confirmed:
        record = (result.metrics or {}).get("record")
        if result.error is not None or not record:
            continue
        identity = record["identity"]
        key = _key(identity["mechanism"], identity["magnitudes"])
        group = groups.setdefault(
            key, {"label": identity["label"], "magnitudes": identity["magnitudes"], "objective": [], "held_out": []}
        )
        objective, held_out = _scores(rows_of(record), metric, search.objective_targets)
        group["objective"].append(objective)
        if held_out is not None:
            group["held_out"].append(held_out)
    rows = []
    for key, group in sorted(groups.items(), key=lambda kv: top.index(kv[0]) if kv[0] in top else len(top)):
        role = f"search #{top.index(key) + 1}" if key in top else "baseline"
        rows.append(
            {
                "role": role,
                "label": group["label"],
                "magnitudes": group["magnitudes"],
                "seeds": len(group["objective"]),
                "objective_metric": search.objective_metric if search.objective_targets else metric,
                **_mean_std("objective", group["objective"]),
                **({"held_out_metric": search.held_out_metric} if search.objective_targets else {}),
                **(_mean_std("held_out", group["held_out"]) if search.objective_targets else {}),
            }
        )
    return rows


def _key(mechanism: str, magnitudes: dict) -> str:
    return json.dumps([mechanism, {k: round(float(v), 12) for k, v in sorted(magnitudes.items())}])


def _scores(rows, metric: str, objective_targets) -> tuple[float, float | None]:
    if not objective_targets:
        return next(r.value for r in rows if r.key == metric), None
    values = {r.target: r.value for r in objective_rows(rows, metric, objective_targets)}
    return values.get("objective", float("nan")), values.get("held_out")


def _mean_std(name: str, values: list[float]) -> dict[str, float | None]:
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {f"{name}_mean": mean, f"{name}_std": std}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["confirmed (mean ± std over seeds):"]
    for row in rows:
        text = f"  {row['role']:10s} {row['label']:40s} n={row['seeds']}  objective {_pm(row, 'objective')}"
        if "held_out_mean" in row:
            text += f"  held-out {_pm(row, 'held_out')}"
        lines.append(text)
    return "\n".join(lines)


def _pm(row: dict[str, Any], name: str) -> str:
    mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
