"""Tests that guard table cells: each fails on a plausible bug that would silently turn one row or
column of a table into a copy of another (LS trained as ST, targeted columns from untargeted AEs,
MU/CM partners that are unaugmented or the samples themselves)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raystudy.config import EvalConfig, TrainConfig
from raystudy.config.evaluation import PIXEL
from raystudy.core.data import Split, make_synthetic, random_batch
from raystudy.core.models import build_model
from raystudy.mechanisms import training_step


def tiny(classes=4, size=8, seed=0):
    torch.manual_seed(seed)
    return build_model("tiny_cnn", classes, input_size=size, mean=(0.5,) * 3, std=(0.25,) * 3)


# --------------------------------------------------------------------------------------------
# LS: the step's loss and gradient are those of the smoothed targets


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_a_label_smoothing_step_descends_the_smoothed_target_loss(p):
    classes = 5
    recipe = TrainConfig.from_preset("faithful", mechanism="LS", magnitudes={"p": p}).recipe()
    model = tiny(classes)
    with torch.no_grad():  # confident logits, where smoothing changes the loss (near uniform ones it hardly does)
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(30)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 8, 8, generator=gen), torch.randint(0, classes, (16,), generator=gen)
    # Written out from METHOD.md: 1-p on the label, p/(m-1) on each other class.
    smoothed = torch.full((16, classes), p / (classes - 1))
    smoothed[torch.arange(16), y] = 1 - p
    expected = -(smoothed * F.log_softmax(reference(x), dim=1)).sum(1).mean()
    expected.backward()
    plain = F.cross_entropy(reference(x), y)
    assert abs(expected.item() - plain.item()) > 0.1  # the setting tells LS from ST

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
    before = [q.detach().clone() for q in model.parameters()]
    parts = training_step(model, recipe, optimizer, x, y, classes)
    assert float(parts["loss"]) == pytest.approx(expected.item(), rel=1e-5)
    for start, after, ref in zip(before, model.parameters(), reference.parameters()):
        torch.testing.assert_close(start - after.detach(), ref.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Targeted columns: the hook's targeted AEs aim at the target class


@pytest.fixture(scope="module")
def trained_surrogate():
    """A tiny CNN that fits 10-class synthetic data (where a 16/255 budget can reach any class)."""
    from raystudy.training.loop import train

    data = make_synthetic(512, 200, num_classes=10, image_size=16, seed=3)
    config = TrainConfig.from_preset(
        "faithful", dataset="synthetic", model="tiny_cnn", epochs=4, batch_size=32, lr=0.05, seed=0
    )
    return train(config, dataset=data, log=None).model.eval(), data


def test_targeted_aes_hit_their_class_far_more_often_than_untargeted_ones(trained_surrogate):
    from raystudy.metrics import evaluate_surrogate, make_attack, make_eval_set
    from raystudy.metrics.asr import fooling_rate

    model, data = trained_surrogate
    config = EvalConfig(n_eval=100, budgets=(16,), modes=("untargeted", "targeted"), smoothness_samples=4, seed=0)
    eval_set = make_eval_set(data.test, 10, config)
    metrics = evaluate_surrogate(model, {"self": model}, eval_set, config)
    x, y, goal = eval_set.images.float() / 255, eval_set.labels, eval_set.target_classes
    attack = make_attack("pgd", 16 * PIXEL)
    untargeted = attack(model, x, y, None, torch.Generator().manual_seed(16))
    targeted = attack(model, x, y, goal, torch.Generator().manual_seed(16))
    with torch.no_grad():
        untargeted_hits = fooling_rate(y, model(untargeted).argmax(1), goal)  # untargeted AEs landing on goal
        targeted_hits = fooling_rate(y, model(targeted).argmax(1), goal)
    assert targeted_hits > untargeted_hits + 0.4  # a setting where aiming makes the difference
    # The hook's targeted cells count its AEs landing on their target class (not merely fooling).
    assert metrics["fooling/pgd/targeted/16"] == pytest.approx(targeted_hits, abs=1e-6)
    assert metrics["fooling/pgd/untargeted/16"] > targeted_hits + 0.1
    assert metrics["asr/pgd/targeted/16/self"] > untargeted_hits + 0.4


# --------------------------------------------------------------------------------------------
# MU / CM partners: fresh training images, each with its own crop and flip


def distinct_split(n: int, size: int = 32) -> Split:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return Split(images, torch.arange(n))  # the label names the source image


def test_partners_are_augmented_each_on_its_own():
    torch.manual_seed(0)
    split = distinct_split(1)  # every partner comes from the same stored image
    partners, labels = random_batch(split, 64)
    assert labels.eq(0).all()
    raw = split.images[0].float() / 255
    plain = (partners - raw).abs().flatten(1).amax(1) < 1e-6
    assert plain.float().mean() < 0.5  # most partners were cropped or flipped
    distinct = {tuple(p.flatten().tolist()) for p in partners}
    assert len(distinct) > 40  # and each draw took its own crop and flip (162 possible)


def test_partners_are_crops_and_flips_of_their_source():
    torch.manual_seed(1)
    split = distinct_split(8)
    partners, labels = random_batch(split, 32)
    padded = F.pad(split.images.float() / 255, (4, 4, 4, 4))
    for image, label in zip(partners, labels):
        source = padded[label]
        crops = [source[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(image, c) or torch.equal(image, c.flip(2)) for c in crops)


def test_the_training_loop_gives_mixup_fresh_partners_not_the_batch(monkeypatch):
    import raystudy.training.loop as train_module

    seen = []

    def spy(model, recipe, optimizer, x, y, num_classes, sam, autocast, partners):
        partner_x, partner_y = partners()
        seen.append(((partner_x - x).abs().flatten(1).amax(1) < 1e-6).float().mean())
        assert partner_x.shape == x.shape and partner_y.shape == y.shape
        return {"loss": torch.tensor(0.0), "correct": torch.tensor(0)}

    monkeypatch.setattr(train_module, "training_step", spy)
    config = TrainConfig.from_preset(
        "faithful", dataset="synthetic", model="tiny_cnn", mechanism="MU", magnitudes={"p": 0.9}, epochs=1,
        batch_size=32, n_train=256, n_test=32, image_size=8,
    )  # fmt: skip
    train_module.train(config, log=None)
    assert len(seen) == 8 and max(seen) < 0.2  # partners are other images, not the batch itself
