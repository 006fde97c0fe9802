"""Searchers that count a study's trials against the trials Ray holds, never against saved counts.

Ray saves its own counts (its ConcurrencyLimiter's running trials, a search's number of
suggestions, a grid generator's running trials and the grid points it has handed out) in files it
uploads apart from the experiment's trial list. A driver lost between two such uploads left a
resumed study out of step with its trials: waiting forever for a trial Ray never recorded, or
running one trial more or fewer than asked. A searcher here takes `--max-concurrent` through the
limiter's public `set_max_concurrency`, answers FINISHED itself (Ray is given num_samples -1), and
counts the trials `RayTrials` (a Tune callback) saw at the start of Ray's last step plus those it
suggested since: nothing of it is saved, so a resumed driver counts what the restored Ray holds.
`PlanSearcher` hands out a grid's plans this way.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher


@dataclass(frozen=True)
class Step:
    """Ray's trials when one step of its loop began: every trial's id, the unfinished ones' ids,
    and the plans the trials run (a grid's; a search's trials have none)."""

    number: int
    every: frozenset[str] = frozenset()
    unfinished: frozenset[str] = frozenset()
    plans: frozenset[str] = frozenset()


_NO_STEP = Step(-1)
_AT_STEP: dict[str, Step] = {}  # per study name, in the driver: what `RayTrials` saw last
_steps = itertools.count()


def plan_key(plan: Any) -> str:
    return json.dumps(plan, sort_keys=True)


class RayTrials(Callback):
    """Shows a study's searcher the trials Ray holds, at the start of every step of Ray's loop
    (before it asks the searcher for new trials)."""

    def __init__(self, study_name: str) -> None:
        self.study_name = study_name

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        _AT_STEP[self.study_name] = Step(
            next(_steps),
            frozenset(t.trial_id for t in trials),
            frozenset(t.trial_id for t in trials if not t.is_finished()),
            frozenset(plan_key(t.config["plan"]) for t in trials if "plan" in (t.config or {})),
        )


class CountedSearcher(Searcher):
    """The counting both searchers share; subclasses call `_forget_counts` when made or restored."""

    UNSAVED = ("_suggested", "_completed")  # this driver's: never in what Ray saves
    study_name: str
    max_concurrent: int | None

    def _forget_counts(self) -> None:
        self._suggested: dict[str, tuple[int, str | None]] = {}  # suggestion -> (step made at, plan)
        self._completed: set[str] = set()  # ... and those Ray reported complete
        _AT_STEP.pop(self.study_name, None)  # Ray's next step says which trials it holds

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Ray's ConcurrencyLimiter offers its limit here; True: this searcher keeps it."""
        self.max_concurrent = max_concurrent
        return True

    def _since_step(self) -> tuple[Step, dict[str, str | None]]:
        step = _AT_STEP.get(self.study_name, _NO_STEP)
        return step, {tid: plan for tid, (at, plan) in self._suggested.items() if at >= step.number}

    def trials_held(self) -> tuple[set[str], set[str]]:
        """(every trial, those still running): what Ray held at the start of its last step and what
        was suggested since; before any step was seen (called directly), this driver's suggestions
        and those of them not complete."""
        step, since = self._since_step()
        return set(step.every | since.keys()), set(step.unfinished | (since.keys() - self._completed))

    def plans_held(self) -> set[str]:
        step, since = self._since_step()
        return set(step.plans) | {plan for plan in since.values() if plan is not None}

    def at_limit(self) -> bool:
        return self.max_concurrent is not None and len(self.trials_held()[1]) >= self.max_concurrent

    def _note_suggested(self, trial_id: str, plan: str | None = None) -> None:
        self._suggested[trial_id] = (_AT_STEP.get(self.study_name, _NO_STEP).number, plan)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._completed.add(trial_id)


class PlanSearcher(CountedSearcher):
    """A grid's plans in order, each in one trial: a plan is handed out while no trial Ray holds
    runs it (Ray's `grid_search` hands them out by a saved position instead)."""

    def __init__(self, plans: list[dict[str, Any]], study_name: str) -> None:
        super().__init__(metric=None, mode=None)
        self.plans, self.study_name, self.max_concurrent = list(plans), study_name, None
        self._forget_counts()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.UNSAVED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_counts()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        held = self.plans_held()
        left = [plan for plan in self.plans if plan_key(plan) not in held]
        if not left:
            return Searcher.FINISHED
        if self.at_limit():
            return None  # Ray asks again at a later step
        self._note_suggested(trial_id, plan_key(left[0]))
        return {"plan": left[0]}

    # The plans are in tuner.pkl, and Ray saves the searcher at every snapshot of the experiment:
    # the saved state is only the limit, as JSON (read back from storage: checked, never unpickled).
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"max_concurrent": self.max_concurrent}, f)

    def restore(self, checkpoint_path: str) -> None:
        try:
            with open(checkpoint_path) as f:
                saved = json.loads(f.read(1 << 12))
            limit = saved["max_concurrent"]
        except (OSError, ValueError, TypeError, KeyError):
            limit = None
        if not (limit is None or (type(limit) is int and limit > 0)):
            limit = None
        self.max_concurrent = self.max_concurrent if limit is None else limit
        self._forget_counts()
