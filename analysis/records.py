"""Reading Ray Tune experiments offline: no Ray, no cluster, local paths or storage URIs.

An experiment is what `raystudy run/search/targets` wrote: `raystudy-study.json` (the study file,
the evaluation images, the targets) and one folder per trial holding Ray's `params.json` (the
trial's config), `result.json` (one JSON line per report; the trial-end hook's metrics are in the
line with `final: 1`) and, if it failed, `error.txt`. Trials are found by those files and
identified by their recorded config, never by folder names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from raystudy import storage
from raystudy.errors import RaystudyError
from raystudy.space import STUDY_RECORD, StudySpec, parse_space

DONE, FAILED, INCOMPLETE, MISSING, STOPPED = "done", "failed", "incomplete", "missing", "stopped early"


@dataclass(frozen=True)
class TrialRecord:
    experiment: str
    trial_id: str
    config: dict[str, Any]  # the Ray config (grid: {"trial": {...}}; search: the sampled values)
    status: str  # done, failed, stopped early (ASHA), incomplete (no final yet) or missing
    final: dict[str, Any] = field(default_factory=dict)  # the final result: epoch record + hook metrics
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
    return TrialRecord(experiment, str(trial_id), config, status, finals[-1] if finals else {}, history, error, base)


def trial_key(config: dict[str, Any]) -> str:
    """A grid trial's identity: its mechanism, magnitudes, model, LGV flag, overrides and seed."""
    return json.dumps(config.get("trial", config), sort_keys=True)


def _missing(spec: StudySpec, trials: list[TrialRecord]) -> list[TrialRecord]:
    """Grid points the study defines but no trial folder holds (a study stopped before starting them)."""
    if spec.kind == "search":
        return []
    seen = {trial_key(t.config) for t in trials}
    return [
        TrialRecord(spec.name, f"missing-{i}", {"trial": c}, MISSING)
        for i, c in enumerate(spec.grid_configs())
        if trial_key({"trial": c}) not in seen
    ]
