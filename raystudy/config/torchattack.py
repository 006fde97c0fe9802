"""Transfer attacks from torchattack (the optional extra `torchattack`, pinned at TORCHATTACK_VERSION),
named in a study's evaluation as `torchattack/<Name>` (`torchattack/SSA`, `torchattack/BSR`, ...),
with their own options under `attack_options: {torchattack/SSA: {num_spectrum: 10}}`.

What each attack takes is written out here from torchattack's registry (`REGISTRY`; a test holds it
against the installed package), so a study file is validated without importing torch. Budget,
steps, step size and targeted mode come from the study's evaluation settings as for raystudy's own
attacks (raystudy.metrics.hook); the AEs are rounded to 8-bit pixels and measured the same way. In
metric names an attack is `torchattack.<Name>` (a metric's parts are separated by `/`).
"""

from __future__ import annotations

import math
from typing import Any

from raystudy.errors import RaystudyError

TORCHATTACK_VERSION = "1.7.2"
PREFIXES = ("torchattack/", "torchattack.")
CANONICAL = "torchattack."
# name -> (torchattack's category, whether it has a targeted mode, the options a study may give).
# The options raystudy sets itself are not among them (SET_BY_RAYSTUDY).
REGISTRY: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "ATT": ("GRADIENT_VIT", True, ("hook_cfg", "decay", "lambd")),
    "Admix": ("COMMON", True, ("decay", "portion", "size", "num_classes")),
    "BFA": ("COMMON", True, ("decay", "eta", "num_ens", "feature_layer_cfg", "num_classes")),
    "BIA": ("GENERATIVE", False, ("weights", "checkpoint_path")),
    "BPA": ("COMMON", True, ("hook_cfg", "decay")),
    "BSR": ("COMMON", True, ("decay", "num_scale", "num_block")),
    "CDA": ("GENERATIVE", False, ("weights", "checkpoint_path", "inception")),
    "DANAA": ("COMMON", False, ("decay", "num_ens", "scale", "lr", "feature_layer_cfg")),
    "DIFGSM": ("COMMON", True, ("decay", "resize_rate", "diversity_prob")),
    "DR": ("COMMON", False, ("decay", "feature_layer_cfg")),
    "DeCoWA": ("COMMON", True, ("decay", "mesh_width", "mesh_height", "rho", "num_warping", "noise_scale")),
    "DeepFool": ("NON_EPS", False, ("overshoot", "num_classes")),
    "FDA": ("COMMON", False, ("decay", "random_start")),
    "FGSM": ("COMMON", True, ()),
    "FIA": ("COMMON", False, ("decay", "num_ens", "feature_layer_cfg", "drop_rate")),
    "GAMA": ("GENERATIVE", False, ("weights", "checkpoint_path")),
    "GRA": ("COMMON", True, ("beta", "eta", "num_neighbors", "decay")),
    "GeoDA": ("NON_EPS", False, ("input_shape", "epsilon", "p", "max_queries", "sub_dim", "tol", "sigma", "mu")),
    "IFGSM": ("COMMON", True, ()),
    "ILPD": ("COMMON", False, ("decay", "sigma", "coef", "feature_layer_cfg")),
    "L2T": ("COMMON", True, ("decay", "num_scale")),
    "LTP": ("GENERATIVE", False, ("weights", "checkpoint_path", "inception")),
    "MIFGSM": ("COMMON", True, ("decay",)),
    "MIG": ("COMMON", True, ("decay", "s_factor")),
    "MuMoDIG": ("COMMON", False, ("decay", "n_trans", "n_base", "n_interpolate", "region_num", "lambd")),
    "NAA": ("COMMON", False, ("decay", "num_ens", "feature_layer_cfg")),
    "NIFGSM": ("COMMON", True, ("decay",)),
    "PGD": ("COMMON", True, ("random_start",)),
    "PGDL2": ("COMMON", True, ("random_start",)),
    "PNAPatchOut": ("GRADIENT_VIT", True, ("hook_cfg", "decay", "pna_skip", "pna_patchout")),
    "SGM": ("COMMON", True, ("hook_cfg", "decay", "gamma")),
    "SINIFGSM": ("COMMON", True, ("decay", "m")),
    "SSA": ("COMMON", True, ("decay", "num_spectrum", "rho")),
    "SSP": ("COMMON", True, ("ssp_layer",)),
    "TGR": ("GRADIENT_VIT", True, ("hook_cfg", "decay")),
    "TIFGSM": ("COMMON", True, ("decay", "kern_len", "n_sig")),
    "VDC": ("GRADIENT_VIT", True, ("hook_cfg", "decay", "sample_num_batches")),
    "VMIFGSM": ("COMMON", True, ("decay", "n", "beta")),
    "VNIFGSM": ("COMMON", True, ("decay", "n", "beta")),
}
# Set from the evaluation settings (eps, steps, alpha = step_size, targeted = the mode), the
# surrogate (model, normalize: raystudy's models normalize their own input) and the dataset.
SET_BY_RAYSTUDY = ("eps", "steps", "alpha", "targeted", "clip_min", "clip_max", "model", "normalize", "device")
FROM_DATASET = ("num_classes",)
# Why an attack cannot run on a raystudy surrogate: by category, then by name.
REFUSED_CATEGORIES = {
    "GENERATIVE": "a generative attack: it crafts with a pretrained generator, not with the surrogate",
    "NON_EPS": "not an attack within an L-inf budget",
    # Its hooks expect a bare timm ViT (`model.blocks`); raystudy's models wrap theirs in a
    # normalization layer first.
    "GRADIENT_VIT": "it hooks the blocks of a bare timm ViT, and raystudy's models put their input "
    "normalization in front of the network",
}
REFUSED = {
    "PGDL2": "an L2 attack (the study's budgets are L-inf)",
    "SGM": "it hooks torchvision's ResNet/DenseNet module names (relu, layerX.Y), which raystudy's models "
    "lack: its skip-gradient weighting would silently not apply",
    "BPA": "it hooks torchvision's ResNet module names, which raystudy's models lack",
    "SSP": "it downloads torchvision's pretrained VGG-16 as its feature extractor",
}
# Attacks that draw their noise or crops at 224 x 224: ImageNet-sized inputs only.
SIZE_224_ONLY = ("SSA", "L2T")
NEEDS_OPTION = {"feature_layer_cfg": "the name of one of the surrogate's layers (e.g. 1.4 for ResNet-8's second block)"}


