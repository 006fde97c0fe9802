"""Every mechanism of METHOD.md's table, registered by name: its magnitudes (grids, defaults, ranges),
what its recipe holds (`Traits`), and how to build that recipe.

No torch here: validating a study, planning it and analysing its records read these specs alone;
a recipe's parts (raystudy/mechanisms/adversarial.py, augmentation.py, gradient_norms.py, sam.py)
are imported when a recipe is built to train. A new mechanism is one `register(MechanismSpec(...))`
here and, if it needs a new part, one small module beside this one.
"""

from __future__ import annotations

from raystudy.mechanisms.base import MechanismSpec, Param, Recipe, Traits, register

# --- ST and LS: cross-entropy against (smoothed) one-hot targets (registered in METHOD.md's order) ---

SMOOTHING = Param(
    "p",
    "label-smoothing mass moved off the true class",
    grids={"cifar10": (0.1, 0.2, 0.3, 0.4, 0.5), "imagenette": (0.1, 0.2, 0.3, 0.4, 0.5)},
    defaults={"cifar10": 0.1, "imagenette": 0.1},
    low=0.0,
    high=0.999,
    low_inclusive=True,
)

register(MechanismSpec("ST", "plain cross-entropy", (), lambda m, family: Recipe(), Traits()))

# --- MU, CM, CO: batch transforms (raystudy/mechanisms/augmentation.py) -----------------------------

PROBABILITY_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


def _probability(meaning: str) -> Param:
    return Param(
        "p",
        meaning,
        grids={"cifar10": PROBABILITY_GRID, "imagenette": PROBABILITY_GRID},
        defaults={"cifar10": 0.1, "imagenette": 0.1},
        low=0.0,
        high=1.0,
        low_inclusive=True,
    )


CUTOUT_SIZE = Param(
    "size",
    "cutout square side in pixels (at most)",
    grids={"cifar10": (8, 12, 16, 20, 24), "imagenette": (80, 100, 120, 140, 160)},
    defaults={"cifar10": 8, "imagenette": 80},
    low=0.0,
    integer=True,
)


def _transform(kind: str, value: float) -> Recipe:
    from raystudy.mechanisms import augmentation

    return Recipe(transform=getattr(augmentation, kind)(value))


register(
    MechanismSpec(
        "MU",
        "mixup with a fresh partner, probability p per sample (2 rounds)",
        (_probability("mixup probability per sample"),),
        lambda m, family: _transform("Mixup", m["p"]),
        Traits(transform=True),
        tau5={"cifar10": {"p": 0.9}, "imagenette": {"p": 0.9}},
    )
)
register(
    MechanismSpec(
        "CM",
        "cutmix with a fresh partner, probability p per sample (2 rounds)",
        (_probability("cutmix probability per sample"),),
        lambda m, family: _transform("CutMix", m["p"]),
        Traits(transform=True),
        tau5={"cifar10": {"p": 0.9}, "imagenette": {"p": 0.9}},
    )
)
register(
    MechanismSpec(
        "CO",
        "cutout of a random square of side up to M",
        (CUTOUT_SIZE,),
        lambda m, family: _transform("Cutout", int(m["size"])),
        Traits(transform=True),
        tau5={"cifar10": {"size": 24}, "imagenette": {"size": 160}},
    )
)

register(
    MechanismSpec(
        "LS",
        "label smoothing: 1-p on the label, p/(m-1) on each other class",
        (SMOOTHING,),
        lambda m, family: Recipe(label_smoothing=m["p"]),
        Traits(),
        tau5={"cifar10": {"p": 0.5}, "imagenette": {"p": 0.5}},
    )
)


# --- AT: adversarial training on L2 PGD examples (raystudy/mechanisms/adversarial.py) ---------------

EPSILON = Param(
    "epsilon",
    "L2 radius of the training perturbation ([0,1] pixels)",
    grids={"cifar10": (0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0), "imagenette": (0.05, 0.1, 0.2, 0.5, 1.0, 3.0, 5.0)},
    defaults={"cifar10": 0.03, "imagenette": 1.0},
    low=0.0,
)
# (steps, step size as a fraction of epsilon) per grid family, as in METHOD.md.
PGD_SCHEDULE = {"cifar10": (10, 0.25), "imagenette": (5, 0.4)}


