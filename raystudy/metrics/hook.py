"""The trial-end hook: every metric of a trained surrogate against its targets, as flat names.

Metric names (budgets are in 1/255 units, e.g. `8` = 8/255; `<t>` is a target's name):
    acc, acc/<t>                        clean accuracy on the evaluation set
    smoothness/mean, smoothness/max     |dominant input-Hessian eigenvalue| over the sample
    similarity/<t>, similarity/mean     mean per-sample gradient cosine (per target, over targets)
    similarity_min/<t>                  its minimum over the sample
    asr/<attack>/<mode>/<budget>/<t>    Definition 3 ASR (samples both models get right); and /mean
    asr_all/<attack>/<mode>/<budget>/<t> the published code's ASR over all samples; and /mean
    support/<t>                         samples both the surrogate and <t> classify correctly
    fooling/<attack>/<mode>/<budget>    fraction of AEs that fool the surrogate itself
    seconds/<part>                      wall time of each part (accuracy, smoothness, similarity, <attack>)
with <attack> in pgd, mi, di, dim, autoattack and <mode> in untargeted, targeted (AutoAttack is
untargeted only). An `Ensemble` surrogate (LGV) is attacked one member per iteration, cycling in
a shuffled order, and measured (accuracy, smoothness, similarity) through its mean logits.
No Ray here: the trainable calls this and reports the dict.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from raystudy.data import Split, balanced_subset
from raystudy.errors import RaystudyError
from raystudy.metrics.asr import fooling_rate, transfer_success
from raystudy.metrics.attacks import ATTACKS, PIXEL, autoattack, make_attack
from raystudy.metrics.similarity import gradient_cosine, input_gradients
from raystudy.metrics.smoothness import DEFAULT_ITERATIONS, DEFAULT_TOLERANCE, smoothness
from raystudy.models import Ensemble, eval_mode

MODES = ("untargeted", "targeted")
TARGET_CLASS_RULES = ("random", "next")


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
    batch_size: int = 250
    autoattack_steps: int = 100  # the reference setting; fewer only for quick checks

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks:
            raise RaystudyError(f"unknown attack(s) {', '.join(bad) or '(none)'}; known: {', '.join(ATTACKS)}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise RaystudyError(f"modes {self.modes!r}: each must be one of {', '.join(MODES)}")
        if not self.budgets or any(not 0 < b <= 255 for b in self.budgets):
            raise RaystudyError(f"budgets {self.budgets!r} must be whole numbers of 1/255 in (0, 255]")
        if self.target_classes not in TARGET_CLASS_RULES:
            raise RaystudyError(f"target_classes={self.target_classes!r}; known: {', '.join(TARGET_CLASS_RULES)}")
        for key in ("n_eval", "smoothness_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise RaystudyError(f"{key}={getattr(self, key)} must be >= 1")
        if self.steps < 1 or self.batch_size < 1 or self.power_iterations < 1:
            raise RaystudyError("steps, batch_size and power_iterations must be >= 1")


@dataclass(frozen=True)
class EvalSet:
    """The fixed evaluation images of a study: which test images, their labels and attack targets."""

    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    target_classes: torch.Tensor  # int64 (N,), != labels
    indices: np.ndarray  # positions in the test split (recorded with the experiment)

    def to(self, device) -> "EvalSet":
        return EvalSet(self.images.to(device), self.labels.to(device), self.target_classes.to(device), self.indices)


def make_eval_set(test: Split, num_classes: int, config: EvalConfig) -> EvalSet:
    """The same images and target classes for every trial that uses the same config.seed."""
    n = config.n_eval if config.n_eval is not None and config.n_eval < len(test) else None
    indices = balanced_subset(test.labels, n, config.seed) if n else np.arange(len(test))
    # A seeded random order: the archives are sorted by class, and smoothness uses a prefix.
    indices = np.random.default_rng(config.seed).permutation(indices)
    subset = test.subset(indices)
    labels = subset.labels.cpu()
    if config.target_classes == "next":
        targets = (labels + 1) % num_classes
    else:  # uniform over the other classes: y + U{1..m-1} mod m
        offsets = torch.randint(1, num_classes, labels.shape, generator=torch.Generator().manual_seed(config.seed + 7))
        targets = (labels + offsets) % num_classes
    return EvalSet(subset.images.cpu(), labels, targets, indices)


def _batches(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _predict(model: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s]).argmax(1) for s in _batches(len(x), size)])


def evaluate_surrogate(
    surrogate: nn.Module,
    targets: Mapping[str, nn.Module],
    eval_data: EvalSet,
    config: EvalConfig,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Every documented metric of `surrogate` against `targets` on `eval_data` (see the module doc)."""
    if "mean" in targets:
        raise RaystudyError("a target may not be called 'mean' (it names the mean over targets)")
    device = next(surrogate.parameters()).device
    data = eval_data.to(device)
    with eval_mode(surrogate), eval_mode(*targets.values(), frozen=True):
        return _evaluate(surrogate, targets, data, config, log)


