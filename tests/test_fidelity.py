"""The published forms (METHOD.md, "Where the published code differs"), checked on intermediate values.

Each test pins one detail a plausible edit could change without breaking the end-to-end runs: the
batch-128 magnitude rule, the fp32 input path, fresh mixup/cutmix partners, DI's draws, SAM's two
passes, AT's eval-mode PGD, the attack loop's projection and momentum, and the documented defaults.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raystudy.config import TrainConfig
from raystudy.core.models import build_model
from raystudy.mechanisms import get_mechanism, objective, soft_targets, training_step
from raystudy.mechanisms.adversarial import L2PGD
from raystudy.mechanisms.augmentation import CutMix, Mixup
from raystudy.mechanisms.base import ForwardPass
from raystudy.mechanisms.gradient_norms import InputGradientNorm, InputJacobianNorm
from raystudy.mechanisms.sam import SAM
from raystudy.mechanisms.step import soft_cross_entropy
from raystudy.metrics import EvalConfig, LinfAttack, make_attack, smoothness
from raystudy.metrics.attacks import PIXEL, round_to_8bit
from raystudy.training.loop import _autocast


def tiny(classes=4, size=16, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny_cnn", classes, input_size=size, mean=(0.5,) * 3, std=(0.25,) * 3)


def linear(d_in=48, classes=4, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, classes))


def batch(n=32, classes=4, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)


# --------------------------------------------------------------------------------------------
# 1. The fast preset keeps the per-step method


def test_fast_preset_keeps_a_small_perturbation_at_the_first_layer():
    """At AT's smallest budget the first convolution must see the perturbation fp32 would show it."""
    model = tiny(10, 32).eval()
    x, _ = batch(16, 10, 32)
    delta = torch.randn_like(x)
    delta = 0.01 * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # eps = 0.01 (L2), per sample
    first = model[1].features[0]
    seen = []
    hook = first.register_forward_hook(lambda m, i, o: seen.append(o.float()))

    def first_layer_difference(autocast) -> torch.Tensor:
        seen.clear()
        with torch.no_grad(), autocast:
            model(x)
            model(x + delta)
        return (seen[1] - seen[0]).flatten()

    intended = first_layer_difference(torch.autocast("cpu", enabled=False))
    fast = TrainConfig.from_preset("fast", mechanism="AT", magnitudes={"epsilon": 0.01})
    under_fast = first_layer_difference(_autocast(fast, torch.device("cpu")))
    bf16 = first_layer_difference(torch.autocast("cpu", dtype=torch.bfloat16))
    hook.remove()
    assert F.cosine_similarity(under_fast, intended, dim=0) >= 0.99
    assert F.cosine_similarity(bf16, intended, dim=0) < 0.9  # what bf16 would have done: the test can fail


def penalty_and_gradient(model, penalty, x, y) -> tuple[float, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    logits = model(x)
    y_soft = soft_targets(y, 4)
    value = penalty(ForwardPass(model, x, y_soft, logits, soft_cross_entropy(logits, y_soft)))
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)  # JR does not depend on the last bias
    return float(value.detach()), torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
    )


@pytest.mark.parametrize("penalty, draws", [(InputGradientNorm(0.5), 1), (InputJacobianNorm(0.01), 40)])
def test_penalty_at_batch_512_matches_batch_128_in_expectation(penalty, draws):
    model = tiny().eval()  # eval mode: the per-sample gradients do not depend on the batch's BN statistics
    x, y = batch(512)
    torch.manual_seed(1)
    big = [penalty_and_gradient(model, penalty, x, y) for _ in range(draws)]
    small = [
        penalty_and_gradient(model, penalty, x[i : i + 128], y[i : i + 128])
        for _ in range(draws)
        for i in range(0, 512, 128)
    ]
    big_value, small_value = sum(v for v, _ in big) / len(big), sum(v for v, _ in small) / len(small)
    big_grad, small_grad = sum(g for _, g in big) / len(big), sum(g for _, g in small) / len(small)
    assert big_value == pytest.approx(small_value, rel=0.05)
    assert float(big_grad.norm() / small_grad.norm()) == pytest.approx(1.0, abs=0.05)
    assert F.cosine_similarity(big_grad, small_grad, dim=0) > 0.98


# --------------------------------------------------------------------------------------------
# 2. MU / CM mix with fresh, unmixed partners


def identity_images(ids: torch.Tensor, sources: int, size: int = 6) -> torch.Tensor:
    """Image of source k is one-hot on channel k: a pixel's channels are its source weights."""
    return F.one_hot(ids, sources).float().view(len(ids), sources, 1, 1).expand(-1, -1, size, size).clone()


class PartnerPool:
    """Hands out fresh sources (ids 16, 17, ...) as the training set would: never a mixed image."""

    def __init__(self, n: int, sources: int):
        self.n, self.sources, self.next = n, sources, n
        self.draws = []

    def __call__(self):
        ids = torch.arange(self.next, self.next + self.n)
        self.next += self.n
        self.draws.append(ids)
        return identity_images(ids, self.sources), F.one_hot(ids, self.sources).float()


@pytest.mark.parametrize("transform", [Mixup(p=1.0), CutMix(p=1.0)])
def test_two_rounds_mix_each_sample_with_two_fresh_partners(transform):
    torch.manual_seed(0)
    n, sources = 16, 48
    own = torch.arange(n)
    pool = PartnerPool(n, sources)
    mixed, labels = transform(identity_images(own, sources), F.one_hot(own, sources).float(), pool)
    assert len(pool.draws) == 2  # one fresh draw per round
    pixel_weights = mixed.mean(dim=(2, 3))  # fraction of each source in the image
    assert torch.allclose(pixel_weights.sum(1), torch.ones(n)) and torch.allclose(labels.sum(1), torch.ones(n))
    for i in range(n):
        allowed = {i, int(pool.draws[0][i]), int(pool.draws[1][i])}
        assert set(torch.nonzero(pixel_weights[i] > 1e-6).flatten().tolist()) <= allowed  # at most three sources
        assert set(torch.nonzero(labels[i] > 1e-6).flatten().tolist()) <= allowed
    second = torch.stack([pixel_weights[i, pool.draws[1][i]] for i in range(n)])
    assert torch.allclose(second, torch.stack([labels[i, pool.draws[1][i]] for i in range(n)]), atol=1e-6)
    if isinstance(transform, Mixup):  # pixels and labels are mixed by the same weights throughout
        assert torch.allclose(pixel_weights, labels, atol=1e-6)
        assert (pixel_weights > 1e-6).sum(1).eq(3).all()


