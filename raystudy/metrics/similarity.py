"""Gradient similarity: per-sample cosine between two models' input gradients of the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.core.models import Ensemble
from raystudy.mechanisms.model_state import eval_mode


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(f(x_i), y_i) / d x_i for every sample (eval mode), flattened to (B, d). An LGV
    `Ensemble` member by member: with g = softmax(mean logits) - onehot(y), the mean of J_m^T g."""
    with eval_mode(model):
        if isinstance(model, Ensemble):
            return _ensemble_input_gradients(list(model.members), x, y)
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad.flatten(1)


def _ensemble_input_gradients(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    with torch.no_grad():
        p = torch.softmax(sum(m(x) for m in members) / len(members), dim=1)
        g = (p - F.one_hot(y, p.shape[1]).to(p.dtype)) / len(members)
    grad = torch.zeros_like(x)
    for member in members:  # one member's graph at a time
        xx = x.detach().requires_grad_(True)
        grad += torch.autograd.grad((member(xx) * g).sum(), xx)[0]
    return grad.flatten(1)


def gradient_cosine(surrogate_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two (B, d) gradient batches (0 where a gradient vanishes)."""
    return F.cosine_similarity(surrogate_grads.double(), target_grads.double(), dim=1, eps=1e-30).float()
