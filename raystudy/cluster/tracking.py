"""Experiment tracking through Ray Tune's logger callbacks: TensorBoard, MLflow, Weights & Biases.

Part of the study builder (it imports Ray): `raystudy run/targets/search --log-to mlflow,tensorboard`.
Every per-epoch result and the final hook metrics go to each tracker, with the trial's mechanism,
magnitudes and seed (or a search sample's values) as tags and its resolved plan as parameters.
- tensorboard: event files in each trial's folder of the experiment (`tensorboard --logdir EXP`).
- mlflow: runs under the study's name in `$MLFLOW_TRACKING_URI`, else in `./mlruns` (MLflow's own
  local default, a file store); metric names use '.' where raystudy's use '/' (`asr.pgd.untargeted.8.mean`).
- wandb: runs in the project named after the study; offline (`wandb sync` later) unless the user
  is logged in (`WANDB_API_KEY` or `wandb login`) or sets `WANDB_MODE`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from raystudy.errors import RaystudyError, require_extra

TRACKERS = ("tensorboard", "mlflow", "wandb")
_NOT_METRICS = ("config", "record")
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def parse_trackers(text: str | None) -> tuple[str, ...]:
    """'mlflow,tensorboard' -> ('mlflow', 'tensorboard'); unknown names list the valid ones."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise RaystudyError(f"--log-to: unknown tracker(s) {', '.join(unknown)}; valid: {', '.join(TRACKERS)}")
    return names


def trial_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """Who a trial is, as string tags: mechanism, magnitudes, seed (and target name), or a search
    sample's values."""
    if "plan" not in config:
        return {str(k): f"{v:g}" if isinstance(v, float) else str(v) for k, v in config.items()}
    plan = config["plan"]
    train = plan["train"]
    tags = {
        "mechanism": str(train["mechanism"]),
        "magnitudes": ",".join(f"{k}={v:g}" for k, v in dict(train["magnitudes"]).items()) or "none",
        "seed": str(train["seed"]),
        "model": str(train["model"]),
    }
    if plan.get("target_name"):
        tags["target_name"] = str(plan["target_name"])
    return tags


def tracking_callbacks(trackers: tuple[str, ...], study_name: str) -> list:
    return [_callback(name, study_name) for name in trackers]


def _require(name: str) -> None:
    require_extra(_PACKAGES[name], "tracking", f"--log-to {name}")


def _callback(name: str, study_name: str):
    _require(name)
    if name == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return TBXLoggerCallback()
    if name == "mlflow":
        return _mlflow_callback(study_name)
    return _wandb_callback(study_name)


def _mlflow_callback(study_name: str):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store for local use behind this switch (its default is a database).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    class TaggedMLflowLoggerCallback(MLflowLoggerCallback):
        """One MLflow run per trial, tagged with the trial's identity."""

        def log_trial_start(self, trial) -> None:
            study_tags = self.tags  # a restarted trial's run exists: Ray does not tag it again
            self.tags = {**study_tags, **trial_tags(trial.config)}
            try:
                super().log_trial_start(trial)
            finally:
                self.tags = study_tags

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            # The config is the run's parameters and the record a JSON structure: neither is a metric.
            # '/' becomes '.': MLflow's file store makes each '/' a folder, and `acc` (a file) would
            # clash with `acc/<target>` (a folder).
            # MLflow's names take no `+` (a target behind a defense, `t1+jpeg:75`): written `t1__jpeg:75`.
            metrics = {k.replace("/", ".").replace("+", "__"): v for k, v in result.items() if k not in _NOT_METRICS}
            super().log_trial_result(iteration, trial, metrics)

    return TaggedMLflowLoggerCallback(tracking_uri=uri, experiment_name=study_name, tags={"study": study_name})


def _wandb_callback(study_name: str):
    from raystudy.cluster.ray_internals import wandb_callback_class

    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    os.environ.setdefault("WANDB_MODE", "online" if logged_in else "offline")  # Ray and wandb read it

    class TaggedWandbLoggerCallback(wandb_callback_class()):
        def log_trial_start(self, trial) -> None:
            self.kwargs["tags"] = [f"{k}={v}" for k, v in trial_tags(trial.config).items()]
            super().log_trial_start(trial)

    return TaggedWandbLoggerCallback(project=study_name)