def test_mixup_probability_and_uniform_weight():
    torch.manual_seed(0)
    n = 20000
    x, y = torch.zeros(n, 1, 1, 1), F.one_hot(torch.zeros(n, dtype=torch.long), 2).float()
    partners = lambda: (torch.ones(n, 1, 1, 1), F.one_hot(torch.ones(n, dtype=torch.long), 2).float())  # noqa: E731
    mixed, labels = Mixup(p=0.3, rounds=1)(x, y, partners)
    partner_weight = mixed.flatten()
    was_mixed = partner_weight > 0
    assert was_mixed.float().mean() == pytest.approx(0.3, abs=0.015)
    mixed_weights = partner_weight[was_mixed]  # 1 - b with b ~ Beta(1, 1) = U(0, 1)
    assert mixed_weights.mean() == pytest.approx(0.5, abs=0.015)
    assert mixed_weights.var() == pytest.approx(1 / 12, abs=0.005)
    assert torch.allclose(labels[:, 1], partner_weight)


def test_cutmix_probability_and_box_size():
    torch.manual_seed(0)
    n, side = 20000, 32
    x, y = torch.zeros(n, 1, side, side), F.one_hot(torch.zeros(n, dtype=torch.long), 2).float()
    partners = lambda: (torch.ones(n, 1, side, side), F.one_hot(torch.ones(n, dtype=torch.long), 2).float())  # noqa: E731
    pasted, labels = CutMix(p=0.6, rounds=1)(x, y, partners)
    area = pasted.mean(dim=(1, 2, 3))
    assert torch.allclose(labels[:, 1], area)
    assert (area > 0).float().mean() == pytest.approx(0.6, abs=0.015)
    # Independently: a box of side floor(S*sqrt(1-b)) at a uniform centre, clipped at the borders.
    gen = torch.Generator().manual_seed(1)
    box = (side * torch.sqrt(1 - torch.rand(n, generator=gen))).floor()
    centre = torch.randint(0, side, (2, n), generator=gen).float()
    extent = ((centre + box - (box / 2).floor()).clamp(max=side) - (centre - (box / 2).floor()).clamp(min=0)).prod(0)
    expected = float(extent.mean()) / side**2
    assert float(area[area > 0].mean()) == pytest.approx(expected, rel=0.03)


# --------------------------------------------------------------------------------------------
# 3. DI as published


def di_outputs(draws=3000, side=32):
    attack = make_attack("di", 8 * PIXEL)
    x = torch.rand(2, 3, side, side)
    gen = torch.Generator().manual_seed(0)
    return x, [attack._diversify(x, gen) for _ in range(draws)]


def test_di_sizes_and_identity_frequency():
    x, outputs = di_outputs()
    n = len(outputs)
    identity = sum(torch.equal(o, x) for o in outputs) / n
    enlarged = [o.shape[-1] for o in outputs if o.shape[-1] > 32]
    shrunk = [o for o in outputs if o.shape[-1] == 32 and not torch.equal(o, x)]
    # r ~ U(0.75, 1.5): r in [1, 33/32) keeps the batch (s = 32); else it is used with probability 0.7.
    keep = (33 / 32 - 1) / 0.75
    assert identity == pytest.approx(keep + (1 - keep) * 0.3, abs=0.03)
    assert len(enlarged) / n == pytest.approx(0.7 * (1.5 - 33 / 32) / 0.75, abs=0.03)
    assert len(shrunk) / n == pytest.approx(0.7 * 0.25 / 0.75, abs=0.03)
    assert min(enlarged) == 33 and max(enlarged) == 47  # s = floor(32 r) for r < 1.5, padded to s x s
    # A shrunk batch is resized to a side in [floor(32 r), 32) >= 24 and zero-padded back to 32.
    content = [int((o[0].abs().sum(0) > 0).any(1).sum()) for o in shrunk]
    assert min(content) == 24 and max(content) == 31
    assert all(
        o.shape[0] == 2 and torch.equal(o[0].abs().sum(0) > 0, o[1].abs().sum(0) > 0) for o in outputs[:200]
    )  # one draw per batch


def test_di_resizes_bilinearly_so_gradients_reach_every_pixel():
    attack = make_attack("di", 8 * PIXEL)
    gen = torch.Generator().manual_seed(0)
    found = {"shrunk": False, "enlarged": False}
    for _ in range(200):
        x = torch.rand(1, 3, 32, 32, requires_grad=True)
        state = gen.get_state()
        out = attack._diversify(x, gen)
        if out is x:
            continue
        kind = "enlarged" if out.shape[-1] > 32 else "shrunk"
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert (grad > 0).all(), f"a {kind} batch leaves pixels without gradient"
        gen.set_state(state)
        found[kind] = True
        if all(found.values()):
            return
        attack._diversify(x, gen)
    pytest.fail(f"not every case was drawn: {found}")


# --------------------------------------------------------------------------------------------
# 4. SAM, SAM&IR, SAM&JR: two passes, the update from the second gradient only


