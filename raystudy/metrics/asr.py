"""Transfer attack success rates, counted as METHOD.md defines them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransferCount:
    asr: float  # Definition 3: over samples both surrogate and target classify correctly when clean
    asr_all: float  # the published code's: over every sample (untargeted: 1 - target accuracy on AEs)
    support: int  # how many samples Definition 3 counts


def transfer_success(
    y: torch.Tensor,
    surrogate_clean: torch.Tensor,
    target_clean: torch.Tensor,
    target_adversarial: torch.Tensor,
    target_class: torch.Tensor | None = None,
) -> TransferCount:
    """Untargeted success: the target's prediction on the AE differs from y; targeted (when
    `target_class` is given): it equals the target class. Arguments are predicted labels.
    `asr` is NaN when no sample is correct for both models (nothing to count, not 0%)."""
    success = target_adversarial != y if target_class is None else target_adversarial == target_class
    both_correct = (surrogate_clean == y) & (target_clean == y)
    support = int(both_correct.sum())
    asr = float(success[both_correct].float().mean()) if support else float("nan")
    return TransferCount(asr, float(success.float().mean()), support)


def fooling_rate(
    y: torch.Tensor, surrogate_adversarial: torch.Tensor, target_class: torch.Tensor | None = None
) -> float:
    """Fraction of all AEs that fool the surrogate itself (FP)."""
    success = surrogate_adversarial != y if target_class is None else surrogate_adversarial == target_class
    return float(success.float().mean())