# Gradients an attack takes per step, where it takes more than one (what `raystudy plan` prices
# it by): (its option or None, that option's default in TORCHATTACK_VERSION, gradients per unit of
# it, and per step besides). BSR, SSA, DeCoWA: one per transformed copy; L2T: per scale, two
# augmentations chained, each of which makes 5.8 copies on average over its 15 operations (up to
# 15): about 34 images per scale; Admix: `size` mixed images at 5 scales; VMI/VNI-FGSM and GRA:
# one more per neighbour sampled; SI-NI-FGSM: one per scale; MIG: one per interpolation point;
# FDA: the clean and the adversarial batch in one forward; MuMoDIG: (1 + n_trans) x n_base x
# n_interpolate (gradients_per_step); the feature-level attacks' aggregate gradient (num_ens
# gradients, once) is spread over a 10-step attack.
GRADIENTS_PER_STEP: dict[str, tuple[str | None, int, float, float]] = {
    "BSR": ("num_scale", 20, 1, 0),
    "SSA": ("num_spectrum", 20, 1, 0),
    "L2T": ("num_scale", 5, 34, 0),
    "DeCoWA": ("num_warping", 20, 1, 0),
    "Admix": ("size", 3, 5, 0),
    "VMIFGSM": ("n", 5, 1, 1),
    "VNIFGSM": ("n", 5, 1, 1),
    "GRA": ("num_neighbors", 20, 1, 1),
    "SINIFGSM": ("m", 3, 1, 0),
    "MIG": ("s_factor", 25, 1, 0),
    "FIA": ("num_ens", 30, 0.1, 1),
    "NAA": ("num_ens", 30, 0.1, 1),
    "DANAA": ("num_ens", 30, 0.1, 1),
    "BFA": ("num_ens", 30, 0.1, 1),
    "FDA": (None, 2, 1, 0),
}


# Attacks whose copies' graphs are all alive at once: sent through the model as one batch (BSR,
# Admix, MIG, FDA), or each scale's loss kept until one gradient of their mean (L2T). The others
# loop, one copy's graph at a time. One step then holds that many images' graphs per image
# (raystudy.budget.memory; tests/test_torchattack.py holds it against the batches the library sends).
ONE_FORWARD = frozenset({"BSR", "Admix", "MIG", "FDA", "L2T"})


