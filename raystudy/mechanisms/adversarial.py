"""Adversarial training (AT) with small L2 budgets: train on x + delta, delta from L2 PGD (the spec,
its magnitude and PGD schedule: raystudy/mechanisms/specs.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raystudy.mechanisms.model_state import eval_mode
from raystudy.mechanisms.step import soft_cross_entropy


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class L2PGD:
    """Maximize the soft-target CE within ||delta||_2 <= epsilon per sample and x + delta in [0, 1].

    Starts at delta = 0 (no random start), steps along the L2-normalized gradient, and runs with
    the model in eval mode (BN running statistics, as the published code does); the model's
    training flag is restored afterwards and no parameter gradients are accumulated.
    """

    epsilon: float
    steps: int
    step_size: float

    def __call__(self, model: nn.Module, x: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        delta = torch.zeros_like(x)
        with eval_mode(model):
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = soft_cross_entropy(model(x + delta), y_soft).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = delta.detach() + self.step_size * grad / _per_sample_norm(grad)
                delta = delta * (self.epsilon / _per_sample_norm(delta)).clamp(max=1.0)
                delta = (x + delta).clamp(0.0, 1.0) - x
        return (x + delta).detach()
