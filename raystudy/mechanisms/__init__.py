"""Training mechanisms: every entry of METHOD.md's table, registered by name.

from raystudy.mechanisms import get_mechanism
recipe = get_mechanism("SAM&JR").recipe({"rho": 0.1, "lambda_jr": 1e-4}, "cifar10")
"""

from raystudy.mechanisms import adversarial, augmentation, gradient_norms, sam, standard  # noqa: F401 (registers)
from raystudy.mechanisms.base import (
    MECHANISMS,
    MechanismSpec,
    Param,
    Recipe,
    get_mechanism,
    mechanism_label,
    parse_magnitudes,
)
from raystudy.mechanisms.step import objective, soft_cross_entropy, soft_targets, training_step

# METHOD.md's order, for listings and tables.
ORDER = ("ST", "MU", "CM", "CO", "LS", "AT", "IR", "JR", "ER", "SAM", "SAM&IR", "SAM&JR")
assert set(ORDER) == set(MECHANISMS), "every registered mechanism needs a place in ORDER"
_registered = dict(MECHANISMS)
MECHANISMS.clear()
MECHANISMS.update((name, _registered[name]) for name in ORDER)

__all__ = [
    "MECHANISMS",
    "MechanismSpec",
    "Param",
    "Recipe",
    "get_mechanism",
    "mechanism_label",
    "parse_magnitudes",
    "objective",
    "soft_cross_entropy",
    "soft_targets",
    "training_step",
]
