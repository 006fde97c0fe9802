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

from raystudy.config.evaluation import DEFAULT_ITERATIONS, DEFAULT_TOLERANCE, LANCZOS_ITERATIONS
from raystudy.core.models import Ensemble
from raystudy.mechanisms.model_state import eval_mode, twice_differentiable


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
    start: torch.Tensor | None = None,
) -> PowerIterationResult:
    """Per-sample dominant eigenvalue of d^2 CE(f(x_i), y_i) / dx_i^2, all samples at once.

    Each sample stops at the first iteration where its eigenvalue changed by less than `tolerance`
    (relative), its value kept from then on, so a sample's result does not depend on the others
    in its batch; the loop ends when all have stopped, or after `iterations`. `start`: the first
    vectors (default: drawn from `generator`). The caller puts the model in eval mode (required
    for the samples to be independent); parameter gradients are not touched. `loss_fn(outputs, y)`
    must be a sum of per-sample losses (summed cross-entropy by default). An LGV `Ensemble` is
    differentiated member by member (one member's graph in memory at a time).
    """
    hvp, v = _products_and_start(model, x, y, loss_fn, generator, start)
    eigenvalues = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    done = 0
    for done in range(1, iterations + 1):
        hv = hvp(v)
        new = (hv * v).flatten(1).sum(1)  # Rayleigh quotient v^T H v with ||v|| = 1
        stopping = (new - eigenvalues).abs() <= tolerance * new.abs().clamp_min(1e-12)
        eigenvalues = torch.where(converged, eigenvalues, new.detach())
        converged = converged | stopping
        v = _unit(hv.detach())
        if bool(converged.all()):
            break
    return PowerIterationResult(eigenvalues, done, converged)


def input_hessian_lanczos(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    iterations: int = LANCZOS_ITERATIONS,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summed_cross_entropy,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample largest (algebraic) eigenvalue of the input Hessian by Lanczos, all samples at once.

    `iterations` Hessian-vector products build each sample's Krylov basis (fully re-orthogonalized:
    in floating point the plain three-term recurrence loses orthogonality and repeats eigenvalues);
    the largest eigenvalue of the tridiagonal matrix is the estimate. The published code calls
    ARPACK's Lanczos (scipy's eigsh, which='LA') per sample and reports |lambda|; this is the same
    iteration, batched, with a fixed number of steps (a basis of iterations x the batch's size is
    kept). A sample whose Krylov space closes early (an exact invariant subspace) keeps its exact
    value, and the loop ends when every sample's has: for a piecewise-linear (ReLU, max-pool)
    network the input Hessian of cross-entropy is J^T S J with J constant nearby, of rank at most
    (classes - 1), so Lanczos is exact after that many products. Same conventions as
    `input_hessian_top_eigenvalue` (eval mode, summed per-sample loss).
    """
    hvp, v = _products_and_start(model, x, y, loss_fn, generator, start)
    basis, alphas, betas = [v], [], []
    closed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for step in range(iterations):
        w = hvp(v).detach()
        # A closed sample's later diagonal entries repeat its first Rayleigh quotient, which is never
        # above the largest eigenvalue of its own (exact) block: that one stays the largest.
        alphas.append(torch.where(closed, alphas[0], _dot(w, v)) if alphas else _dot(w, v))
        for _ in range(2):  # full re-orthogonalization (Gram-Schmidt, twice is enough)
            for q in basis:
                w = w - _dot(w, q).view(-1, *([1] * (w.dim() - 1))) * q
        if step == iterations - 1:
            break
        beta = w.flatten(1).norm(dim=1)
        # Closed: what is left is rounding error (a few hundred ulps of the largest |alpha|).
        closed = closed | (beta <= 256 * torch.finfo(w.dtype).eps * torch.stack(alphas).abs().amax(0).clamp_min(1e-30))
        if bool(closed.all()):  # every Krylov space closed: the tridiagonal matrices are exact
            break
        betas.append(torch.where(closed, torch.zeros_like(beta), beta))
        v = torch.where(closed.view(-1, *([1] * (w.dim() - 1))), torch.zeros_like(w), _unit(w))
        basis.append(v)
    tridiagonal = torch.diag_embed(torch.stack(alphas, 1).double())
    if betas:
        off = torch.diag_embed(torch.stack(betas, 1).double(), offset=1)
        tridiagonal = tridiagonal + off + off.transpose(1, 2)
    return torch.linalg.eigvalsh(tridiagonal)[:, -1].to(x.dtype)


def _products_and_start(model, x, y, loss_fn, generator, start):
    """(v -> H v for every sample at once, the unit start vectors): what both estimators begin with."""
    if start is None:
        start = torch.randn(x.shape, generator=generator, device="cpu")
    if isinstance(model, Ensemble) and loss_fn is not summed_cross_entropy:
        raise ValueError("an Ensemble is differentiated member by member for the summed cross-entropy only")
    hvp = _ensemble_hvp(model, x, y) if isinstance(model, Ensemble) else _hvp(model, x, y, loss_fn)
    return hvp, _unit(start.to(x.device, x.dtype))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> H v for every sample at once: one graph of the input gradient, reused by every product."""
    x = x.detach().requires_grad_(True)
    with twice_differentiable():
        loss = loss_fn(model(x), y)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    return lambda v: torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=True)[0]


