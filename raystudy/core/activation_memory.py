"""Bytes autograd saves per image for a model's backward pass, measured on the CPU.

What a training step or an input gradient holds beyond the weights is, to first order, what the
forward pass saves for backward, and that grows linearly with the batch. It is measured here by
counting the distinct tensors autograd saves (`torch.autograd.graph.saved_tensors_hooks`; the
weights, saved too, excluded) at two small batches: the difference per image is the slope, and
`raystudy.budget.memory` scales it to any batch. `benchmarks/activation_memory.py` writes the table that
`raystudy plan` reads; `tests/test_memory.py` holds a scaled estimate against a direct count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.core.models import build_model


def saved_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for one forward pass and its loss."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    x = images.detach().requires_grad_(True)  # input gradients, as the hook and the attacks take them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    del loss
    return sum(seen.values())


def bytes_per_image(model: nn.Module, image_size: int, batches: tuple[int, int] = (2, 4)) -> float:
    """Saved bytes per image: the slope between two batches (a per-batch constant cancels)."""
    model.train()  # training's graph: batch norm saves its batch statistics
    small, large = (saved_bytes(model, torch.rand(b, 3, image_size, image_size)) for b in batches)
    return (large - small) / (batches[1] - batches[0])


def measure(name: str, image_size: int, num_classes: int = 10) -> dict[str, float]:
    """{saved bytes per image, parameter bytes} of `name` built for `image_size` pixels."""
    torch.manual_seed(0)
    model = build_model(name, num_classes, input_size=image_size)
    return {
        "saved_bytes_per_image": bytes_per_image(model, image_size),
        "parameter_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters())),
    }
