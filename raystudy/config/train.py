"""The typed, frozen configuration of one training run, and the schedule presets.

Built once at the boundary (CLI flags, later the search-space YAML) and validated there: every
check raises a RaystudyError naming the bad key. Below this module nothing takes a raw dict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import reprlib
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Mapping

from raystudy.errors import RaystudyError
from raystudy.mechanisms import PENALTY_GRADIENTS, StepShape, get_mechanism
from raystudy.mechanisms.base import grid_family

# --- Checks of single values, shared by the configuration layer (study files, flags, records) ------
# Each raises a one-line RaystudyError naming the key and saying what is allowed; `show` keeps a bad
# value's text short (and on one line) whatever was given.

MAX_SEED = 2**32 - 1  # numpy's generators take 32-bit seeds
MAX_NAME = 128  # characters of a name: a study, a target, a model, a mechanism, a metric
MAX_TEXT = 10_000  # characters of free text (a description) or of a path
# Characters never allowed in text: control characters (NUL, escape, newline outside free text),
# lone surrogates and the Unicode line and paragraph separators (they would split an error line).
_FORBIDDEN_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 60
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 6
_SHOW.maxlevel = 3


def show(value: Any) -> str:
    """A bad value as a message shows it: repr, at most ~60 characters of any part, one line."""
    try:
        return _SHOW.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return f"<a {type(value).__name__} too long to show>"


@dataclass(frozen=True)
class Range:
    """Whole numbers (`whole`) or finite numbers from `low` to `high`; an open end excludes its bound.
    bool is not a number here, and NaN or infinity never is one."""

    low: float
    high: float
    whole: bool = True
    open_low: bool = False
    open_high: bool = False

    def __str__(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        if math.isinf(self.low) and math.isinf(self.high):
            return kind
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{kind} in {left}{_number_text(self.low)}, {_number_text(self.high)}{right}"

    def is_kind(self, value: Any) -> bool:
        kind = numbers.Integral if self.whole else numbers.Real
        return isinstance(value, kind) and not isinstance(value, bool)

    def holds(self, value: Any) -> bool:
        try:
            if not self.whole and not math.isfinite(value):
                return False
        except OverflowError:  # an int beyond any float
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def check_kind(self, key: str, value: Any) -> Any:
        if not self.is_kind(value):
            raise RaystudyError(f"{key}={show(value)} has the wrong type ({type(value).__name__}): must be {self}")
        return value

    def check(self, key: str, value: Any) -> Any:
        """`value`, if it is such a number; else a RaystudyError naming the key and what is allowed."""
        if not self.holds(self.check_kind(key, value)):
            raise RaystudyError(f"{key}={show(value)} must be {self}")
        return value


FINITE = Range(-math.inf, math.inf, whole=False)  # any finite number


def _number_text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_text(key: str, value: Any, max_length: int = MAX_NAME, lines: bool = False) -> str:
    """A string of at most `max_length` characters, without control characters (tabs and newlines
    allowed only where `lines`)."""
    if not isinstance(value, str):
        raise RaystudyError(f"{key}={show(value)} has the wrong type ({type(value).__name__}): must be text")
    if len(value) > max_length:
        raise RaystudyError(f"{key}={show(value)} is {len(value)} characters long; at most {max_length}")
    if value.isprintable():  # no control or separator character at all: the common case, fast
        return value
    allowed = "\t\n" if lines else ""
    bad = next((c for c in value if c not in allowed and unicodedata.category(c) in _FORBIDDEN_CATEGORIES), None)
    if bad is not None:
        raise RaystudyError(f"{key}={show(value)} holds the control character {bad!r}: give plain text")
    return value


def check_name(key: str, value: Any) -> str:
    """A name that becomes one folder or file name: plain text, not empty, '.' or '..', no '/' or '\\'."""
    name = check_text(key, value)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise RaystudyError(f"{key}={show(name)} must be a plain name (one folder name: no / or \\, not . or ..)")
    return name


def check_flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RaystudyError(f"{key}={show(value)} has the wrong type ({type(value).__name__}): must be true or false")
    return value


# Images at most this many pixels wide are CIFAR-sized: the CIFAR model variants (3x3 stem, no early
# down-sampling) and pad-and-crop augmentation (raystudy.core.data) apply to them.
CIFAR_MAX_INPUT = 64
# The CIFAR variants raystudy.core.models builds (for inputs of at most CIFAR_MAX_INPUT pixels); larger
# inputs take any timm model by name.
CIFAR_MODEL_NAMES = ("densenet121", "inception_v3", "resnet18", "resnet50", "resnet8", "tiny_cnn", "vgg16", "vgg_small")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "constant")
SAM_BN_PASSES = ("both", "first")  # which SAM passes update BatchNorm's running statistics

# METHOD.md's published recipe per dataset family ("faithful"). Every setting of a step is part of
# the method: batch size and weight decay set how sharp the minimum is (smoothness is what the
# study measures), IR's and JR's magnitudes are batch-128 magnitudes, and fp32 keeps AT's smallest
# perturbations (bf16 rounds most of an eps=0.01 perturbation away before the first convolution).
CIFAR10_RECIPE = dict(
    epochs=200,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    warmup_epochs=10,
    schedule="cosine",
    precision="fp32",
    pretrained=False,
)
FAITHFUL: dict[str, dict[str, Any]] = {
    "cifar10": CIFAR10_RECIPE,
    # ResNet-50 (and the timm targets) fine-tuned from ImageNet weights; lr as METHOD.md states it.
    "imagenette": {**CIFAR10_RECIPE, "epochs": 50, "warmup_epochs": 5, "lr": 1.0, "pretrained": True},
}
# "fast" is the faithful recipe with a fifth of its epochs (warm-up kept at the same fraction) and
# the IR/JR/ER penalties' parameter gradients by finite differences: the same loss at every step,
# a shorter schedule, and a cheaper gradient of the same penalty (cosine >= 0.999 to double
# backprop on ResNet-18, VGG-16 and Inception-V3 from initialisation to trained:
# results/finite_difference_sweep.json). Throughput comes from packing trials per GPU, not from a
# larger batch, a stronger weight decay or a lower precision.
FAST_EPOCH_FRACTION = 5
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "faithful": FAITHFUL,
    "fast": {
        family: {
            **values,
            "epochs": values["epochs"] // FAST_EPOCH_FRACTION,
            "warmup_epochs": values["warmup_epochs"] // FAST_EPOCH_FRACTION,
            "penalty_gradient": "finite_difference",
        }
        for family, values in FAITHFUL.items()
    },
}


# What a study file or a flag may give each numeric setting: generous for real studies, small
# enough for a plan to hold (epochs x steps, batches, models saved) and for a seed to reach numpy.
LIMITS: dict[str, Range] = {
    "epochs": Range(1, 10_000),
    "batch_size": Range(1, 65_536),
    "lr": Range(0, 1e12, whole=False, open_low=True),  # 1e12: the tests make training diverge on purpose
    "momentum": Range(0, 1, whole=False, open_high=True),
    "weight_decay": Range(0, 10, whole=False),
    "warmup_epochs": Range(0, 10_000),
    "seed": Range(0, MAX_SEED),
    "data_seed": Range(0, MAX_SEED),
    "checkpoint_every": Range(1, 10_000),
    "n_train": Range(1, 10_000_000),
    "n_test": Range(1, 10_000_000),
    "image_size": Range(8, 1_024),  # the side of generated images: up to what a timm model takes
    "snapshots_per_epoch": Range(0, 100),
}
PATH_SETTINGS = ("init_checkpoint", "data_path")  # text up to MAX_TEXT characters; other text up to MAX_NAME


def _setting(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A TrainConfig field with what `raystudy train` needs to offer it as a flag (help, name, choices)."""
    # Runs only while the class is defined, at import, before mutation testing can switch a mutant on.
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})  # pragma: no mutate


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field but `magnitudes` is also a `raystudy train` flag (its metadata)."""

    dataset: str = _setting("cifar10", "cifar10, imagenette or synthetic")
    model: str = _setting("resnet18", "architecture (CIFAR variants or, for large inputs, any timm model)")
    mechanism: str = _setting("ST", "training mechanism (see `raystudy mechanisms`)")
    # Every magnitude of the mechanism (defaults filled in), as sorted (name, value) pairs (flag: --magnitude).
    magnitudes: tuple[tuple[str, float], ...] = ()
    epochs: int = _setting(200, "epochs")
    batch_size: int = _setting(128, "batch size (IR/JR magnitudes are rescaled from batch 128)")
    lr: float = _setting(0.1, "peak learning rate")
    momentum: float = _setting(0.9, "SGD momentum")
    weight_decay: float = _setting(1e-4, "weight decay (base SGD step only)")
    warmup_epochs: int = _setting(10, "linear warm-up epochs, then the schedule")
    schedule: str = _setting("cosine", "cosine decay to 0 per epoch, or constant", choices=SCHEDULES)
    precision: str = _setting("fp32", "fp32, or bf16 autocast (refused for AT, IR, JR)", choices=PRECISIONS)
    seed: int = _setting(0, "seed of weights, batches, augmentation and mechanisms")
    data_seed: int = _setting(0, "seed of the --n-train/--n-test subsets (the same for every trial)")
    deterministic: bool = _setting(False, "deterministic kernels (bit-exact resume on GPU; slower)")
    checkpoint_every: int = _setting(1, "epochs between resumable checkpoints")
    n_train: int | None = _setting(None, "seeded class-balanced training subset (default: the whole split)")
    n_test: int | None = _setting(None, "seeded class-balanced test subset (default: the whole split)")
    image_size: int = _setting(32, "image side of the synthetic dataset")
    pretrained: bool = _setting(False, "start from timm's ImageNet weights (ImageNette fine-tunes)")
    init_checkpoint: str | None = _setting(None, "start from this model file (LGV's fine-tuning)", flag="--init")
    snapshots_per_epoch: int = _setting(0, "models saved along each epoch (LGV's collection)")
    sam_bn: str = _setting(
        "both", "BN statistics updated by both SAM passes (published) or the first", choices=SAM_BN_PASSES
    )
    penalty_gradient: str = _setting(
        "exact",
        "parameter gradient of IR/JR/ER: exact double backprop (faithful) or finite_difference (fast)",
        choices=PENALTY_GRADIENTS,
    )
    data_path: str | None = field(  # where this machine keeps the data: not part of the run's identity
        default=None,
        compare=False,
        metadata={
            "help": "data folder (default: $RAYSTUDY_DATA, else download CIFAR-10)",
            "flag": "--data",
            "choices": (),
        },
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first, so that no comparison below meets a wrong one
            if f.name != "magnitudes":
                check_setting(f.name, getattr(self, f.name), ranges=False)
        _check_magnitudes(self.magnitudes)
        resolved, has_penalties, input_sensitive = _mechanism_facts(self.mechanism, self.magnitudes, self.dataset)
        object.__setattr__(self, "magnitudes", resolved)
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
        _check(self.sam_bn in SAM_BN_PASSES, "sam_bn", self.sam_bn, f"must be one of {', '.join(SAM_BN_PASSES)}")
        _check(
            self.penalty_gradient in PENALTY_GRADIENTS,
            "penalty_gradient",
            self.penalty_gradient,
            f"must be one of {', '.join(PENALTY_GRADIENTS)}",
        )
        if not has_penalties:
            # Nothing is differentiated twice: the record says so, whatever the preset's default.
            object.__setattr__(self, "penalty_gradient", "exact")
        _check(
            self.precision == "fp32" or self.penalty_gradient == "exact" or not has_penalties,
            "precision",
            self.precision,
            "would drown the finite differences of penalty_gradient=finite_difference in rounding: use fp32",
        )
        _check(
            self.precision == "fp32" or not input_sensitive,
            "precision",
            self.precision,
            f"would round away {self.mechanism}'s small input perturbations or input gradients: use fp32",
        )
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _check(self.data_seed >= 0, "data_seed", self.data_seed, "must be >= 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(self.snapshots_per_epoch >= 0, "snapshots_per_epoch", self.snapshots_per_epoch, "must be >= 0")
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, value, "must be >= 1")
        for key, limits in LIMITS.items():  # then the upper bounds (the lower ones were checked above)
            if getattr(self, key) is not None:
                limits.check(key, getattr(self, key))

    def shape(self) -> StepShape:
        """What the step does (adversary, penalties and how their gradient is taken, SAM), without
        building it: no torch."""
        return get_mechanism(self.mechanism).traits.step(self.penalty_gradient)

    def recipe(self):
        """The step's parts; the magnitudes were resolved and checked when this config was made."""
        from raystudy.mechanisms.finite_difference import with_penalty_gradient

        recipe = get_mechanism(self.mechanism).build(dict(self.magnitudes), grid_family(self.dataset))
        recipe = with_penalty_gradient(recipe, self.penalty_gradient)
        return dataclasses.replace(recipe, sam_bn_second_pass=self.sam_bn == "both")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (magnitudes as a mapping); `from_dict` reads it back."""
        # Every field is a plain value (magnitudes: pairs): a shallow copy, much cheaper than asdict
        # for the thousands of plans an analysis keys.
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "magnitudes": dict(self.magnitudes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RaystudyError(f"unknown training setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "magnitudes" in values:
            values["magnitudes"] = tuple((k, v) for k, v in _check_magnitudes(values["magnitudes"]).items())
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "TrainConfig":
        """The preset's recipe for the dataset's family, then `overrides` (None values ignored)."""
        if preset not in PRESETS:
            raise RaystudyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        base = dict(PRESETS[preset][grid_family(check_setting("dataset", overrides.get("dataset") or "cifar10"))])
        if overrides.get("epochs") is not None and overrides.get("warmup_epochs") is None:
            check_setting("epochs", overrides["epochs"])
            # A shorter run keeps the preset's warm-up fraction (10/200 faithful, 2/40 fast).
            base["warmup_epochs"] = base["warmup_epochs"] * overrides["epochs"] // base["epochs"]
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Names of the settings (except where the data lives) in which two configs differ."""
        return [
            f.name for f in dataclasses.fields(self) if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}  # "int | None", "str", ...


