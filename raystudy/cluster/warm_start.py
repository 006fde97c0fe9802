"""Warm start: the finished trials of earlier experiments, known to a search's sampler before it suggests anything.

`search: {warm_start: [EXPERIMENT, ...]}` names earlier grid or search experiments (local folders or
storage URIs). When the search is made (`select`), each one is read as the analysis reads it (its
manifest and trial records validated as anything read from storage), and every finished trial that
falls inside the search's space is kept, with its objective values as this search defines them, in
the search's manifest (`warm_start`). The search's Optuna history then holds them as completed
trials, marked with their experiment and trial, before the sampler is first asked
(raystudy.cluster.searcher.OptunaSearcher.add_known). They are not retrained. A resumed search
reads them from its manifest, not from the earlier experiments again, and adds only those its
history lacks.

A trial is skipped, and counted by reason in one line per experiment, where it did not finish,
lies outside the space (another mechanism, a value outside a range, or a setting the search does
not search that differs: `StudySpec.sample_of_plan`), was measured otherwise than this search
measures (other evaluation images, attack or smoothness settings), lacks an objective metric, was
measured on other targets, or has an objective that is not a finite number. No Ray here.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from raystudy.config import StudySpec
from raystudy.config.evaluation import EvalConfig
from raystudy.config.study import averaged_over_targets
from raystudy.errors import RaystudyError
from raystudy.persist import storage
from raystudy.persist.record import (
    AGGREGATE_TARGETS,
    MetricRow,
    finite_number,
    flat,
    is_defended,
    objective_rows,
    rows_of,
    targets_location,
)

# The evaluation settings each metric's value depends on (the others choose which metrics exist,
# or how fast they are computed). A metric not named here depends on all of them.
IMAGES = ("n_eval", "seed")
ATTACK_SETTINGS = IMAGES + ("steps", "step_size", "random_start", "loss")
MEASURED_BY: dict[str, tuple[str, ...]] = {
    "acc": IMAGES,
    "similarity": IMAGES,
    "similarity_min": IMAGES,
    "smoothness": IMAGES
    + ("smoothness_samples", "power_iterations", "power_tolerance", "smoothness_method", "lanczos_iterations"),
    "asr": ATTACK_SETTINGS,
    "asr_all": ATTACK_SETTINGS,
    "fooling": ATTACK_SETTINGS,
    "support": ATTACK_SETTINGS,
    "test_acc": (),
}
SELECTION_ONLY = ("budgets", "attacks", "modes", "batch_size", "defenses")
EVERY_SETTING = tuple(f for f in EvalConfig.__dataclass_fields__ if f not in SELECTION_ONLY)
NOT_FINISHED = "not finished"
OTHER_TARGETS = "measured on other targets"
OTHER_TARGET_MODELS = "measured on other target models (same names, other files)"


def settings_of(metric: str) -> tuple[str, ...]:
    """The evaluation settings a metric's value depends on: a targeted attack's also on how its
    classes are chosen, AutoAttack's on its steps."""
    settings = MEASURED_BY.get(metric.split("/", 1)[0], EVERY_SETTING)
    if settings is ATTACK_SETTINGS:
        parts = metric.split("/")
        settings += ("target_classes", "targeted_steps") if "targeted" in parts else ()
        settings += ("autoattack_steps",) if "autoattack" in parts else ()
        settings += ("attack_options",) if any(p.startswith("torchattack.") for p in parts) else ()
    return settings


@dataclass(frozen=True)
class KnownTrial:
    """A finished trial of an earlier experiment, as the search's sampler is told it."""

    experiment: str  # its experiment's location
    trial_id: str
    params: dict[str, Any]  # the search's values that make its plan
    values: tuple[float, ...]  # its objective values, in the search's order

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "trial_id": self.trial_id,
            "params": self.params,
            "values": list(self.values),
        }


