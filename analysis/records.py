"""Reading Ray Tune experiments offline: no Ray, no cluster, local paths or storage URIs.

An experiment is what `raystudy run/search/targets` wrote: `raystudy-study.json` (the study file,
the evaluation images, the targets) and one folder per trial holding Ray's `params.json` (the
trial's plan), `result.json` (one JSON line per report; the line with `final: 1` carries the
trial's record: identity, plan, versions and metric rows, see raystudy.record) and, if it failed,
`error.txt`. Trials are found by those files and identified by their recorded plan, never by
folder names. Experiments written before records are migrated on read (`_migrate`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from raystudy import storage
from raystudy.config import STUDY_RECORD, StudySpec, TrialPlan, parse_space
from raystudy.errors import RaystudyError
from raystudy.mechanisms import mechanism_label
from raystudy.record import legacy_rows, make_record

DONE, FAILED, INCOMPLETE, MISSING, STOPPED = "done", "failed", "incomplete", "missing", "stopped early"


@dataclass(frozen=True)
class TrialRecord:
    experiment: str
    trial_id: str
    config: dict[str, Any]  # the Ray config (grid: {"plan": {...}}; search: the sampled values)
    status: str  # done, failed, stopped early (ASHA), incomplete (no final yet) or missing
    final: dict[str, Any] = field(default_factory=dict)  # the final result (flat metrics for Ray)
    record: dict[str, Any] = field(default_factory=dict)  # the trial's record (raystudy.record); {} unless done
    history: tuple[dict[str, Any], ...] = ()
    error: str = ""
    location: str = ""  # the trial's folder (where its checkpoints are), "" if it never ran


@dataclass(frozen=True)
class Experiment:
    path: str
    name: str
    spec: StudySpec
    record: dict[str, Any]
    trials: tuple[TrialRecord, ...]


def load_experiment(path: str) -> Experiment:
    location = storage.normalize(path)
    if not storage.exists(storage.join(location, STUDY_RECORD)):
        raise RaystudyError(f"{path} is not a raystudy experiment (no {STUDY_RECORD}; pass <storage>/<study name>)")
    try:
        record = json.loads(storage.read_bytes(storage.join(location, STUDY_RECORD)))
        spec = parse_space(record["study"], record.get("source", path), record.get("data"))
    except (ValueError, KeyError) as err:
        raise RaystudyError(f"{path}: unreadable {STUDY_RECORD} ({err})") from None
    trials = [t for t in (_read_trial(location, spec.name, d) for d in storage.list_dirs(location)) if t is not None]
    trials = [_migrate(spec, t) if t.final and not t.record else t for t in trials]
    trials += _missing(spec, trials)
    return Experiment(location, spec.name, spec, record, tuple(trials))


def _read_trial(location: str, experiment: str, folder: str) -> TrialRecord | None:
    base = storage.join(location, folder)
    if not storage.exists(storage.join(base, "params.json")):
        return None  # not a trial folder
    config = json.loads(storage.read_bytes(storage.join(base, "params.json")))
    rows = []
    if storage.exists(storage.join(base, "result.json")):
        for line in storage.read_bytes(storage.join(base, "result.json")).decode().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash mid-write
    finals = [r for r in rows if r.get("final") == 1]
    error = ""
    if storage.exists(storage.join(base, "error.txt")):
        lines = storage.read_bytes(storage.join(base, "error.txt")).decode(errors="replace").strip().splitlines()
        error = lines[-1] if lines else "unknown error"
    stopped = bool(rows) and rows[-1].get("done") is True  # a scheduler (ASHA) ended it before the hook
    status = DONE if finals else FAILED if error else STOPPED if stopped else INCOMPLETE
    trial_id = (rows[-1].get("trial_id") if rows else None) or folder
    history = tuple(r for r in rows if r.get("final") != 1)
    final = finals[-1] if finals else {}
    return TrialRecord(experiment, str(trial_id), config, status, final, final.get("record", {}), history, error, base)


def plan_of(spec: StudySpec, trial: TrialRecord) -> TrialPlan:
    """The trial's plan: from its record when it finished, else from the config Ray recorded."""
    if trial.record:
        return TrialPlan.from_dict(trial.record["plan"])
    return spec.plan_from_ray(trial.config)


def _migrate(spec: StudySpec, trial: TrialRecord) -> TrialRecord:
    """A finished trial written before records: its plan from its config, its rows from its flat metrics."""
    plan = spec.plan_from_ray(trial.config)
    label = mechanism_label(plan.train.mechanism, dict(plan.train.magnitudes), plan.train.dataset, plan.lgv is not None)
    identity = {**plan.identity(), "label": label[0]}
    study = {"name": spec.name, "kind": spec.kind, "preset": spec.preset}
    record = make_record(identity, plan.to_dict(), study, {}, legacy_rows(trial.final))
    return dataclasses.replace(trial, record=record)


def _missing(spec: StudySpec, trials: list[TrialRecord]) -> list[TrialRecord]:
    """Grid points the study defines but no trial folder holds (a study stopped before starting them)."""
    if spec.kind == "search":
        return []
    seen = {plan_of(spec, t).key() for t in trials}
    return [
        TrialRecord(spec.name, f"missing-{i}", {"plan": plan.to_dict()}, MISSING)
        for i, plan in enumerate(spec.plans)
        if plan.key() not in seen
    ]