def sam_reference(model, recipe, x, y, rho, lr, seed):
    """theta - lr * grad L(theta + rho * g / ||g||), g = grad L(theta), L the recipe's loss (SGD, no decay)."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    start = [p.detach().clone() for p in params]
    y_soft = soft_targets(y, 4)
    torch.manual_seed(seed)
    first = torch.autograd.grad(objective(ref, recipe, x, y_soft)["loss"], params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in first))
    with torch.no_grad():
        for p, g in zip(params, first):
            p.add_(rho * g / norm)
    second = torch.autograd.grad(objective(ref, recipe, x, y_soft)["loss"], params)
    return [s - lr * g for s, g in zip(start, second)]


@pytest.mark.parametrize("name", ["SAM", "SAM&IR", "SAM&JR"])
def test_sam_step_moves_by_the_gradient_at_the_ascended_weights(name):
    model = linear()
    x, y = batch(8, 4, 4)
    recipe = get_mechanism(name).recipe({"rho": 0.3}, "cifar10")
    assert recipe.sam_rho == 0.3 and len(recipe.penalties) == (0 if name == "SAM" else 1)
    expected = sam_reference(model, recipe, x, y, 0.3, 0.5, seed=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(7)
    training_step(model, recipe, optimizer, x, y, 4, SAM(model.parameters(), 0.3))
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_sam_and_ir_and_sam_and_jr_use_the_ir_and_jr_losses_at_their_defaults():
    sam_ir = get_mechanism("SAM&IR").recipe({}, "cifar10")
    sam_jr = get_mechanism("SAM&JR").recipe({}, "cifar10")
    assert sam_ir.sam_rho == 0.1 and sam_ir.penalties == (InputGradientNorm(0.5),)
    assert sam_jr.sam_rho == 0.1 and sam_jr.penalties == (InputJacobianNorm(1e-4),)
    assert get_mechanism("IR").recipe({}, "cifar10").penalties == (InputGradientNorm(0.5),)


def bn_running_mean_after(model, steps):
    for step in steps:
        step(model)
    return model[1].features[1].running_mean.clone()


@pytest.mark.parametrize("sam_bn, passes", [("both", 2), ("first", 1)])
def test_sam_updates_batchnorm_statistics_in_both_passes_by_default(sam_bn, passes):
    model = tiny(size=8)
    x, y = batch(16, 4, 8)
    recipe = TrainConfig.from_preset(
        "faithful", dataset="synthetic", model="tiny_cnn", mechanism="SAM", sam_bn=sam_bn
    ).recipe()
    reference = copy.deepcopy(model)

    def first_pass(m):
        loss = F.cross_entropy(m(x), y)
        loss.backward()

    def second_pass(m):  # at the ascended weights, in train mode
        sam = SAM(m.parameters(), recipe.sam_rho)
        sam.ascend()
        m(x)
        sam.restore()

    expected = bn_running_mean_after(reference, [first_pass, second_pass][:passes])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only BN statistics can change
    training_step(model, recipe, optimizer, x, y, 4, SAM(model.parameters(), recipe.sam_rho))
    assert torch.allclose(model[1].features[1].running_mean, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 5. AT: L2 PGD in eval mode, the published schedule, training on the adversarial batch only


def l2_pgd_reference(model, x, y_soft, eps, steps, step_size):
    model.eval()
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(soft_cross_entropy(model(x + delta), y_soft).sum(), delta)
        delta = delta.detach() + step_size * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / delta.flatten(1).norm(dim=1), max=1.0).view(-1, 1, 1, 1)
        delta = (x + delta).clamp(0, 1) - x
    return x + delta


def test_at_schedule_is_the_published_one():
    assert get_mechanism("AT").recipe({"epsilon": 0.5}, "cifar10").adversary == L2PGD(0.5, 10, 0.125)
    assert get_mechanism("AT").recipe({"epsilon": 1.0}, "imagenette").adversary == L2PGD(1.0, 5, 0.4)
    assert get_mechanism("AT").recipe({}, "cifar10").adversary.epsilon == 0.03


def test_l2_pgd_matches_the_formula_in_eval_mode_and_leaves_batchnorm_alone():
    model = tiny(size=8)
    x, y = batch(16, 4, 8)
    y_soft = soft_targets(y, 4)
    model.train()
    running = model[1].features[1].running_mean.clone()
    adversarial = L2PGD(0.5, 10, 0.125)(model, x, y_soft)
    assert torch.equal(model[1].features[1].running_mean, running) and model.training
    reference = l2_pgd_reference(copy.deepcopy(model), x, y_soft, 0.5, 10, 0.125)
    assert torch.allclose(adversarial, reference, atol=1e-6)
    shorter = l2_pgd_reference(copy.deepcopy(model), x, y_soft, 0.5, 9, 0.125)
    assert not torch.allclose(adversarial, shorter, atol=1e-4)  # the step count is visible here


def test_at_step_trains_on_the_adversarial_batch_only():
    model = linear()
    x, y = batch(8, 4, 4)
    recipe = get_mechanism("AT").recipe({"epsilon": 1.0}, "cifar10")
    adversarial = recipe.adversary(model, x, soft_targets(y, 4))
    expected_grads = torch.autograd.grad(F.cross_entropy(model(adversarial), y), list(model.parameters()))
    start = [p.detach().clone() for p in model.parameters()]
    training_step(model, recipe, torch.optim.SGD(model.parameters(), lr=1.0), x, y, 4)
    for p, s, g in zip(model.parameters(), start, expected_grads):
        assert torch.allclose(p, s - g, atol=1e-6)


def test_objective_is_mean_cross_entropy_plus_each_penalty_once():
    model = linear()
    x, y = batch(8, 4, 4)
    recipe = get_mechanism("IR").recipe({"lambda_ir": 0.7}, "cifar10")
    out = objective(model, recipe, x, soft_targets(y, 4))
    assert torch.allclose(out["ce"], F.cross_entropy(model(x), y))
    assert torch.allclose(out["loss"], out["ce"] + out["ir"])
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    y_soft = soft_targets(y, 4)
    assert torch.allclose(
        out["ir"], InputGradientNorm(0.7)(ForwardPass(model, xg, y_soft, logits, soft_cross_entropy(logits, y_soft)))
    )


# --------------------------------------------------------------------------------------------
# 6. The attack loop: the published defaults, projection before rounding, MI's normalization


def linf_reference(model, x, y, eps, steps, step_size, momentum=0.0, target=None):
    """METHOD.md's PGD / MI, written out: sign steps, eps-ball and [0, 1] projection after each."""
    delta, direction = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y if target is None else target, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        if momentum:
            direction = momentum * direction + g / g.abs().mean(dim=(1, 2, 3), keepdim=True)
            g = direction
        sign = -1.0 if target is not None else 1.0
        delta = (delta.detach() + sign * step_size * g.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return x + delta


def test_attack_defaults_are_the_published_ones():
    pgd = LinfAttack(8 * PIXEL)
    assert (pgd.steps, pgd.step_size, pgd.random_start, pgd.momentum, pgd.diversity_prob) == (
        20,
        2 * PIXEL,
        False,
        0.0,
        0.0,
    )
    assert pgd.resize_range == (0.75, 1.5) and pgd.round_to_8bit
    assert make_attack("pgd", 8 * PIXEL) == pgd
    assert make_attack("mi", 8 * PIXEL) == LinfAttack(8 * PIXEL, momentum=0.9)
    assert make_attack("di", 8 * PIXEL) == LinfAttack(8 * PIXEL, diversity_prob=0.7)
    assert make_attack("dim", 8 * PIXEL) == LinfAttack(8 * PIXEL, momentum=0.9, diversity_prob=0.7)
    config = EvalConfig()
    assert (config.steps, config.step_size, config.random_start, config.budgets) == (20, 2 * PIXEL, False, (4, 8, 16))


@pytest.mark.parametrize("name, targeted", [("pgd", False), ("pgd", True), ("mi", False), ("mi", True)])
def test_attack_iterates_match_the_written_out_formula(name, targeted):
    model = tiny(size=8).eval()
    x, y = batch(8, 4, 8)
    target = (y + 1) % 4 if targeted else None
    attack = LinfAttack(12 * PIXEL, steps=6, momentum=0.9 if name == "mi" else 0.0, round_to_8bit=False)
    reference = linf_reference(model, x, y, 12 * PIXEL, 6, 2 * PIXEL, attack.momentum, target)
    assert torch.allclose(attack(model, x, y, target), reference, atol=1e-6)


def test_projection_holds_before_the_final_rounding():
    model = linear(48, 2)  # binary linear: the CE gradient's sign never changes, so PGD saturates
    x = 0.25 + 0.5 * torch.rand(16, 3, 4, 4)
    y = torch.zeros(16, dtype=torch.long)
    adversarial = LinfAttack(8 * PIXEL, round_to_8bit=False)(model, x, y)
    direction = (model[1].weight[1] - model[1].weight[0]).sign().view(1, 3, 4, 4)
    assert torch.allclose(adversarial - x, 8 * PIXEL * direction.expand_as(x), atol=1e-6)
    long_budget = LinfAttack(1.0, round_to_8bit=False)(model, x, y)  # 20 steps of 2/255, no ball to stop them
    assert torch.allclose((long_budget - x).abs().max(), torch.tensor(40 * PIXEL), atol=1e-6)


def test_rounding_to_8bit_pixels():
    x = torch.tensor([0.5, 0.0, 1.0]).view(1, 3, 1, 1) * 255 // 1 / 255
    adversarial = x + torch.tensor([0.6, -0.2, 0.2]).view(1, 3, 1, 1) * PIXEL
    rounded = round_to_8bit(adversarial, x, 8 * PIXEL)
    assert torch.allclose(rounded * 255, torch.tensor([128.0, 0.0, 255.0]).view(1, 3, 1, 1), atol=1e-4)


def test_di_attack_feeds_diversified_batches_to_the_model():
    sizes = []
    model = tiny(size=32).eval()
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[-1]))
    x, y = batch(4, 4, 32)
    make_attack("di", 8 * PIXEL)(model, x, y, None, torch.Generator().manual_seed(0))
    assert len(sizes) == 20 and len(set(sizes)) > 2 and max(sizes) <= 47


