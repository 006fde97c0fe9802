"""SAM (Foret et al. 2021) as an update rule that wraps the base optimizer's step.

Non-adaptive, as in the published code: ascend to theta + rho * g / ||g|| (norm over all
parameters), take the gradient there, restore theta, and let the base optimizer (SGD with its
weight decay) step with that gradient. SAM&IR and SAM&JR run both passes on the regularized loss.
"""

from __future__ import annotations

from typing import Iterable

import torch


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
