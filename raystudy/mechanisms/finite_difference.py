"""Finite-difference parameter gradients of the gradient-norm penalties: the same loss, no double backprop.

`penalty_gradient: finite_difference` swaps each exact penalty of a recipe (IR, JR, ER, also inside
SAM&IR and SAM&JR) for its form here. Each keeps the exact penalty's definition and batch-128
magnitude rule (gradient_norms.py); only the parameter gradient is computed differently:

* IR (Finlay & Oberman 2019): with the batch's stacked input gradient g = grad_x sum_i CE_i and
  d = g/||g|| held fixed, ||g|| = d . g is the directional derivative of sum_i CE_i along d, so
  grad_theta ||g|| = grad_theta of (sum CE(x + e d) - sum CE(x)) / e as e -> 0: two forward passes
  and ordinary backprop. The reported value is the exact ||g|| (one backward to the input only).
* JR: J u for one random unit input direction u per sample, by the difference quotient
  (f(x + h u) - f(x)) / h; since E[u u^T] = I/d over the d input dimensions, 1/2 * d * ||J u||^2 has
  the published estimator's expectation 1/2 * ||J||_F^2 (which projects on the C logits instead).
  Its parameter gradient is ordinary backprop through both passes.
* ER (Zhao et al. 2022): grad_theta lambda/2 ||g_theta||^2 = lambda * H g_theta, and
  H g ~ ||g|| * (grad L(theta + r g/||g||) - grad L(theta)) / r: a second forward and backward at
  shifted weights, as in SAM. The reported value is the exact lambda/2 ||g_theta||^2.

The second pass replays the first pass's ReLU/max-pool/dropout decisions (activation_pattern.py)
and leaves BatchNorm's running statistics alone (one update per step, as with the exact form).
The steps were chosen from the sweep in benchmarks/finite_difference_sweep.py
(results/finite_difference_sweep.json): with the pattern held, the cosine to double backprop's
gradient is >= 0.9996 from 1e-4 to 1e-2 on every model swept (trained CNNs with ReLU and max-pool
or SiLU, a ResNet-18) and >= 0.99999 at 1e-3, falling off below 1e-4 (float32 cancellation) and
above 1e-2 (curvature). 1e-3 sits in the middle of the plateau. Without the held pattern, a ReLU
network's cosine is 0.12-0.95 from 1e-4 to 1e-1. Training with these forms turns TF32 off
(raystudy/train.py): its 10-bit mantissa is far coarser than the steps.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.func import functional_call

from raystudy.mechanisms.activation_pattern import ActivationPattern
from raystudy.mechanisms.base import ForwardPass, Penalty, Recipe
from raystudy.mechanisms.gradient_norms import (
    InputGradientNorm,
    InputJacobianNorm,
    WeightGradientNorm,
    ir_batch_factor,
    jr_batch_factor,
)
from raystudy.mechanisms.step import soft_cross_entropy
from raystudy.modes import bn_running_stats_frozen

PENALTY_GRADIENTS = ("exact", "finite_difference")
# Root-mean-square per-sample input step for IR and JR, in [0, 1] pixel units, and the weight-space
# step for ER (the L2 norm of the whole parameter shift); see the module docstring.
INPUT_STEP = 1e-3
WEIGHT_STEP = 1e-3
_TINY = 1e-12


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor equal to `value` whose gradient is `surrogate`'s: the loss reports the exact
    penalty while backprop takes the finite-difference gradient."""
    return value.detach() + (surrogate - surrogate.detach())


def forward_again(fwd: ForwardPass, x: torch.Tensor | None = None, params: dict | None = None) -> torch.Tensor:
    """Logits of a second pass at input `x` and/or shifted `params`, with the first pass's
    piecewise decisions replayed and BatchNorm's running statistics untouched."""
    x = fwd.x.detach() if x is None else x
    with fwd.pattern.replay(), bn_running_stats_frozen(fwd.model):
        if params is None:
            return fwd.model(x)
        return functional_call(fwd.model, params, (x,))


