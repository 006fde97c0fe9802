"""The typed, frozen configuration of one training run, and the schedule presets.

Built once at the boundary (CLI flags, later the search-space YAML) and validated there: every
check raises a RaystudyError naming the bad key. Below this module nothing takes a raw dict.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from raystudy.errors import RaystudyError
from raystudy.mechanisms import get_mechanism
from raystudy.mechanisms.base import grid_family

PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "constant")
SAM_BN_MODES = ("both", "first")  # which SAM passes update BatchNorm's running statistics

# METHOD.md's published recipe per dataset family ("faithful"). Every setting of a step is part of
# the method: batch size and weight decay set how sharp the minimum is (smoothness is what the
# study measures), IR's and JR's magnitudes are batch-128 magnitudes, and fp32 keeps AT's smallest
# perturbations (bf16 rounds most of an eps=0.01 perturbation away before the first convolution).
FAITHFUL: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        epochs=200,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=10,
        schedule="cosine",
        precision="fp32",
        pretrained=False,
    ),
    # ResNet-50 (and the timm targets) fine-tuned from ImageNet weights; lr as METHOD.md states it.
    "imagenette": dict(
        epochs=50,
        batch_size=128,
        lr=1.0,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=5,
        schedule="cosine",
        precision="fp32",
        pretrained=True,
    ),
}
# "fast" is the faithful recipe with a fifth of its epochs (warm-up kept at the same fraction):
# the same loss at every step, only a shorter schedule. Throughput comes from packing trials
# per GPU, not from a larger batch, a stronger weight decay or a lower precision.
FAST_EPOCH_FRACTION = 5
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "faithful": FAITHFUL,
    "fast": {
        family: {
            **values,
            "epochs": values["epochs"] // FAST_EPOCH_FRACTION,
            "warmup_epochs": values["warmup_epochs"] // FAST_EPOCH_FRACTION,
        }
        for family, values in FAITHFUL.items()
    },
}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "cifar10"
    model: str = "resnet18"
    mechanism: str = "ST"
    # Every magnitude of the mechanism (defaults filled in), as sorted (name, value) pairs.
    magnitudes: tuple[tuple[str, float], ...] = ()
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 10  # linear warm-up, then the schedule
    schedule: str = "cosine"  # cosine decay to 0 per epoch, or constant
    precision: str = "fp32"  # fp32 or bf16 autocast
    seed: int = 0  # weights, batches, augmentation, mechanisms
    data_seed: int = 0  # which n_train / n_test subset (same for every trial)
    deterministic: bool = False  # deterministic kernels (slower on GPU)
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    n_train: int | None = None  # seeded class-balanced subsets; None = whole split
    n_test: int | None = None
    image_size: int = 32  # synthetic data only
    pretrained: bool = False  # timm weights (ImageNette models)
    init_checkpoint: str | None = None  # start from these weights (LGV's fine-tuning)
    snapshots_per_epoch: int = 0  # models saved along each epoch (LGV's collection)
    sam_bn: str = "both"  # BN running statistics updated by both SAM passes (published) or the first only
    data_path: str | None = field(default=None, compare=False)  # where this machine keeps the data

    def __post_init__(self) -> None:
        spec = get_mechanism(self.mechanism)
        resolved = spec.resolve(dict(self.magnitudes), self.dataset)
        object.__setattr__(self, "magnitudes", tuple(sorted(resolved.items())))
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(
            self.warmup_epochs == 0 or 0 < self.warmup_epochs < self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"must be 0 or below epochs={self.epochs}",
        )
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"must be one of {', '.join(SCHEDULES)}")
        _check(self.precision in PRECISIONS, "precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        _check(self.sam_bn in SAM_BN_MODES, "sam_bn", self.sam_bn, f"must be one of {', '.join(SAM_BN_MODES)}")
        _check(
            self.precision == "fp32" or not self.recipe().input_sensitive,
            "precision",
            self.precision,
            f"would round away {self.mechanism}'s small input perturbations or input gradients: use fp32",
        )
        _check(self.seed >= 0 and self.data_seed >= 0, "seed", self.seed, "must be >= 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(self.snapshots_per_epoch >= 0, "snapshots_per_epoch", self.snapshots_per_epoch, "must be >= 0")
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, value, "must be >= 1")

    def recipe(self):
        recipe = get_mechanism(self.mechanism).recipe(dict(self.magnitudes), self.dataset)
        return dataclasses.replace(recipe, sam_bn_second_pass=self.sam_bn == "both")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        values = dict(values)
        if "lgv_base" in values:  # written before LGV became a phase: mechanism "LGV" trained with lgv_base
            base = values.pop("lgv_base")
            values["mechanism"] = base if values.get("mechanism") == "LGV" else values.get("mechanism", "ST")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RaystudyError(f"unknown training setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "magnitudes" in values:
            values["magnitudes"] = tuple((str(k), float(v)) for k, v in dict(values["magnitudes"]).items())
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "TrainConfig":
        """The preset's recipe for the dataset's family, then `overrides` (None values ignored)."""
        if preset not in PRESETS:
            raise RaystudyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        base = dict(PRESETS[preset][grid_family(overrides.get("dataset") or "cifar10")])
        if overrides.get("epochs") is not None and overrides.get("warmup_epochs") is None:
            # A shorter run keeps the preset's warm-up fraction (10/200 faithful, 2/40 fast).
            base["warmup_epochs"] = base["warmup_epochs"] * overrides["epochs"] // base["epochs"]
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Names of the settings (except where the data lives) in which two configs differ."""
        return [
            f.name for f in dataclasses.fields(self) if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise RaystudyError(f"{key}={value!r} {why}")
