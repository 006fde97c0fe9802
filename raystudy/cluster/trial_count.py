"""Searchers that count a study's trials against the trials Ray holds, never against saved counts.

Ray saves its own counts (its ConcurrencyLimiter's running trials, a search's number of
suggestions, a grid generator's running trials and the grid points it has handed out) in files it
uploads apart from the experiment's trial list. A driver lost between two such uploads left a
resumed study out of step with its trials: waiting forever for a trial Ray never recorded, or
running one trial more or fewer than asked, and every later resume the same. A searcher here
takes `--max-concurrent` through the limiter's public `set_max_concurrency` and answers FINISHED
itself, counting the trials `RayTrials` (a Tune callback) saw at the start of Ray's last step plus
those it suggested since: nothing of it is saved, so a resumed driver counts what the restored Ray
holds; Ray's own count and "finished" are not restored (`CountedSearch`). `PlanSearcher` hands out
a grid's plans this way.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator


@dataclass(frozen=True)
class Step:
    """Ray's trials when one step of its loop began: how many, how many unfinished, and the plans
    they run (a grid's; a search's trials have none)."""

    number: int
    trials: int = 0
    unfinished: int = 0
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
        self._plan_of: dict[str, str] = {}  # a trial's plan key, made once per trial

    def __getstate__(self) -> dict[str, Any]:
        return {"study_name": self.study_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["study_name"])

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        for trial in trials:
            if trial.trial_id not in self._plan_of and "plan" in (trial.config or {}):
                self._plan_of[trial.trial_id] = plan_key(trial.config["plan"])
        _AT_STEP[self.study_name] = Step(
            next(_steps),
            len(trials),
            sum(not t.is_finished() for t in trials),
            frozenset(self._plan_of[t.trial_id] for t in trials if t.trial_id in self._plan_of),
        )


class CountedSearch(SearchGenerator):
    """Ray's wrapper of a searcher, given to the Tuner as it is (with Ray's ConcurrencyLimiter
    inside where a limit is set) and restored without Ray's saved count of suggestions and
    "finished": the searcher inside counts against the trials Ray holds. Ray still stops at the
    number of samples it is given, which the searcher never exceeds."""

    def set_state(self, state: dict) -> None:
        super().set_state({**state, "counter": 0, "finished": False})


def counted_search(searcher: "CountedSearcher", max_concurrent: int | None) -> CountedSearch:
    """What the Tuner gets as its search algorithm (with max_concurrent_trials left unset)."""
    return CountedSearch(ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher)


class CountedSearcher(Searcher):
    """The counting both searchers share, kept up as it goes (a grid of thousands of plans asks
    for them all at Ray's first step). Subclasses call `_forget_counts` when made or restored."""

    UNSAVED = ("_step", "_since", "_since_plans", "_since_open", "_completed", "_next")  # this driver's
    study_name: str
    max_concurrent: int | None

    def _forget_counts(self) -> None:
        self._step = _NO_STEP.number  # the step the suggestions below were made after
        self._since: set[str] = set()  # suggested since Ray's step `_step` began
        self._since_plans: set[str] = set()  # ... the plans they run
        self._since_open = 0  # ... how many of them Ray has not reported complete
        self._completed: set[str] = set()
        self._next = 0  # PlanSearcher: plans before this one are all held
        _AT_STEP.pop(self.study_name, None)  # Ray's next step says which trials it holds

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Ray's ConcurrencyLimiter offers its limit here; True: this searcher keeps it."""
        self.max_concurrent = max_concurrent
        return True

    def ray_step(self) -> Step:
        """What Ray held at the start of its last step; the suggestions made before that step are
        in it. Before any step was seen (called directly), every suggestion counts as since."""
        step = _AT_STEP.get(self.study_name, _NO_STEP)
        if step.number != self._step:
            self._step, self._since, self._since_plans, self._since_open = step.number, set(), set(), 0
        return step

    def trials_held(self) -> int:
        return self.ray_step().trials + len(self._since)

    def at_limit(self) -> bool:
        running = self.ray_step().unfinished + self._since_open
        return self.max_concurrent is not None and running >= self.max_concurrent

    def _note_suggested(self, trial_id: str, plan: str | None = None) -> None:
        self.ray_step()
        self._since.add(trial_id)
        self._since_open += 1
        if plan is not None:
            self._since_plans.add(plan)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._since and trial_id not in self._completed:
            self._since_open -= 1
        self._completed.add(trial_id)


class PlanSearcher(CountedSearcher):
    """A grid's plans in order, each in one trial: a plan is handed out while no trial Ray holds
    runs it (Ray's `grid_search` hands them out by a saved position instead)."""

    def __init__(self, plans: list[dict[str, Any]], study_name: str) -> None:
        super().__init__(metric=None, mode=None)
        self.plans, self.study_name, self.max_concurrent = list(plans), study_name, None
        self._forget_counts()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in (*self.UNSAVED, "_keys")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_counts()

    def _forget_counts(self) -> None:
        super()._forget_counts()
        self._keys = [plan_key(plan) for plan in self.plans]

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        held = self.ray_step().plans
        # Plans once held stay held (Ray's list only grows): the first one not held is after them.
        while self._next < len(self._keys) and (
            self._keys[self._next] in held or self._keys[self._next] in self._since_plans
        ):
            self._next += 1
        if self._next == len(self._keys):
            return Searcher.FINISHED
        if self.at_limit():
            return None  # Ray asks again at a later step
        self._note_suggested(trial_id, self._keys[self._next])
        return {"plan": self.plans[self._next]}

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
