"""The study builder: a StudySpec becomes a Ray Tune experiment (grid, targets or Optuna search).

Ray lives here and in `raystudy.trainable` only. An experiment is `<storage>/<study name>/`: Ray's
trial logs and checkpoints, plus `raystudy-study.json` (the study file's contents, the data
path, the evaluation images and targeted classes) from which `resume` rebuilds everything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from raystudy import optuna_history, storage
from raystudy.checkpoint import STATE_FILE
from raystudy.config import STUDY_RECORD, StudySpec, load_space, parse_space
from raystudy.config.study import SearchParam, TrialPlan
from raystudy.errors import RaystudyError
from raystudy.local_ray import init_local_ray
from raystudy.query import confirmed_endpoints, load_endpoints, query_experiment, save_endpoints
from raystudy.record import checked_study_record
from raystudy.trainable import FINAL_KEY, run_trial, targets_location, trial_folder

BEST_CONFIG = "best_config.json"
# Settings every worker must see as the driver does; never a secret: Ray stores a runtime_env in its
# job table (readable through the dashboard) and prints it to runtime_env_agent.log. Credentials reach
# workers from the provider's chain on a cluster (instance profile, service account) and from the
# inherited environment on a local Ray.
WORKER_ENVIRONMENT = (
    "RAYSTUDY_CACHE",
    "RAYSTUDY_DATA",
    "RAYSTUDY_DEVICE",
    "HF_HUB_OFFLINE",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# A variable whose name holds one of these carries a credential (AWS_ACCESS_KEY_ID included).
CREDENTIAL_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "KEY")


def experiment_path(spec: StudySpec, storage_path: str) -> str:
    return storage.join(storage.normalize(storage_path), spec.name)


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table reporter with our columns
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # hook metrics exist only at the end
    if ray.is_initialized():
        return
    storage.configure_s3_endpoint()
    _keep_credentials_out_of_trial_runtime_envs()
    runtime_env = worker_runtime_env(os.environ)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        init_local_ray(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)


def worker_runtime_env(environment: dict[str, str]) -> dict | None:
    """The runtime_env that carries WORKER_ENVIRONMENT to every worker: data and cache folders, the
    object store's endpoint and region (tests/test_secrets.py: no secret among them)."""
    passed = {k: environment[k] for k in WORKER_ENVIRONMENT if k in environment}
    return {"env_vars": passed} if passed else None


