"""Data augmentations as batch transforms on the device: mixup (MU), cutmix (CM), cutout (CO).

MU and CM act as the published dataset wrapper does: per sample, with probability p, mix with a
*fresh, unmixed* partner drawn at random from the training set (with its own crop and flip), in
two independent rounds, each round drawing new partners: a second round never mixes with an
already-mixed image. `partners()` supplies such a batch. Beta(1, 1) is the uniform distribution,
so mixing weights are drawn with torch.rand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ROUNDS = 2  # independent rounds of MU / CM per batch, as in the published code

# A fresh batch of (images in [0, 1], soft labels) from the training set, the size of the batch.
Partners = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def _box_masks(b: int, h: int, w: int, box_h: torch.Tensor, box_w: torch.Tensor, device) -> torch.Tensor:
    """Boolean (B, 1, H, W) masks of boxes of the given sides at random centres, clipped at borders."""
    cy = torch.randint(0, h, (b,), device=device)
    cx = torch.randint(0, w, (b,), device=device)
    y0, y1 = (cy - box_h // 2).clamp(0, h), (cy + box_h - box_h // 2).clamp(0, h)
    x0, x1 = (cx - box_w // 2).clamp(0, w), (cx + box_w - box_w // 2).clamp(0, w)
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    inside = (
        (rows >= y0[:, None, None])
        & (rows < y1[:, None, None])
        & (cols >= x0[:, None, None])
        & (cols < x1[:, None, None])
    )
    return inside[:, None]


@dataclass(frozen=True)
class Mixup:
    """x' = b*x + (1-b)*x_partner with b ~ U(0, 1) for a sample chosen with probability p; labels alike."""

    p: float
    rounds: int = ROUNDS

    def __call__(self, x: torch.Tensor, y_soft: torch.Tensor, partners: Partners) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(self.rounds):
            partner_x, partner_y = partners()
            b = x.shape[0]
            weight = torch.rand(b, device=x.device)
            weight = torch.where(torch.rand(b, device=x.device) < self.p, weight, torch.ones_like(weight))
            x = weight[:, None, None, None] * x + (1 - weight[:, None, None, None]) * partner_x
            y_soft = weight[:, None] * y_soft + (1 - weight[:, None]) * partner_y
        return x, y_soft


@dataclass(frozen=True)
class CutMix:
    """Paste a box of side S*sqrt(1-b), b ~ U(0, 1), at a random centre (clipped at the borders) from
    the partner into a sample chosen with probability p; the label takes the pasted area's weight."""

    p: float
    rounds: int = ROUNDS

    def __call__(self, x: torch.Tensor, y_soft: torch.Tensor, partners: Partners) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(self.rounds):
            partner_x, partner_y = partners()
            b, _, h, w = x.shape
            side = torch.sqrt(1 - torch.rand(b, device=x.device))  # box side S * sqrt(1 - b)
            apply = torch.rand(b, device=x.device) < self.p
            box_h = torch.where(apply, (h * side).long(), 0)
            box_w = torch.where(apply, (w * side).long(), 0)
            mask = _box_masks(b, h, w, box_h, box_w, x.device)
            area = mask.float().mean(dim=(1, 2, 3))  # the pasted (clipped) fraction sets the label weight
            x = torch.where(mask, partner_x, x)
            y_soft = (1 - area[:, None]) * y_soft + area[:, None] * partner_y
        return x, y_soft


@dataclass(frozen=True)
class Cutout:
    size: int

    def __call__(
        self, x: torch.Tensor, y_soft: torch.Tensor, partners: Partners | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        side = torch.full((b,), int(self.size), device=x.device)
        mask = _box_masks(b, h, w, side, side, x.device)
        return x.masked_fill(mask, 0.0), y_soft