# --------------------------------------------------------------------------------------------
# 7. Smoothness and AutoAttack settings


def test_smoothness_defaults_and_early_stop():
    import inspect

    from raystudy.metrics.smoothness import DEFAULT_ITERATIONS, DEFAULT_TOLERANCE, input_hessian_top_eigenvalue

    assert (DEFAULT_ITERATIONS, DEFAULT_TOLERANCE) == (20, 1e-3)
    assert (EvalConfig().power_iterations, EvalConfig().power_tolerance) == (20, 1e-3)
    defaults = inspect.signature(smoothness).parameters
    assert defaults["iterations"].default == 20 and defaults["tolerance"].default == 1e-3
    model = tiny(size=8).eval()
    x, y = batch(4, 4, 8)
    capped = input_hessian_top_eigenvalue(model, x, y, iterations=7, tolerance=0.0)
    assert capped.iterations == 7 and not capped.converged.all()
    loose = input_hessian_top_eigenvalue(model, x, y, iterations=50, tolerance=0.5)
    assert loose.iterations < 50 and loose.converged.all()


def test_autoattack_is_the_standard_version_with_reference_settings(monkeypatch):
    torchattacks = pytest.importorskip("torchattacks", reason="the optional extra raystudy[autoattack]")

    from raystudy.metrics.attacks import autoattack

    built = []

    class Capture:
        def __init__(self, parts):
            built.extend(parts)

        def __call__(self, x, y):
            return x

    monkeypatch.setattr(torchattacks, "MultiAttack", Capture)
    model = tiny(size=8)
    x, y = batch(2, 4, 8)
    autoattack(model, x, y, eps=8 * PIXEL, num_classes=4, seed=5)
    assert [type(a).__name__ for a in built] == ["APGD", "APGDT", "FAB", "Square"]
    apgd, apgdt, fab, square = built
    assert all(a.eps == 8 * PIXEL and a.norm == "Linf" and a.seed == 5 and a.n_restarts == 1 for a in built)
    assert apgd.steps == apgdt.steps == fab.steps == 100 and apgd.loss == "ce"
    assert fab.multi_targeted and apgdt.n_target_classes == fab.n_target_classes == 3
    assert square.n_queries == 5000
    assert model.training  # mode restored


def test_magnitude_rule_is_stated_in_the_listing():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "raystudy", "mechanisms"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "batch-128" in out.stdout and "sqrt(B/128)" in out.stdout and "B/128" in out.stdout


# --------------------------------------------------------------------------------------------
# 8. Small pieces with known answers: the fooling rate, batching, boxes, magnitude parsing