def _keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credentials into every trainable's runtime_env (the names in
    ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE), which the job table keeps and
    runtime_env_agent.log prints. No public setting turns that off, so the credential names are
    dropped from that set; workers take credentials from their own environment instead."""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", set())
    propagated.difference_update({name for name in propagated if is_credential(name)})


def is_credential(name: str) -> bool:
    return any(marker in name.upper() for marker in CREDENTIAL_MARKERS)


def _resources(spec: StudySpec, local: bool) -> dict[str, float]:
    import ray

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, **dict(spec.resources.custom)}
    if local and spec.resources.gpu and not ray.cluster_resources().get("GPU"):
        print(
            f"no GPU on this machine: trials run on the CPU (the study asks for gpu={spec.resources.gpu:g})", flush=True
        )
        resources["gpu"] = 0
    return resources


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


def _trainable(spec: StudySpec, storage_path: str, local: bool):
    from ray import tune
    from ray.tune.trainable import wrap_function

    resources = _resources(spec, local)
    spec = with_gpu_share(spec, resources["gpu"])
    trainable = wrap_function(tune.with_parameters(run_trial, study=spec, storage_path=storage_path))
    return tune.with_resources(_restoring_from_newest_checkpoint(trainable), resources)


def with_gpu_share(spec: StudySpec, gpu: float) -> StudySpec:
    """The study as its trials see it: with the GPU share they were given (0 where a local Ray has
    no GPU), from which each picks its device (raystudy.precision)."""
    if gpu == spec.resources.gpu:
        return spec
    return dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, gpu=float(gpu)))


def _restoring_from_newest_checkpoint(trainable: type) -> type:
    """The trainable, restoring from the newest checkpoint its trial folder holds when the one Ray
    names is gone. Ray deletes a trial's old checkpoints (num_to_keep) as soon as newer ones are
    reported, but a killed driver's experiment snapshot can still name one of them: Ray's own
    restore then fails the trial on every retry ("does not exist on storage anymore")."""
    import pyarrow.fs

    class NewestCheckpointTrainable(trainable):
        def restore(self, checkpoint_path):
            checkpoint = getattr(checkpoint_path, "checkpoint", None)
            if checkpoint is None or _exists(checkpoint.filesystem, checkpoint.path):
                return super().restore(checkpoint_path)
            newest = _newest_checkpoint(checkpoint.filesystem, os.path.dirname(checkpoint.path))
            if newest is None:
                print(f"checkpoint {checkpoint.path} is gone and no other was kept: training from the start")
                return None
            print(f"checkpoint {checkpoint.path} is gone: restoring from the newest kept, {newest}")
            replacement = type(checkpoint)(newest, filesystem=checkpoint.filesystem)
            return super().restore(type(checkpoint_path)(checkpoint=replacement, metrics=checkpoint_path.metrics))

    def _exists(filesystem, path: str) -> bool:
        return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def _newest_checkpoint(filesystem, trial_path: str) -> str | None:
        """The checkpoint folder whose state file was written last (by time, not by name: a driver
        restored from an old snapshot numbers its checkpoints again from there); one cut short by
        the crash lacks its state file."""
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
        folders = [f.path for f in found if f.type == pyarrow.fs.FileType.Directory and "checkpoint_" in f.base_name]
        states = [filesystem.get_file_info(f"{folder}/{STATE_FILE}") for folder in folders]
        written = [
            (state.mtime, folder) for state, folder in zip(states, folders) if state.type == pyarrow.fs.FileType.File
        ]
        return max(written)[1] if written else None

    NewestCheckpointTrainable.__name__ = trainable.__name__
    return NewestCheckpointTrainable


def _optuna_storage(experiment: str, url: str | None):
    """(Optuna storage, mirror) of a new search: an RDB `url` as given (clusters run a database);
    else sqlite beside a local experiment; else, for a storage URI, an append-only journal on this
    machine mirrored into `<experiment>/optuna-journal/` in segments (raystudy.optuna_history), so
    that the search's history lives with the experiment and a new driver machine can resume it."""
    import optuna

    if url:  # Ray pickles the searcher, this URL with it, into the experiment: no password in it
        storage.refuse_credentials_in(url, "--optuna-storage", "PGPASSWORD or ~/.pgpass, MYSQL_PWD, ...")
        return optuna.storages.RDBStorage(url), None
    if not storage.is_uri(experiment):
        os.makedirs(experiment, exist_ok=True)
        return optuna.storages.RDBStorage(f"sqlite:///{os.path.join(experiment, storage.OPTUNA_DB)}"), None
    # A new experiment starts a new journal: one left here by an earlier experiment of the same URI
    # (since deleted) must not lend it its trials. A resumed search fetches the experiment's copy.
    local = optuna_history.local_journal(experiment)
    if os.path.exists(local):
        os.remove(local)
    mirror = optuna_history.JournalMirror(local, storage.join(experiment, optuna_history.JOURNAL_DIR))
    return optuna_history.journal_storage(local), mirror


def _local_optuna_db(experiment: str) -> str:
    """This machine's copy of a remote experiment's sqlite database (searches written before journals)."""
    return str(optuna_history.local_copy_folder(experiment) / storage.OPTUNA_DB)


def flush_search_history(experiment: str) -> None:
    """Upload what this machine's journal of a remote search holds beyond the experiment's segments
    (the searcher uploads at most every SYNC_INTERVAL_S; the end of a run is one more)."""
    if not storage.is_uri(experiment):
        return
    local = optuna_history.local_journal(experiment)
    if not os.path.isfile(local):
        return
    remote = storage.join(experiment, optuna_history.JOURNAL_DIR)
    optuna_history.JournalMirror(local, remote, uploaded=optuna_history.uploaded_bytes(remote)).sync(force=True)


