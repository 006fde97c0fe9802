"""The trial-end hook: every metric of a trained surrogate against its targets.

`measure_surrogate` returns `MetricRow`s with their dimensions (raystudy.persist.record);
`evaluate_surrogate` the same as a dict of flat names:

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
<t> also names each target behind each of the evaluation's defenses (`resnet50+jpeg:75`: accuracy,
ASR, support; no similarity, whose gradients are not taken through a defense; not in the means).
No Ray here: the trainable calls this and reports the rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from raystudy.config.defense import parse_defense
from raystudy.config.evaluation import MODES, EvalConfig  # noqa: F401 (MODES re-exported)
from raystudy.config.torchattack import has_targeted_mode, is_torchattack
from raystudy.core.data import Split, balanced_subset
from raystudy.core.models import Ensemble
from raystudy.core.precision import tf32
from raystudy.errors import OutOfGpuMemory, RaystudyError
from raystudy.mechanisms.model_state import eval_mode
from raystudy.metrics.asr import fooling_rate, transfer_success
from raystudy.metrics.attacks import PIXEL, autoattack, make_attack, torchattack_examples
from raystudy.metrics.defenses import defended
from raystudy.metrics.similarity import gradient_cosine, input_gradients
from raystudy.metrics.smoothness import smoothness
from raystudy.persist.record import AGGREGATE_TARGETS, MetricRow, flat


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
    indices, targets = eval_indices(test.labels, num_classes, config)
    subset = test.subset(indices)
    return EvalSet(subset.images.cpu(), subset.labels.cpu(), targets, indices)


def eval_indices(labels: torch.Tensor, num_classes: int, config: EvalConfig) -> tuple[np.ndarray, torch.Tensor]:
    """(indices into the test split, targeted classes) of the evaluation images: from the labels
    and config.seed alone, so the driver records them without the images (data.test_labels_for)."""
    n = config.n_eval if config.n_eval is not None and config.n_eval < len(labels) else None
    indices = balanced_subset(labels, n, config.seed) if n else np.arange(len(labels))
    # A seeded random order: the archives are sorted by class, and smoothness uses a prefix.
    indices = np.random.default_rng(config.seed).permutation(indices)
    chosen = labels.cpu()[torch.as_tensor(indices, dtype=torch.long)]
    if config.target_classes == "next":
        return indices, (chosen + 1) % num_classes
    # uniform over the other classes: y + U{1..m-1} mod m
    offsets = torch.randint(1, num_classes, chosen.shape, generator=torch.Generator().manual_seed(config.seed + 7))
    return indices, (chosen + offsets) % num_classes


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
    return flat(measure_surrogate(surrogate, targets, eval_data, config, log))


@dataclass
class KeptImages:
    """What the hook hands to black-box targets (raystudy.blackbox.query): the surrogate's clean predictions
    and every AE it crafted, as the 8-bit images the white-box targets were shown."""

    surrogate_clean: torch.Tensor | None = None
    adversarial: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)  # (attack, mode, budget)


def measure_surrogate(
    surrogate: nn.Module,
    targets: Mapping[str, nn.Module],
    eval_data: EvalSet,
    config: EvalConfig,
    log: Callable[[str], None] | None = None,
    keep: KeptImages | None = None,
    share: str = "",
) -> list[MetricRow]:
    """Every metric as a row with its dimensions; the models come back in the modes they had.
    With `keep`, the clean predictions and AEs are also kept there (uint8, on the CPU). Out of GPU
    memory, the evaluation batch is halved and the hook run again (`share`: the trial's GPU share,
    for the message)."""
    reserved = [name for name in targets if name in AGGREGATE_TARGETS]
    if reserved:
        raise RaystudyError(
            f"a target may not be called {reserved[0]!r}: {', '.join(AGGREGATE_TARGETS)} name aggregates over targets"
        )
    device = next(surrogate.parameters()).device
    data = eval_data.to(device)
    batch = config.batch_size
    while True:
        # fp32 throughout (raystudy.core.precision): smoothness and similarity are input gradients
        try:
            with eval_mode(surrogate), eval_mode(*targets.values(), frozen=True), tf32(False):
                return _measure(surrogate, targets, data, dataclasses.replace(config, batch_size=batch), log, keep)
        except torch.OutOfMemoryError:
            # Every metric but the random draws (random starts, DI, LGV's member order) is the same at
            # any batch: halve it and measure again rather than lose a trained surrogate.
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch == 1:
                raise OutOfGpuMemory(
                    f"the trial-end hook ran out of GPU memory even at batch 1 ({_models(surrogate, targets)}"
                    f"{share}): give the trial a larger resources.gpu share (raystudy plan estimates it)"
                ) from None
            batch //= 2
            if log is not None:
                log(
                    f"  out of GPU memory at evaluation batch {batch * 2} ({_models(surrogate, targets)}{share}): "
                    f"measuring again at batch {batch}"
                )


def _models(surrogate: nn.Module, targets: Mapping[str, nn.Module]) -> str:
    members = f"an ensemble of {len(surrogate.members)}" if isinstance(surrogate, Ensemble) else "one model"
    return f"surrogate {members}, targets {', '.join(targets) or 'none'}"


def _measure(surrogate, targets, data: EvalSet, config: EvalConfig, log, keep: KeptImages | None) -> list[MetricRow]:
    x, y, goal = data.images.float() / 255, data.labels, data.target_classes
    rows: list[MetricRow] = []
    clock = lambda part: _timed(rows, part, log, x.device)  # noqa: E731

    behind = defended_targets(targets, config)
    with clock("accuracy"):
        clean = {"surrogate": _predict(surrogate, x, config.batch_size)}
        clean.update({name: _predict(m, x, config.batch_size) for name, m in {**targets, **behind}.items()})
        rows.append(MetricRow("acc", float((clean["surrogate"] == y).float().mean())))
        rows += [
            MetricRow("acc", float((clean[name] == y).float().mean()), target=name) for name in {**targets, **behind}
        ]
        if keep is not None:
            keep.surrogate_clean = clean["surrogate"].cpu()
    with clock("smoothness"):
        k = min(config.smoothness_samples or len(x), len(x))
        values = smoothness(
            surrogate,
            x[:k],
            y[:k],
            config.batch_size,
            config.power_iterations,
            config.power_tolerance,
            config.seed,
            config.smoothness_method,
            config.lanczos_iterations,
        )
        rows += [
            MetricRow("smoothness", float(values.mean()), statistic="mean"),
            MetricRow("smoothness", float(values.max()), statistic="max"),
        ]
    with clock("similarity"):
        rows += _similarities(surrogate, targets, x, y, config.batch_size)
    for attack in config.attacks:
        with clock(attack):
            for mode in config.modes:
                if attack == "autoattack" and mode == "targeted":
                    continue  # AutoAttack's targeted parts still aim at misclassification
                if is_torchattack(attack) and mode == "targeted" and not has_targeted_mode(attack):
                    continue  # an attack torchattack implements untargeted only
                for budget in config.budgets:
                    target_classes = goal if mode == "targeted" else None
                    rows += _transfer(
                        surrogate, targets, x, y, target_classes, attack, mode, budget, clean, config, keep, behind
                    )
    return _support_once(rows)


def _support_once(rows: list[MetricRow]) -> list[MetricRow]:
    """`support/<t>` is the same for every attack (it counts clean predictions): keep one row per target."""
    seen, out = set(), []
    for row in rows:
        if row.name == "support":
            if row.target in seen:
                continue
            seen.add(row.target)
        out.append(row)
    return out


def _similarities(surrogate, targets, x, y, size) -> list[MetricRow]:
    cosines: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    for s in _batches(len(x), size):
        surrogate_grads = input_gradients(surrogate, x[s], y[s])
        for name, target in targets.items():
            cosines[name].append(gradient_cosine(surrogate_grads, input_gradients(target, x[s], y[s])))
    rows, means = [], []
    for name, parts in cosines.items():
        values = torch.cat(parts)
        means.append(float(values.mean()))
        rows += [
            MetricRow("similarity", means[-1], target=name),
            MetricRow("similarity_min", float(values.min()), target=name),
        ]
    rows.append(MetricRow("similarity", float(np.mean(means)) if means else float("nan"), target="mean"))
    return rows


def _craft(surrogate, x, y, goal, attack, budget, config, generator) -> torch.Tensor:
    eps = budget * PIXEL
    if attack == "autoattack":
        num_classes = _num_classes(surrogate, x)
        return torch.cat(
            [
                autoattack(surrogate, x[s], y[s], eps, num_classes, config.seed, config.autoattack_steps)
                for s in _batches(len(x), config.batch_size)
            ]
        )
    mode = "untargeted" if goal is None else "targeted"
    if is_torchattack(attack):
        num_classes = _num_classes(surrogate, x)
        labels = y if goal is None else goal
        options = config.options_of(attack)
        steps, seed = config.steps_for(mode), config.seed + budget
        return torchattack_examples(
            surrogate,
            x,
            labels,
            goal is not None,
            attack,
            eps,
            steps,
            config.step_size,
            options,
            seed,
            config.batch_size,
            num_classes,
            config.random_start,
        )
    crafter = make_attack(attack, eps, config.steps_for(mode), config.step_size, config.random_start, config.loss)
    models = list(surrogate.members) if isinstance(surrogate, Ensemble) else surrogate  # LGV: one member per step
    return torch.cat(
        [
            crafter(models, x[s], y[s], None if goal is None else goal[s], generator)
            for s in _batches(len(x), config.batch_size)
        ]
    )


def _num_classes(surrogate: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return surrogate(x[:1]).shape[1]


def quick_transfer_asr(
    surrogate: nn.Module, targets: Mapping[str, nn.Module], eval_data: EvalSet, config: EvalConfig, budget: int = 8
) -> float:
    """Mean untargeted PGD ASR over the targets at one budget: a cheap proxy to report mid-training."""
    device = next(surrogate.parameters()).device
    data = eval_data.to(device)
    x, y = data.images.float() / 255, data.labels
    # fp32 as the hook measures, whatever the training phase that calls it allows (raystudy.core.precision)
    with eval_mode(surrogate), eval_mode(*targets.values(), frozen=True), tf32(False):
        clean = {"surrogate": _predict(surrogate, x, config.batch_size)}
        clean.update({name: _predict(m, x, config.batch_size) for name, m in targets.items()})
        rows = _transfer(surrogate, targets, x, y, None, "pgd", "untargeted", budget, clean, config)
    return next(row.value for row in rows if row.name == "asr" and row.target == "mean")


def defended_targets(targets: Mapping[str, nn.Module], config: EvalConfig) -> dict[str, nn.Module]:
    """Each target behind each of the evaluation's defenses, as `<target>+<defense>`."""
    out = {}
    for name in config.defenses:
        steps = parse_defense(name)
        for target_name, target in targets.items():
            out[f"{target_name}+{name}"] = defended(target, steps, config.seed)
    return out