def _cross_entropy_sum(logits: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
    return soft_cross_entropy(logits, y_soft).sum()


@dataclass(frozen=True)
class InputGradientNormFD:
    """IR with the parameter gradient of ||grad_x sum CE|| from a directional difference quotient."""

    weight: float
    step: float = INPUT_STEP
    name: str = "ir"
    needs_input_grad: bool = True
    input_sensitive: bool = True
    holds_pattern: bool = True
    double_backward: bool = False

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        batch = fwd.x.shape[0]
        (grad,) = torch.autograd.grad(fwd.ce.sum(), fwd.x, retain_graph=True)
        norm = grad.float().norm()
        # One unit direction over the whole batch (the published norm is of the stacked gradient);
        # a step of step*sqrt(B) along it moves each sample by `step` in root mean square.
        eps = self.step * batch**0.5
        ahead = forward_again(fwd, x=fwd.x.detach() + eps * grad / (norm + _TINY))
        directional = (_cross_entropy_sum(ahead, fwd.y_soft) - fwd.ce.sum()) / eps
        scale = self.weight * ir_batch_factor(batch) / batch
        return straight_through(scale * norm, scale * directional)


@dataclass(frozen=True)
class InputJacobianNormFD:
    """JR with R = 1/2 * d * ||J u||^2 / B, J u by a forward difference along a random unit u per sample."""

    weight: float
    step: float = INPUT_STEP
    name: str = "jr"
    needs_input_grad: bool = False
    input_sensitive: bool = True
    holds_pattern: bool = True
    double_backward: bool = False

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        batch, dims = fwd.x.shape[0], fwd.x[0].numel()
        u = torch.randn_like(fwd.x)
        u = u / u.flatten(1).norm(dim=1).view(-1, *[1] * (u.dim() - 1))
        ahead = forward_again(fwd, x=fwd.x.detach() + self.step * u)
        jvp = (ahead.float() - fwd.logits.float()) / self.step
        estimate = 0.5 * dims * jvp.pow(2).sum() / batch
        return self.weight * jr_batch_factor(batch) * estimate / batch


@dataclass(frozen=True)
class WeightGradientNormFD:
    """ER with lambda * H g from a difference of the weight gradients at theta and theta + r g/||g||."""

    weight: float
    step: float = WEIGHT_STEP
    name: str = "er"
    needs_input_grad: bool = False
    input_sensitive: bool = False
    holds_pattern: bool = True
    double_backward: bool = False

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        named = [(n, p) for n, p in fwd.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(fwd.ce.mean(), [p for _, p in named], retain_graph=True)
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        shift = self.step / (norm + _TINY)
        # theta + const: differentiable in theta, so backprop gives grad L at the shifted weights.
        shifted = {n: p + shift.to(p.dtype) * g for (n, p), g in zip(named, grads)}
        ahead = forward_again(fwd, params=shifted)
        ce_ahead = _cross_entropy_sum(ahead, fwd.y_soft) / fwd.x.shape[0]
        value = 0.5 * self.weight * norm.pow(2)
        return straight_through(value, self.weight * norm.detach() / self.step * (ce_ahead - fwd.ce.mean()))


_FINITE_DIFFERENCE_FORM = {
    InputGradientNorm: InputGradientNormFD,
    InputJacobianNorm: InputJacobianNormFD,
    WeightGradientNorm: WeightGradientNormFD,
}


def finite_difference_form(penalty: Penalty) -> Penalty:
    return _FINITE_DIFFERENCE_FORM[type(penalty)](penalty.weight)


def with_penalty_gradient(recipe: Recipe, penalty_gradient: str) -> Recipe:
    """The recipe with its penalties' parameter gradients computed `exact`ly or by `finite_difference`."""
    if penalty_gradient == "exact" or not recipe.penalties:
        return recipe
    return dataclasses.replace(recipe, penalties=tuple(finite_difference_form(p) for p in recipe.penalties))


def penalty_parameter_gradient(model: torch.nn.Module, penalty: Penalty, x: torch.Tensor, y_soft: torch.Tensor):
    """(value, flat parameter gradient) of `penalty` alone at (x, y_soft), in the model's current
    mode, leaving BatchNorm's running statistics as they were: for comparing the two forms."""
    buffers = [b.detach().clone() for b in model.buffers()]
    pattern = ActivationPattern() if penalty.holds_pattern else None
    x = x.detach().requires_grad_(penalty.needs_input_grad)
    with pattern.record() if pattern else nullcontext():
        logits = model(x)
    term = penalty(ForwardPass(model, x, y_soft, logits, soft_cross_entropy(logits, y_soft), pattern))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)  # JR does not reach the last bias
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
    return term.detach(), flat
