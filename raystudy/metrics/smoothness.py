"""Model smoothness: the dominant eigenvalue of the input Hessian of the loss, per sample.

Power iteration with Hessian-vector products (double backprop), the model in eval mode. In eval
mode sample i's loss depends on x_i alone, so the Hessian of the *summed* loss is block-diagonal
with the per-sample Hessians as blocks: one HVP of the summed loss with a stacked vector gives
every sample's HVP at once, and the whole batch iterates together.

Power iteration converges to the eigenvalue of largest magnitude. For ReLU/max-pool networks
the input Hessian of cross-entropy is positive semidefinite (J^T H_softmax J, piecewise-linear
J), so that is lambda_max. With smooth activations (GELU, SiLU) it may be a negative
eigenvalue: `input_hessian_top_eigenvalue` returns it signed (the Rayleigh quotient), and the
smoothness metric reports its absolute value, as the published code's Lanczos routine does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.config.evaluation import DEFAULT_ITERATIONS, DEFAULT_TOLERANCE
from raystudy.modes import eval_mode, twice_differentiable


@dataclass(frozen=True)
class PowerIterationResult:
    eigenvalues: torch.Tensor  # (B,) signed Rayleigh quotients at the last iteration
    iterations: int  # iterations run (all samples converged, or the cap)
    converged: torch.Tensor  # (B,) bool: relative change below the tolerance


def summed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, *([1] * (v.dim() - 1)))


def input_hessian_top_eigenvalue(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = DEFAULT_TOLERANCE,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summed_cross_entropy,
) -> PowerIterationResult:
    """Per-sample dominant eigenvalue of d^2 CE(f(x_i), y_i) / dx_i^2, all samples at once.

    Stops when every sample's eigenvalue changed by less than `tolerance` (relative) in one
    iteration, or after `iterations`. The caller puts the model in eval mode (required for the
    samples to be independent); parameter gradients are not touched. `loss_fn(outputs, y)` must
    be a sum of per-sample losses (summed cross-entropy by default).
    """
    x = x.detach().requires_grad_(True)
    with twice_differentiable():
        loss = loss_fn(model(x), y)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    v = _unit(torch.randn(x.shape, generator=generator, device="cpu").to(x.device))
    eigenvalues = torch.zeros(x.shape[0], device=x.device)
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    done = 0
    for done in range(1, iterations + 1):
        (hv,) = torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=True)
        new = (hv * v).flatten(1).sum(1)  # Rayleigh quotient v^T H v with ||v|| = 1
        converged = (new - eigenvalues).abs() <= tolerance * new.abs().clamp_min(1e-12)
        eigenvalues = new.detach()
        v = _unit(hv.detach())
        if bool(converged.all()):
            break
    return PowerIterationResult(eigenvalues, done, converged)


def smoothness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 250,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> torch.Tensor:
    """|dominant input-Hessian eigenvalue| per sample (smaller = smoother), in eval mode, batched."""
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        values = [
            input_hessian_top_eigenvalue(
                model, x[i : i + batch_size], y[i : i + batch_size], iterations, tolerance, generator
            ).eigenvalues
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(values).abs()