def check_setting(key: str, value: Any, ranges: bool = True) -> Any:
    """A training setting (any TrainConfig field but magnitudes) of the field's type and, with `ranges`,
    within its LIMITS (a study file's `train:` values; `raystudy train`'s flags use LIMITS too)."""
    kind, _, optional = _FIELD_TYPES[key].partition(" | ")
    if value is None and optional:
        return value
    if kind in ("int", "float"):
        return LIMITS[key].check(key, value) if ranges else LIMITS[key].check_kind(key, value)
    if kind == "bool":
        return check_flag(key, value)
    return check_text(key, value, MAX_TEXT if key in PATH_SETTINGS else MAX_NAME)


def _check_magnitudes(magnitudes: Any) -> dict[str, float]:
    """Magnitudes as {name: float}: names are text, values finite numbers (the mechanism checks ranges)."""
    try:
        values = dict(magnitudes)
    except (TypeError, ValueError):
        raise RaystudyError(f"magnitudes={show(magnitudes)} must map magnitude names to numbers") from None
    for name, value in values.items():
        FINITE.check(f"magnitude {check_text('magnitude', name)}", value)
    return {name: float(value) for name, value in values.items()}


def _mechanism_facts(mechanism: str, magnitudes: Any, dataset: str) -> tuple[tuple, bool, bool]:
    """(resolved magnitudes as sorted pairs, the recipe has penalties, the recipe is input-sensitive),
    checked; the same few settings recur across the thousands of plans an analysis validates."""
    return _mechanism_facts_of(mechanism, tuple(sorted(dict(magnitudes).items())), dataset)


@functools.lru_cache(maxsize=4096)
def _mechanism_facts_of(mechanism: str, magnitudes: tuple, dataset: str) -> tuple[tuple, bool, bool]:
    spec = get_mechanism(mechanism)
    resolved = spec.resolve(dict(magnitudes), dataset)
    shape = spec.traits.step("exact")
    return tuple(sorted(resolved.items())), shape.has_penalties, shape.input_sensitive


def check_model_name(name: str, input_size: int) -> None:
    """Raise the same error `build_model` would for an unknown name, without building anything."""
    if input_size <= CIFAR_MAX_INPUT:
        if name not in CIFAR_MODEL_NAMES:
            raise RaystudyError(
                f"unknown model {name!r} for {input_size}px inputs; known: {', '.join(CIFAR_MODEL_NAMES)}"
            )
        return
    import timm

    if not timm.is_model(name):
        raise RaystudyError(
            f"unknown model {name!r}: not a timm model (e.g. resnet50, vgg16, densenet121, mobilenetv2_100)"
        )


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise RaystudyError(f"{key}={value!r} {why}")