def _transfer(
    surrogate, targets, x, y, goal, attack, mode, budget, clean, config, keep=None, behind=None
) -> list[MetricRow]:
    """AEs crafted once for this (attack, mode, budget), then shown to every target, and to every
    target behind each defense (`behind`: not in the means, which stay over the targets as they are)."""
    generator = torch.Generator().manual_seed(config.seed + budget)
    adversarial = _craft(surrogate, x, y, goal, attack, budget, config, generator)
    if keep is not None:  # exact: the attacks round their AEs to 8-bit pixels
        keep.adversarial[(attack, mode, budget)] = (adversarial * 255).round().to(torch.uint8).cpu()
    where = {"attack": attack, "mode": mode, "budget": budget}
    rows = [MetricRow("fooling", fooling_rate(y, _predict(surrogate, adversarial, config.batch_size), goal), **where)]
    counts = {
        name: transfer_success(
            y, clean["surrogate"], clean[name], _predict(target, adversarial, config.batch_size), goal
        )
        for name, target in {**targets, **(behind or {})}.items()
    }
    for name, count in counts.items():
        rows += [
            MetricRow("asr", count.asr, target=name, **where),
            MetricRow("asr_all", count.asr_all, target=name, **where),
            MetricRow("support", float(count.support), target=name),
        ]
    for kind in ("asr", "asr_all"):
        values = [getattr(c, kind) for n, c in counts.items() if n in targets and not math.isnan(getattr(c, kind))]
        rows.append(MetricRow(kind, float(np.mean(values)) if values else float("nan"), target="mean", **where))
    return rows


@contextmanager
def _timed(rows: list[MetricRow], part: str, log, device: torch.device):
    """Wall time of one part as a `seconds/<part>` row, logged when it ends."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":  # only the trial's own device (no context made on another)
        torch.cuda.synchronize(device)
    rows.append(MetricRow("seconds", time.perf_counter() - start, statistic=part))
    if log is not None:
        log(f"  {part}: {rows[-1].value:.1f}s")