def test_fooling_rate_counts_every_sample():
    from raystudy.metrics.asr import fooling_rate

    y = torch.tensor([0, 1, 2, 3])
    assert fooling_rate(y, torch.tensor([0, 2, 2, 0])) == 0.5  # samples 1 and 3 fooled
    assert fooling_rate(y, torch.tensor([1, 2, 2, 0]), target_class=torch.tensor([1, 2, 3, 0])) == 0.75


def test_eval_set_batches_and_device_copy_keep_every_field():
    from raystudy.core.data import make_synthetic
    from raystudy.metrics.hook import _batches, make_eval_set

    assert _batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    data = make_synthetic(32, 40, num_classes=4, image_size=8, seed=0)
    eval_set = make_eval_set(data.test, 4, EvalConfig(n_eval=20))
    moved = eval_set.to("cpu")
    assert torch.equal(moved.images, eval_set.images) and torch.equal(moved.labels, eval_set.labels)
    assert torch.equal(moved.target_classes, eval_set.target_classes) and (moved.indices == eval_set.indices).all()


def test_boxes_are_placed_at_the_drawn_centres_and_clipped():
    from raystudy.mechanisms.augmentation import _box_masks

    b, h, w = 400, 9, 7
    box_h, box_w = torch.randint(0, 10, (b,)), torch.randint(0, 8, (b,))
    torch.manual_seed(3)
    masks = _box_masks(b, h, w, box_h, box_w, None)[:, 0]
    torch.manual_seed(3)
    cy, cx = torch.randint(0, h, (b,)), torch.randint(0, w, (b,))
    for i in range(b):
        top, left = int(cy[i]) - int(box_h[i]) // 2, int(cx[i]) - int(box_w[i]) // 2
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[max(top, 0) : max(top + int(box_h[i]), 0), max(left, 0) : max(left + int(box_w[i]), 0)] = True
        assert torch.equal(masks[i], expected), i
    assert masks[:, 0, :].any() and masks[:, :, 0].any()  # boxes reach the first row and column


def test_unmixed_samples_are_left_exactly_as_they_were():
    x, y = torch.rand(64, 3, 8, 8), F.one_hot(torch.arange(64) % 4, 4).float()
    partners = lambda: (torch.rand(64, 3, 8, 8), F.one_hot(torch.zeros(64, dtype=torch.long), 4).float())  # noqa: E731
    for transform in (Mixup(p=0.0), CutMix(p=0.0)):
        out, labels = transform(x, y, partners)
        assert torch.equal(out, x) and torch.equal(labels, y)


def test_partners_get_the_batch_label_smoothing_and_a_missing_source_is_an_error():
    from raystudy.mechanisms.base import Recipe

    model = linear(12, 5)
    x, y = torch.rand(16, 3, 2, 2), torch.arange(16) % 5
    with pytest.raises(ValueError, match="pass partners="):
        training_step(
            model,
            get_mechanism("MU").recipe({"p": 0.5}, "cifar10"),
            torch.optim.SGD(model.parameters(), lr=0.1),
            x,
            y,
            5,
        )
    seen = {}
    recipe = Recipe(
        transform=lambda x, y_soft, partners: seen.setdefault("partner", partners()) and (x, y_soft),
        label_smoothing=0.2,
    )
    training_step(
        model, recipe, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 5, partners=lambda: (x, (y + 1) % 5)
    )
    assert torch.allclose(seen["partner"][1], soft_targets((y + 1) % 5, 5, 0.2))


def test_magnitude_bounds_and_parsing():
    from raystudy.errors import RaystudyError
    from raystudy.mechanisms import parse_magnitudes

    assert get_mechanism("MU").resolve({"p": 0.0}, "cifar10") == {"p": 0.0}  # [0, 1]: both ends allowed
    assert get_mechanism("MU").resolve({"p": 1.0}, "cifar10") == {"p": 1.0}
    with pytest.raises(RaystudyError, match=r"epsilon=0 is outside \(0, inf\]"):  # AT's budget must be > 0
        get_mechanism("AT").resolve({"epsilon": 0.0}, "cifar10")
    with pytest.raises(RaystudyError, match=r"p=1 is outside \[0, 0.999\]"):
        get_mechanism("LS").resolve({"p": 1.0}, "cifar10")
    with pytest.raises(RaystudyError, match=r"p=-0.1 is outside \[0, 1\]"):
        get_mechanism("MU").resolve({"p": -0.1}, "cifar10")
    sam_jr = get_mechanism("SAM&JR")
    assert parse_magnitudes(None, sam_jr) == {} and parse_magnitudes("  ", sam_jr) == {}
    assert parse_magnitudes("rho=0.2", sam_jr) == {"rho": 0.2}
    with pytest.raises(RaystudyError, match="magnitude 'rho==0.2' is not name=number"):
        parse_magnitudes("rho==0.2", sam_jr)
    with pytest.raises(RaystudyError, match="magnitude 'lambda_jr' is not name=number"):
        parse_magnitudes("rho=0.2,lambda_jr", sam_jr)
    with pytest.raises(RaystudyError, match="ST takes no magnitude"):
        parse_magnitudes("0.5", get_mechanism("ST"))


def test_grids_and_defaults_are_method_md_s():
    grids = {
        name: {p.name: p.grids["cifar10"] for p in get_mechanism(name).params}
        for name in ("MU", "CM", "CO", "LS", "AT", "ER", "SAM")
    }
    assert grids["MU"] == grids["CM"] == {"p": (0.1, 0.3, 0.5, 0.7, 0.9)}
    assert grids["CO"] == {"size": (8, 12, 16, 20, 24)} and grids["LS"] == {"p": (0.1, 0.2, 0.3, 0.4, 0.5)}
    assert grids["AT"] == {"epsilon": (0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)} and grids["SAM"] == {
        "rho": (0.01, 0.05, 0.1, 0.15, 0.2)
    }
    assert grids["ER"] == {"lambda_er": (1e-3, 5e-3, 0.01, 0.05, 0.1)}
    assert get_mechanism("CO").params[0].grids["imagenette"] == (80, 100, 120, 140, 160)
    assert {n: get_mechanism(n).default_magnitudes("cifar10") for n in ("MU", "CO", "LS", "ER")} == {
        "MU": {"p": 0.1},
        "CO": {"size": 8},
        "LS": {"p": 0.1},
        "ER": {"lambda_er": 0.05},
    }


