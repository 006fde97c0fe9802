"""Gradient-norm penalties (IR, JR, ER) in the published code's forms (METHOD.md).

All three differentiate through a gradient (double backprop), so they run eagerly (no
torch.compile) and cost several times a plain step.

The magnitudes are batch-128 magnitudes (METHOD.md): the published IR term lambda*||g||/B shrinks
like 1/sqrt(B) (the stacked gradient's norm grows like sqrt(B)) and JR's lambda*R/B like 1/B, so at
any other batch size B lambda is rescaled internally, to lambda*sqrt(B/128) for IR and lambda*B/128
for JR: a grid value means at every batch size what it means in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raystudy.mechanisms.base import ForwardPass

REFERENCE_BATCH = 128  # the batch size the published magnitudes were tuned at


def ir_batch_factor(batch: int) -> float:
    """IR's lambda multiplier at batch `batch`: sqrt(B / 128)."""
    return (batch / REFERENCE_BATCH) ** 0.5


def jr_batch_factor(batch: int) -> float:
    """JR's lambda multiplier at batch `batch`: B / 128."""
    return batch / REFERENCE_BATCH


@dataclass(frozen=True)
class InputGradientNorm:
    """IR: loss = (sum_i CE_i + lambda' * ||grad_x sum_i CE_i||_2) / B, lambda' = lambda * sqrt(B/128).

    One L2 norm of the whole batch's stacked input gradient (not squared, not per sample), as in
    the published code; BN stays in train mode during the double backprop.
    """

    weight: float
    name: str = "ir"
    needs_input_grad: bool = True
    input_sensitive: bool = True
    holds_pattern: bool = False
    double_backward: bool = True

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        (grad,) = torch.autograd.grad(fwd.ce.sum(), fwd.x, create_graph=True)
        batch = fwd.x.shape[0]
        return self.weight * ir_batch_factor(batch) * grad.float().norm() / batch


def jacobian_projection_norm(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """R = 1/2 * C * ||J^T v||^2 / B with one random unit vector v per sample over the C logits.

    Since E[v v^T] = I / C for v uniform on the unit sphere, C * E||J^T v||^2 = ||J||_F^2: R is an
    unbiased estimate of 1/2 * mean_i ||J_i||_F^2 from a single projection (one extra backward,
    Hoffman et al. 2019's estimator with n_proj = 1, as in the published code).
    """
    batch, classes = logits.shape
    v = torch.randn(batch, classes, device=logits.device, dtype=logits.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    (jtv,) = torch.autograd.grad(logits, x, grad_outputs=v, create_graph=True)
    return 0.5 * classes * jtv.float().pow(2).sum() / batch


@dataclass(frozen=True)
class InputJacobianNorm:
    """JR: loss = (sum_i CE_i + lambda' * R) / B, lambda' = lambda * B/128, R from `jacobian_projection_norm`."""

    weight: float
    name: str = "jr"
    needs_input_grad: bool = True
    input_sensitive: bool = True
    holds_pattern: bool = False
    double_backward: bool = True

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        batch = fwd.x.shape[0]
        return self.weight * jr_batch_factor(batch) * jacobian_projection_norm(fwd.x, fwd.logits) / batch


@dataclass(frozen=True)
class WeightGradientNorm:
    """ER: loss = CE_mean + lambda / 2 * ||grad_theta CE_mean||^2."""

    weight: float
    name: str = "er"
    needs_input_grad: bool = False
    input_sensitive: bool = False
    holds_pattern: bool = False
    double_backward: bool = True

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        params = [p for p in fwd.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(fwd.ce.mean(), params, create_graph=True)
        return 0.5 * self.weight * sum(g.float().pow(2).sum() for g in grads)
