"""Plain training (ST) and label smoothing (LS): cross-entropy against (smoothed) one-hot targets."""

from __future__ import annotations

from raystudy.mechanisms.base import MechanismSpec, Param, Recipe, register

SMOOTHING = Param(
    "p",
    "label-smoothing mass moved off the true class",
    grids={"cifar10": (0.1, 0.2, 0.3, 0.4, 0.5), "imagenette": (0.1, 0.2, 0.3, 0.4, 0.5)},
    defaults={"cifar10": 0.1, "imagenette": 0.1},
    low=0.0,
    high=0.999,
    low_inclusive=True,
)

register(MechanismSpec("ST", "plain cross-entropy", (), lambda m, family: Recipe()))
register(
    MechanismSpec(
        "LS",
        "label smoothing: 1-p on the label, p/(m-1) on each other class",
        (SMOOTHING,),
        lambda m, family: Recipe(label_smoothing=m["p"]),
        tau5={"cifar10": {"p": 0.5}, "imagenette": {"p": 0.5}},
    )
)
