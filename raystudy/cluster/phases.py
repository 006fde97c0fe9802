"""A study as a pipeline of phases over one experiment: tune (the trials), confirm (a search's best
configurations retrained with fresh seeds), query (the black-box endpoints). `run` makes the
experiment and runs every phase; `resume` opens it and runs the same list. Tune and confirm are
marked done in the manifest once all their trials ended, and are then not run again; the query
phase runs each time (its answers are cached per image: nothing is asked twice). What the CLI's
run/targets/search/resume/query commands call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raystudy.blackbox.query import confirmed_endpoints, load_endpoints, query_experiment
from raystudy.cluster import confirm, outcome
from raystudy.cluster.experiment import Experiment, RayOptions, history_of, read_manifest, tune
from raystudy.cluster.searcher import reconcile
from raystudy.config import STUDY_MANIFEST, StudySpec, load_space
from raystudy.errors import RaystudyError
from raystudy.persist import storage
from raystudy.persist.record import targets_location
from raystudy.training.trial import FINAL_KEY

TUNE, CONFIRM = "tune", "confirm"  # the phases a manifest marks done (the query phase runs each time)


def run(spec: StudySpec, raw: Any, storage_path: str, ray: RayOptions, optuna_storage: str | None = None) -> list:
    """A new study, every phase; returns the trials' results (the confirmation's after the search's)."""
    from raystudy.cluster.tracking import tracking_callbacks

    tracking_callbacks(ray.trackers, spec.name)  # a missing tracker package fails before anything runs
    experiment = Experiment.create(spec, raw, storage_path, ray.address is None, optuna_storage)
    return _run_phases(experiment, ray)


def resume(location: str, ray: RayOptions, eval_batch_size: int | None = None) -> list:
    """Finish an interrupted study: unfinished and errored trials go on, finished ones stay; then the
    phases after it."""
    return _run_phases(Experiment.open(location, eval_batch_size), ray)


def _run_phases(experiment: Experiment, ray: RayOptions) -> list:
    spec = experiment.spec
    if spec.kind == "targets" and not spec.plans:  # endpoints only: saved when the experiment was made
        experiment.mark_done(TUNE)
        return []
    results = tune(experiment, ray)
    _after_tune(experiment, results)
    expected = spec.search.num_samples if spec.kind == "search" else len(spec.plans)
    if len(results) == expected and outcome.all_finished(results):  # an interrupted fit() returns too
        experiment.mark_done(TUNE)
    everything = list(results)
    if spec.kind == "search" and spec.search.confirm is not None:
        everything += run_confirm(experiment, results, ray)
    if spec.kind != "targets" and experiment.endpoints:
        query_endpoints(experiment, ray.targets_file)  # idempotent: answers are cached per image
    return everything


def _after_tune(experiment: Experiment, results) -> None:
    spec = experiment.spec
    outcome.report(results, experiment.location)
    if spec.kind == "search":
        history = history_of(experiment)
        if history.place.exists():
            reconcile(history, results, FINAL_KEY)
        outcome.write_best(spec, results, experiment.location)


def run_confirm(search: Experiment, results, ray: RayOptions) -> list:
    """The confirm phase: start (or resume) the confirmation grid beside the search and record its
    summary in the search's best_config.json; returns the confirmation's results."""
    spec = search.spec
    if search.done(CONFIRM):
        print(f"confirm: done ({confirm.confirm_experiment(search.location)})")
        return []
    plans = confirm.top_plans(spec, results)
    if not plans:
        print("confirm: no finished search trial to confirm")
        return []
    location = confirm.confirm_experiment(search.location)
    print(f"confirm: retraining the top {len(plans)} with seeds {list(spec.search.confirm.seeds)} in {location}")
    if storage.exists(storage.join(location, STUDY_MANIFEST)):
        grid = Experiment.open(location)
    else:
        grid_raw = confirm.confirm_raw(spec, search.raw, plans)
        grid_spec = confirm.confirm_spec(spec, grid_raw)
        grid = Experiment.create(grid_spec, grid_raw, search.storage_root, ray.address is None)
    confirmed = _run_phases(grid, RayOptions(ray.address, ray.num_cpus, targets_file=ray.targets_file))
    confirm.record_summary(spec, plans, confirmed, search.location, location)
    if grid.done(TUNE):
        search.mark_done(CONFIRM)
    return confirmed


def query_endpoints(experiment: Experiment, targets_file: str | None = None, required: bool = False) -> int | None:
    """The query phase (raystudy.blackbox.query) for the black-box targets of the study's targets
    study: the endpoints stored with the targets, confirmed by the targets study file on this machine.
    Returns the queries paid now; None where the targets name no endpoint and `required`."""
    spec = experiment.spec
    stored = load_endpoints(targets_location(experiment.storage_root, spec.targets))
    if not stored:
        return None if required else 0
    source, local = users_endpoints(spec, experiment.storage_root, targets_file)
    endpoints = confirmed_endpoints(stored, local, source)
    print(f"querying {len(endpoints)} endpoint(s) named in {source} with the kept images of the finished trials")
    paid = query_experiment(experiment.location, endpoints)
    print(f"endpoint queries done: {paid} paid now (answers are kept in {experiment.location}/endpoint-cache)")
    return paid


def users_endpoints(spec: StudySpec, storage_root: str, targets_file: str | None) -> tuple[str, tuple]:
    """(file, endpoints) of the targets study file on this machine: --targets-file, else the file
    `<targets>.yaml` beside the study file, else the file `raystudy targets` was run with (where its
    manifest says). Only a local file is read: the bucket may say where to look, never what to send."""
    candidates = [targets_file] if targets_file else [str(Path(spec.source).with_name(f"{spec.targets}.yaml"))]
    if not targets_file:
        try:
            manifest = read_manifest(storage.join(storage_root, spec.targets))
        except RaystudyError:
            manifest = None
        source = manifest.get("source") if isinstance(manifest, dict) else None
        candidates += [source] if isinstance(source, str) and "://" not in source else []
    for candidate in candidates:
        # A path that came from the bucket (a resumed study's source, the targets' manifest) names a
        # file only the user can have written: owned by them, in a folder no one else may write.
        if Path(candidate).is_file() and (candidate == targets_file or storage.only_user_writes(Path(candidate))):
            targets = load_space(candidate)
            if targets.kind != "targets" or targets.name != spec.targets:
                raise RaystudyError(f"{candidate} is not the targets study {spec.targets!r} (kind: targets)")
            return candidate, targets.endpoints
    raise RaystudyError(
        f"the targets of {spec.name!r} name endpoints, and the query phase sends images and tokens only to "
        f"endpoints a targets study file on this machine names: give it with --targets-file "
        f"(looked for {', '.join(map(repr, candidates))}); nothing was sent"
    )