def _evaluate(surrogate, targets, data: EvalSet, config: EvalConfig, log) -> dict[str, float]:
    x, y, goal = data.images.float() / 255, data.labels, data.target_classes
    metrics: dict[str, float] = {}
    clock = lambda part: _timed(metrics, part, log)  # noqa: E731

    with clock("accuracy"):
        clean = {"surrogate": _predict(surrogate, x, config.batch_size)}
        clean.update({name: _predict(m, x, config.batch_size) for name, m in targets.items()})
        metrics["acc"] = float((clean["surrogate"] == y).float().mean())
        metrics.update({f"acc/{name}": float((clean[name] == y).float().mean()) for name in targets})
    with clock("smoothness"):
        k = min(config.smoothness_samples or len(x), len(x))
        values = smoothness(
            surrogate, x[:k], y[:k], config.batch_size, config.power_iterations, config.power_tolerance, config.seed
        )
        metrics["smoothness/mean"], metrics["smoothness/max"] = float(values.mean()), float(values.max())
    with clock("similarity"):
        metrics.update(_similarities(surrogate, targets, x, y, config.batch_size))
    for attack in config.attacks:
        with clock(attack):
            for mode in config.modes:
                if attack == "autoattack" and mode == "targeted":
                    continue  # AutoAttack's targeted parts still aim at misclassification
                for budget in config.budgets:
                    metrics.update(
                        _transfer(
                            surrogate,
                            targets,
                            x,
                            y,
                            goal if mode == "targeted" else None,
                            attack,
                            mode,
                            budget,
                            clean,
                            config,
                        )
                    )
    return metrics


def _similarities(surrogate, targets, x, y, size) -> dict[str, float]:
    cosines: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    for s in _batches(len(x), size):
        surrogate_grads = input_gradients(surrogate, x[s], y[s])
        for name, target in targets.items():
            cosines[name].append(gradient_cosine(surrogate_grads, input_gradients(target, x[s], y[s])))
    out = {}
    for name, parts in cosines.items():
        values = torch.cat(parts)
        out[f"similarity/{name}"], out[f"similarity_min/{name}"] = float(values.mean()), float(values.min())
    out["similarity/mean"] = float(np.mean([out[f"similarity/{n}"] for n in targets])) if targets else float("nan")
    return out


def _craft(surrogate, x, y, goal, attack, budget, config, generator) -> torch.Tensor:
    eps = budget * PIXEL
    if attack == "autoattack":
        with torch.no_grad():
            num_classes = surrogate(x[:1]).shape[1]
        return torch.cat(
            [
                autoattack(surrogate, x[s], y[s], eps, num_classes, config.seed, config.autoattack_steps)
                for s in _batches(len(x), config.batch_size)
            ]
        )
    crafter = make_attack(attack, eps, config.steps, config.step_size, config.random_start)
    models = list(surrogate.members) if isinstance(surrogate, Ensemble) else surrogate  # LGV: one member per step
    return torch.cat(
        [
            crafter(models, x[s], y[s], None if goal is None else goal[s], generator)
            for s in _batches(len(x), config.batch_size)
        ]
    )


def quick_transfer_asr(
    surrogate: nn.Module, targets: Mapping[str, nn.Module], eval_data: EvalSet, config: EvalConfig, budget: int = 8
) -> float:
    """Mean untargeted PGD ASR over the targets at one budget: a cheap proxy to report mid-training."""
    device = next(surrogate.parameters()).device
    data = eval_data.to(device)
    x, y = data.images.float() / 255, data.labels
    with eval_mode(surrogate), eval_mode(*targets.values(), frozen=True):
        clean = {"surrogate": _predict(surrogate, x, config.batch_size)}
        clean.update({name: _predict(m, x, config.batch_size) for name, m in targets.items()})
        out = _transfer(surrogate, targets, x, y, None, "pgd", "untargeted", budget, clean, config)
    return out[f"asr/pgd/untargeted/{budget}/mean"]


def _transfer(surrogate, targets, x, y, goal, attack, mode, budget, clean, config) -> dict[str, float]:
    """AEs crafted once for this (attack, mode, budget), then shown to every target."""
    generator = torch.Generator().manual_seed(config.seed + budget)
    adversarial = _craft(surrogate, x, y, goal, attack, budget, config, generator)
    key = f"{attack}/{mode}/{budget}"
    out = {f"fooling/{key}": fooling_rate(y, _predict(surrogate, adversarial, config.batch_size), goal)}
    for name, target in targets.items():
        count = transfer_success(
            y, clean["surrogate"], clean[name], _predict(target, adversarial, config.batch_size), goal
        )
        out[f"asr/{key}/{name}"], out[f"asr_all/{key}/{name}"], out[f"support/{name}"] = (
            count.asr,
            count.asr_all,
            count.support,
        )
    for prefix in ("asr", "asr_all"):
        values = [out[f"{prefix}/{key}/{name}"] for name in targets if not math.isnan(out[f"{prefix}/{key}/{name}"])]
        out[f"{prefix}/{key}/mean"] = float(np.mean(values)) if values else float("nan")
    return out


@contextmanager
def _timed(metrics: dict[str, float], part: str, log):
    """Wall time of one part into metrics['seconds/<part>'], logged when it ends."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    metrics[f"seconds/{part}"] = time.perf_counter() - start
    if log is not None:
        log(f"  {part}: {metrics[f'seconds/{part}']:.1f}s")
