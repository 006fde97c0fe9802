"""Trial-end metrics against known answers: quadratic Hessians, identical and opposite gradients,
attacks that stay in their budget, hand-counted ASR, and the full hook on tiny trained models."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math

import pytest
import torch
from conftest import raystudy_here
from torch import nn

from raystudy.config import TrainConfig
from raystudy.core.data import make_synthetic
from raystudy.core.models import build_model
from raystudy.errors import RaystudyError
from raystudy.metrics import (
    EvalConfig,
    LinfAttack,
    autoattack,
    evaluate_surrogate,
    gradient_cosine,
    input_gradients,
    input_hessian_top_eigenvalue,
    make_attack,
    make_eval_set,
    smoothness,
    transfer_success,
)
from raystudy.training.loop import train


class PerSampleQuadratic(nn.Module):
    """Output i is 1/2 x_i^T A_i x_i: sample i's input Hessian is A_i, whatever x_i is."""

    def __init__(self, matrices: torch.Tensor):
        super().__init__()
        self.register_buffer("a", matrices)

    def forward(self, x):
        flat = x.flatten(1)
        return 0.5 * torch.einsum("bi,bij,bj->b", flat, self.a, flat)


def symmetric_with_eigenvalues(values, seed):
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(torch.tensor(values)) @ q.T


def quadratic_loss(outputs, y):
    return outputs.sum()


def test_power_iteration_finds_known_top_eigenvalues_per_sample():
    spectra = [
        [5.0, 3.0, 1.0, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.2, 0.1, 0.05] + [0.0] * 9,
        [40.0, 39.0, 1.0] + [0.0] * 9,
    ]
    model = PerSampleQuadratic(torch.stack([symmetric_with_eigenvalues(s, i) for i, s in enumerate(spectra)]))
    x = torch.rand(3, 3, 2, 2)
    result = input_hessian_top_eigenvalue(
        model,
        x,
        torch.zeros(3),
        iterations=500,
        tolerance=1e-6,
        generator=torch.Generator().manual_seed(0),
        loss_fn=quadratic_loss,
    )
    assert torch.allclose(result.eigenvalues, torch.tensor([5.0, 0.2, 40.0]), rtol=1e-3)
    assert result.converged.all()


def test_negative_dominant_eigenvalue_is_returned_signed_and_smoothness_is_its_magnitude():
    model = PerSampleQuadratic(symmetric_with_eigenvalues([-6.0, 2.0, 1.0, 0.0], 3)[None])
    x = torch.rand(1, 1, 2, 2)
    signed = input_hessian_top_eigenvalue(
        model, x, torch.zeros(1), iterations=300, tolerance=1e-9, loss_fn=quadratic_loss
    )
    assert signed.eigenvalues.item() == pytest.approx(-6.0, rel=1e-3)


def test_batched_power_iteration_agrees_with_a_per_sample_loop():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4, input_size=8).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    batched = smoothness(model, x, y, iterations=200, tolerance=1e-7)
    looped = torch.cat(
        [smoothness(model, x[i : i + 1], y[i : i + 1], iterations=200, tolerance=1e-7, seed=i + 1) for i in range(6)]
    )
    assert torch.allclose(batched, looped, rtol=1e-2)
    assert (batched > 0).all()


def test_similarity_of_a_model_with_itself_is_one_and_with_its_mirror_minus_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    mirror = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():  # swapping the two classes' rows negates the CE gradient's direction
        mirror[1].weight.copy_(model[1].weight.flip(0))
        mirror[1].bias.copy_(model[1].bias.flip(0))
    x, y = torch.rand(10, 3, 2, 2), torch.randint(0, 2, (10,))
    g = input_gradients(model, x, y)
    assert torch.allclose(gradient_cosine(g, input_gradients(model, x, y)), torch.ones(10), atol=1e-6)
    assert torch.allclose(gradient_cosine(g, input_gradients(mirror, x, y)), -torch.ones(10), atol=1e-6)


def linear_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 4))