def select(spec: StudySpec, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's `warm_start` entry of a new search whose own manifest (targets, evaluation
    images) is `manifest`: per earlier experiment its counts, and every trial kept. One line each."""
    from analysis.records import load_experiment

    sources, kept, seen = [], [], {}
    for given in spec.search.warm_start:
        location = storage.normalize(given)
        if location in seen:
            raise RaystudyError(f"warm_start: {given} and {seen[location]} are the same experiment: name it once")
        seen[location] = given
        earlier = load_experiment(location, cache=None)
        if earlier.spec.kind == "targets":
            raise RaystudyError(f"warm_start: {given} is a targets study: its models are targets, not surrogates")
        measured_otherwise = _measured_otherwise(spec, manifest, earlier)
        other_models = not _same_target_models(spec, manifest, earlier)
        skipped: Counter[str] = Counter()
        added = 0
        for trial in earlier.trials:
            known, reason = _judge(spec, manifest, earlier, trial, measured_otherwise)
            if known is not None and other_models:
                known, reason = None, OTHER_TARGET_MODELS
            if known is None:
                skipped[reason] += 1
            else:
                kept.append(known)
                added += 1
        sources.append(
            {"experiment": earlier.path, "trials": len(earlier.trials), "added": added, "skipped": dict(skipped)}
        )
        print(_summary_line(given, len(earlier.trials), added, skipped), flush=True)
    return {"sources": sources, "trials": [k.to_dict() for k in kept]}


def _summary_line(given: str, total: int, added: int, skipped: Counter) -> str:
    line = f"warm start: {added} of {total} trial(s) of {given} known to the sampler (not retrained)"
    if skipped:
        line += "; skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    return line


def _judge(spec: StudySpec, manifest, earlier, trial, measured_otherwise: dict[str, str]):
    """(KnownTrial, "") for a trial the search can take, else (None, why not)."""
    from analysis.records import DONE, plan_of

    if trial.status != DONE or not trial.record:
        return None, NOT_FINISHED
    try:
        plan = plan_of(earlier.spec, trial)
        params, why = spec.sample_of_plan(plan)
    except (RaystudyError, KeyError, TypeError, ValueError, AttributeError):
        return None, "with a plan that cannot be read"
    if params is None:
        return None, why
    rows = rows_of(trial.record)
    theirs = set(earlier.record.get("endpoints") or [])  # black-box targets: rows added after the trial
    values = []
    for metric in spec.search.metrics:
        if measured_otherwise[metric]:
            return None, measured_otherwise[metric]
        value, why = _objective_value(spec, manifest, rows, metric, theirs)
        if why:
            return None, why
        values.append(value)
    return KnownTrial(earlier.path, trial.trial_id, params, tuple(values)), ""


def _same_target_models(spec: StudySpec, manifest, earlier) -> bool:
    """Whether the earlier experiment attacked the very target models this search attacks: the same
    targets study in the same storage, or target files of the same names with the same bytes (an
    experiment copied to another storage)."""
    ours = targets_location(manifest["storage"], spec.targets)
    their_storage = earlier.record.get("storage") or earlier.path.rsplit("/", 1)[0]
    theirs = targets_location(their_storage, earlier.spec.targets)
    if ours == theirs:
        return True
    names = [t for t in manifest.get("targets") or [] if t not in set(manifest.get("endpoints") or [])]
    return all(_digest(storage.join(ours, f"{n}.pt")) == _digest(storage.join(theirs, f"{n}.pt")) for n in names)


def _digest(location: str) -> str | None:
    entry = storage.file_entry(location)
    if entry is None:
        return None
    return f"{entry.size}:" + hashlib.sha256(storage.read_bytes(location)).hexdigest()


def _measured_otherwise(spec: StudySpec, manifest, earlier) -> dict[str, str]:
    """Per objective metric: "" where the earlier experiment measured it as this search does, else why not."""
    out = {}
    for metric in spec.search.metrics:
        settings = settings_of(metric)
        differ = [s for s in settings if getattr(spec.evaluation, s) != getattr(earlier.spec.evaluation, s)]
        if settings and manifest.get("eval_indices") != earlier.record.get("eval_indices"):
            differ.append("evaluation images")
        targeted = "/targeted/" in metric  # the classes a targeted attack aims at, per image
        if targeted and manifest.get("eval_target_classes") != earlier.record.get("eval_target_classes"):
            differ.append("targeted classes")
        out[metric] = f"measured otherwise ({', '.join(dict.fromkeys(differ))} differ)" if differ else ""
    return out


def _objective_value(spec: StudySpec, manifest, rows: list[MetricRow], metric: str, their_endpoints: set[str]):
    """(value, "") of one objective metric as this search computes it, or (None, why not). A metric
    averaged over targets must have been measured on this search's targets (with objective targets:
    on those at least, and averaged over them)."""
    family = metric.rsplit("/", 1)[0]
    per_target = {
        r.target
        for r in rows
        if r.target is not None
        and r.target not in AGGREGATE_TARGETS
        and not is_defended(r.target)
        and r.key.rsplit("/", 1)[0] == family
    } - their_endpoints
    value = flat(rows).get(metric)
    if averaged_over_targets(metric) or (metric.endswith("/mean") and per_target):
        # The hook's means are over the white-box targets; the black-box ones are queried after.
        hooks_targets = set(manifest.get("targets") or []) - set(manifest.get("endpoints") or [])
        objective_targets = spec.search.objective_targets
        if value is not None and not per_target:
            return None, OTHER_TARGETS
        if objective_targets and averaged_over_targets(metric):
            if not set(objective_targets) <= per_target:
                return None, OTHER_TARGETS
            mean = [r for r in objective_rows(rows, metric, objective_targets) if r.target == "objective"]
            value = mean[0].value if mean else None
        elif value is not None and per_target != hooks_targets:
            return None, OTHER_TARGETS
    if value is None:
        return None, f"without {metric}"
    if not finite_number(value):
        return None, f"with {metric} not a finite number"
    return float(value), ""


def from_manifest(manifest: Mapping[str, Any]) -> list[KnownTrial]:
    """The trials a search's manifest says its sampler knows (checked with the manifest)."""
    entry = manifest.get("warm_start") or {}
    return [
        KnownTrial(t["experiment"], t["trial_id"], dict(t["params"]), tuple(float(v) for v in t["values"]))
        for t in entry.get("trials", [])
    ]
