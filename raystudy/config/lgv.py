"""The LGV phase's settings (the phase itself runs in raystudy.training.lgv_ensemble)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from raystudy.config.train import Range, check_text, show
from raystudy.errors import RaystudyError

if TYPE_CHECKING:
    from raystudy.config.train import TrainConfig

LGV_BASES = ("ST", "SAM", "SAM&JR")  # METHOD.md: the fine-tuning may use SGD, SAM or SAM&JR
LIMITS: dict[str, Range] = {
    "epochs": Range(1, 1_000),
    "lr": Range(0, 1_000, whole=False, open_low=True),
    "models_per_epoch": Range(1, 100),  # models saved per epoch: the ensemble has epochs x this many
    "batch_size": Range(1, 65_536),
}


@dataclass(frozen=True)
class LgvPhase:
    """How the ensemble is collected; `base=None` fine-tunes with the trained model's own mechanism."""

    base: str | None = None
    epochs: int = 10
    lr: float = 0.05
    models_per_epoch: int = 4
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.base is not None and check_text("lgv: base", self.base) not in LGV_BASES:
            raise RaystudyError(f"lgv: base={show(self.base)}; LGV fine-tunes with {', '.join(LGV_BASES)}")
        for key, limits in LIMITS.items():
            limits.check(f"lgv: {key}", getattr(self, key))

    @classmethod
    def parse(cls, value: Any) -> "LgvPhase | None":
        """A study's `lgv:` entry: false/absent (no phase), true (the defaults) or a mapping of fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise RaystudyError(f"lgv must be true, false or a mapping of {', '.join(cls.fields())}, not {show(value)}")
        unknown = sorted((show(k) for k in value if k not in cls.fields()))
        if unknown:
            raise RaystudyError(f"lgv: unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.fields())}")
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
        return type(trained).from_dict(values)