@pytest.mark.parametrize("name", ["pgd", "mi", "di", "dim"])
@pytest.mark.parametrize("random_start", [False, True])
def test_attacks_stay_within_budget_and_pixel_range(name, random_start):
    model = build_model("tiny_cnn", 4, input_size=8)
    x = torch.randint(0, 256, (16, 3, 8, 8)) / 255.0
    y = torch.randint(0, 4, (16,))
    eps = 8 / 255
    for target in (None, (y + 1) % 4):
        adv = make_attack(name, eps, steps=5, random_start=random_start)(
            model, x, y, target, torch.Generator().manual_seed(0)
        )
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert torch.allclose(adv * 255, (adv * 255).round(), atol=1e-4)  # 8-bit pixels
    assert model.training  # mode restored


def test_pgd_at_large_budget_breaks_a_linear_model_and_targeted_pgd_hits_the_target():
    model = linear_classifier()
    x = torch.rand(64, 3, 4, 4)
    y = model(x).argmax(1)  # the model is right on every clean point
    adv = LinfAttack(eps=1.0, steps=20, step_size=0.1)(model, x, y)
    assert (model(adv).argmax(1) == y).float().mean() < 0.05
    target = (y + 1) % 4
    adv = LinfAttack(eps=1.0, steps=20, step_size=0.1)(model, x, y, target)
    assert (model(adv).argmax(1) == target).float().mean() > 0.95


def test_momentum_and_input_diversity_change_the_trajectory():
    model = build_model("tiny_cnn", 4, input_size=8).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,))
    runs = {
        name: make_attack(name, 16 / 255, steps=10)(model, x, y, None, torch.Generator().manual_seed(0))
        for name in ("pgd", "mi", "di")
    }
    assert not torch.equal(runs["pgd"], runs["mi"])
    assert not torch.equal(runs["pgd"], runs["di"])


def test_asr_counts_only_samples_both_models_get_right():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    surrogate_clean = torch.tensor([0, 1, 2, 3, 1, 1])  # wrong on sample 4
    target_clean = torch.tensor([0, 1, 2, 0, 0, 1])  # wrong on sample 3
    target_adv = torch.tensor([1, 1, 0, 3, 2, 2])  # flips 0, 2, 4, 5
    count = transfer_success(y, surrogate_clean, target_clean, target_adv)
    assert count.support == 4  # samples 0, 1, 2, 5
    assert count.asr == pytest.approx(3 / 4)  # 0, 2, 5 fooled; 1 not
    assert count.asr_all == pytest.approx(4 / 6)
    goal = torch.tensor([1, 2, 0, 0, 1, 2])
    targeted = transfer_success(y, surrogate_clean, target_clean, target_adv, goal)
    assert targeted.asr == pytest.approx(3 / 4) and targeted.asr_all == pytest.approx(3 / 6)  # hits: 0, 2, 5
    none = transfer_success(y, (y + 1) % 4, target_clean, target_adv)
    assert none.support == 0 and math.isnan(none.asr)