# Memory needs a step's peak, not its mean: L2T draws two of its 98 augmentations per scale (1 to
# 15 copies each, 5.8 on average), so a step's five scales hold 170 images per image on average and
# 289 at the 95th percentile (uniform draws, where its search starts): 58 per scale, against 34.
PEAK_PER_UNIT = {"L2T": 58}


def images_per_forward(attack: str, options: dict[str, Any]) -> float:
    """Images per attacked image whose graphs one step of `attack` holds at once (1 for raystudy's
    own and for attacks that loop over their copies)."""
    if not is_torchattack(attack) or attack[len(CANONICAL) :] not in ONE_FORWARD:
        return 1.0
    name = attack[len(CANONICAL) :]
    return gradients_per_step(attack, options, per_unit=PEAK_PER_UNIT.get(name))


def gradients_per_step(attack: str, options: dict[str, Any], per_unit: float | None = None) -> float:
    """About how many surrogate gradients one step of `attack` takes (1 for raystudy's own)."""
    if not is_torchattack(attack):
        return 1.0
    name = attack[len(CANONICAL) :]
    if name == "MuMoDIG":  # integrated gradients over n_base x n_interpolate points, then n_trans times more
        n_trans, n_base, n_interpolate = (
            _number(options, k, d) for k, d in (("n_trans", 6), ("n_base", 1), ("n_interpolate", 1))
        )
        return (1 + n_trans) * n_base * n_interpolate
    if name not in GRADIENTS_PER_STEP:
        return 1.0
    option, default, unit, besides = GRADIENTS_PER_STEP[name]
    value = _number(options, option, default) if option else default
    return float(value) * (unit if per_unit is None else per_unit) + besides


def _number(options: dict[str, Any], key: str, default: float) -> float:
    """An option's number, its default where it is not one (a wrong type is refused by a trial step)."""
    value = options.get(key, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float(default)


def is_torchattack(attack: str) -> bool:
    return attack.startswith(PREFIXES)


def canonical(attack: str) -> str:
    """`torchattack/SSA` or `torchattack.SSA` -> `torchattack.SSA` (one line if the name is unknown)."""
    name = attack[len("torchattack/") :]
    if name not in REGISTRY:
        raise RaystudyError(f"unknown torchattack attack {name!r}; valid: {', '.join(sorted(REGISTRY, key=str.lower))}")
    return CANONICAL + name


def check_attack(attack: str, options: dict[str, Any], input_size: int | None = None, ensembles: bool = False) -> None:
    """One line where the attack cannot run on surrogates of `input_size` pixels (None: not known
    yet; `ensembles`: LGV ensembles among them) with these options. What only running it shows (a
    layer name, an option's type or range) raystudy.metrics.attacks.check_torchattack_runs finds."""
    name = attack[len(CANONICAL) :]
    category, _, accepted = REGISTRY[name]
    why = REFUSED_CATEGORIES.get(category) or REFUSED.get(name)
    if why:
        raise RaystudyError(f"attack {attack} cannot run here: {why}")
    if name in SIZE_224_ONLY and input_size not in (None, 224):
        raise RaystudyError(
            f"attack {attack} draws its noise at 224 x 224 pixels (torchattack {TORCHATTACK_VERSION}): "
            f"it cannot attack {input_size}-pixel images"
        )
    unknown = sorted(set(options) - (set(accepted) - set(FROM_DATASET)))
    if unknown:
        raystudy_sets = [k for k in unknown if k in SET_BY_RAYSTUDY + FROM_DATASET]
        hint = f" ({', '.join(raystudy_sets)}: from the evaluation settings and the data)" if raystudy_sets else ""
        valid = ", ".join(o for o in accepted if o not in FROM_DATASET) or "none"
        raise RaystudyError(f"attack {attack}: unknown option(s) {', '.join(unknown)}{hint}; valid: {valid}")
    for option, what in NEEDS_OPTION.items():
        if option in accepted and not options.get(option):
            raise RaystudyError(f"attack {attack} needs the option {option}: {what}")
        if option in accepted and ensembles:
            raise RaystudyError(f"attack {attack} names a layer of one model: it cannot attack an LGV ensemble")
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, (int, float, str, bool)):
            raise RaystudyError(f"attack {attack}: option {key}={value!r} must be a number, text or true/false")
        if isinstance(value, float) and not math.isfinite(value):
            raise RaystudyError(f"attack {attack}: option {key}={value!r} must be a finite number")


def has_targeted_mode(attack: str) -> bool:
    return REGISTRY[attack[len(CANONICAL) :]][1]