def _close_search_history(spec: StudySpec, experiment: str) -> None:
    """Once a search has run, an Optuna trial still RUNNING was asked by a driver lost before Ray
    recorded the trial: nothing will ever report it, so it is marked failed (a history with a
    dangling trial misleads the sampler and the dashboard). Searches on an RDB URL are left alone."""
    import optuna

    if storage.is_uri(experiment):
        local = optuna_history.local_journal(experiment)
        history = optuna_history.journal_storage(local) if os.path.isfile(local) else None
    else:
        database = os.path.join(experiment, storage.OPTUNA_DB)
        history = f"sqlite:///{database}" if os.path.isfile(database) else None
    if history is None:
        return
    try:
        study = optuna.load_study(study_name=spec.name, storage=history)
    except KeyError:  # the history is elsewhere (--optuna-storage)
        return
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        print(f"optuna: trial {trial.number} was asked by a lost driver and never ran: marked failed")


def _search_setup(
    spec: StudySpec, experiment: str, optuna_storage: str | None = None
) -> tuple[dict[str, Any], Any, Any]:
    """(param_space, OptunaSearch, ASHA or None) for a kind: search study."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = {}
    for p in spec.search.params:
        if p.choices:
            space[p.name] = tune.choice(list(p.choices))
        else:
            space[p.name] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    define_by_run = None
    if spec.search.conditional:
        # The mechanism is a choice and its magnitudes exist only when it is chosen: Optuna's
        # define-by-run space (Tune then takes no param_space of its own).
        define_by_run, space = ConditionalSpace.of(spec), {}
    db, mirror = _optuna_storage(experiment, optuna_storage)
    searcher = _final_metric_optuna()(
        space=define_by_run,
        # Several metrics: a list each (Optuna's TPE runs its multi-objective mode on them).
        metric=list(spec.search.objective_metrics) if spec.search.multi_objective else spec.search.objective_metric,
        mode=list(spec.search.modes) if spec.search.multi_objective else spec.search.mode,
        study_name=spec.name,
        storage=db,
        sampler=optuna.samplers.TPESampler(seed=spec.search.seed),
    )
    searcher.raystudy_mirror = mirror
    if mirror is not None:
        mirror.sync(force=True)  # the study exists in the experiment before any trial
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
    return space, searcher, scheduler


@dataclass(frozen=True)
class ConditionalSpace:
    """Optuna's define-by-run space of a search over several mechanisms: the mechanism first, then
    only its magnitudes (and the searched training settings). A module-level class, not a closure:
    Ray pickles the searcher, and the space with it, into the experiment."""

    magnitudes: tuple[tuple[str, tuple[SearchParam, ...]], ...]  # (mechanism, its magnitude ranges)
    settings: tuple[SearchParam, ...]

    @classmethod
    def of(cls, spec: StudySpec) -> "ConditionalSpace":
        search = spec.search
        return cls(tuple((m, search.magnitude_params(m, spec.dataset)) for m in search.mechanisms), search.params)

    def __call__(self, trial) -> None:
        ranges = dict(self.magnitudes)
        mechanism = trial.suggest_categorical("mechanism", list(ranges))
        for p in ranges[mechanism] + self.settings:
            if p.choices:
                trial.suggest_categorical(p.name, list(p.choices))
            elif p.integer:
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                trial.suggest_float(p.name, p.low, p.high, log=p.log)


def _final_metric_optuna():
    """OptunaSearch that skips per-epoch results: the objective (a transfer ASR) exists only in the
    final result, and OptunaSearch would look it up in every one (its pruner is off anyway)."""
    from ray.tune.search.optuna import OptunaSearch

    class FinalMetricOptunaSearch(OptunaSearch):
        # The journal's mirror in the experiment (a search written before journals: a tuple, its
        # local sqlite file and that file's copy in the experiment).
        raystudy_mirror: Any = None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            if not all(m in result for m in metrics) or not self._known(trial_id, result):
                return
            if not self._told(trial_id):
                super().on_trial_result(trial_id, result)

        def _known(self, trial_id: str, result: dict) -> bool:
            """Whether this searcher holds the trial's Optuna trial. Ray restores the searcher from its
            last snapshot, which may predate a trial's suggestion: that trial was asked in the database
            (copied on every suggestion) with the same parameters, still running, and is found there."""
            import optuna

            if trial_id in self._ot_trials:
                if self._ot_trials[trial_id].number < len(self._ot_study.get_trials(deepcopy=False)):
                    return True
                # Ray's snapshot knows a trial the fetched history does not (asked after its last
                # upload before the driver was lost): treat it as unknown.
                del self._ot_trials[trial_id]
            config = result.get("config") or {
                k[len("config/") :]: v for k, v in result.items() if k.startswith("config/")
            }
            running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            for frozen in running:
                if frozen.params and all(config.get(k) == v for k, v in frozen.params.items()):
                    self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
                    return True
            print(f"optuna: trial {trial_id} is not in the search's history; its result is kept by Ray only")
            return False

        def _told(self, trial_id: str) -> bool:
            """Optuna already holds this trial's outcome: Ray restarted a trial that had finished
            before its driver was lost (Ray records trial ends with a delay), and it reports its
            kept final result again. Optuna refuses a second outcome; the first stands."""
            import optuna

            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None:
                return False
            state = self._ot_study.get_trials(deepcopy=False)[ot_trial.number].state
            return state != optuna.trial.TrialState.RUNNING

        # The database is copied to the experiment whenever Optuna writes to it (a trial asked or told).
        def suggest(self, trial_id: str):
            suggestion = super().suggest(trial_id)
            self.upload()
            return suggestion

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if not self._known(trial_id, result or {}):
                self._add_from_ray(result or {}, error)
                return
            if self._told(trial_id):
                self._ot_trials.pop(trial_id, None)
                return
            super().on_trial_complete(trial_id, result, error)
            self.upload()

        def _add_from_ray(self, result: dict, error: bool) -> None:
            """A finished trial the history lacks (suggested or told after the last upload before
            the driver was lost): added back from Ray's result, so the sampler knows it."""
            import optuna

            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            config = result.get("config") or {}
            if error or not all(m in result for m in metrics) or not isinstance(self._space, dict):
                return  # define-by-run spaces name no distributions to add a trial with
            try:
                params = {name: config[name] for name in self._space}
                values = [result[m] for m in metrics]
                frozen = optuna.trial.create_trial(params=params, distributions=self._space, values=values)
            except (KeyError, ValueError) as err:
                print(f"optuna: a finished trial could not be added back to the history ({err})")
                return
            self._ot_study.add_trial(frozen)
            print(f"optuna: added back a finished trial the history had lost: {params}")
            self.upload()

        def upload(self) -> None:
            mirror = self.raystudy_mirror
            if isinstance(mirror, optuna_history.JournalMirror):
                mirror.sync()
            elif mirror and os.path.exists(mirror[0]):  # a search written before journals
                with open(mirror[0], "rb") as f:
                    storage.write_bytes(mirror[1], f.read())

        def restore(self, checkpoint_path: str) -> None:
            """Ray's saved searcher names the old driver's local history: fetch the experiment's
            copy to this machine and reopen the study there."""
            import optuna

            super().restore(checkpoint_path)
            mirror = self.raystudy_mirror
            if mirror is None:
                return
            if isinstance(mirror, optuna_history.JournalMirror):
                experiment = mirror.remote.rsplit("/", 1)[0]
                local = optuna_history.local_journal(experiment)
                size = optuna_history.fetch_journal(mirror.remote, local)
                self.raystudy_mirror = optuna_history.JournalMirror(local, mirror.remote, uploaded=size)
                self._storage = optuna_history.journal_storage(local)
            else:
                remote = mirror[1]
                local = _local_optuna_db(remote.rsplit("/", 1)[0])
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(remote))
                self.raystudy_mirror = (local, remote)
                self._storage = optuna.storages.RDBStorage(f"sqlite:///{local}")
            self._ot_study = optuna.load_study(
                study_name=self._study_name, storage=self._storage, sampler=self._ot_study.sampler
            )

    return FinalMetricOptunaSearch


