"""Model modes: blocks that run models in eval mode, or in train mode with BatchNorm's running
statistics left alone, and give each its own mode back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module, frozen: bool = False) -> Iterator[None]:
    """Models in eval mode inside the block (and, with `frozen`, without parameter gradients);
    each model's training flag and its parameters' requires_grad come back as they were."""
    training = [m.training for m in models]
    grads = [[p.requires_grad for p in m.parameters()] for m in models] if frozen else []
    for m in models:
        m.eval()
        if frozen:
            m.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in zip(models, training):
            m.train(mode)
        for m, flags in zip(models, grads):
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


@contextmanager
def bn_running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalizes with batch statistics but leaves its running averages alone."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Attention through PyTorch's plain-math kernel inside the block: the fused scaled-dot-product
    kernels (flash, memory-efficient, the CPU flash kernel) have no double backward, which input
    Hessians and the exact IR, JR and ER gradients take through every layer (timm's ViTs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
