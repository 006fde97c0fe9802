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

The steps are scale-aware. A forward difference errs by truncation (the curvature over the step) and
by float32 cancellation (two nearly equal passes subtracted); a fixed step that sits between the two
on a trained network falls off on an untrained Inception-V3, whose loss is so steep at
initialisation that a step of 1e-3 along the gradient moves it by a sixth of itself. So:
* every step starts from the size of what it perturbs (the images' norm for IR and JR, the weights'
  norm for ER), as the textbook forward-difference step does;
* IR and ER, which step along the gradient, whose norm they know, cap the step where the loss is
  steep: to first order it changes the loss by at most a small fraction of its value
  (h * ||g|| <= INPUT_LOSS_CHANGE or WEIGHT_LOSS_CHANGE times L), never below MIN_STEP_FRACTION of
  the size step;
* JR, which steps along a random direction, measures how fast the logits move along it with a
  pilot difference and steps where they change by LOGIT_CHANGE of their spread.
The constants come from benchmarks/finite_difference_sweep.py (results/finite_difference_sweep.json):
ResNet-18, VGG-16 and Inception-V3 (dropout) with BN in train mode, at initialisation, after one
epoch and trained, against exact double backprop. Without the held pattern a ReLU network's cosine
is far below 1 at every step. Training with these forms turns TF32 off (raystudy/training/loop.py): its
10-bit mantissa is far coarser than the steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from raystudy.mechanisms.activation_pattern import ActivationPattern
from raystudy.mechanisms.base import PENALTY_GRADIENTS, ForwardPass, Penalty, Recipe  # noqa: F401 (re-exported)
from raystudy.mechanisms.gradient_norms import (
    InputGradientNorm,
    InputJacobianNorm,
    WeightGradientNorm,
    ir_batch_factor,
    jr_batch_factor,
)
from raystudy.mechanisms.model_state import bn_running_stats_frozen
from raystudy.mechanisms.step import soft_cross_entropy

# Steps relative to the norm of what they perturb (module docstring): an image (per sample, so a
# CIFAR-10 image of norm ~32 moves by ~1e-3 in L2) and the whole weight vector.
INPUT_STEP = 3e-5
JACOBIAN_STEP = 1e-4  # JR's pilot step
WEIGHT_STEP = 1e-5
# IR and ER: the step along the gradient changes the loss by at most this fraction of itself (first
# order), and is never below MIN_STEP_FRACTION of its size step.
INPUT_LOSS_CHANGE = 3e-3
WEIGHT_LOSS_CHANGE = 1e-3
MIN_STEP_FRACTION = 1e-2
# JR: the step moves the logits by this fraction of their spread (root mean square over classes of
# their deviation from the sample's mean logit), never below MIN_STEP_FRACTION of the pilot step and
# never above JACOBIAN_MAX_STEPS pilot steps (where the logits move slowly, a longer step is still
# cancellation-safe but its truncation error grows: ResNet-18 after one epoch).
LOGIT_CHANGE = 5e-4
JACOBIAN_MAX_STEPS = 3.0
_TINY = 1e-12


def scale_aware_step(size_step: torch.Tensor, loss: torch.Tensor, slope: torch.Tensor, loss_change: float):
    """The step along a gradient of norm `slope`: `size_step`, shortened where the loss is steep so
    that slope * step <= loss_change * loss, but never below MIN_STEP_FRACTION * size_step."""
    steep = loss_change * loss.detach().abs() / (slope.detach() + _TINY)
    return torch.clamp(torch.minimum(size_step, steep), min=MIN_STEP_FRACTION * size_step)


def unit_input_directions(x: torch.Tensor) -> torch.Tensor:
    """One random direction of unit L2 norm per sample, shaped like `x` (JR's u)."""
    u = torch.randn_like(x)
    return u / u.flatten(1).norm(dim=1).view(-1, *[1] * (u.dim() - 1))


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
    loss_change: float = INPUT_LOSS_CHANGE
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
        # its size step moves each sample by `step` times its own norm in root mean square.
        size_step = self.step * fwd.x.detach().float().norm()
        eps = scale_aware_step(size_step, fwd.ce.sum(), norm, self.loss_change)
        ahead = forward_again(fwd, x=fwd.x.detach() + eps * grad / (norm + _TINY))
        directional = (_cross_entropy_sum(ahead, fwd.y_soft) - fwd.ce.sum()) / eps
        scale = self.weight * ir_batch_factor(batch) / batch
        return straight_through(scale * norm, scale * directional)