def _max_epochs(spec: StudySpec) -> int:
    """The longest schedule the search can pick (epochs may be searched)."""
    epochs = [p for p in spec.search.params if p.name == "epochs"]
    if not epochs:
        return spec.search_corner().train.epochs
    return int(max(epochs[0].choices) if epochs[0].choices else epochs[0].high)


def check_targets(spec: StudySpec, storage_path: str) -> list[str]:
    location = targets_location(storage.normalize(storage_path), spec.targets)
    names = storage.list_files(location, ".pt")
    if not names and not load_endpoints(location):
        raise RaystudyError(
            f"study {spec.name!r} attacks the targets of study {spec.targets!r}, but {location} holds none: "
            f"train them first with `raystudy targets search_spaces/{spec.targets}.yaml --storage {storage_path}`"
        )
    found = [n[:-3] for n in names]
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
    return found + [endpoint.name for endpoint in load_endpoints(location)]  # black-box ones are queried after


def _write_record(spec: StudySpec, raw: Any, storage_path: str, experiment: str, targets: list[str]) -> None:
    from raystudy.data import dataset_for
    from raystudy.metrics.hook import make_eval_set

    record: dict[str, Any] = {
        "study": raw,
        "source": spec.source,
        "data": spec.data,
        "storage": storage.normalize(storage_path),
        "targets": targets,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # The black-box targets whose images every trial keeps (none: the analysis need not look for them).
    record["endpoints"] = []
    if spec.kind != "targets":
        endpoints = load_endpoints(targets_location(storage.normalize(storage_path), spec.targets))
        record["endpoints"] = [e.name for e in endpoints]
    if spec.kind != "targets":  # the evaluation images every trial uses, recorded once
        plan = spec.plans[0] if spec.kind != "search" else spec.search_corner()
        dataset = dataset_for(plan.train)
        eval_set = make_eval_set(dataset.test, dataset.num_classes, spec.evaluation)
        record["eval_indices"] = eval_set.indices.tolist()
        record["eval_target_classes"] = eval_set.target_classes.tolist()
    storage.write_bytes(storage.join(experiment, STUDY_RECORD), json.dumps(record, indent=1).encode())


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


def run_study(
    spec: StudySpec,
    raw: Any,
    storage_path: str,
    address: str | None = None,
    max_concurrent: int | None = None,
    num_cpus: int | None = None,
    optuna_storage: str | None = None,
    trackers: tuple[str, ...] = (),
    targets_file: str | None = None,
):
    """Start a new experiment; refuses one that exists (resume it instead). `trackers`: any of
    tensorboard, mlflow, wandb (raystudy.tracking); `targets_file`: the targets study file that
    confirms the stored endpoints (query_endpoints)."""
    from ray import tune

    from raystudy.tracking import tracking_callbacks

    spec.evaluation.check_installed()
    storage.check_writable(storage_path)
    callbacks = tracking_callbacks(trackers, spec.name)  # a missing tracker package fails before anything runs
    experiment = experiment_path(spec, storage_path)
    if storage.exists(storage.join(experiment, STUDY_RECORD)):
        raise RaystudyError(
            f"experiment {experiment} exists: finish it with `raystudy resume {experiment}`, "
            f"or give the study another name"
        )
    targets = check_targets(spec, storage_path) if spec.kind != "targets" else []
    if address is None:
        _check_local_data(spec)
    if spec.kind == "targets" and spec.endpoints:
        save_endpoints(targets_location(storage.normalize(storage_path), spec.name), spec.endpoints)
        print(f"{len(spec.endpoints)} endpoint target(s) saved: {', '.join(e.name for e in spec.endpoints)}")
        if not spec.plans:
            _write_record(spec, raw, storage_path, experiment, targets)
            return []
    _init_ray(address, num_cpus)
    _write_record(spec, raw, storage_path, experiment, targets)
    scheduler = searcher = None
    num_samples = 1
    if spec.kind == "search":
        param_space, searcher, scheduler = _search_setup(spec, experiment, optuna_storage)
        num_samples = spec.search.num_samples
    else:
        param_space = {"plan": tune.grid_search([plan.to_dict() for plan in spec.plans])}
    tuner = tune.Tuner(
        _trainable(spec, storage.normalize(storage_path), local=address is None),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=storage.normalize(storage_path),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=_reporter(spec),
            callbacks=callbacks,
            verbose=1,
        ),
    )
    return _finish(spec, tuner.fit(), experiment, targets_file)


