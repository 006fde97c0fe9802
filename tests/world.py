"""Experiments written in this process, without Ray: what `raystudy run`/`targets` write for a study
whose subject is not Ray (the analysis of a second grid, models that are not the smoke ones). Each
trial runs through raystudy.training.trial.run_one_trial, the function Ray's trainable wraps, and
its results are logged as Ray's JSON logger logs them (result.json rows holding the config, and
params.json) with its checkpoints as Ray keeps them, beside the study manifest that Experiment.create writes."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from raystudy.cluster.experiment import Experiment
from raystudy.config import parse_space
from raystudy.core.checkpoint import STATE_FILE
from raystudy.core.data import dataset_for
from raystudy.training.trial import FINAL_KEY, TrialContext, run_one_trial, trial_folder


def write_experiment(raw: dict, storage: Path, source: str = "world.yaml", data: str | None = None) -> Path:
    """The experiment of study `raw` (a grid or targets study) under `storage`, every trial run here;
    `source`: the study file it came from (relative: beside the storage); `data`: the data folder (`--data`)."""
    spec = parse_space(raw, str(storage / source), data)  # an absolute `source` stays as it is
    experiment = Experiment.create(spec, raw, str(storage), local=True)
    for i, plan in enumerate(spec.plans):
        trial_id = f"world_{i:05d}"
        folder = Path(experiment.location) / trial_folder(trial_id)
        folder.mkdir(parents=True)
        config = {"plan": plan.to_dict()}
        (folder / "params.json").write_text(json.dumps(config))

        def report(metrics: dict, state_path, folder=folder, config=config, trial_id=trial_id) -> None:
            row = {**metrics, "config": config, "trial_id": trial_id, "done": metrics.get(FINAL_KEY) == 1}
            with open(folder / "result.json", "a") as log:
                log.write(json.dumps(row) + "\n")
            if state_path is not None:  # as Ray keeps a reported checkpoint: checkpoint_<n>/checkpoint.pt
                kept = folder / f"checkpoint_{len(list(folder.glob('checkpoint_*'))):06d}"
                kept.mkdir()
                shutil.copy2(state_path, kept / STATE_FILE)

        with tempfile.TemporaryDirectory(prefix="world-trial-") as work:
            context = TrialContext(spec, str(storage), str(folder), Path(work), torch.device("cpu"))
            run_one_trial(plan, context, dataset_for(plan.train), report)
    return Path(experiment.location)
