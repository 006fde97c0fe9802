"""What the trial-end hook measures: the typed, frozen evaluation settings (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raystudy.config.defense import defense_name, parse_defense
from raystudy.config.torchattack import canonical, check_attack, is_torchattack
from raystudy.config.train import MAX_SEED, Range, check_flag, check_text, show
from raystudy.errors import RaystudyError, require_extra

ATTACKS = ("pgd", "mi", "di", "dim", "autoattack")
# The iterative attacks' loss: cross-entropy (METHOD.md, the published code) or the logit loss of
# the targeted-transfer literature (Zhao et al. 2021: the target class's logit, raised).
LOSSES = ("ce", "logit")
MAX_DEFENSES = 16
MODES = ("untargeted", "targeted")
TARGET_CLASS_RULES = ("random", "next")
PIXEL = 1 / 255
# Power iteration for smoothness: iterations, and the relative change at which a sample has converged.
DEFAULT_ITERATIONS = 20
DEFAULT_TOLERANCE = 1e-3
# Smoothness estimators: power iteration (the dominant eigenvalue, stopping early) or Lanczos (the
# largest eigenvalue from a Krylov basis of LANCZOS_ITERATIONS Hessian-vector products, as the
# published code's ARPACK call computes it).
SMOOTHNESS_METHODS = ("power", "lanczos")
LANCZOS_ITERATIONS = 40
MAX_IMAGES = 100_000  # evaluation images (ImageNet's validation split has 50,000)
# What a study file may give each numeric setting (None, where a field allows it, is checked apart).
LIMITS: dict[str, Range] = {
    "n_eval": Range(1, MAX_IMAGES),
    "seed": Range(0, MAX_SEED),
    "steps": Range(1, 10_000),
    "step_size": Range(0, 1, whole=False, open_low=True),  # in [0, 1] pixel units (2/255 by default)
    "smoothness_samples": Range(1, MAX_IMAGES),
    "power_iterations": Range(1, 10_000),
    "power_tolerance": Range(0, 1, whole=False),
    "batch_size": Range(1, 65_536),
    "autoattack_steps": Range(1, 10_000),
    "targeted_steps": Range(1, 10_000),
    "lanczos_iterations": Range(2, 1_000),
}


@dataclass(frozen=True)
class EvalConfig:
    n_eval: int | None = 1000  # images of the test set (seeded, class-balanced); None = all
    seed: int = 0  # the subset, the targeted classes, random starts, power iteration
    budgets: tuple[int, ...] = (4, 8, 16)  # L-inf budgets in 1/255 units
    attacks: tuple[str, ...] = ("pgd",)
    modes: tuple[str, ...] = MODES
    steps: int = 20
    step_size: float = 2 * PIXEL
    random_start: bool = False
    target_classes: str = "random"  # random (fixed, seeded, != y) or next ((y+1) mod m, the published code)
    smoothness_samples: int | None = None  # None = every evaluation image
    power_iterations: int = DEFAULT_ITERATIONS
    power_tolerance: float = DEFAULT_TOLERANCE
    smoothness_method: str = "power"  # SMOOTHNESS_METHODS
    lanczos_iterations: int = LANCZOS_ITERATIONS
    batch_size: int = 250
    autoattack_steps: int = 100  # the reference setting; fewer only for quick checks
    loss: str = "ce"  # the iterative attacks' loss (LOSSES)
    targeted_steps: int | None = None  # targeted attacks' steps (None: `steps`); the logit loss is run ~300
    # Input-transformation defenses (raystudy.config.defense): each target is also measured through each.
    defenses: tuple[str, ...] = ()
    # torchattack's attacks' own options (raystudy.config.torchattack), per attack: ((attack, ((k, v), ...)), ...)
    attack_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def steps_for(self, mode: str) -> int:
        """The iterative attacks' steps in this mode."""
        return self.targeted_steps if mode == "targeted" and self.targeted_steps is not None else self.steps

    def check_installed(self) -> None:
        """Refuse, before anything runs, an attack whose optional package is missing (reading an
        experiment that used it needs no package: this is not part of validation)."""
        if "autoattack" in self.attacks:
            require_extra("torchattacks", "autoattack", "the attack autoattack")
        for attack in filter(is_torchattack, self.attacks):
            require_extra("torchattack", "torchattack", f"the attack {attack}")

    def options_of(self, attack: str) -> dict[str, Any]:
        """A torchattack attack's own options, as the study gave them."""
        return dict(dict(self.attack_options).get(attack, ()))

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "attacks", tuple(canonical(a) if is_torchattack(a) else a for a in self.attacks))
        bad = [a for a in self.attacks if a not in ATTACKS and not is_torchattack(a)]
        if bad or not self.attacks:
            raise RaystudyError(
                f"unknown attack(s) {', '.join(bad) or '(none)'}; known: {', '.join(ATTACKS)}, "
                "or torchattack/<Name> (the extra torchattack)"
            )
        self._check_attack_options()
        if not self.modes or any(m not in MODES for m in self.modes):
            raise RaystudyError(f"modes {self.modes!r}: each must be one of {', '.join(MODES)}")
        whole = all(isinstance(b, int) and not isinstance(b, bool) for b in self.budgets)
        if not self.budgets or not whole or any(not 0 < b <= 255 for b in self.budgets):
            raise RaystudyError(f"budgets {self.budgets!r} must be whole numbers of 1/255 in (0, 255]")
        if self.target_classes not in TARGET_CLASS_RULES:
            raise RaystudyError(f"target_classes={self.target_classes!r}; known: {', '.join(TARGET_CLASS_RULES)}")
        if self.smoothness_method not in SMOOTHNESS_METHODS:
            raise RaystudyError(f"smoothness method {self.smoothness_method!r}; known: {', '.join(SMOOTHNESS_METHODS)}")
        if self.loss not in LOSSES:
            raise RaystudyError(f"loss={self.loss!r}; known: {', '.join(LOSSES)}")
        self._check_defenses()
        for key in ("n_eval", "smoothness_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise RaystudyError(f"{key}={getattr(self, key)} must be >= 1")
        if self.steps < 1 or self.batch_size < 1 or self.power_iterations < 1:
            raise RaystudyError("steps, batch_size and power_iterations must be >= 1")
        for key, limits in LIMITS.items():  # then every bound (the messages above name the common mistakes)
            if getattr(self, key) is not None:
                limits.check(key, getattr(self, key))
        for key in ("budgets", "attacks", "modes"):
            if len(set(getattr(self, key))) != len(getattr(self, key)):
                raise RaystudyError(f"{key}={show(list(getattr(self, key)))} lists a value twice")

    def _check_attack_options(self) -> None:
        """Options only for torchattack's attacks in `attacks`, each valid for its attack; stored as
        sorted pairs. Such an attack takes the cross-entropy of its own implementation."""
        given = self.attack_options
        if isinstance(given, dict):
            given = tuple(given.items())
        shape = "attack_options must map attacks to their options ({torchattack/BSR: {num_scale: 20}})"
        if not isinstance(given, (tuple, list)) or not all(isinstance(g, tuple) and len(g) == 2 for g in given):
            raise RaystudyError(shape)
        resolved = {}
        for attack, options in given:
            name = canonical(attack) if isinstance(attack, str) and is_torchattack(attack) else attack
            if name not in self.attacks or not is_torchattack(name):
                raise RaystudyError(
                    f"attack_options: {attack!r} is not one of the evaluation's torchattack attacks "
                    "(raystudy's own take steps, step_size, random_start and loss from the evaluation)"
                )
            try:
                options = dict(options) if isinstance(options, (dict, tuple)) else None
            except (TypeError, ValueError):
                options = None
            if options is None:
                raise RaystudyError(f"attack_options: {attack}: its options must be a mapping")
            if name in resolved:
                raise RaystudyError(f"attack_options: {attack} is given twice")
            check_attack(name, options)
            resolved[name] = tuple(sorted(options.items()))
        for name in filter(is_torchattack, self.attacks):
            if name not in resolved:
                check_attack(name, {})
        if self.loss != "ce" and any(map(is_torchattack, self.attacks)):
            raise RaystudyError(f"loss: {self.loss} is raystudy's attacks' option; torchattack's use their own loss")
        object.__setattr__(self, "attack_options", tuple(sorted(resolved.items())))

    def _check_defenses(self) -> None:
        """Each defense valid, written as its canonical name (the target columns' suffix), once."""
        if not isinstance(self.defenses, (tuple, list)) or len(self.defenses) > MAX_DEFENSES:
            raise RaystudyError(f"defenses must be a list of at most {MAX_DEFENSES} defenses (jpeg:75, bits:4, ...)")
        names = tuple(defense_name(parse_defense(d)) for d in self.defenses)
        if len(set(names)) != len(names):
            raise RaystudyError(f"defenses={show(list(self.defenses))} lists a defense twice")
        object.__setattr__(self, "defenses", names)

    def _check_types(self) -> None:
        """Every field of its type, before any comparison meets a wrong one."""
        for key, limits in LIMITS.items():
            if getattr(self, key) is not None or key not in ("n_eval", "smoothness_samples", "targeted_steps"):
                limits.check_kind(key, getattr(self, key))
        for key in ("budgets", "attacks", "modes"):
            if not isinstance(getattr(self, key), (tuple, list)):
                raise RaystudyError(f"{key}={show(getattr(self, key))} must be a list")
        for key in ("attacks", "modes"):
            for value in getattr(self, key):
                check_text(key, value)
        check_text("target_classes", self.target_classes)
        check_text("loss", self.loss)
        check_text("smoothness_method", self.smoothness_method)
        check_flag("random_start", self.random_start)
