"""A search's sampler on Ray Tune's public `Searcher` interface, over Optuna's ask-and-tell API.

Ray asks `suggest(trial_id)` for a configuration and reports `on_trial_complete`; the searcher asks
Optuna for a trial (`Study.ask`), draws the space's values through the trial's `suggest_*` calls
(the mechanism first in a search over several, then only its magnitudes), and tells Optuna the
objective values of the trial's final result (`Study.tell`): a trial stopped early by ASHA is told
PRUNED, a failed one FAIL, and a trial is told once. Nothing of Optuna's or Ray's internals is used.

The Optuna history (sqlite beside a local experiment, a journal mirrored into one on a storage URI,
or an RDB URL) is the durable state. What Ray pickles is where the history lives and which Ray
trial is which Optuna trial; a driver restored on another machine fetches the experiment's copy.
`reconcile` runs after every tune phase: a finished Ray trial the history lacks (told after the
last upload before a driver was lost) is added back, and a trial asked by a lost driver that Ray
never ran is marked failed. A warm start's trials (raystudy.cluster.warm_start) are added to the
history as completed trials before the first suggestion (`add_known`).

The trials are counted as raystudy.cluster.trial_count counts them (`num_samples` and
`--max-concurrent` against the trials Ray holds, never against counts Ray saved).
No torch here.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

from ray.tune.search import Searcher

from raystudy.cluster.trial_count import CountedSearcher
from raystudy.config import StudySpec
from raystudy.config.sampler import CMAES_WARM_START_MIN, UNRECORDED_TPE_OPTIONS, SamplerSpec
from raystudy.config.study import SearchParam
from raystudy.errors import RaystudyError
from raystudy.persist import optuna_history, storage

MECHANISM = "mechanism"
# The user attributes that mark a trial of an earlier experiment (a warm start's) in the history.
KNOWN_EXPERIMENT, KNOWN_TRIAL = "warm_start_experiment", "warm_start_trial"


@dataclass(frozen=True)
class SearchSpace:
    """The searched values in the order they are drawn. `mechanisms`: per mechanism its magnitude
    ranges (a search over several; empty for one mechanism); `params`: always searched."""

    mechanisms: tuple[tuple[str, tuple[SearchParam, ...]], ...]
    params: tuple[SearchParam, ...]

    @classmethod
    def of(cls, spec: StudySpec) -> "SearchSpace":
        search = spec.search
        if not search.conditional:
            return cls((), search.params)
        return cls(tuple((m, search.magnitude_params(m, spec.dataset)) for m in search.mechanisms), search.params)

    def drawn_params(self, mechanism: str | None) -> tuple[SearchParam, ...]:
        return (dict(self.mechanisms)[mechanism] if self.mechanisms else ()) + self.params

    def draw(self, trial) -> dict[str, Any]:
        """The configuration of an asked Optuna trial."""
        config: dict[str, Any] = {}
        if self.mechanisms:
            config[MECHANISM] = trial.suggest_categorical(MECHANISM, [m for m, _ in self.mechanisms])
        for p in self.drawn_params(config.get(MECHANISM)):
            if p.choices:
                config[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.integer:
                config[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                config[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        return config

    def distributions(self, config: dict[str, Any]) -> dict[str, Any]:
        """Optuna's distributions of a configuration's values (to add a finished trial back)."""
        import optuna.distributions as d

        out: dict[str, Any] = {}
        if self.mechanisms:
            out[MECHANISM] = d.CategoricalDistribution([m for m, _ in self.mechanisms])
        for p in self.drawn_params(config.get(MECHANISM)):
            if p.choices:
                out[p.name] = d.CategoricalDistribution(list(p.choices))
            elif p.integer:
                out[p.name] = d.IntDistribution(int(p.low), int(p.high), log=p.log)
            else:
                out[p.name] = d.FloatDistribution(p.low, p.high, log=p.log)
        return out


@dataclass(frozen=True)
class HistoryPlace:
    """Where a search's Optuna history lives: an RDB `url` as given (clusters run a database); else
    sqlite beside a local experiment; else a journal on this machine mirrored into the experiment
    (raystudy.persist.optuna_history), which a new driver machine fetches to resume."""

    experiment: str
    url: str | None = None

    def exists(self) -> bool:
        """Whether this history was written (an RDB URL is the user's to keep: taken as written)."""
        if self.url:
            return True
        if self.mirrored:
            local = optuna_history.local_journal(self.experiment)
            remote = storage.join(self.experiment, optuna_history.JOURNAL_DIR)
            return os.path.isfile(local) or bool(storage.list_files(remote, ".log"))
        return os.path.isfile(os.path.join(self.experiment, storage.OPTUNA_DB))

    def in_experiment(self) -> bool:
        """Whether the experiment already holds this history (a journal mirror: uploaded segments;
        a journal this machine kept of an earlier, deleted experiment of the same URI does not count)."""
        if self.mirrored:
            return bool(storage.list_files(storage.join(self.experiment, optuna_history.JOURNAL_DIR), ".log"))
        return self.exists()

    @property
    def mirrored(self) -> bool:
        return self.url is None and storage.is_uri(self.experiment)

    def open(self, fresh: bool):
        """(Optuna storage, journal mirror or None). `fresh`: a new search (a journal left here by
        an earlier, deleted experiment of the same URI must not lend it its trials); else the
        experiment's copy is fetched to this machine, unless this machine's journal extends it."""
        import optuna

        if self.url:
            return optuna.storages.RDBStorage(self.url), None
        if not self.mirrored:
            os.makedirs(self.experiment, exist_ok=True)
            return optuna.storages.RDBStorage(f"sqlite:///{os.path.join(self.experiment, storage.OPTUNA_DB)}"), None
        local = optuna_history.local_journal(self.experiment)
        remote = storage.join(self.experiment, optuna_history.JOURNAL_DIR)
        if fresh:
            if os.path.exists(local):
                os.remove(local)
            uploaded = 0
        else:
            uploaded = optuna_history.resume_journal(remote, local)
        mirror = optuna_history.JournalMirror(local, remote, uploaded=uploaded)
        mirror.sync(force=True)  # what this machine wrote and the experiment lacks goes up first
        return optuna_history.journal_storage(local), mirror


def build_sampler(spec: SamplerSpec, seed: int, source_trials: Sequence[Any] = ()):
    """The Optuna sampler of `spec`, every resolved setting passed explicitly, seeded. CMA-ES draws
    its first generation from `source_trials` (a warm start's) where there are enough of them."""
    import warnings

    import optuna

    kinds = {
        "tpe": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
    }
    with warnings.catch_warnings():  # `group` and QMC are marked experimental: chosen knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        extra = {}
        if spec.name == "cmaes" and len(source_trials) >= CMAES_WARM_START_MIN:
            extra["source_trials"] = list(source_trials)
        return kinds[spec.name](seed=seed, **dict(spec.options), **extra)


class OptunaSearcher(CountedSearcher):
    def __init__(
        self,
        space: SearchSpace,
        metrics: Sequence[str],
        modes: Sequence[str],
        study_name: str,
        place: HistoryPlace,
        seed: int,
        sampler: SamplerSpec = SamplerSpec(),
        num_samples: int | None = None,
    ) -> None:
        """`num_samples`: the trials Ray runs in all (None: as many as Ray asks for)."""
        super().__init__(metric=None, mode=None)  # several objectives: Ray's single metric does not apply
        self.space, self.metrics, self.modes = space, tuple(metrics), tuple(modes)
        self.study_name, self.place, self.seed, self.sampler = study_name, place, seed, sampler
        self.asked: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.num_samples = num_samples
        self.max_concurrent: int | None = None
        self._study = self._mirror = self._history = None
        self._forget_counts()

    # Ray pickles the searcher into the experiment (tuner.pkl, searcher-state-*.pkl): plain data only.
    def __getstate__(self) -> dict[str, Any]:
        unsaved = ("_study", "_mirror", "_history", *self.UNSAVED)
        return {k: v for k, v in self.__dict__.items() if k not in unsaved}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A search started before samplers were named: Optuna's TPE with the installed defaults,
        # as it was built then (its settings were not recorded).
        state.setdefault("sampler", SamplerSpec("tpe", UNRECORDED_TPE_OPTIONS))
        # One saved before the searcher counted its trials: Ray's ConcurrencyLimiter and counter do.
        state.setdefault("num_samples", None)
        state.setdefault("max_concurrent", None)
        self.__dict__.update(state, _study=None, _mirror=None, _history=None)
        self._forget_counts()

    def start(self) -> None:
        """Create the search's Optuna study (a new experiment); its history exists before any trial.
        A driver that starts the search again (lost before Ray saved the experiment) goes on with the
        history the experiment holds: the trials the lost driver asked are failed by `reconcile`."""
        self._open(fresh=not self.place.in_experiment())
        self.sync(force=True)

    def _open(self, fresh: bool) -> None:
        """The history and its sampler."""
        import optuna

        history, self._mirror = self.place.open(fresh)
        self._history = history
        directions = ["maximize" if mode == "max" else "minimize" for mode in self.modes]
        optuna.create_study(study_name=self.study_name, storage=history, directions=directions, load_if_exists=True)
        self._load(history)

    def _load(self, history) -> None:
        """The study with its sampler, built for the trials the history holds now. A reopened
        history's sampler is seeded with the seed plus the search's own trials: the same seed again
        would draw the search's first values again (a warm start's trials were never drawn)."""
        import optuna

        trials = optuna.load_study(study_name=self.study_name, storage=history).get_trials(deepcopy=False)
        known = [t for t in trials if KNOWN_EXPERIMENT in t.user_attrs]
        # QMC's sequence is keyed by its seed and goes on from the trials the study holds: same seed.
        seed = self.seed if self.sampler.name == "qmc" else self.seed + len(trials) - len(known)
        sampler = build_sampler(self.sampler, seed, source_trials=_numeric_part(known))
        self._study = optuna.load_study(study_name=self.study_name, storage=history, sampler=sampler)

    def add_known(self, trials: Sequence[Any]) -> int:
        """A warm start's trials (raystudy.cluster.warm_start.KnownTrial) into the history as
        completed trials, marked with their experiment and trial, each once; then the sampler is
        built again, so that its first suggestion already knows them. Returns how many were added."""
        import optuna

        study = self.study
        held = {
            (t.user_attrs.get(KNOWN_EXPERIMENT), t.user_attrs.get(KNOWN_TRIAL))
            for t in study.get_trials(deepcopy=False)
        }
        added = 0
        for known in trials:
            if (known.experiment, known.trial_id) in held:
                continue  # added by an earlier driver of this search
            try:
                if len(known.values) != len(self.metrics):
                    raise ValueError(f"{len(known.values)} objective values for {len(self.metrics)} objective(s)")
                distributions = self.space.distributions(known.params)
                frozen = optuna.trial.create_trial(
                    params={name: known.params[name] for name in distributions},
                    distributions=distributions,
                    values=list(known.values),
                    user_attrs={KNOWN_EXPERIMENT: known.experiment, KNOWN_TRIAL: known.trial_id},
                )
            except (KeyError, ValueError, TypeError, OverflowError) as err:
                raise RaystudyError(
                    f"warm start: trial {known.trial_id} of {known.experiment} does not fit this search ({err}): "
                    "its manifest was changed?"
                ) from None
            study.add_trial(frozen)
            held.add((known.experiment, known.trial_id))
            added += 1
        if self.sampler.name == "cmaes" and 0 < len(trials) < CMAES_WARM_START_MIN:
            print(
                f"warm start: CMA-ES draws its first generation from the best 10% of at least "
                f"{CMAES_WARM_START_MIN} known trials; with {len(trials)} it starts from the middle of the space"
            )
        self._load(self._history)
        self.sync(force=True)
        return added

    @property
    def study(self):
        if self._study is None:
            self._open(fresh=False)
        return self._study

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.num_samples is not None and self.trials_held() >= self.num_samples:
            return Searcher.FINISHED
        if self.at_limit():
            return None  # Ray asks again at a later step
        trial = self.study.ask()
        config = self.space.draw(trial)
        self.asked[trial_id] = trial.number
        self._note_suggested(trial_id)
        self.sync()
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        super().on_trial_complete(trial_id, result, error)
        result = result or {}
        number = self._number_of(trial_id, result)
        if number is None:
            print(f"optuna: trial {trial_id} is not in the search's history; left to the end of the tune phase")
            return
        if self.study.get_trials(deepcopy=False)[number].state != optuna.trial.TrialState.RUNNING:
            return  # told before: Ray restarted a finished trial and it reported its kept result again
        values = [result.get(m) for m in self.metrics]
        if error:
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        elif any(v is None for v in values):  # stopped early by ASHA: no trial-end metrics
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(number, values)
        self.sync()

    def _number_of(self, trial_id: str, result: dict) -> int | None:
        """The Optuna trial of a Ray trial. Ray restores the searcher from its last snapshot, which
        may predate a trial's suggestion (found among the RUNNING trials by its values), or know a
        trial the fetched history does not (asked after the last upload: unknown), or hold a
        number another trial has since taken in a shorter history (its values differ)."""
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        config = _config_of(result)
        number = self.asked.pop(trial_id, None)
        if number is not None and number < len(trials):
            if not config or _same_values(trials[number].params, config):
                return number
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        return next((t.number for t in running if _same_values(t.params, config)), None)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Ray's saved state names the old driver's history: the experiment's copy is fetched to
        this machine when the history is first used."""
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def sync(self, force: bool = False) -> None:
        if self._mirror is not None:
            self._mirror.sync(force=force)


def _numeric_part(trials: Sequence[Any]) -> list[Any]:
    """The trials with their categorical values left out: CMA-ES searches the numeric values (its
    source trials must have exactly its space's distributions; it draws choices independently)."""
    import optuna

    def numeric(trial):
        kept = {
            k: d
            for k, d in trial.distributions.items()
            if not isinstance(d, optuna.distributions.CategoricalDistribution)
        }
        return optuna.trial.create_trial(
            params={k: trial.params[k] for k in kept},
            distributions=kept,
            values=trial.values,
            user_attrs=trial.user_attrs,
        )

    return [numeric(t) for t in trials]


def _config_of(result: dict) -> dict[str, Any]:
    return result.get("config") or {k[len("config/") :]: v for k, v in result.items() if k.startswith("config/")}


def _same_values(params: dict[str, Any], config: dict[str, Any]) -> bool:
    return bool(params) and all(config.get(k) == v for k, v in params.items())


def reconcile(searcher: OptunaSearcher, results: Sequence[Any], final_key: str) -> None:
    """After a tune phase, the history agrees with Ray's results. A RUNNING Optuna trial is told
    what its Ray trial came to (finished: its values; errored: FAIL; stopped early: PRUNED), stays
    RUNNING while its Ray trial has not ended (a resume goes on with it), and is failed when no Ray
    trial holds it (asked by a lost driver before Ray recorded the trial). A finished Ray trial
    the history lacks altogether (told after its last upload) is added back. Histories on an RDB
    URL are the user's: left alone."""
    import optuna

    if searcher.place.url:
        return
    study = searcher.study
    outcomes = [(dict(r.config), _outcome(r, final_key, searcher.metrics)) for r in results]
    states = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        held = [outcome for config, outcome in outcomes if _same_values(trial.params, config)]
        if not held:
            study.tell(trial.number, state=states.FAIL)
            print(f"optuna: trial {trial.number} was asked by a lost driver and never ran: marked failed")
        elif isinstance(held[0], list):
            study.tell(trial.number, held[0])
        elif held[0] is not None:
            study.tell(trial.number, state=held[0])
    # The search's own finished trials (a warm start's are not Ray's to add back).
    complete = [
        t.params
        for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))
        if KNOWN_EXPERIMENT not in t.user_attrs
    ]
    for config, outcome in outcomes:
        if not isinstance(outcome, list) or any(_same_values(params, config) for params in complete):
            continue
        try:
            distributions = searcher.space.distributions(config)
            params = {name: config[name] for name in distributions}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=outcome))
        except (KeyError, ValueError) as err:
            print(f"optuna: a finished trial could not be added back to the history ({err})")
            continue
        complete.append(params)
        print(f"optuna: added back a finished trial the history had lost: {params}")
    searcher.sync(force=True)


def _outcome(result, final_key: str, metrics: Sequence[str]):
    """What a Ray trial came to: its objective values (finished), FAIL (errored or finished without
    them), PRUNED (stopped early by the scheduler), or None (not ended: a resume goes on with it)."""
    import optuna

    values = result.metrics or {}
    if result.error is not None:
        return optuna.trial.TrialState.FAIL
    if values.get(final_key) == 1:
        found = [values.get(m) for m in metrics]
        return found if all(v is not None for v in found) else optuna.trial.TrialState.FAIL
    if values.get(final_key) == 0 and values.get("done") is True:
        return optuna.trial.TrialState.PRUNED
    return None
