"""Every mechanism against its formula in METHOD.md, on tiny models with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raystudy.core.models import build_model
from raystudy.errors import RaystudyError
from raystudy.mechanisms import MECHANISMS, get_mechanism, objective, parse_magnitudes, soft_targets, training_step
from raystudy.mechanisms.adversarial import L2PGD
from raystudy.mechanisms.augmentation import Cutout
from raystudy.mechanisms.base import ForwardPass
from raystudy.mechanisms.gradient_norms import (
    InputGradientNorm,
    InputJacobianNorm,
    WeightGradientNorm,
    jacobian_projection_norm,
)
from raystudy.mechanisms.sam import SAM
from raystudy.mechanisms.step import soft_cross_entropy

ALL = ("ST", "MU", "CM", "CO", "LS", "AT", "IR", "JR", "ER", "SAM", "SAM&IR", "SAM&JR")


def linear_model(d_in: int = 12, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, classes))


def test_registry_lists_the_twelve_mechanisms_in_method_order():
    assert tuple(MECHANISMS) == ALL


def test_unknown_mechanism_lists_valid_names():
    with pytest.raises(RaystudyError, match="valid: ST, MU, CM"):
        get_mechanism("XX")


def test_magnitudes_parse_and_check():
    spec = get_mechanism("SAM&JR")
    assert parse_magnitudes("rho=0.05,lambda_jr=1e-3", spec) == {"rho": 0.05, "lambda_jr": 1e-3}
    assert spec.resolve({}, "cifar10") == {"rho": 0.1, "lambda_jr": 1e-4}
    assert spec.resolve({}, "imagenette") == {"rho": 0.2, "lambda_jr": 0.1}
    with pytest.raises(RaystudyError, match="takes rho, lambda_jr"):
        parse_magnitudes("0.1", spec)
    with pytest.raises(RaystudyError, match="no magnitude 'lambda'"):
        spec.resolve({"lambda": 1.0}, "cifar10")
    with pytest.raises(RaystudyError, match="outside"):
        get_mechanism("MU").resolve({"p": 1.5}, "cifar10")
    with pytest.raises(RaystudyError, match="whole number"):
        get_mechanism("CO").resolve({"size": 8.5}, "cifar10")
    assert get_mechanism("IR").resolve(parse_magnitudes("0.7", get_mechanism("IR")), "cifar10") == {"lambda_ir": 0.7}


def separable_batch(n=64, classes=4, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.rand(classes, 3, 1, 1, generator=gen)
    x = (centres[y] + 0.05 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("name", ALL)
def test_every_mechanism_lowers_the_loss(name):
    torch.manual_seed(0)
    x, y = separable_batch()
    model = build_model("tiny_cnn", 4, input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    recipe = get_mechanism(name).recipe({}, "cifar10")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sam = SAM(model.parameters(), recipe.sam_rho) if recipe.sam_rho else None
    plain = get_mechanism("ST").recipe({}, "cifar10")

    def clean_loss():
        model.eval()
        with torch.no_grad():
            value = float(objective(model, plain, x, soft_targets(y, 4))["loss"])
        model.train()
        return value

    before = clean_loss()

    def partners():
        pick = torch.randint(0, len(y), (len(y),))
        return x[pick], y[pick]

    for _ in range(30):
        parts = training_step(model, recipe, optimizer, x, y, 4, sam, partners=partners)
        assert torch.isfinite(parts["loss"])
    assert clean_loss() < 0.7 * before


def test_label_smoothing_targets():
    t = soft_targets(torch.tensor([2, 0]), 5, smoothing=0.2)
    assert torch.allclose(t[0], torch.tensor([0.05, 0.05, 0.8, 0.05, 0.05]))
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.allclose(soft_targets(torch.tensor([1]), 3), torch.tensor([[0.0, 1.0, 0.0]]))
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    assert torch.allclose(
        soft_cross_entropy(logits, soft_targets(y, 3)), nn.functional.cross_entropy(logits, y, reduction="none")
    )


def test_cutout_masks_at_most_m_by_m():
    torch.manual_seed(2)
    x = torch.ones(200, 3, 32, 32)
    out, y = Cutout(size=8)(x, torch.zeros(200, 10))
    masked = out[:, 0] == 0
    assert masked.sum((1, 2)).max() <= 64
    assert masked.sum((1, 2)).max() == 64  # unclipped squares exist
    rows, cols = masked.any(2).sum(1), masked.any(1).sum(1)
    assert rows.max() <= 8 and cols.max() <= 8
    assert (masked.sum((1, 2)) == rows * cols).all()  # a rectangle (clipped square)


def test_l2_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4, input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = separable_batch(n=32)
    model.train()
    adversarial = L2PGD(epsilon=0.5, steps=10, step_size=0.125)(model, x, soft_targets(y, 4))
    assert model.training  # flag restored
    assert all(p.grad is None for p in model.parameters())
    norms = (adversarial - x).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-5).all() and (norms > 0.1).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    model.eval()
    with torch.no_grad():
        before = soft_cross_entropy(model(x), soft_targets(y, 4)).mean()
        after = soft_cross_entropy(model(adversarial), soft_targets(y, 4)).mean()
    assert after > before


def test_ir_penalty_equals_independent_gradient_norm():
    model = linear_model()
    x = torch.rand(5, 12)
    y = torch.tensor([0, 1, 2, 0, 1])
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    ce = soft_cross_entropy(logits, soft_targets(y, 3))
    penalty = InputGradientNorm(weight=0.3)(ForwardPass(model, xg, soft_targets(y, 3), logits, ce))
    # Independently: the CE gradient of a linear model is W^T (softmax - onehot) per sample.
    w = model[1].weight.detach()
    residual = torch.softmax(logits.detach(), 1) - nn.functional.one_hot(y, 3)
    expected = (
        0.3 * math.sqrt(5 / 128) * (residual @ w).norm() / 5
    )  # lambda at batch 5 is sqrt(5/128) of its batch-128 value
    assert torch.allclose(penalty, expected, rtol=1e-5)


def test_jr_estimate_matches_exact_frobenius_norm_in_expectation():
    torch.manual_seed(0)
    model = linear_model(d_in=20, classes=6)
    x = torch.rand(8, 20, requires_grad=True)
    w = model[1].weight.detach()
    exact = 0.5 * w.pow(2).sum()  # 1/2 mean_i ||J_i||_F^2, J_i = W for every sample
    draws = torch.stack([jacobian_projection_norm(x, model(x)).detach() for _ in range(4000)])
    assert abs(draws.mean() - exact) / exact < 0.03
    # The loss term divides by B once more, as in the published code.
    logits = model(x)
    torch.manual_seed(5)
    y_soft = soft_targets(torch.zeros(8, dtype=torch.long), 6)
    term = InputJacobianNorm(weight=2.0)(ForwardPass(model, x, y_soft, logits, soft_cross_entropy(logits, y_soft)))
    torch.manual_seed(5)
    assert torch.allclose(term, 2.0 * (8 / 128) * jacobian_projection_norm(x, logits) / 8)  # lambda * B/128 at batch 8


def test_er_penalty_matches_weight_gradient_norm():
    model = linear_model()
    x, y = torch.rand(6, 12), torch.tensor([0, 1, 2, 2, 1, 0])
    logits = model(x)
    ce = soft_cross_entropy(logits, soft_targets(y, 3))
    penalty = WeightGradientNorm(weight=0.2)(ForwardPass(model, x, soft_targets(y, 3), logits, ce))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = 0.1 * sum(p.grad.pow(2).sum() for p in model.parameters())
    assert torch.allclose(penalty, expected, rtol=1e-5)


def test_sam_ascent_has_norm_rho_and_weights_are_restored():
    model = linear_model()
    x, y = torch.rand(6, 12), torch.tensor([0, 1, 2, 2, 1, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    sam = SAM(model.parameters(), rho=0.05)
    assert math.isclose(float(sam.ascend()), 0.05, rel_tol=1e-5)
    moved = torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before)))
    assert math.isclose(float(moved), 0.05, rel_tol=1e-4)
    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", list(MECHANISMS))  # every registered one, a new one included
@pytest.mark.parametrize("gradient", ["exact", "finite_difference"])
def test_a_mechanisms_traits_say_what_its_built_recipe_holds(name, gradient):
    from raystudy.config import TrainConfig

    config = TrainConfig.from_preset("fast", mechanism=name, penalty_gradient=gradient)
    recipe, shape = config.recipe(), config.shape()
    assert shape.adversary == (recipe.adversary is not None) and shape.sam == (recipe.sam_rho is not None)
    assert shape.has_penalties == bool(recipe.penalties)
    assert shape.input_sensitive == recipe.input_sensitive
    assert shape.takes_finite_differences == recipe.takes_finite_differences
    assert shape.double_backward == any(p.double_backward for p in recipe.penalties)
    assert get_mechanism(name).traits.transform == (recipe.transform is not None)