@dataclass(frozen=True)
class InputJacobianNormFD:
    """JR with R = 1/2 * d * ||J u||^2 / B, J u by a forward difference along a random unit u per sample.

    The step is set by how fast the logits move: a pilot difference (no graph) at `step` times the
    images' size measures ||J u||, and the difference that trains is taken where the logits change
    by `logit_change` of their spread, between a hundredth of the pilot step and JACOBIAN_MAX_STEPS
    pilot steps. The right step moves with training and architecture by two orders of magnitude (an
    Inception-V3 at initialisation needs 1e-5 of the images' size, a VGG-16 after one epoch 1e-3);
    `logit_change=inf` takes the pilot's size step instead."""

    weight: float
    step: float = JACOBIAN_STEP
    logit_change: float = LOGIT_CHANGE
    name: str = "jr"
    needs_input_grad: bool = False
    input_sensitive: bool = True
    holds_pattern: bool = True
    double_backward: bool = False

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        batch, dims = fwd.x.shape[0], fwd.x[0].numel()
        u = unit_input_directions(fwd.x)
        x, logits = fwd.x.detach(), fwd.logits.float()
        # One step for the whole batch: in train mode BatchNorm couples the samples, and only a common
        # step makes the difference J u itself.
        h = self.step * x.float().norm() / batch**0.5
        if math.isfinite(self.logit_change):
            with torch.no_grad():
                pilot = (forward_again(fwd, x=x + h * u).float() - logits.detach()) / h
            spread = (logits.detach() - logits.detach().mean(dim=1, keepdim=True)).pow(2).mean().sqrt()
            fitted = self.logit_change * spread / (pilot.pow(2).mean().sqrt() + _TINY)
            h = torch.clamp(fitted, min=MIN_STEP_FRACTION * h, max=JACOBIAN_MAX_STEPS * h)
        jvp = (forward_again(fwd, x=x + h * u).float() - logits) / h
        estimate = 0.5 * dims * jvp.pow(2).sum() / batch
        return self.weight * jr_batch_factor(batch) * estimate / batch


@dataclass(frozen=True)
class WeightGradientNormFD:
    """ER with lambda * H g from a difference of the weight gradients at theta and theta + r g/||g||."""

    weight: float
    step: float = WEIGHT_STEP
    loss_change: float = WEIGHT_LOSS_CHANGE
    name: str = "er"
    needs_input_grad: bool = False
    input_sensitive: bool = False
    holds_pattern: bool = True
    double_backward: bool = False

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        named = [(n, p) for n, p in fwd.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(fwd.ce.mean(), [p for _, p in named], retain_graph=True)
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        size = torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for _, p in named]))
        r = scale_aware_step(self.step * size, fwd.ce.mean(), norm, self.loss_change)
        shift = r / (norm + _TINY)
        # theta + const: differentiable in theta, so backprop gives grad L at the shifted weights.
        shifted = {n: p + shift.to(p.dtype) * g for (n, p), g in zip(named, grads)}
        ahead = forward_again(fwd, params=shifted)
        ce_ahead = _cross_entropy_sum(ahead, fwd.y_soft) / fwd.x.shape[0]
        value = 0.5 * self.weight * norm.pow(2)
        return straight_through(value, self.weight * norm.detach() / r * (ce_ahead - fwd.ce.mean()))


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


def penalty_parameter_gradient(
    model: torch.nn.Module, penalty: Penalty, x: torch.Tensor, y_soft: torch.Tensor, seed: int | None = None
):
    """(value, flat parameter gradient) of `penalty` alone at (x, y_soft), in the model's current
    mode, leaving BatchNorm's running statistics as they were: for comparing the two forms.

    The pass is recorded for every penalty, so that two calls with the same `seed` draw the same
    dropout masks (and JR the same directions) whichever form they compute."""
    buffers = [b.detach().clone() for b in model.buffers()]
    pattern = ActivationPattern()
    x = x.detach().requires_grad_(penalty.needs_input_grad)
    if seed is not None:
        torch.manual_seed(seed)
    with pattern.record():
        logits = model(x)
    term = penalty(ForwardPass(model, x, y_soft, logits, soft_cross_entropy(logits, y_soft), pattern))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)  # JR does not reach the last bias
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
    return term.detach(), flat