def load_record(experiment: str) -> dict[str, Any]:
    location = storage.join(storage.normalize(experiment), STUDY_RECORD)
    if not storage.exists(location):
        raise RaystudyError(f"{experiment} is not a raystudy experiment (no {STUDY_RECORD})")
    return checked_study_record(storage.read_json(location), location)


def resume_study(
    experiment: str,
    address: str | None = None,
    num_cpus: int | None = None,
    targets_file: str | None = None,
    eval_batch_size: int | None = None,
):
    """Finish an interrupted experiment: unfinished and errored trials go on, finished ones stay.
    `eval_batch_size`: the trial-end hook's batch from now on (a trial whose hook ran out of memory
    resumes from its last epoch's checkpoint and is measured at it; the values do not depend on it)."""
    from ray import tune

    record = load_record(experiment)
    spec = parse_space(record["study"], record["source"], record["data"])
    check_record_matches(spec, storage.normalize(experiment))
    if eval_batch_size is not None:
        spec = dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, batch_size=eval_batch_size))
    _init_ray(address, num_cpus)
    tuner = tune.Tuner.restore(
        storage.normalize(experiment),
        trainable=_trainable(spec, storage.normalize(experiment).rsplit("/", 1)[0], local=address is None),
        resume_unfinished=True,
        resume_errored=True,
    )
    return _finish(spec, tuner.fit(), storage.normalize(experiment), targets_file)


