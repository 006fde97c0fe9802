"""An experiment: made once (`Experiment.create`, a new study; `Experiment.open`, to resume), and its
tune phase, the Ray Tune run of its trials (grid, targets or Optuna search).

An experiment is `<storage>/<study name>/`: Ray's trial logs and checkpoints, plus the study
manifest `raystudy-study.json` (the study file's contents, the data path, the targets found, the
evaluation images, the phases done) from which `open` rebuilds everything. The targets are found
once, when the experiment is made; the evaluation images are chosen from the test labels alone
(no image decoded on the driver). The phases that follow (confirm, query) are raystudy.cluster.phases.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from raystudy.blackbox.query import load_endpoints, save_endpoints
from raystudy.cluster import searcher as search
from raystudy.cluster import warm_start
from raystudy.cluster.session import init_ray
from raystudy.cluster.trial_count import PlanSearcher, RayTrials, counted_search
from raystudy.config import STUDY_MANIFEST, StudySpec, parse_space
from raystudy.config.sampler import search_settings
from raystudy.config.torchattack import is_torchattack
from raystudy.core.checkpoint import STATE_FILE
from raystudy.errors import RaystudyError
from raystudy.persist import migrate, storage
from raystudy.persist.record import checked_manifest, targets_location
from raystudy.training.trial import trial_folder


@dataclass
class Experiment:
    spec: StudySpec
    raw: Any  # the study file's contents, as the manifest keeps them
    location: str  # <storage>/<study name>
    manifest: dict[str, Any]

    @property
    def storage_root(self) -> str:
        return self.location.rsplit("/", 1)[0]

    @property
    def targets(self) -> list[str]:
        return list(self.manifest.get("targets") or [])

    @property
    def endpoints(self) -> list[str]:
        return list(self.manifest.get("endpoints") or [])

    def done(self, phase: str) -> bool:
        return phase in self.manifest.get("phases_done", [])

    def mark_done(self, phase: str) -> None:
        if not self.done(phase):
            self.manifest["phases_done"] = [*self.manifest.get("phases_done", []), phase]
            self._write_manifest()

    def _write_manifest(self) -> None:
        location = storage.join(self.location, STUDY_MANIFEST)
        storage.write_bytes(location, json.dumps(self.manifest, indent=1).encode())

    @classmethod
    def create(
        cls, spec: StudySpec, raw: Any, storage_path: str, local: bool, optuna_storage: str | None = None
    ) -> "Experiment":
        """A new experiment: refuses one that exists (resume it instead), finds the targets once,
        saves a targets study's endpoints and writes the manifest."""
        spec.evaluation.check_installed()
        if spec.kind != "targets" and any(map(is_torchattack, spec.evaluation.attacks)):
            from raystudy.metrics.attacks import check_torchattack_runs

            check_torchattack_runs(spec)  # one step of each on a model without weights: seconds
        storage.check_writable(storage_path)
        root = storage.normalize(storage_path)
        location = storage.join(root, spec.name)
        if storage.exists(storage.join(location, STUDY_MANIFEST)):
            raise RaystudyError(
                f"experiment {location} exists: finish it with `raystudy resume {location}`, "
                f"or give the study another name"
            )
        if optuna_storage:  # Ray pickles the searcher, this URL with it, into the experiment: no password in it
            storage.refuse_credentials_in(optuna_storage, "--optuna-storage", "PGPASSWORD or ~/.pgpass, MYSQL_PWD, ...")
        stored = [] if spec.kind == "targets" else load_endpoints(targets_location(root, spec.targets))
        endpoints = [e.name for e in stored]
        targets = [] if spec.kind == "targets" else find_targets(spec, root, endpoints)
        if local:
            _check_local_data(spec)
        if spec.kind == "targets" and spec.endpoints:
            save_endpoints(targets_location(root, spec.name), spec.endpoints)
            print(f"{len(spec.endpoints)} endpoint target(s) saved: {', '.join(e.name for e in spec.endpoints)}")
        manifest: dict[str, Any] = {
            "format": migrate.MANIFEST_FORMAT,
            "study": raw,
            "source": spec.source,
            "data": spec.data,
            "storage": root,
            "targets": targets,
            "endpoints": endpoints,  # the black-box targets whose images every trial keeps
            "optuna_storage": optuna_storage,
            "phases_done": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if spec.kind != "targets":
            manifest.update(_evaluation_images(spec))
        if spec.search is not None:  # what draws the samples, written out (raystudy/config/sampler.py)
            manifest["search_settings"] = search_settings(spec.search.sampler, spec.search.seed)
        if spec.search is not None and spec.search.warm_start:  # read once: a resume reads the manifest
            manifest["warm_start"] = warm_start.select(spec, manifest)
        experiment = cls(spec, raw, location, manifest)
        experiment._write_manifest()
        return experiment

    @classmethod
    def open(cls, location: str, eval_batch_size: int | None = None) -> "Experiment":
        """An experiment to resume, from its manifest, checked against what Ray recorded.
        `eval_batch_size`: the trial-end hook's batch from now on (the values do not depend on it)."""
        experiment = cls.read(location)
        migrate.check_resumable(experiment.manifest, experiment.location)
        check_manifest_matches(experiment.spec, experiment.location)
        if eval_batch_size is not None:
            evaluation = dataclasses.replace(experiment.spec.evaluation, batch_size=eval_batch_size)
            experiment.spec = dataclasses.replace(experiment.spec, evaluation=evaluation)
        experiment.manifest = migrate.current_manifest(experiment.manifest)
        return experiment

    @classmethod
    def read(cls, location: str) -> "Experiment":
        """An experiment as its manifest says (to query it or read it; `open` to resume it)."""
        location = storage.normalize(location)
        manifest = read_manifest(location)
        spec = parse_space(manifest["study"], manifest["source"], manifest["data"])
        return cls(spec, manifest["study"], location, manifest)


def read_manifest(experiment: str) -> dict[str, Any]:
    location = storage.join(storage.normalize(experiment), STUDY_MANIFEST)
    if not storage.exists(location):
        raise RaystudyError(f"{experiment} is not a raystudy experiment (no {STUDY_MANIFEST})")
    return checked_manifest(storage.read_json(location), location)


def find_targets(spec: StudySpec, storage_root: str, endpoints: list[str]) -> list[str]:
    """The targets of the study's targets study (model files, then endpoints): found once."""
    location = targets_location(storage_root, spec.targets)
    found = [n[:-3] for n in storage.list_files(location, ".pt")]
    if not found and not endpoints:
        raise RaystudyError(
            f"study {spec.name!r} attacks the targets of study {spec.targets!r}, but {location} holds none: "
            f"train them first with `raystudy targets search_spaces/{spec.targets}.yaml --storage {storage_root}`"
        )
    if spec.search is not None and spec.search.objective_targets:
        missing = [t for t in spec.search.objective_targets if t not in found]
        if missing:
            raise RaystudyError(
                f"search: objective_targets {', '.join(missing)} not among the targets of {spec.targets!r}: "
                f"{', '.join(found)}"
            )
        if set(found) <= set(spec.search.objective_targets):
            raise RaystudyError(
                f"search: objective_targets take every target of {spec.targets!r}: hold at least one out "
                f"(the winner is tested on the held-out targets)"
            )
    return found + endpoints  # black-box ones are queried after


def _evaluation_images(spec: StudySpec) -> dict[str, list[int]]:
    """The evaluation images every trial uses, from the test labels alone (nothing decoded here:
    a cluster's head node need not hold the data's pixels); each trial draws the same from its own."""
    from raystudy.core.data import test_labels_for
    from raystudy.metrics.hook import eval_indices

    plan = spec.plans[0] if spec.kind != "search" else spec.search_corner()
    labels, num_classes = test_labels_for(plan.train)
    indices, target_classes = eval_indices(labels, num_classes, spec.evaluation)
    return {"eval_indices": indices.tolist(), "eval_target_classes": target_classes.tolist()}


def _check_local_data(spec: StudySpec) -> None:
    """On a local Ray every trial reads the data from this machine: a data folder that is not here
    is one line now, not one failed trial each. (On a cluster the folder must exist on the workers,
    which the driver cannot see.)"""
    path = spec.data or os.environ.get("RAYSTUDY_DATA")
    datasets = {spec.dataset} | {plan.train.dataset for plan in spec.plans}
    if not path or "://" in path or datasets == {"synthetic"}:
        return
    if not os.path.isdir(os.path.expanduser(path)):
        source = "RAYSTUDY_DATA" if not spec.data else "the data folder (--data or the file's data:)"
        raise RaystudyError(f"{source} {path!r} is not a folder on this machine")


def check_manifest_matches(spec: StudySpec, experiment: str) -> None:
    """Before Ray's pickled state is restored: the manifest names this experiment, and every trial
    Ray started is one of the study's (a manifest swapped or edited in the bucket is refused)."""
    from analysis.records import MISSING, load_experiment, plan_of

    if spec.name != experiment.rstrip("/").rsplit("/", 1)[-1]:
        raise RaystudyError(
            f"{experiment}: its manifest is of study {spec.name!r}, not of this experiment: not resumed"
        )
    for trial in load_experiment(experiment, cache=None).trials:
        if trial.status == MISSING:
            continue
        try:
            plan = plan_of(spec, trial)
        except (RaystudyError, KeyError, TypeError, ValueError, AttributeError):
            plan = None
        if plan is None or (spec.kind != "search" and plan not in spec.plans):
            raise RaystudyError(
                f"{experiment}: trial {trial.trial_id} ran a setting its study manifest does not hold: the manifest "
                "does not match the experiment (changed since it started?): not resumed"
            )


# ---------------------------------------------------------------------------------------------
# The tune phase


@dataclass(frozen=True)
class RayOptions:
    """How the driver reaches Ray and runs trials (command-line options, not the study's)."""

    address: str | None = None
    num_cpus: int | None = None
    max_concurrent: int | None = None
    trackers: tuple[str, ...] = ()
    targets_file: str | None = None


def tune(experiment: Experiment, ray: RayOptions):
    """Run the experiment's trials with Ray Tune, or go on with them where Ray saved its state
    (Tuner.restore: unfinished and errored trials go on); returns Ray's ResultGrid. A tune phase
    that is done only reads Ray's results. An experiment whose Ray never started (a wrong
    --address, the driver lost before) starts its trials now."""
    from ray import tune as ray_tune

    from raystudy.cluster.trainable import run_trial

    spec = experiment.spec
    if experiment.done("tune"):  # Ray's results as saved: no Ray started, nothing run
        with migrate.old_module_paths():
            return ray_tune.Tuner.restore(experiment.location, trainable=run_trial).get_results()
    init_ray(ray.address, ray.num_cpus)
    trainable = _trainable(experiment, local=ray.address is None)
    if ray_tune.Tuner.can_restore(experiment.location):
        # 0.1.0 pickled this module's trial_dirname as raystudy.study's: Ray unpickles its state in
        # restore() and again, each trial's, when fit() starts.
        with migrate.old_module_paths():
            tuner = ray_tune.Tuner.restore(
                experiment.location, trainable=trainable, resume_unfinished=True, resume_errored=True
            )
            return tuner.fit()
    from raystudy.cluster.tracking import tracking_callbacks

    scheduler = None
    callbacks = tracking_callbacks(ray.trackers, spec.name)
    # The searcher counts the trials against those Ray holds, never against Ray's saved counts
    # (raystudy.cluster.trial_count).
    callbacks.append(RayTrials(spec.name))
    if spec.kind == "search":
        searcher, scheduler = _search_setup(experiment)
        num_samples, max_concurrent = spec.search.num_samples, ray.max_concurrent
    else:  # not Ray's grid_search, whose saved position among the plans goes out of step with its trials
        searcher = PlanSearcher([plan.to_dict() for plan in spec.plans], spec.name)
        num_samples, max_concurrent = len(spec.plans), ray.max_concurrent or grid_pending_limit(len(spec.plans))
    tuner = ray_tune.Tuner(
        trainable,
        tune_config=ray_tune.TuneConfig(
            search_alg=counted_search(searcher, max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            trial_dirname_creator=trial_dirname,
            # A trial actor that ended well runs the next trial with the same resources: the next
            # trial skips a new process's imports (and on a GPU its CUDA start), about 3 s a trial
            # on a CPU. Every trial seeds its draws and sets its threads, precision and memory share
            # itself, so its metrics do not depend on the process (README "Trials share processes").
            # Not where trials differ in `deterministic`: cuBLAS reads its workspace setting once
            # per process, so a deterministic trial after another would not be deterministic.
            reuse_actors=len({plan.train.deterministic for plan in spec.plans}) <= 1,
        ),
        run_config=ray_tune.RunConfig(
            name=spec.name,
            storage_path=experiment.storage_root,
            failure_config=ray_tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=_reporter(spec),
            callbacks=callbacks,
            verbose=1,
        ),
    )
    return tuner.fit()


def grid_pending_limit(num_plans: int) -> int:
    """The trials of a grid without --max-concurrent that may wait for resources at once (Ray's
    limit is also the most that run): as many as Ray's own grid let wait, max(200, 1.1 x the
    cluster's CPUs), so an autoscaler sees the demand."""
    import ray

    return max(1, min(num_plans, max(200, int(ray.cluster_resources().get("CPU", 1) * 1.1))))


def history_of(experiment: Experiment) -> search.OptunaSearcher:
    """The search's Optuna history, as a searcher that has not suggested anything (to reconcile it
    with Ray's results after a tune phase, however the phase's own searcher was restored)."""
    spec = experiment.spec
    place = search.HistoryPlace(experiment.location, experiment.manifest.get("optuna_storage"))
    metrics = spec.search.objective_metrics
    modes = spec.search.modes if spec.search.multi_objective else (spec.search.mode,)
    return search.OptunaSearcher(
        search.SearchSpace.of(spec),
        metrics,
        modes,
        spec.name,
        place,
        spec.search.seed,
        spec.search.sampler,
        num_samples=spec.search.num_samples,
    )


def _search_setup(experiment: Experiment):
    """(searcher, ASHA or None) of a new search; its history exists in the experiment before any trial."""
    from ray.tune.schedulers import ASHAScheduler

    spec = experiment.spec
    searcher = history_of(experiment)
    searcher.start()
    known = warm_start.from_manifest(experiment.manifest)
    if known:  # before Ray asks for the first trial; a driver that restarts the search adds none twice
        added = searcher.add_known(known)
        print(f"warm start: {added} finished trial(s) of earlier experiments added to the search's history")
    scheduler = None
    if spec.search.proxy_every:
        # stop_last_trials=False: a trial that survives every rung must still reach its trial-end
        # hook, which runs after its last epoch's report (ASHA would otherwise stop it at max_t).
        scheduler = ASHAScheduler(
            metric="proxy/asr",
            mode="max",
            time_attr="epoch",
            grace_period=spec.search.grace_period,
            max_t=_max_epochs(spec),
            stop_last_trials=False,
        )
    return searcher, scheduler


def _max_epochs(spec: StudySpec) -> int:
    """The longest schedule the search can pick (epochs may be searched)."""
    epochs = [p for p in spec.search.params if p.name == "epochs"]
    if not epochs:
        return spec.search_corner().train.epochs
    return int(max(epochs[0].choices) if epochs[0].choices else epochs[0].high)


def _reporter(spec: StudySpec):
    from ray.tune import CLIReporter

    metrics = {"epoch": "epoch", "test_acc": "test acc", "asr/pgd/untargeted/8/mean": "ASR pgd 8/255 (mean)"}
    if spec.kind == "search":
        parameters = {p.name: p.name for p in spec.search.params}
        if spec.search.conditional:
            parameters = {"mechanism": "mechanism", **parameters}
    elif spec.kind == "targets":
        parameters = {"plan/target_name": "target", "plan/train/seed": "seed"}
    else:  # the magnitudes come from each result's columns (a mapping in the plan)
        parameters = {"plan/train/mechanism": "mechanism", "plan/train/seed": "seed"}
        metrics = {"magnitudes": "magnitudes", **metrics}
    return CLIReporter(parameter_columns=parameters, metric_columns=metrics, max_report_frequency=30)


def trial_dirname(trial) -> str:
    return trial_folder(trial.trial_id)


def _trainable(experiment: Experiment, local: bool):
    import ray
    from ray import tune as ray_tune

    from raystudy.cluster.ray_internals import function_trainable
    from raystudy.cluster.trainable import run_trial

    spec = experiment.spec
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, **dict(spec.resources.custom)}
    if local and spec.resources.gpu and not ray.cluster_resources().get("GPU"):
        print(
            f"no GPU on this machine: trials run on the CPU (the study asks for gpu={spec.resources.gpu:g})", flush=True
        )
        resources["gpu"] = 0
    found = "targets" in experiment.manifest and spec.kind != "targets"  # a manifest written by 0.1.0 may lack it
    endpoints = set(experiment.endpoints)
    function = ray_tune.with_parameters(
        run_trial,
        study=with_gpu_share(spec, resources["gpu"]),
        storage_path=experiment.storage_root,
        target_names=tuple(t for t in experiment.targets if t not in endpoints) if found else None,
        keep_images=bool(endpoints) if found else None,
    )
    return ray_tune.with_resources(function_trainable(function, STATE_FILE), resources)


def with_gpu_share(spec: StudySpec, gpu: float) -> StudySpec:
    """The study as its trials see it: with the GPU share they were given (0 where a local Ray has
    no GPU), from which each picks its device (raystudy.core.precision)."""
    if gpu == spec.resources.gpu:
        return spec
    return dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, gpu=float(gpu)))
