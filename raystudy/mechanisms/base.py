"""What a training mechanism is, and the registry of them.

A mechanism (METHOD.md's table) combines three independent parts:
  * a batch transform  (x, y_soft) -> (x, y_soft): identity, mixup, cutmix, cutout;
  * loss terms on the (possibly adversarial) batch: cross-entropy with optional label smoothing,
    plus penalties (IR, JR, ER) that share the forward pass;
  * an update rule: SGD, or SAM wrapping it.
A `MechanismSpec` names its magnitude parameters (with METHOD.md's grids and defaults) and turns
their values into a `Recipe` of those parts; SAM&JR is a spec whose recipe has SAM and the JR
penalty, not a new class of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from raystudy.errors import RaystudyError

if TYPE_CHECKING:  # the specs and the registry need no torch: only a built recipe's parts do
    import torch
    from torch import nn

# How a penalty's parameter gradient is taken (raystudy/mechanisms/finite_difference.py).
PENALTY_GRADIENTS = ("exact", "finite_difference")

# Which magnitude grid a dataset uses: CIFAR-sized data the CIFAR-10 grid, ImageNette its own.
GRID_FAMILY = {"cifar10": "cifar10", "synthetic": "cifar10", "imagenette": "imagenette", "imagenet": "imagenette"}


class BatchTransform(Protocol):
    """(x, y_soft, partners) -> (x, y_soft); `partners()` draws a fresh, unmixed batch of the same
    size from the training set (mixup and cutmix mix with it; cutout ignores it)."""

    def __call__(
        self, x: torch.Tensor, y_soft: torch.Tensor, partners: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Adversary(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ForwardPass:
    """What a penalty sees of the step's forward pass: the model, its (possibly adversarial) input,
    the soft targets, the logits and the per-sample cross-entropy; `pattern` holds the pass's
    ReLU/max-pool/dropout decisions when a penalty takes finite differences around it."""

    model: nn.Module
    x: torch.Tensor
    y_soft: torch.Tensor
    logits: torch.Tensor
    ce: torch.Tensor
    pattern: Any = None  # an ActivationPattern, recorded during the forward pass


class Penalty(Protocol):
    """A loss term added to the mean cross-entropy, computed from the same forward pass.

    `needs_input_grad`: the input must require grad (the penalty differentiates with respect to it);
    `input_sensitive`: the penalty depends on small input perturbations or input gradients (no bf16);
    `holds_pattern`: the penalty runs a second forward pass that must replay the first's decisions;
    `double_backward`: its parameter gradient differentiates a gradient (create_graph=True).
    """

    name: str
    needs_input_grad: bool
    input_sensitive: bool
    holds_pattern: bool
    double_backward: bool

    def __call__(self, fwd: ForwardPass) -> torch.Tensor: ...


@dataclass(frozen=True)
class Recipe:
    """The parts of one training step; `None` means the part is absent."""

    transform: BatchTransform | None = None
    label_smoothing: float = 0.0
    adversary: Adversary | None = None
    penalties: tuple[Penalty, ...] = ()
    sam_rho: float | None = None
    # BatchNorm running statistics updated by SAM's second pass too (the published closure runs
    # both passes in train mode); False freezes them there, as davda54/sam's example does.
    sam_bn_second_pass: bool = True

    @property
    def takes_finite_differences(self) -> bool:
        """A penalty differences two nearby forward passes (penalty_gradient: finite_difference)."""
        return any(p.holds_pattern for p in self.penalties)

    @property
    def input_sensitive(self) -> bool:
        """The step depends on small input perturbations or input gradients (AT, IR, JR)."""
        return self.adversary is not None or any(p.input_sensitive for p in self.penalties)


@dataclass(frozen=True)
class StepShape:
    """What one training step of a recipe does, known without building it: what precision and
    memory planning ask (raystudy.core.precision, raystudy.budget.memory), and what validation checks."""

    adversary: bool
    has_penalties: bool
    input_sensitive: bool  # small input perturbations or input gradients (AT, IR, JR)
    takes_finite_differences: bool  # penalty_gradient: finite_difference
    double_backward: bool  # an exact penalty gradient differentiates a gradient
    sam: bool


@dataclass(frozen=True)
class Traits:
    """The parts a mechanism's recipe holds at any magnitude: an adversary, a penalty on input
    gradients ("input": IR, JR) or on weight gradients ("weight": ER), SAM, a batch transform.
    tests/test_mechanisms.py holds them against every built recipe."""

    adversary: bool = False
    penalty: str | None = None
    sam: bool = False
    transform: bool = False

    def step(self, penalty_gradient: str) -> StepShape:
        penalized = self.penalty is not None
        return StepShape(
            adversary=self.adversary,
            has_penalties=penalized,
            input_sensitive=self.adversary or self.penalty == "input",
            takes_finite_differences=penalized and penalty_gradient == "finite_difference",
            double_backward=penalized and penalty_gradient != "finite_difference",
            sam=self.sam,
        )


@dataclass(frozen=True)
class Param:
    """A magnitude parameter: its grids and defaults per dataset family, and its valid range."""

    name: str
    meaning: str
    grids: Mapping[str, tuple[float, ...]]
    defaults: Mapping[str, float]
    low: float
    high: float = float("inf")
    low_inclusive: bool = False
    integer: bool = False

    def check(self, value: float, mechanism: str) -> float:
        above_low = value >= self.low if self.low_inclusive else value > self.low
        if not (above_low and value <= self.high):
            bound = "[" if self.low_inclusive else "("
            raise RaystudyError(f"{mechanism}: {self.name}={value:g} is outside {bound}{self.low:g}, {self.high:g}]")
        if self.integer and value != int(value):
            raise RaystudyError(f"{mechanism}: {self.name} must be a whole number of pixels, got {value:g}")
        return float(value)


@dataclass(frozen=True)
class MechanismSpec:
    name: str
    summary: str
    params: tuple[Param, ...]
    build: Callable[[Mapping[str, float], str], Recipe] = field(repr=False)
    traits: Traits  # required: validation, precision and memory planning read it (no default to forget)
    # Magnitudes of the headline table's second row (augmentations at tau=5); empty if none.
    tau5: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def default_magnitudes(self, dataset: str) -> dict[str, float]:
        family = grid_family(dataset)
        return {p.name: p.defaults[family] for p in self.params}

    def resolve(self, magnitudes: Mapping[str, float] | None, dataset: str) -> dict[str, float]:
        """Defaults for the dataset overlaid with `magnitudes`, each checked; unknown names are errors."""
        values = self.default_magnitudes(dataset)
        known = {p.name: p for p in self.params}
        for name, value in (magnitudes or {}).items():
            if name not in known:
                valid = ", ".join(known) or "none"
                raise RaystudyError(f"{self.name} has no magnitude {name!r}; its magnitudes: {valid}")
            values[name] = known[name].check(float(value), self.name)
        return values

    def recipe(self, magnitudes: Mapping[str, float] | None, dataset: str) -> Recipe:
        return self.build(self.resolve(magnitudes, dataset), grid_family(dataset))


MECHANISMS: dict[str, MechanismSpec] = {}


def register(spec: MechanismSpec) -> MechanismSpec:
    if spec.name in MECHANISMS:
        raise ValueError(f"mechanism {spec.name!r} registered twice")
    MECHANISMS[spec.name] = spec
    return spec


def get_mechanism(name: str) -> MechanismSpec:
    if name not in MECHANISMS:
        raise RaystudyError(f"unknown mechanism {name!r}; valid: {', '.join(MECHANISMS)}")
    return MECHANISMS[name]


def grid_family(dataset: str) -> str:
    if dataset not in GRID_FAMILY:
        raise RaystudyError(f"unknown dataset {dataset!r}; known: {', '.join(GRID_FAMILY)}")
    return GRID_FAMILY[dataset]


def mechanism_label(mechanism: str, magnitudes: dict, dataset: str, lgv: bool = False) -> tuple[str, float]:
    """'MU τ=1' for augmentations on their grid, 'AT' at the default, 'AT (epsilon=0.1)' elsewhere."""
    spec = get_mechanism(mechanism)
    family = grid_family(dataset)
    tau = float("nan")
    if not spec.params or magnitudes == spec.default_magnitudes(dataset) and not spec.tau5:
        label = mechanism
    elif spec.tau5 and len(spec.params) == 1 and magnitudes[spec.params[0].name] in spec.params[0].grids[family]:
        tau = float(spec.params[0].grids[family].index(magnitudes[spec.params[0].name]) + 1)
        label = f"{mechanism} τ={int(tau)}"
    else:
        label = f"{mechanism} (" + ", ".join(f"{k}={v:g}" for k, v in magnitudes.items()) + ")"
    return (f"LGV-{label}" if lgv else label), tau


def parse_magnitudes(text: str | None, spec: MechanismSpec) -> dict[str, float]:
    """'0.1' for a one-parameter mechanism, or 'rho=0.1,lambda_jr=1e-4'."""
    if text is None or text.strip() == "":
        return {}
    pairs = [part.strip() for part in text.split(",") if part.strip()]
    if len(pairs) == 1 and "=" not in pairs[0]:
        if len(spec.params) != 1:
            names = ", ".join(p.name for p in spec.params) or "no magnitude"
            raise RaystudyError(f"{spec.name} takes {names}: write --magnitude name=value[,name=value]")
        pairs = [f"{spec.params[0].name}={pairs[0]}"]
    values = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:  # float("") also rejects a pair without "="
            values[name.strip()] = float(value)
        except ValueError:
            raise RaystudyError(f"magnitude {pair!r} is not name=number") from None
    return values