def test_autoattack_stays_within_budget():
    pytest.importorskip("torchattacks", reason="the optional extra raystudy[autoattack]")
    model = build_model("tiny_cnn", 4, input_size=8)
    x, y = torch.randint(0, 256, (6, 3, 8, 8)) / 255.0, torch.randint(0, 4, (6,))
    adv = autoattack(model, x, y, eps=8 / 255, num_classes=4, seed=0, steps=5)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny surrogate and two tiny targets trained on the same synthetic data."""
    root = tmp_path_factory.mktemp("models")
    common = dict(
        dataset="synthetic", model="tiny_cnn", epochs=3, batch_size=32, n_train=512, n_test=128, image_size=16, lr=0.05
    )
    models = {}
    for name, seed in (("surrogate", 0), ("t1", 1), ("t2", 2)):
        train(TrainConfig.from_preset("faithful", seed=seed, **common), out_dir=root / name, log=None)
        models[name] = root / name
    return root, models


@pytest.mark.slow
def test_hook_returns_every_documented_key_with_finite_values(trained):
    from raystudy.core.checkpoint import load_model

    root, paths = trained
    data = make_synthetic(512, 128, num_classes=10, image_size=16, seed=0)
    surrogate = load_model(paths["surrogate"] / "model.pt")[0]
    targets = {n: load_model(paths[n] / "model.pt")[0] for n in ("t1", "t2")}
    with_autoattack = importlib.util.find_spec("torchattacks") is not None  # the optional extra
    attacks = ("pgd", "dim", "autoattack") if with_autoattack else ("pgd", "dim")
    config = EvalConfig(n_eval=40, budgets=(4, 16), attacks=attacks, smoothness_samples=10, autoattack_steps=10)
    metrics = evaluate_surrogate(surrogate, targets, make_eval_set(data.test, 10, config), config)
    expected = {
        "acc",
        "acc/t1",
        "acc/t2",
        "smoothness/mean",
        "smoothness/max",
        "similarity/t1",
        "similarity/t2",
        "similarity/mean",
        "similarity_min/t1",
        "support/t1",
    }
    for attack, modes in (
        ("pgd", ("untargeted", "targeted")),
        ("dim", ("untargeted", "targeted")),
        ("autoattack", ("untargeted",)),
    ):
        if attack not in attacks:
            continue
        for mode in modes:
            for budget in (4, 16):
                key = f"{attack}/{mode}/{budget}"
                expected |= {f"fooling/{key}"} | {
                    f"{p}/{key}/{t}" for p in ("asr", "asr_all") for t in ("t1", "t2", "mean")
                }
    assert expected <= set(metrics)
    assert not any(k.startswith(("asr/autoattack/targeted", "fooling/autoattack/targeted")) for k in metrics)
    assert all(math.isfinite(v) for v in metrics.values()), {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert metrics["acc"] > 0.5
    assert metrics["asr/pgd/untargeted/16/mean"] >= metrics["asr/pgd/untargeted/4/mean"]


def test_eval_set_is_fixed_per_seed_and_targets_differ_from_labels():
    data = make_synthetic(64, 200, num_classes=5, image_size=8, seed=0)
    a = make_eval_set(data.test, 5, EvalConfig(n_eval=50, seed=3))
    b = make_eval_set(data.test, 5, EvalConfig(n_eval=50, seed=3))
    assert (a.indices == b.indices).all() and torch.equal(a.target_classes, b.target_classes)
    assert (a.target_classes != a.labels).all() and len(set(a.target_classes.tolist())) > 1
    # The test split is sorted by class here, like the archives: a prefix (smoothness uses one) still mixes classes.
    from raystudy.core.data import Split

    ordered = Split(data.test.images, data.test.labels.sort().values)
    prefix = make_eval_set(ordered, 5, EvalConfig(n_eval=100, seed=0)).labels[:10]
    assert len(set(prefix.tolist())) >= 3
    following = make_eval_set(data.test, 5, EvalConfig(n_eval=50, seed=3, target_classes="next"))
    assert torch.equal(following.target_classes, (following.labels + 1) % 5)


def test_evaluate_command_and_its_errors(trained, tmp_path):
    root, paths = trained
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    base = ["evaluate", "--n-eval", "20", "--budgets", "8"]
    targets = f"{paths['t1']},{paths['t2']}"
    ok = raystudy_here(*base, "--surrogate", paths["surrogate"], "--targets", targets, "--out", tmp_path / "m.json")
    assert ok.returncode == 0, ok.stderr
    assert "pgd/untargeted/8" in ok.stdout and (tmp_path / "m.json").is_file()
    for surrogate in (tmp_path / "missing.pt", tmp_path / "corrupt.pt"):
        bad = raystudy_here(*base, "--surrogate", surrogate, "--targets", paths["t1"])
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def _smooth_ensemble() -> nn.Module:
    """Three small nets with smooth activations (their Hessians have the second-order term too), in float64."""
    from raystudy.core.models import Ensemble

    torch.manual_seed(3)
    members = [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3))
        for _ in range(3)
    ]
    return Ensemble(members).double().eval()


def test_an_ensembles_hessian_vector_products_member_by_member_equal_the_whole_ensembles():
    from raystudy.metrics.smoothness import _ensemble_hvp, _hvp, summed_cross_entropy

    ensemble = _smooth_ensemble()
    x, y = torch.rand(5, 3, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    v = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    whole = _hvp(lambda inputs: torch.stack([m(inputs) for m in ensemble.members]).mean(0), x, y, summed_cross_entropy)
    assert torch.allclose(_ensemble_hvp(ensemble, x, y)(v), whole(v), rtol=1e-10, atol=1e-12)


def test_an_ensembles_smoothness_and_gradients_member_by_member_equal_the_whole_ensembles():
    from raystudy.metrics.similarity import input_gradients

    ensemble = _smooth_ensemble()
    x, y = torch.rand(6, 3, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    as_one = nn.Sequential(nn.Identity(), ensemble).eval()  # not an Ensemble itself: differentiated whole
    assert torch.allclose(input_gradients(ensemble, x, y), input_gradients(as_one, x, y), rtol=1e-10)
    assert torch.allclose(smoothness(ensemble, x, y, iterations=30), smoothness(as_one, x, y, iterations=30), rtol=1e-8)


def test_smoothness_does_not_depend_on_the_batch_it_is_computed_in():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4, input_size=8).eval()
    x, y = torch.rand(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    whole = smoothness(model, x, y, batch_size=7, iterations=40, tolerance=1e-3)
    assert torch.allclose(smoothness(model, x, y, batch_size=3, iterations=40, tolerance=1e-3), whole, rtol=1e-4)
    assert torch.allclose(smoothness(model, x, y, batch_size=1, iterations=40, tolerance=1e-3), whole, rtol=1e-4)


class _RunsOutAbove(nn.Module):
    """A model that raises CUDA's out-of-memory error for batches above `limit` (as a capped share does)."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.batches = model, limit, []

    def forward(self, x):
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_hooks_batch_and_measures_the_same_values():
    from raystudy.metrics.hook import measure_surrogate

    torch.manual_seed(0)
    data = make_synthetic(64, 40, num_classes=4, image_size=8, seed=0)
    surrogate = build_model("tiny_cnn", 4, input_size=8)
    target = copy.deepcopy(surrogate)  # agrees with the surrogate when clean: the ASR has support
    config = EvalConfig(n_eval=40, budgets=(8,), steps=3, batch_size=40)
    eval_set = make_eval_set(data.test, 4, config)
    small = dataclasses.replace(config, batch_size=10)
    expected = {
        r.key: r.value for r in measure_surrogate(surrogate, {"t": target}, eval_set, small) if r.name != "seconds"
    }
    capped, said = _RunsOutAbove(surrogate, limit=10), []
    rows = measure_surrogate(capped, {"t": target}, eval_set, config, log=said.append)
    assert {r.key: r.value for r in rows if r.name != "seconds"} == pytest.approx(expected, rel=1e-5)
    assert capped.batches[:2] == [40, 20] and max(capped.batches[2:]) <= 10  # 40, 20, then 10 holds
    assert any(
        "out of GPU memory at evaluation batch 20" in line and "measuring again at batch 10" in line for line in said
    )


def test_a_hook_out_of_memory_even_at_batch_one_is_one_line_naming_models_and_share():
    from raystudy.metrics.hook import measure_surrogate

    data = make_synthetic(16, 8, num_classes=4, image_size=8, seed=0)
    config = EvalConfig(n_eval=8, budgets=(8,), steps=1, batch_size=4)
    never = _RunsOutAbove(build_model("tiny_cnn", 4, input_size=8), limit=0)
    with pytest.raises(
        RaystudyError, match="out of GPU memory even at batch 1 \\(surrogate one model, targets t; gpu 0.25"
    ):
        measure_surrogate(
            never,
            {"t": build_model("tiny_cnn", 4, input_size=8)},
            make_eval_set(data.test, 4, config),
            config,
            share="; gpu 0.25 of cuda:0",
        )
