"""One training step for any recipe: transform, (adversarial) inputs, loss terms, SGD or SAM."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.mechanisms.activation_pattern import ActivationPattern
from raystudy.mechanisms.base import ForwardPass, Recipe
from raystudy.mechanisms.model_state import bn_running_stats_frozen, twice_differentiable
from raystudy.mechanisms.sam import SAM


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: 1-p on the label, p/(m-1) on every other class."""
    off = smoothing / (num_classes - 1) if smoothing else 0.0
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing)


def soft_cross_entropy(logits: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against soft targets (equal to F.cross_entropy for one-hot ones)."""
    return -(y_soft * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def objective(model: nn.Module, recipe: Recipe, x: torch.Tensor, y_soft: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'loss': CE mean + penalties, 'ce': ..., <penalty name>: ..., 'logits': ...} on a ready batch."""
    if any(p.needs_input_grad for p in recipe.penalties):
        x = x.detach().requires_grad_(True)
    pattern = ActivationPattern() if any(p.holds_pattern for p in recipe.penalties) else None
    twice = any(p.double_backward for p in recipe.penalties)
    with pattern.record() if pattern else nullcontext(), twice_differentiable() if twice else nullcontext():
        logits = model(x)
    ce = soft_cross_entropy(logits, y_soft)
    out = {"ce": ce.mean().detach(), "logits": logits.detach()}
    loss = ce.mean()
    fwd = ForwardPass(model, x, y_soft, logits, ce, pattern)
    for penalty in recipe.penalties:
        value = penalty(fwd)
        out[penalty.name] = value.detach()
        loss = loss + value
    out["loss"] = loss
    return out


def training_step(
    model: nn.Module,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    sam: SAM | None = None,
    autocast: AbstractContextManager | None = None,
    partners: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply one update; returns the loss parts and the number of correct (argmax-target) predictions.

    `partners()` returns a fresh (images, labels) batch from the training set, as large as this one:
    the mixing partners of mixup and cutmix (required when the recipe mixes).
    """
    autocast = autocast or nullcontext()
    y_soft = soft_targets(labels, num_classes, recipe.label_smoothing)
    if recipe.transform is not None:
        x, y_soft = recipe.transform(x, y_soft, _soft_partners(partners, num_classes, recipe.label_smoothing))
    with autocast:
        if recipe.adversary is not None:
            x = recipe.adversary(model, x, y_soft)
        out = objective(model, recipe, x, y_soft)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if sam is not None:
        # Second pass at the ascended weights on the same batch, in train mode: BN running
        # statistics are updated again, as the published closure does, unless the recipe freezes them.
        sam.ascend()
        optimizer.zero_grad(set_to_none=True)
        frozen = nullcontext() if recipe.sam_bn_second_pass else bn_running_stats_frozen(model)
        with autocast, frozen:
            objective(model, recipe, x, y_soft)["loss"].backward()
        sam.restore()
    optimizer.step()
    # Tensors, not floats: the loop sums them on the device and syncs once per epoch.
    record = {k: v.detach() for k, v in out.items() if k != "logits"}
    record["correct"] = (out["logits"].argmax(1) == y_soft.argmax(1)).sum()
    return record


def _soft_partners(partners, num_classes: int, smoothing: float):
    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        if partners is None:
            raise ValueError("this recipe mixes with partners from the training set: pass partners=")
        images, labels = partners()
        return images, soft_targets(labels, num_classes, smoothing)

    return draw