def test_registry_refuses_a_second_mechanism_of_the_same_name():
    from raystudy.mechanisms.base import MECHANISMS, MechanismSpec, Traits, register

    with pytest.raises(ValueError, match="'ST' registered twice"):
        register(MechanismSpec("ST", "again", (), lambda m, f: None, Traits()))
    spec = register(MechanismSpec("TEST-ONLY", "a new one", (), lambda m, f: None, Traits()))
    try:
        assert MECHANISMS["TEST-ONLY"] is spec
    finally:
        del MECHANISMS["TEST-ONLY"]


def test_sam_restore_needs_an_ascent():
    with pytest.raises(RuntimeError, match="without a preceding ascend"):
        SAM(linear().parameters(), 0.1).restore()


def test_hook_against_the_surrogate_itself_and_the_quick_proxy():
    """A target identical to the surrogate: similarity 1, transfer = fooling; the proxy equals the hook's PGD ASR."""
    from raystudy.core.data import make_synthetic
    from raystudy.metrics import evaluate_surrogate, make_eval_set
    from raystudy.metrics.hook import quick_transfer_asr

    data = make_synthetic(32, 60, num_classes=4, image_size=8, seed=0)
    surrogate, other = tiny(4, 8, seed=1), tiny(4, 8, seed=2)
    surrogate.train()
    config = EvalConfig(n_eval=24, budgets=(8,), steps=3, power_iterations=2, smoothness_samples=6, batch_size=10)
    eval_set = make_eval_set(data.test, 4, config)
    metrics = evaluate_surrogate(surrogate, {"self": copy.deepcopy(surrogate), "other": other}, eval_set, config)
    assert surrogate.training and other.training  # modes restored... for the caller
    assert metrics["similarity/self"] == pytest.approx(1.0, abs=1e-5) and metrics[
        "similarity_min/self"
    ] == pytest.approx(1.0, abs=1e-5)
    for mode in ("untargeted", "targeted"):
        assert metrics[f"asr_all/pgd/{mode}/8/self"] == pytest.approx(metrics[f"fooling/pgd/{mode}/8"])
    assert metrics["acc/self"] == metrics["acc"] and metrics["support/self"] == round(metrics["acc"] * 24)
    assert metrics["similarity/mean"] == pytest.approx((metrics["similarity/self"] + metrics["similarity/other"]) / 2)
    proxy = quick_transfer_asr(surrogate, {"self": copy.deepcopy(surrogate), "other": other}, eval_set, config)
    assert proxy == pytest.approx(metrics["asr/pgd/untargeted/8/mean"]) and surrogate.training


# --------------------------------------------------------------------------------------------
# 9. The attack loop's randomness, random start, ensembles; the hook against a recomputation


def di_reference(x: torch.Tensor, generator: torch.Generator, prob: float = 0.7) -> torch.Tensor:
    """METHOD.md's DI written out, drawing in the published order: r, the side, the offsets, the coin."""
    side = x.shape[-1]
    rate = 0.75 + 0.75 * float(torch.rand(1, generator=generator))
    scaled = int(side * rate)
    if scaled == side:
        return x
    low, high = (scaled, side) if rate < 1 else (side, scaled)
    new = int(torch.randint(low, high, (1,), generator=generator))
    resized = F.interpolate(x, size=(new, new), mode="bilinear", align_corners=False)
    top, left = (int(v) for v in torch.randint(0, high - new, (2,), generator=generator))
    padded = F.pad(resized, (left, high - new - left, top, high - new - top))
    return padded if float(torch.rand(1, generator=generator)) < prob else x


def test_di_matches_the_written_out_transform_and_uses_only_its_generator():
    attack = make_attack("di", 8 * PIXEL)
    x = torch.rand(3, 3, 32, 32)
    for seed in range(40):
        torch.manual_seed(1000 + seed)  # the global RNG must not matter
        out = attack._diversify(x, torch.Generator().manual_seed(seed))
        expected = di_reference(x, torch.Generator().manual_seed(seed))
        assert out.shape[-1] == out.shape[-2] and torch.equal(out, expected), seed