def check_record_matches(spec: StudySpec, experiment: str) -> None:
    """Before Ray's pickled state is restored: the record names this experiment, and every trial
    Ray started is one of the study's (a record swapped or edited in the bucket is refused)."""
    from analysis.records import MISSING, load_experiment, plan_of

    if spec.name != experiment.rstrip("/").rsplit("/", 1)[-1]:
        raise RaystudyError(f"{experiment}: its record is of study {spec.name!r}, not of this experiment: not resumed")
    for trial in load_experiment(experiment, cache=None).trials:
        if trial.status == MISSING:
            continue
        try:
            plan = plan_of(spec, trial)
        except (RaystudyError, KeyError, TypeError, ValueError, AttributeError):
            plan = None
        if plan is None or (spec.kind != "search" and plan not in spec.plans):
            raise RaystudyError(
                f"{experiment}: trial {trial.trial_id} ran a setting its study record does not hold: the record "
                "does not match the experiment (changed since it started?): not resumed"
            )


def _finish(spec: StudySpec, results, experiment: str, targets_file: str | None = None):
    if spec.kind == "search":
        _close_search_history(spec, experiment)
        flush_search_history(experiment)
    errors = [r for r in results if r.error is not None]
    finished = [r for r in results if r.error is None and (r.metrics or {}).get(FINAL_KEY) == 1]
    stopped = [r for r in results if r.error is None and _stopped_early(r)]
    print(f"{len(finished)} of {len(results)} trials finished; results in {experiment}")
    if stopped:
        print(f"{len(stopped)} trials stopped early by ASHA (no trial-end metrics; pruned in the Optuna study)")
    if len(finished) + len(stopped) + len(errors) < len(results):
        print(
            f"{len(results) - len(finished) - len(stopped) - len(errors)} trials did not finish: "
            f"`raystudy resume {experiment}` goes on"
        )
    for r in errors:
        print(f"  failed: {_describe(r.config)}: {str(r.error).strip().splitlines()[-1][:300]}")
    if spec.kind == "search":
        _write_best(spec, results, experiment)
    if spec.kind != "targets":
        query_endpoints(spec, experiment, targets_file)
    return results