def _ensemble_hvp(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> H v of CE(mean of the members' logits), member by member. With z = mean_m z_m,
    p = softmax(z) and g = p - onehot(y): grad = mean_m J_m^T g, and
    H v = J^T S (J v) + mean_m d/dx [g^T J_m v] (g held), S = diag(p) - p p^T, J v = mean_m J_m v."""
    members = list(ensemble.members)
    x = x.detach()
    with torch.no_grad():
        p = torch.softmax(sum(m(x) for m in members) / len(members), dim=1)
        g = p - F.one_hot(y, p.shape[1]).to(p.dtype)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        u = sum(_member_jvp(m, x, v, keep_graph=False)[1] for m in members) / len(members)
        s = p * u - p * (p * u).sum(1, keepdim=True)
        out = torch.zeros_like(x)
        for m in members:  # one member's graph at a time
            xx = x.detach().requires_grad_(True)
            z, jv = _member_jvp(m, xx, v, keep_graph=True)
            out += torch.autograd.grad(((z * s).sum() + (jv * g).sum()) / len(members), xx)[0]
        return out

    return hvp


def _member_jvp(member: nn.Module, x: torch.Tensor, v: torch.Tensor, keep_graph: bool):
    """(logits, J v) of one member at x (which requires grad when `keep_graph`): J v by the double
    backward trick, J v = d/dw <J^T w, v>, kept differentiable in x where asked."""
    x_in = x if keep_graph else x.detach().requires_grad_(True)
    with twice_differentiable():
        z = member(x_in)
    w = torch.zeros_like(z, requires_grad=True)
    (jt_w,) = torch.autograd.grad((z * w).sum(), x_in, create_graph=True)
    (jv,) = torch.autograd.grad((jt_w * v).sum(), w, create_graph=keep_graph)
    return z, jv


def smoothness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 250,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    method: str = "power",
    lanczos_iterations: int = LANCZOS_ITERATIONS,
) -> torch.Tensor:
    """|input-Hessian eigenvalue| per sample (smaller = smoother), in eval mode, batched: the
    dominant one by power iteration (`method="power"`), or the largest by Lanczos as the published
    code computes it (`"lanczos"`). Every sample's start vector is drawn at once, so the result
    does not depend on `batch_size`."""
    starts = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), device="cpu")

    def estimate(i: int) -> torch.Tensor:
        part = slice(i, i + batch_size)
        if method == "lanczos":
            return input_hessian_lanczos(model, x[part], y[part], lanczos_iterations, start=starts[part])
        return input_hessian_top_eigenvalue(
            model, x[part], y[part], iterations, tolerance, start=starts[part]
        ).eigenvalues

    with eval_mode(model):
        values = [estimate(i) for i in range(0, len(x), batch_size)]
    return torch.cat(values).abs()