def _adversarial(m, family: str) -> Recipe:
    from raystudy.mechanisms.adversarial import L2PGD

    steps, fraction = PGD_SCHEDULE[family]
    return Recipe(adversary=L2PGD(m["epsilon"], steps, fraction * m["epsilon"]))


register(
    MechanismSpec(
        "AT",
        "adversarial training on L2 PGD examples (adversarial batch only)",
        (EPSILON,),
        _adversarial,
        Traits(adversary=True),
    )
)

# --- IR, JR, ER: gradient-norm penalties (raystudy/mechanisms/gradient_norms.py) --------------------

LAMBDA_IR = Param(
    "lambda_ir",
    "IR weight on the input-gradient norm",
    grids={"cifar10": (0.1, 0.3, 0.5, 0.7, 1.0), "imagenette": (0.1, 0.5, 1.0, 1.5, 2.0)},
    defaults={"cifar10": 0.5, "imagenette": 1.0},
    low=0.0,
    low_inclusive=True,
)
LAMBDA_JR = Param(
    "lambda_jr",
    "JR weight on the input-Jacobian norm",
    grids={"cifar10": (1e-5, 1e-4, 0.01, 0.05, 0.1), "imagenette": (0.001, 0.01, 0.1, 0.5, 1.0)},
    defaults={"cifar10": 1e-4, "imagenette": 0.1},
    low=0.0,
    low_inclusive=True,
)
LAMBDA_ER = Param(
    "lambda_er",
    "ER weight on the squared weight-gradient norm",
    grids={"cifar10": (1e-3, 5e-3, 0.01, 0.05, 0.1), "imagenette": (0.05, 0.3, 0.5, 0.7, 1.0)},
    defaults={"cifar10": 0.05, "imagenette": 0.05},
    low=0.0,
    low_inclusive=True,
)


def _penalized(kind: str, weight: float, sam_rho: float | None = None) -> Recipe:
    from raystudy.mechanisms import gradient_norms

    return Recipe(penalties=(getattr(gradient_norms, kind)(weight),), sam_rho=sam_rho)


register(
    MechanismSpec(
        "IR",
        "input-gradient regularization: + lambda * ||grad_x CE||_2",
        (LAMBDA_IR,),
        lambda m, family: _penalized("InputGradientNorm", m["lambda_ir"]),
        Traits(penalty="input"),
    )
)
register(
    MechanismSpec(
        "JR",
        "input-Jacobian regularization: + lambda * R, R ~ 1/2 ||J||_F^2 by random projection",
        (LAMBDA_JR,),
        lambda m, family: _penalized("InputJacobianNorm", m["lambda_jr"]),
        Traits(penalty="input"),
    )
)
register(
    MechanismSpec(
        "ER",
        "weight-gradient (flatness) regularization: + lambda/2 * ||grad_theta CE||^2",
        (LAMBDA_ER,),
        lambda m, family: _penalized("WeightGradientNorm", m["lambda_er"]),
        Traits(penalty="weight"),
    )
)

# --- SAM and its combinations: an update rule (raystudy/mechanisms/sam.py) --------------------------

RHO = Param(
    "rho",
    "SAM neighbourhood radius",
    grids={"cifar10": (0.01, 0.05, 0.1, 0.15, 0.2), "imagenette": (0.2, 0.5, 1.0, 2.0, 3.0)},
    defaults={"cifar10": 0.1, "imagenette": 0.2},
    low=0.0,
)

register(
    MechanismSpec(
        "SAM",
        "sharpness-aware minimization with radius rho",
        (RHO,),
        lambda m, family: Recipe(sam_rho=m["rho"]),
        Traits(sam=True),
    )
)
register(
    MechanismSpec(
        "SAM&IR",
        "SAM whose inner loss is the IR loss",
        (RHO, LAMBDA_IR),
        lambda m, family: _penalized("InputGradientNorm", m["lambda_ir"], sam_rho=m["rho"]),
        Traits(penalty="input", sam=True),
    )
)
register(
    MechanismSpec(
        "SAM&JR",
        "SAM whose inner loss is the JR loss",
        (RHO, LAMBDA_JR),
        lambda m, family: _penalized("InputJacobianNorm", m["lambda_jr"], sam_rho=m["rho"]),
        Traits(penalty="input", sam=True),
    )
)