def query_endpoints(spec: StudySpec, experiment: str, targets_file: str | None = None) -> int:
    """The query phase (raystudy.query) for the black-box targets of the study's targets study, if any:
    the endpoints stored with the targets, confirmed by the targets study file on this machine."""
    storage_root = experiment.rsplit("/", 1)[0]
    stored = load_endpoints(targets_location(storage_root, spec.targets))
    if not stored:
        return 0
    source, local = users_endpoints(spec, storage_root, targets_file)
    endpoints = confirmed_endpoints(stored, local, source)
    print(f"querying {len(endpoints)} endpoint(s) named in {source} with the kept images of the finished trials")
    paid = query_experiment(experiment, endpoints)
    print(f"endpoint queries done: {paid} paid now (answers are kept in {experiment}/endpoint-cache)")
    return paid


def users_endpoints(spec: StudySpec, storage_root: str, targets_file: str | None) -> tuple[str, tuple]:
    """(file, endpoints) of the targets study file on this machine: --targets-file, else the file
    `<targets>.yaml` beside the study file, else the file `raystudy targets` was run with (where its
    record says). Only a local file is read: the bucket may say where to look, never what to send."""
    candidates = [targets_file] if targets_file else [str(Path(spec.source).with_name(f"{spec.targets}.yaml"))]
    if not targets_file:
        try:
            record = storage.read_json(storage.join(storage_root, spec.targets, STUDY_RECORD), missing_ok=True)
        except RaystudyError:
            record = None
        source = record.get("source") if isinstance(record, dict) else None
        candidates += [source] if isinstance(source, str) and "://" not in source else []
    for candidate in candidates:
        # A path that came from the bucket (a resumed study's source, the targets' record) names a
        # file only the user can have written: owned by them, in a folder no one else may write.
        if Path(candidate).is_file() and (candidate == targets_file or _only_user_writes(Path(candidate))):
            targets = load_space(candidate)
            if targets.kind != "targets" or targets.name != spec.targets:
                raise RaystudyError(f"{candidate} is not the targets study {spec.targets!r} (kind: targets)")
            return candidate, targets.endpoints
    raise RaystudyError(
        f"the targets of {spec.name!r} name endpoints, and the query phase sends images and tokens only to "
        f"endpoints a targets study file on this machine names: give it with --targets-file "
        f"(looked for {', '.join(map(repr, candidates))}); nothing was sent"
    )


def _only_user_writes(path: Path) -> bool:
    """True if `path` and its folder belong to this user and neither is writable by others."""
    try:
        stats = [path.stat(), path.resolve().parent.stat()]
    except OSError:
        return False
    return all(s.st_uid == os.getuid() and not s.st_mode & (stat.S_IWGRP | stat.S_IWOTH) for s in stats)


def _write_best(spec: StudySpec, results, experiment: str) -> None:
    """best_config.json: the best finished trial on the objective (several objectives: the Pareto
    front), with what it was selected on and, with objective targets, its held-out score."""
    search = spec.search
    metrics = search.objective_metrics
    done = [
        r for r in results if r.error is None and r.metrics.get(FINAL_KEY) == 1 and all(m in r.metrics for m in metrics)
    ]
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
    return sorted(k.split("/", 1)[1] for k in metrics if k.startswith("support/"))


def all_finished(results) -> bool:
    """True when every trial ended: with its final (hook) result, or stopped early by the scheduler."""
    return all(r.error is None and ((r.metrics or {}).get(FINAL_KEY) == 1 or _stopped_early(r)) for r in results)


def _stopped_early(result) -> bool:
    """A scheduler's STOP marks the trial's last result done without the final one."""
    metrics = result.metrics or {}
    return metrics.get(FINAL_KEY) == 0 and metrics.get("done") is True


def _describe(config: dict[str, Any]) -> str:
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
