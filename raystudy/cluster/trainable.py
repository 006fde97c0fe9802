"""The Ray Tune function trainable: the only code that reports to Ray, a thin adapter around
`raystudy.training.trial.run_one_trial` (which runs a trial without Ray).

It hands the trial Ray's latest checkpoint (unpacked into the trial's work folder) and its folder
in the experiment, and reports each result through `tune.report`, with the epoch's checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from raystudy.config import StudySpec
from raystudy.core.checkpoint import STATE_FILE
from raystudy.core.data import dataset_for
from raystudy.persist import storage
from raystudy.persist.record import targets_location  # noqa: F401 (the study builder reads it and FINAL_KEY here)
from raystudy.training.trial import FINAL_KEY, TrialContext, run_one_trial, share_device, trial_folder  # noqa: F401


def run_trial(
    config: dict[str, Any],
    study: StudySpec,
    storage_path: str,
    target_names: tuple[str, ...] | None = None,
    keep_images: bool | None = None,
) -> None:
    """One trial on a Ray worker; `target_names` and `keep_images`: what the experiment's manifest
    says (the targets are not looked for again by every trial)."""
    plan = study.plan_from_ray(config)
    device = share_device(study)
    dataset = dataset_for(plan.train)
    work = Path(tempfile.mkdtemp(prefix="raystudy-trial-"))
    try:
        folder = storage.join(storage_path, study.name, trial_folder(tune.get_context().get_trial_id()))
        context = TrialContext(
            study, storage_path, folder, work, device, _restore_ray_checkpoint, target_names, keep_images
        )
        run_one_trial(plan, context, dataset, lambda metrics, state: _report(metrics, state, storage_path))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _restore_ray_checkpoint(work: Path) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(work))  # holds checkpoint.pt: train() resumes from it


def _report(metrics: dict[str, Any], state_path: Path | None, storage_path: str) -> None:
    if state_path is None:
        tune.report(metrics)
        return
    # Ray uploads the checkpoint inside tune.report and fails the trial if the store is down: wait
    # out an outage first (raystudy.persist.storage retries with backoff), so it costs time, not a failure.
    storage.wait_until_reachable(storage_path)
    with tempfile.TemporaryDirectory(prefix="raystudy-ckpt-") as folder:
        shutil.copy2(state_path, Path(folder) / STATE_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
