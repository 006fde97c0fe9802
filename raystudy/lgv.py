"""LGV (Gubri et al. 2022) as a phase after training: an ensemble collected along a fine-tuning run.

LGV is a schedule, not a loss, so it is not a mechanism: from a trained surrogate, fine-tune with a
base mechanism's update (ST's SGD, SAM or SAM&JR) at a constant learning rate and keep
`models_per_epoch` snapshots per epoch (METHOD.md: lr 0.05, momentum 0.9, weight decay 1e-4,
batch 256, 10 epochs, 4 per epoch: 40 models). The attack then uses one collected model per
iteration. `collect` runs the ordinary epoch loop (`raystudy.train.train`) with that schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from raystudy.checkpoint import load_model
from raystudy.config import TrainConfig
from raystudy.data import Dataset
from raystudy.errors import RaystudyError
from raystudy.models import Ensemble

LGV_BASES = ("ST", "SAM", "SAM&JR")  # METHOD.md: the fine-tuning may use SGD, SAM or SAM&JR


@dataclass(frozen=True)
class LgvPhase:
    """How the ensemble is collected; `base=None` fine-tunes with the trained model's own mechanism."""

    base: str | None = None
    epochs: int = 10
    lr: float = 0.05
    models_per_epoch: int = 4
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.base is not None and self.base not in LGV_BASES:
            raise RaystudyError(f"lgv: base={self.base!r}; LGV fine-tunes with {', '.join(LGV_BASES)}")
        for key in ("epochs", "models_per_epoch", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise RaystudyError(f"lgv: {key}={getattr(self, key)!r} must be a whole number >= 1")
        if not self.lr > 0:
            raise RaystudyError(f"lgv: lr={self.lr!r} must be > 0")

    @classmethod
    def parse(cls, value: Any) -> "LgvPhase | None":
        """A study's `lgv:` entry: false/absent (no phase), true (the defaults) or a mapping of fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise RaystudyError(f"lgv must be true, false or a mapping of {', '.join(cls.fields())}, not {value!r}")
        unknown = sorted(set(value) - set(cls.fields()))
        if unknown:
            raise RaystudyError(
                f"lgv: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(cls.fields())}"
            )
        try:
            return cls(**value)
        except TypeError as err:
            raise RaystudyError(f"lgv: {err}") from None

    @staticmethod
    def fields() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(LgvPhase))

    def base_for(self, trained: TrainConfig) -> str:
        base = self.base or trained.mechanism
        if base not in LGV_BASES:
            raise RaystudyError(f"LGV fine-tunes with {', '.join(LGV_BASES)}, not {base} (set lgv: {{base: ...}})")
        return base

    def train_config(self, trained: TrainConfig, init_checkpoint: str) -> TrainConfig:
        """The fine-tuning run: the trained config's data and model, the base's update at a constant lr."""
        base = self.base_for(trained)
        magnitudes = dict(trained.magnitudes) if base == trained.mechanism else {}
        values = {
            **trained.to_dict(),
            "mechanism": base,
            "magnitudes": magnitudes,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "warmup_epochs": 0,
            "schedule": "constant",
            "snapshots_per_epoch": self.models_per_epoch,
            "init_checkpoint": init_checkpoint,
            "pretrained": False,
        }
        return TrainConfig.from_dict(values)


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
    from raystudy.train import pick_device, train

    config = phase.train_config(trained, str(model_file))
    if log is not None:
        log(
            f"LGV: {config.epochs} epochs at lr {config.lr:g} with {config.mechanism}, "
            f"{config.snapshots_per_epoch} models per epoch"
        )
    result = train(config, dataset=dataset, out_dir=out_dir, device=device, log=log)
    target = pick_device(device)
    return Ensemble([load_model(path, target)[0] for path in result.snapshots]).to(target)
