"""Training mechanisms: every entry of METHOD.md's table, registered by name.

from raystudy.mechanisms import get_mechanism
recipe = get_mechanism("SAM&JR").recipe({"rho": 0.1, "lambda_jr": 1e-4}, "cifar10")

The specs and the registry (raystudy/mechanisms/specs.py) import no torch: validation, plans and
analysis read them alone. The training step and the recipes' parts import it when used.
"""

from raystudy.mechanisms import specs  # noqa: F401 (registers)
from raystudy.mechanisms.base import (
    MECHANISMS,
    PENALTY_GRADIENTS,
    MechanismSpec,
    Param,
    Recipe,
    StepShape,
    Traits,
    get_mechanism,
    mechanism_label,
    parse_magnitudes,
)

# METHOD.md's order, for listings and tables: specs.py registers them in it (tests/test_mechanisms.py).
ORDER = ("ST", "MU", "CM", "CO", "LS", "AT", "IR", "JR", "ER", "SAM", "SAM&IR", "SAM&JR")

_STEP = ("objective", "soft_cross_entropy", "soft_targets", "training_step")


def __getattr__(name: str):
    """The training step's functions (raystudy/mechanisms/step.py, torch), imported when first used."""
    if name in _STEP:
        from raystudy.mechanisms import step

        return getattr(step, name)
    raise AttributeError(f"module 'raystudy.mechanisms' has no attribute {name!r}")


__all__ = [
    "MECHANISMS",
    "ORDER",
    "PENALTY_GRADIENTS",
    "MechanismSpec",
    "Param",
    "Recipe",
    "StepShape",
    "Traits",
    "get_mechanism",
    "mechanism_label",
    "parse_magnitudes",
    *_STEP,
]
