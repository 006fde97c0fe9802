"""Gradient similarity: per-sample cosine between two models' input gradients of the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.modes import eval_mode


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(f(x_i), y_i) / d x_i for every sample (eval mode), flattened to (B, d)."""
    with eval_mode(model):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad.flatten(1)


def gradient_cosine(surrogate_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two (B, d) gradient batches (0 where a gradient vanishes)."""
    return F.cosine_similarity(surrogate_grads.double(), target_grads.double(), dim=1, eps=1e-30).float()
