"""LGV (Gubri et al. 2022) as a phase after training: an ensemble collected along a fine-tuning run.

LGV is a schedule, not a loss, so it is not a mechanism: from a trained surrogate, fine-tune with a
base mechanism's update (ST's SGD, SAM or SAM&JR) at a constant learning rate and keep
`models_per_epoch` snapshots per epoch (METHOD.md: lr 0.05, momentum 0.9, weight decay 1e-4,
batch 256, 10 epochs, 4 per epoch: 40 models). The attack then uses one collected model per
iteration. `collect` runs the ordinary epoch loop (`raystudy.training.loop.train`) with that schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from raystudy.config import TrainConfig
from raystudy.config.lgv import LGV_BASES, LgvPhase
from raystudy.core.checkpoint import load_model
from raystudy.core.data import Dataset
from raystudy.core.models import Ensemble

__all__ = ["LGV_BASES", "LgvPhase", "collect"]


def collect(
    trained: TrainConfig,
    model_file: str | Path,
    dataset: Dataset,
    phase: LgvPhase,
    out_dir: str | Path,
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> Ensemble:
    """Fine-tune the model in `model_file` (trained with `trained`) per `phase`, saving snapshots
    under `out_dir/lgv/`, and load them as an ensemble. Resumes like any training run."""
    from raystudy.training.loop import pick_device, train

    config = phase.train_config(trained, str(model_file))
    if log is not None:
        log(
            f"LGV: {config.epochs} epochs at lr {config.lr:g} with {config.mechanism}, "
            f"{config.snapshots_per_epoch} models per epoch"
        )
    result = train(config, dataset=dataset, out_dir=out_dir, device=device, log=log)
    target = pick_device(device)
    return Ensemble([load_model(path, target)[0] for path in result.snapshots]).to(target)
