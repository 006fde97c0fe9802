"""Finite-difference penalty gradients against exact double backprop, with known answers.

IR and ER: the parameter gradient's cosine to the exact one is >= 0.99 on a trained CNN (ReLU,
max-pool), the same CNN with SiLU, and a ResNet-18 at a small batch, all in train mode. JR: both
estimators are random; the finite-difference one has the published one's expectation (checked
within standard errors, and exactly on a linear model whose Jacobian is known).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raystudy.config import TrainConfig
from raystudy.core.models import build_model
from raystudy.errors import RaystudyError
from raystudy.mechanisms import objective, soft_targets, training_step
from raystudy.mechanisms.activation_pattern import ActivationPattern
from raystudy.mechanisms.finite_difference import (
    InputGradientNormFD,
    InputJacobianNormFD,
    WeightGradientNormFD,
    penalty_parameter_gradient,
)
from raystudy.mechanisms.gradient_norms import InputGradientNorm, InputJacobianNorm, WeightGradientNorm

CLASSES, SIZE = 4, 16


def data(n: int, seed: int):
    """Separable synthetic images: a class-dependent colour offset plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    colours = torch.rand(CLASSES, 3, 1, 1, generator=torch.Generator().manual_seed(99))
    x = (0.5 * colours[y] + 0.5 * torch.rand(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return x, y


def with_silu(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        setattr(model, name, nn.SiLU()) if isinstance(child, nn.ReLU) else with_silu(child)
    return model


def trained(model: nn.Module, steps: int = 60) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = data(32, seed=step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    relu = trained(build_model("tiny_cnn", CLASSES, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3))
    torch.manual_seed(0)
    silu = trained(with_silu(build_model("tiny_cnn", CLASSES, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)))
    torch.manual_seed(0)
    resnet = trained(build_model("resnet18", CLASSES, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3), steps=5)
    return {"relu_cnn": relu.train(), "silu_cnn": silu.train(), "resnet18": resnet.train()}


def cosine_to_exact(model, exact, finite_difference, batch: int) -> float:
    x, y = data(batch, seed=1000)
    _, reference = penalty_parameter_gradient(model, exact, x, soft_targets(y, CLASSES))
    _, estimate = penalty_parameter_gradient(model, finite_difference, x, soft_targets(y, CLASSES))
    return float(F.cosine_similarity(estimate.double(), reference.double(), dim=0))


CASES = [("relu_cnn", 32), ("silu_cnn", 32), ("resnet18", 4)]


@pytest.mark.parametrize("name, batch", CASES)
def test_ir_finite_difference_gradient_matches_double_backprop(models, name, batch):
    assert cosine_to_exact(models[name], InputGradientNorm(0.5), InputGradientNormFD(0.5), batch) >= 0.99


@pytest.mark.parametrize("name, batch", CASES)
def test_er_finite_difference_gradient_matches_double_backprop(models, name, batch):
    assert cosine_to_exact(models[name], WeightGradientNorm(0.05), WeightGradientNormFD(0.05), batch) >= 0.99


class _FreeSecondPass:
    """Records nothing, replays nothing: the perturbed pass makes its own ReLU decisions."""

    def record(self):
        return nullcontext()

    def replay(self):
        return nullcontext()


def test_without_the_held_pattern_a_relu_network_disagrees(models, monkeypatch):
    """Why the pattern is held: on a ResNet-18, units crossing zero spoil the difference quotient."""
    import raystudy.mechanisms.finite_difference as fd

    held = cosine_to_exact(models["resnet18"], InputGradientNorm(0.5), InputGradientNormFD(0.5), 4)
    monkeypatch.setattr(fd, "ActivationPattern", _FreeSecondPass)
    free = cosine_to_exact(models["resnet18"], InputGradientNorm(0.5), InputGradientNormFD(0.5), 4)
    assert held >= 0.99 > free


def test_reported_penalties_are_the_exact_values(models):
    """The loss logged with finite differences is the same number the exact form gives (IR, ER)."""
    model = models["relu_cnn"]
    x, y = data(16, seed=7)
    y_soft = soft_targets(y, CLASSES)
    for exact, fd in (
        (InputGradientNorm(0.5), InputGradientNormFD(0.5)),
        (WeightGradientNorm(0.05), WeightGradientNormFD(0.05)),
    ):
        exact_value, _ = penalty_parameter_gradient(model, exact, x, y_soft)
        fd_value, _ = penalty_parameter_gradient(model, fd, x, y_soft)
        assert torch.allclose(fd_value, exact_value, rtol=1e-5)


def test_jr_finite_difference_is_unbiased_on_a_linear_model():
    """J = W for every sample: E[1/2 d ||W u||^2] = 1/2 ||W||_F^2 over unit u in d dimensions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    x = torch.rand(8, 3, 4, 4)
    w = model[1].weight.detach()
    penalty = InputJacobianNormFD(weight=128 / 8 * 8)  # undo lambda * (B/128) / B at batch 8
    draws = torch.stack(
        [
            penalty_parameter_gradient(model, penalty, x, soft_targets(torch.zeros(8, dtype=torch.long), 6))[0]
            for _ in range(3000)
        ]
    )
    exact = 0.5 * w.pow(2).sum()
    assert abs(draws.mean() - exact) / exact < 0.03


def test_jr_finite_difference_has_the_published_expectation(models):
    """Mean over draws of the value and of a fixed projection of the gradient agree within their
    standard errors on a trained ReLU CNN (the variances are reported by the sweep benchmark)."""
    model = models["relu_cnn"]
    x, y = data(32, seed=3)
    y_soft = soft_targets(y, CLASSES)
    probe = None
    stats = {}
    torch.manual_seed(0)
    for penalty in (InputJacobianNorm(1.0), InputJacobianNormFD(1.0)):
        values, projections = [], []
        for _ in range(150):
            value, grad = penalty_parameter_gradient(model, penalty, x, y_soft)
            probe = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1)) if probe is None else probe
            values.append(float(value))
            projections.append(float(grad @ probe))
        stats[type(penalty).__name__] = [
            (torch.tensor(s).mean(), torch.tensor(s).std() / len(s) ** 0.5) for s in (values, projections)
        ]
    for (mean_a, se_a), (mean_b, se_b) in zip(stats["InputJacobianNorm"], stats["InputJacobianNormFD"]):
        assert abs(mean_a - mean_b) < 4 * (se_a**2 + se_b**2) ** 0.5
    # The test can fail: a factor-2 error in the estimate would be many standard errors away.
    (mean_a, se_a), (mean_b, se_b) = stats["InputJacobianNorm"][0], stats["InputJacobianNormFD"][0]
    assert abs(mean_a - 2 * mean_b) > 4 * (se_a**2 + 4 * se_b**2) ** 0.5


def test_held_pattern_makes_a_relu_network_piecewise_linear_in_its_input(models):
    """Replayed at the same input the logits are identical; along a direction the replayed network
    is affine (eval mode), so doubling the step doubles the change exactly."""
    model = models["resnet18"].eval()
    try:
        x, _ = data(4, seed=5)
        d = torch.randn_like(x)
        pattern = ActivationPattern()
        with torch.no_grad():
            with pattern.record():
                base = model(x)
            replayed = []
            for shifted in (x, x + 0.05 * d, x + 0.1 * d):
                with pattern.replay():
                    replayed.append(model(shifted))
            same, one, two = replayed[0], replayed[1] - base, replayed[2] - base
            free = model(x + 0.1 * d) - base
        assert torch.equal(same, base)
        assert torch.allclose(two, 2 * one, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(free, 2 * one, rtol=1e-3, atol=1e-4)  # the real network is not affine there
    finally:
        model.train()


def test_replay_refuses_a_different_network():
    pattern = ActivationPattern()
    with pattern.record():
        nn.ReLU()(torch.randn(3))
    with pytest.raises(RuntimeError, match="piecewise decisions"):
        with pattern.replay():
            pass


@pytest.mark.parametrize("mechanism", ["IR", "JR", "ER", "SAM&IR", "SAM&JR"])
def test_finite_difference_recipe_swaps_every_penalty(mechanism):
    exact = TrainConfig(mechanism=mechanism).recipe()
    fd = TrainConfig(mechanism=mechanism, penalty_gradient="finite_difference").recipe()
    assert [type(p).__name__ + "FD" for p in exact.penalties] == [type(p).__name__ for p in fd.penalties]
    assert [p.weight for p in exact.penalties] == [p.weight for p in fd.penalties]
    assert fd.sam_rho == exact.sam_rho and fd.takes_finite_differences and not exact.takes_finite_differences


def test_penalty_gradient_settings_are_checked():
    assert TrainConfig(mechanism="ST", penalty_gradient="finite_difference").recipe().penalties == ()
    with pytest.raises(RaystudyError, match="penalty_gradient"):
        TrainConfig(mechanism="IR", penalty_gradient="forward")
    with pytest.raises(RaystudyError, match="finite differences"):
        TrainConfig(mechanism="ER", penalty_gradient="finite_difference", precision="bf16")
    TrainConfig(mechanism="ER", precision="bf16")  # the exact form is allowed in bf16, as before


@pytest.mark.parametrize("mechanism", ["IR", "JR", "ER"])
def test_finite_difference_step_updates_batchnorm_statistics_once(mechanism):
    """The second (perturbed) pass leaves BN's running statistics alone: after a step they are what
    one train-mode forward of the batch leaves."""
    torch.manual_seed(0)
    model = build_model("tiny_cnn", CLASSES, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = data(16, seed=2)
    config = TrainConfig(mechanism=mechanism, penalty_gradient="finite_difference", dataset="synthetic")
    recipe = config.recipe()
    bn = model[1].features[1]
    expected = bn.running_mean.clone()
    with torch.no_grad():
        batch_mean = model[1].features[0](model[0](x)).mean(dim=(0, 2, 3))
    expected = 0.9 * expected + 0.1 * batch_mean
    training_step(model, recipe, torch.optim.SGD(model.parameters(), lr=0.0), x, y, CLASSES)
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)


def test_finite_difference_objective_reports_loss_parts():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", CLASSES, input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = data(8, seed=4)
    recipe = TrainConfig(mechanism="IR", penalty_gradient="finite_difference", dataset="synthetic").recipe()
    out = objective(model, recipe, x, soft_targets(y, CLASSES))
    assert torch.allclose(out["loss"], out["ce"] + out["ir"]) and out["ir"] > 0


def test_training_with_finite_differences_runs_in_full_fp32():
    """TF32 (cuDNN's default for convolutions) would drown a 1e-3 step: the loop turns it off while
    it trains (raystudy.core.precision), for finite differences and for input gradients alike (JR), and
    restores the flags after."""
    from raystudy.core.data import make_synthetic
    from raystudy.core.precision import tf32_flags
    from raystudy.training.loop import train

    data = make_synthetic(128, 32, num_classes=CLASSES, image_size=SIZE, seed=0)
    common = dict(dataset="synthetic", model="tiny_cnn", epochs=1, batch_size=32, warmup_epochs=0, image_size=SIZE)
    before, seen = tf32_flags(), []
    note = lambda record, path, model: seen.append(tf32_flags())  # noqa: E731
    config = TrainConfig(mechanism="SAM&JR", penalty_gradient="finite_difference", **common)
    result = train(config, data, on_epoch_end=note, log=None)
    assert seen == [{"matmul": False, "cudnn": False}] and math.isfinite(result.history[-1]["loss"])
    train(TrainConfig(mechanism="SAM", **common), data, on_epoch_end=note, log=None)
    assert seen[-1] == {"matmul": True, "cudnn": True} and tf32_flags() == before


def test_scale_aware_step_is_the_size_step_capped_where_the_loss_is_steep_and_floored():
    from raystudy.mechanisms.finite_difference import MIN_STEP_FRACTION, scale_aware_step

    size, loss = torch.tensor(1e-3), torch.tensor(2.0)
    assert float(scale_aware_step(size, loss, torch.tensor(1.0), 3e-3)) == pytest.approx(1e-3)  # flat: size step
    # Steep (slope 100): the step moves the loss by 3e-3 of itself, 6e-5.
    assert float(scale_aware_step(size, loss, torch.tensor(100.0), 3e-3)) == pytest.approx(3e-3 * 2.0 / 100)
    # Steeper still: never below MIN_STEP_FRACTION of the size step.
    assert float(scale_aware_step(size, loss, torch.tensor(1e6), 3e-3)) == pytest.approx(MIN_STEP_FRACTION * 1e-3)
    assert float(scale_aware_step(size, loss, torch.tensor(0.0), 3e-3)) == pytest.approx(1e-3)  # no gradient


def _linear(weight_scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, CLASSES))
    with torch.no_grad():
        model[1].weight.mul_(weight_scale)
    return model


def _steps_taken(monkeypatch, penalty, model, x, y_soft) -> list[torch.Tensor]:
    """The input shifts of every second pass `penalty` makes (x_shifted - x)."""
    import raystudy.mechanisms.finite_difference as fd

    shifts, original = [], fd.forward_again

    def spy(fwd, x=None, params=None):
        if x is not None:
            shifts.append((x - fwd.x.detach()).detach())
        return original(fwd, x=x, params=params)

    monkeypatch.setattr(fd, "forward_again", spy)
    penalty_parameter_gradient(model, penalty, x, y_soft, seed=0)
    return shifts


@pytest.mark.parametrize("weight_scale", [1.0, 1e3])
def test_ir_steps_its_size_step_or_where_the_loss_changes_by_its_fraction(monkeypatch, weight_scale):
    """Linear softmax model: the step along the stacked gradient is min(step * ||x||, c * L / ||g||):
    the size step where the loss is flat, the loss-change cap where it is steep."""
    from raystudy.mechanisms.finite_difference import INPUT_LOSS_CHANGE, INPUT_STEP

    # Images near mid-grey and logits W (x - 1/2): the loss stays near log 4 while its slope grows
    # with W. In float64, so that the step reads back exactly from the shifted input.
    model = _linear(weight_scale).double()
    with torch.no_grad():
        model[1].bias.copy_(-0.5 * model[1].weight.sum(dim=1))
    x = 0.5 + 1e-3 * torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(8) % CLASSES
    y_soft = soft_targets(y, CLASSES).double()
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xg), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    loss = loss.detach()
    expected = min(INPUT_STEP * float(x.norm()), INPUT_LOSS_CHANGE * float(loss) / float(grad.norm()))
    (shift,) = _steps_taken(monkeypatch, InputGradientNormFD(0.5), model, x, y_soft)
    assert float(shift.norm()) == pytest.approx(expected, rel=1e-3)
    assert F.cosine_similarity(shift.flatten(), grad.flatten(), dim=0) > 0.9999  # along the gradient
    steep = INPUT_LOSS_CHANGE * float(loss) / float(grad.norm()) < INPUT_STEP * float(x.norm())
    assert steep == (weight_scale > 1)  # both branches of the rule are exercised


@pytest.mark.parametrize("weight_scale", [1e-3, 10.0, 1e3])
def test_jr_steps_where_the_logits_change_by_their_fraction_of_the_spread(monkeypatch, weight_scale):
    """Linear model: J u = W u exactly, so the step the pilot finds is c * spread / rms(W u) (within
    the pilot's range)."""
    from raystudy.mechanisms.finite_difference import (
        JACOBIAN_MAX_STEPS,
        JACOBIAN_STEP,
        LOGIT_CHANGE,
        MIN_STEP_FRACTION,
    )

    model = _linear(weight_scale)
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # a spread that does not scale with W
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    pilot, final = _steps_taken(monkeypatch, InputJacobianNormFD(1.0), model, x, soft_targets(torch.zeros(8).long(), 4))
    h0 = JACOBIAN_STEP * float(x.norm()) / 8**0.5
    assert float(pilot.norm()) == pytest.approx(h0 * 8**0.5, rel=1e-2)  # unit directions, one per sample
    u = final / final.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        logits = model(x)
        ju = model[1](u.flatten(1)) - model[1].bias
    spread = (logits - logits.mean(dim=1, keepdim=True)).pow(2).mean().sqrt()
    wanted = LOGIT_CHANGE * float(spread) / float(ju.pow(2).mean().sqrt())
    expected = min(max(wanted, MIN_STEP_FRACTION * h0), JACOBIAN_MAX_STEPS * h0)
    h = float(final.flatten(1).norm(dim=1).mean())
    assert h == pytest.approx(expected, rel=1e-2)
    # A flat model's step is held at the top of its range; the others change the logits by the same
    # fraction of their spread, a hundredfold steeper W or not.
    assert (wanted > JACOBIAN_MAX_STEPS * h0) == (weight_scale < 1)
    assert wanted > MIN_STEP_FRACTION * h0
