"""`raystudy status EXPERIMENT`: where a study stands, read as the analysis reads it.

Only the study record and each trial's result files (JSON and text) are read, never Ray's own
experiment state or pickles (`experiment_state-*.json`, `tuner.pkl`, `error.pkl`): a status of a
bucket that someone else can write runs no code from it. No Ray here.
"""

from __future__ import annotations

from collections import Counter

from analysis.records import FAILED, INCOMPLETE, MISSING, LoggedTrial, load_experiment, plan_of
from raystudy.config import StudySpec
from raystudy.errors import RaystudyError


def study_status(experiment: str) -> str:
    """One line of counts per state, then one per failed and per unfinished trial."""
    loaded = load_experiment(experiment)
    counts = Counter(t.status for t in loaded.trials)
    lines = [f"{experiment}: {len(loaded.trials)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    for trial in loaded.trials:
        if trial.status == FAILED:
            lines.append(
                f"  failed: {describe(loaded.spec, trial)}: {printable(trial.error or 'no error message')[:300]}"
            )
        elif trial.status in (INCOMPLETE, MISSING):
            epoch = trial.history[-1].get("epoch") if trial.history else None
            suffix = f" (epoch {epoch})" if epoch is not None else ""
            lines.append(f"  {trial.status}: {describe(loaded.spec, trial)}{suffix}")
    return "\n".join(lines)


def printable(text: str) -> str:
    """Text from storage as a terminal shows it harmlessly: control characters (escape sequences
    that could rewrite the screen) as their escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe(spec: StudySpec, trial: LoggedTrial) -> str:
    """The trial's setting in words: its target's name, its loaded model, or mechanism and seed."""
    try:
        plan = plan_of(spec, trial)
    except (RaystudyError, KeyError, TypeError, ValueError, AttributeError):
        return f"trial {printable(trial.trial_id)} (its plan cannot be read)"
    if plan.loaded is not None:
        return plan.loaded.describe()
    magnitudes = ", ".join(f"{k}={v:g}" for k, v in dict(plan.train.magnitudes).items())
    who = plan.target_name or f"{plan.train.mechanism} ({magnitudes or 'no magnitude'})"
    return f"{who}, seed {plan.train.seed}"
