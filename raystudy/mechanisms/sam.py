"""SAM (Foret et al. 2021) as an update rule that wraps the base optimizer's step.

Non-adaptive, as in the published code: ascend to theta + rho * g / ||g|| (norm over all
parameters), take the gradient there, restore theta, and let the base optimizer (SGD with its
weight decay) step with that gradient. SAM&IR and SAM&JR run both passes on the regularized loss.
"""

from __future__ import annotations

from typing import Iterable

import torch

from raystudy.mechanisms.base import MechanismSpec, Param, Recipe, register
from raystudy.mechanisms.gradient_norms import LAMBDA_IR, LAMBDA_JR, InputGradientNorm, InputJacobianNorm

RHO = Param(
    "rho",
    "SAM neighbourhood radius",
    grids={"cifar10": (0.01, 0.05, 0.1, 0.15, 0.2), "imagenette": (0.2, 0.5, 1.0, 2.0, 3.0)},
    defaults={"cifar10": 0.1, "imagenette": 0.2},
    low=0.0,
)


class SAM:
    """`ascend()` after the first backward, `restore()` after the second, then the base step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], rho: float):
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def ascend(self) -> torch.Tensor:
        """Move to theta + rho * g / ||g||; returns the ascent's norm (rho unless g = 0) as a
        tensor, so a training step never waits for the GPU here."""
        with_grad = [p for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in with_grad]))
        scale = self.rho / (grad_norm + 1e-12)
        self._saved = [p.detach().clone() for p in self.params]
        for p in with_grad:
            p.add_(p.grad * scale.to(p.dtype))
        return grad_norm * scale

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact weights saved by `ascend` (a subtraction would drift by rounding)."""
        if self._saved is None:
            raise RuntimeError("SAM.restore() without a preceding ascend()")
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)
        self._saved = None


register(
    MechanismSpec(
        "SAM",
        "sharpness-aware minimization with radius rho",
        (RHO,),
        lambda m, family: Recipe(sam_rho=m["rho"]),
    )
)
register(
    MechanismSpec(
        "SAM&IR",
        "SAM whose inner loss is the IR loss",
        (RHO, LAMBDA_IR),
        lambda m, family: Recipe(sam_rho=m["rho"], penalties=(InputGradientNorm(m["lambda_ir"]),)),
    )
)
register(
    MechanismSpec(
        "SAM&JR",
        "SAM whose inner loss is the JR loss",
        (RHO, LAMBDA_JR),
        lambda m, family: Recipe(sam_rho=m["rho"], penalties=(InputJacobianNorm(m["lambda_jr"]),)),
    )
)
