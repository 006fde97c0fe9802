"""Smoothness as published: the input Hessian's largest eigenvalue by Lanczos, against known spectra
and against ARPACK (scipy's eigsh, what the published code calls) on a small CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics import PerSampleQuadratic, quadratic_loss, symmetric_with_eigenvalues
from torch import nn

from raystudy.config import parse_space
from raystudy.errors import RaystudyError
from raystudy.metrics.smoothness import _hvp, input_hessian_lanczos, input_hessian_top_eigenvalue, smoothness


def test_lanczos_finds_the_largest_eigenvalue_of_known_spectra():
    spectra = [
        [5.0, 3.0, 1.0, 0.5, 0.1] + [0.0] * 7,
        [0.2, 0.19, 0.05] + [0.0] * 9,  # a small eigengap, where power iteration is slow
        [2.0, 1.0, -6.0] + [0.0] * 9,  # a larger negative one: Lanczos reports the largest (2), as eigsh's "LA"
    ]
    a = torch.stack([symmetric_with_eigenvalues(s, seed=i) for i, s in enumerate(spectra)])
    model, x = PerSampleQuadratic(a), torch.randn(3, 12)
    found = input_hessian_lanczos(model, x, torch.zeros(3), iterations=12, loss_fn=quadratic_loss)
    assert torch.allclose(found, torch.tensor([5.0, 0.2, 2.0]), atol=1e-5)
    # Power iteration gives the dominant one (largest in magnitude), slowly where the gap is small.
    power = input_hessian_top_eigenvalue(model, x, torch.zeros(3), iterations=20, tolerance=0, loss_fn=quadratic_loss)
    assert power.eigenvalues[2] == pytest.approx(-6.0, rel=1e-3)
    assert abs(power.eigenvalues[1] - 0.2) > abs(found[1] - 0.2)


def test_lanczos_agrees_with_arpack_on_a_small_cnn():
    from scipy.sparse.linalg import LinearOperator, eigsh

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double()
    x, y = torch.rand(3, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    model.eval()
    ours = input_hessian_lanczos(model, x, y, iterations=30, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        hvp = _hvp(model, x[i : i + 1], y[i : i + 1], lambda z, t: nn.functional.cross_entropy(z, t, reduction="sum"))

        def product(v, hvp=hvp):
            return hvp(torch.from_numpy(np.asarray(v).reshape(1, 3, 4, 4))).reshape(-1).detach().numpy()

        (reference,), _ = eigsh(LinearOperator((48, 48), matvec=product, dtype=np.float64), k=1, which="LA")
        assert float(ours[i]) == pytest.approx(reference, rel=1e-6)


def test_the_smoothness_method_is_chosen_in_the_study_file():
    space = {"name": "s", "kind": "grid", "targets": "t", "trials": [{"mechanism": "ST"}]}
    evaluation = parse_space(
        {**space, "evaluation": {"smoothness": {"method": "lanczos", "iterations": 30}}}, "s.yaml"
    ).evaluation
    assert (evaluation.smoothness_method, evaluation.lanczos_iterations) == ("lanczos", 30)
    power = parse_space({**space, "evaluation": {"smoothness": {"iterations": 50}}}, "s.yaml").evaluation
    assert (power.smoothness_method, power.power_iterations) == ("power", 50)
    for bad, message in (
        ({"smoothness": {"method": "arnoldi"}}, "smoothness method 'arnoldi'; known: power, lanczos"),
        ({"smoothness": {"method": "lanczos", "steps": 3}}, "smoothness must be a mapping"),
        ({"smoothness": {"iterations": 5}, "power_iterations": 5}, "both given"),
        ({"smoothness_method": "lanczos", "lanczos_iterations": 1}, "lanczos_iterations"),
    ):
        with pytest.raises(RaystudyError, match=message):
            parse_space({**space, "evaluation": bad}, "s.yaml")


def test_smoothness_by_lanczos_is_the_magnitude_and_does_not_depend_on_the_batch():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    whole = smoothness(model, x, y, batch_size=6, method="lanczos", lanczos_iterations=48)
    halves = smoothness(model, x, y, batch_size=3, method="lanczos", lanczos_iterations=48)
    assert torch.allclose(whole, halves, rtol=1e-4) and bool((whole >= 0).all())
    # A ReLU network's input Hessian is positive semidefinite: both estimators find the same eigenvalue.
    power = smoothness(model, x, y, batch_size=6, iterations=500, tolerance=0)
    assert torch.allclose(power, whole, rtol=1e-3)


def test_a_relu_networks_input_hessian_is_exact_after_classes_minus_one_products():
    """Cross-entropy's input Hessian of a piecewise-linear network is J^T S J (J constant nearby):
    rank at most classes - 1, so Lanczos is exact after that many products."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    )
    x, y = torch.rand(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    model = model.double().eval()
    short = input_hessian_lanczos(model, x, y, iterations=4, generator=torch.Generator().manual_seed(0))
    long = input_hessian_lanczos(model, x, y, iterations=40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(short, long, rtol=1e-10)


def test_a_sample_whose_krylov_space_closes_early_keeps_its_value_whatever_its_batch():
    """Sample 0's space closes after two products (two distinct eigenvalues), sample 1's after
    four: sample 0's largest eigenvalue (-1) is the same in the batch as alone, as ARPACK's "LA"."""
    a = torch.stack(
        [torch.diag(torch.tensor([-1.0, -1.0, -2.0, -2.0])), torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))]
    )
    model, x = PerSampleQuadratic(a.double()), torch.randn(2, 4, dtype=torch.float64)
    start = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = input_hessian_lanczos(model, x, torch.zeros(2), iterations=6, loss_fn=quadratic_loss, start=start)
    first = PerSampleQuadratic(a[:1].double())
    alone = input_hessian_lanczos(first, x[:1], torch.zeros(1), iterations=6, loss_fn=quadratic_loss, start=start[:1])
    assert torch.allclose(batched, torch.tensor([-1.0, 4.0], dtype=torch.float64)) and torch.allclose(
        alone, batched[:1]
    )