def test_random_start_is_uniform_in_the_ball_inside_the_image_and_seeded():
    model = linear(48, 4)
    x = torch.rand(64, 3, 4, 4)
    y = torch.zeros(64, dtype=torch.long)
    start = LinfAttack(8 * PIXEL, steps=0, random_start=True, round_to_8bit=False)
    torch.manual_seed(1)
    a = start(model, x, y, None, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = start(model, x, y, None, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # the generator alone decides
    delta = a - x
    assert delta.abs().max() <= 8 * PIXEL + 1e-7 and a.min() >= 0 and a.max() <= 1
    inside = (x > 0.1) & (x < 0.9)  # pixels the [0, 1] clamp cannot touch
    assert delta[inside].abs().mean() == pytest.approx(4 * PIXEL, rel=0.1)  # U(-eps, eps): mean |delta| = eps / 2
    assert (delta[inside] > 0).float().mean() == pytest.approx(0.5, abs=0.05)


def test_a_pixel_without_gradient_does_not_move():
    model = linear(48, 2)
    with torch.no_grad():
        model[1].weight[:, :5] = 0.0  # the first five pixels do not affect the logits
    x = 0.25 + 0.5 * torch.rand(4, 3, 4, 4)
    adversarial = LinfAttack(8 * PIXEL, round_to_8bit=False)(model, x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(adversarial.flatten(1)[:, :5], x.flatten(1)[:, :5])


def test_an_ensemble_is_attacked_one_member_per_step_in_a_seeded_order():
    first, second = tiny(size=8, seed=1).eval(), tiny(size=8, seed=2).eval()
    x, y = batch(6, 4, 8)
    attack = LinfAttack(12 * PIXEL, steps=5, round_to_8bit=False)
    torch.manual_seed(3)
    cycled = attack([first, second], x, y, None, torch.Generator().manual_seed(9))
    order = torch.randperm(2, generator=torch.Generator().manual_seed(9)).tolist()
    members = [[first, second][order[i % 2]] for i in range(5)]
    delta = torch.zeros_like(x)
    for model in members:  # the same sign steps, each on the member of that step
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = (delta.detach() + 2 * PIXEL * g.sign()).clamp(-12 * PIXEL, 12 * PIXEL)
        delta = (x + delta).clamp(0, 1) - x
    assert torch.allclose(cycled, x + delta, atol=1e-6)
    assert not torch.allclose(cycled, attack(first, x, y), atol=1e-4)


def hook_setting():
    from raystudy.core.data import make_synthetic
    from raystudy.metrics import make_eval_set

    data = make_synthetic(32, 60, num_classes=4, image_size=8, seed=0)
    config = EvalConfig(
        n_eval=24,
        budgets=(4, 8),
        steps=3,
        step_size=3 * PIXEL,
        power_iterations=3,
        power_tolerance=1e-4,
        smoothness_samples=6,
        batch_size=10,
        seed=2,
    )
    return make_eval_set(data.test, 4, config), config


def test_hook_metrics_equal_a_recomputation_from_the_parts():
    from raystudy.metrics import evaluate_surrogate, transfer_success
    from raystudy.metrics.asr import fooling_rate

    eval_set, config = hook_setting()
    surrogate, target = tiny(4, 8, seed=1).eval(), tiny(4, 8, seed=2).eval()
    seen_grad_flags = []
    target.register_forward_hook(lambda m, i, o: seen_grad_flags.append(next(m.parameters()).requires_grad))
    lines = []
    metrics = evaluate_surrogate(surrogate, {"t": target}, eval_set, config, log=lines.append)
    assert (
        seen_grad_flags and not any(seen_grad_flags) and next(target.parameters()).requires_grad
    )  # frozen inside only
    x, y, goal = eval_set.images.float() / 255, eval_set.labels, eval_set.target_classes
    with torch.no_grad():
        clean_s, clean_t = surrogate(x).argmax(1), target(x).argmax(1)
    values = smoothness(surrogate, x[:6], y[:6], 10, 3, 1e-4, 2)
    assert metrics["smoothness/mean"] == pytest.approx(float(values.mean()))
    assert metrics["smoothness/max"] == pytest.approx(float(values.max()))
    assert metrics["acc"] == pytest.approx(float((clean_s == y).float().mean()))
    for mode, target_classes in (("untargeted", None), ("targeted", goal)):
        for budget in (4, 8):
            attack = make_attack("pgd", budget * PIXEL, 3, 3 * PIXEL)
            generator = torch.Generator().manual_seed(2 + budget)
            adversarial = torch.cat(
                [
                    attack(surrogate, x[s], y[s], None if target_classes is None else target_classes[s], generator)
                    for s in (slice(0, 10), slice(10, 20), slice(20, 24))
                ]
            )
            with torch.no_grad():
                count = transfer_success(y, clean_s, clean_t, target(adversarial).argmax(1), target_classes)
                fooled = fooling_rate(y, surrogate(adversarial).argmax(1), target_classes)
            key = f"pgd/{mode}/{budget}"
            assert metrics[f"fooling/{key}"] == pytest.approx(fooled), key
            assert metrics[f"asr_all/{key}/t"] == pytest.approx(count.asr_all), key
            assert metrics[f"asr_all/{key}/mean"] == pytest.approx(count.asr_all), key
            if count.support:
                assert metrics[f"asr/{key}/t"] == pytest.approx(count.asr), key
    assert {"seconds/accuracy", "seconds/smoothness", "seconds/similarity", "seconds/pgd"} <= set(metrics)
    assert any(line.strip().startswith("smoothness:") for line in lines)


def test_the_hook_hands_autoattack_its_budget_classes_seed_and_steps(monkeypatch):
    from raystudy.metrics import evaluate_surrogate
    from raystudy.metrics import hook as hook_module

    calls = []

    def fake(model, x, y, eps, num_classes, seed, steps):
        calls.append((x.shape[0], eps, num_classes, seed, steps, torch.equal(y, y)))
        return x

    monkeypatch.setattr(hook_module, "autoattack", fake)
    eval_set, config = hook_setting()
    config = dataclasses.replace(config, attacks=("autoattack",), autoattack_steps=7)
    metrics = evaluate_surrogate(tiny(4, 8, seed=1), {"t": tiny(4, 8, seed=2)}, eval_set, config)
    assert [c[0] for c in calls] == [10, 10, 4, 10, 10, 4]  # batches of 10, budget 4 then 8, untargeted only
    assert {c[1:5] for c in calls} == {(4 * PIXEL, 4, 2, 7), (8 * PIXEL, 4, 2, 7)}
    assert "fooling/autoattack/untargeted/8" in metrics and "fooling/autoattack/targeted/8" not in metrics
    assert metrics["fooling/autoattack/untargeted/8"] == pytest.approx(1 - metrics["acc"])  # unperturbed AEs


def test_an_lgv_ensemble_surrogate_is_attacked_member_by_member():
    from raystudy.core.models import Ensemble
    from raystudy.metrics import evaluate_surrogate

    eval_set, config = hook_setting()
    config = dataclasses.replace(config, budgets=(8,), modes=("untargeted",))
    first, second = tiny(4, 8, seed=1).eval(), tiny(4, 8, seed=3).eval()
    target = tiny(4, 8, seed=2).eval()
    metrics = evaluate_surrogate(Ensemble([first, second]), {"t": target}, eval_set, config)
    x, y = eval_set.images.float() / 255, eval_set.labels
    attack = make_attack("pgd", 8 * PIXEL, 3, 3 * PIXEL)
    generator = torch.Generator().manual_seed(10)
    adversarial = torch.cat(
        [attack([first, second], x[s], y[s], None, generator) for s in (slice(0, 10), slice(10, 20), slice(20, 24))]
    )
    with torch.no_grad():
        expected = float((target(adversarial).argmax(1) != y).float().mean())
    assert metrics["asr_all/pgd/untargeted/8/t"] == pytest.approx(expected)


def test_eval_set_sizes_and_target_class_draws():
    from raystudy.core.data import make_synthetic
    from raystudy.metrics import make_eval_set

    data = make_synthetic(32, 40, num_classes=5, image_size=8, seed=0)
    for n_eval in (None, 40, 100):  # none, all or more than there are: the whole test split, in a seeded order
        chosen = make_eval_set(data.test, 5, EvalConfig(n_eval=n_eval, seed=4))
        assert sorted(chosen.indices.tolist()) == list(range(40)) and chosen.indices.tolist() != list(range(40))
    random = make_eval_set(data.test, 5, EvalConfig(n_eval=None, seed=4))
    offsets = torch.randint(1, 5, (40,), generator=torch.Generator().manual_seed(4 + 7))  # the recorded rule
    assert torch.equal(random.target_classes, (random.labels + offsets) % 5)
    assert set(((random.target_classes - random.labels) % 5).tolist()) == {1, 2, 3, 4}


def test_a_target_called_mean_is_refused():
    from raystudy.errors import RaystudyError
    from raystudy.metrics import evaluate_surrogate

    eval_set, config = hook_setting()
    with pytest.raises(RaystudyError, match="a target may not be called 'mean'"):
        evaluate_surrogate(tiny(4, 8), {"mean": tiny(4, 8)}, eval_set, config)


# --------------------------------------------------------------------------------------------
# 10. Power iteration's stopping rule, smoothness seeding, settings that are refused


class ScalarQuadratic(nn.Module):
    """Output i is 1/2 * a_i * x_i^2 for a one-pixel input: the Hessian is a_i exactly."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x):
        return 0.5 * self.a * x.flatten(1)[:, 0] ** 2


def test_power_iteration_counts_and_stops_exactly():
    from test_metrics import PerSampleQuadratic, symmetric_with_eigenvalues

    from raystudy.metrics.smoothness import input_hessian_top_eigenvalue

    # One pixel: every iterate is exact, so the second iteration changes nothing and stops there.
    model = ScalarQuadratic(torch.tensor([3.0, 0.5]))
    x = torch.rand(2, 1, 1, 1)
    exact = input_hessian_top_eigenvalue(model, x, None, iterations=50, tolerance=0.0, loss_fn=lambda o, y: o.sum())
    assert exact.iterations == 2 and torch.allclose(exact.eigenvalues, torch.tensor([3.0, 0.5]))
    # One iteration is the Rayleigh quotient of the seeded start vector.
    a = symmetric_with_eigenvalues([4.0, 1.0, 0.5, 0.1], seed=0)
    quad = PerSampleQuadratic(a[None])
    x = torch.rand(1, 1, 2, 2)
    one = input_hessian_top_eigenvalue(
        quad,
        x,
        None,
        iterations=1,
        tolerance=0.0,
        generator=torch.Generator().manual_seed(3),
        loss_fn=lambda o, y: o.sum(),
    )
    v = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(3)).flatten()
    v = v / v.norm()
    assert one.iterations == 1 and one.eigenvalues.item() == pytest.approx(float(v @ a @ v), rel=1e-5)
    # A small eigenvalue converges to the relative tolerance, not to an absolute one.
    small = PerSampleQuadratic(symmetric_with_eigenvalues([0.01, 0.007, 0.001, 0.0], seed=1)[None])
    result = input_hessian_top_eigenvalue(small, x, None, iterations=500, tolerance=1e-4, loss_fn=lambda o, y: o.sum())
    assert result.eigenvalues.item() == pytest.approx(0.01, rel=5e-3)


def test_smoothness_is_seeded_by_its_seed_alone():
    import inspect

    model = tiny(4, 8).eval()
    x, y = batch(5, 4, 8)
    torch.manual_seed(1)
    first = smoothness(model, x, y, iterations=2, seed=3)
    torch.manual_seed(2)
    again = smoothness(model, x, y, iterations=2, seed=3)
    assert torch.equal(first, again) and not torch.equal(first, smoothness(model, x, y, iterations=2, seed=4))
    parameters = inspect.signature(smoothness).parameters
    assert parameters["batch_size"].default == 250 and parameters["seed"].default == 0


def test_make_attack_passes_every_option_and_names_the_known_attacks():
    assert make_attack("pgd", 8 * PIXEL, steps=7, step_size=PIXEL, random_start=True) == LinfAttack(
        8 * PIXEL, 7, PIXEL, True
    )
    with pytest.raises(ValueError, match="unknown iterative attack 'fgsm'; known: pgd, mi, di, dim"):
        make_attack("fgsm", 8 * PIXEL)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"attacks": ("fgsm",)}, "unknown attack(s) fgsm; known: pgd, mi, di, dim, autoattack"),
        ({"attacks": ()}, "unknown attack(s) (none)"),
        ({"modes": ("both",)}, "each must be one of untargeted, targeted"),
        ({"modes": ()}, "each must be one of untargeted, targeted"),
        ({"budgets": (8.5,)}, "must be whole numbers of 1/255"),
        ({"budgets": (0,)}, "must be whole numbers of 1/255"),
        ({"budgets": (256,)}, "must be whole numbers of 1/255"),
        ({"budgets": ()}, "must be whole numbers of 1/255"),
        ({"budgets": (True,)}, "must be whole numbers of 1/255"),
        ({"target_classes": "last"}, "target_classes='last'; known: random, next"),
        ({"n_eval": 0}, "n_eval=0 must be >= 1"),
        ({"smoothness_samples": 0}, "smoothness_samples=0 must be >= 1"),
        ({"steps": 0}, "steps, batch_size and power_iterations must be >= 1"),
        ({"batch_size": 0}, "steps, batch_size and power_iterations must be >= 1"),
        ({"power_iterations": 0}, "steps, batch_size and power_iterations must be >= 1"),
    ],
)
def test_evaluation_settings_that_are_refused(settings, message):
    from raystudy.errors import RaystudyError

    with pytest.raises(RaystudyError) as err:
        EvalConfig(**settings)
    assert message in str(err.value)


def test_evaluation_settings_at_their_limits_are_accepted():
    config = EvalConfig(
        budgets=(1, 255),
        n_eval=1,
        smoothness_samples=1,
        steps=1,
        batch_size=1,
        power_iterations=1,
        attacks=("pgd", "autoattack"),
        modes=("targeted",),
        target_classes="next",
    )
    assert config.budgets == (1, 255) and config.n_eval == 1
