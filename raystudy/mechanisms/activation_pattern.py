"""Hold a forward pass's piecewise decisions fixed for a second, nearby forward pass.

Double backprop differentiates a ReLU network with its activation pattern fixed (ReLU'' = 0,
max-pool's argmax and dropout's mask unchanged). A finite difference between two forward passes
only agrees with it if the second pass makes the same decisions: otherwise every unit whose input
crosses zero between the two passes switches its whole gradient on or off, an O(1/h) change in
O(h) of the units, which does not vanish as the step h shrinks. Replaying the recorded decisions
makes the second pass the network's piecewise-linear neighbour, so the difference quotient tends to
exactly the derivative double backprop computes.

The decisions are recorded per call, in call order, through a TorchFunctionMode: modules reused
within one forward (torchvision's BasicBlock calls its ReLU twice) and functional calls are both
covered, on any architecture built from F.relu, F.max_pool2d and F.dropout. Smooth activations
(SiLU, GELU) need nothing held: their finite differences converge as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_MAX_POOL = {F.max_pool2d, F.max_pool2d_with_indices}
_DROPOUT = {F.dropout}


class ActivationPattern:
    """`with pattern.record(): model(x)`, then `with pattern.replay(): model(x + h * d)`."""

    def __init__(self) -> None:
        self.decisions: list[torch.Tensor] = []

    @contextmanager
    def record(self) -> Iterator[None]:
        self.decisions = []
        with _Record(self.decisions):
            yield

    @contextmanager
    def replay(self) -> Iterator[None]:
        mode = _Replay(self.decisions)
        with mode:
            yield
        if mode.position != len(self.decisions):
            raise RuntimeError(
                f"the replayed pass made {mode.position} piecewise decisions, the recorded one {len(self.decisions)}"
            )


def _relu_is_inplace(func, args, kwargs) -> bool:
    return func in _RELU_INPLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))


def _pool_arguments(args, kwargs) -> tuple[tuple, dict]:
    kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
    return args[:6], kwargs  # (input, kernel, stride, padding, dilation, ceil_mode); return_indices dropped


def _dropout_arguments(args, kwargs) -> tuple[float, bool, bool]:
    names = ("p", "training", "inplace")
    values = dict(zip(names, args[1:]), **kwargs)
    return float(values.get("p", 0.5)), bool(values.get("training", True)), bool(values.get("inplace", False))


class _Record(TorchFunctionMode):
    def __init__(self, decisions: list[torch.Tensor]):
        super().__init__()
        self.decisions = decisions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU or func in _RELU_INPLACE:
            out = func(*args, **kwargs)
            self.decisions.append(out > 0)
            return out
        if func in _MAX_POOL:
            pool_args, pool_kwargs = _pool_arguments(args, kwargs)
            values, indices = F.max_pool2d_with_indices(*pool_args, **pool_kwargs)
            self.decisions.append(indices)
            return (values, indices) if func is F.max_pool2d_with_indices or kwargs.get("return_indices") else values
        if func in _DROPOUT:
            p, training, inplace = _dropout_arguments(args, kwargs)
            if not training or p == 0:
                return args[0]
            # Drawn here rather than inside F.dropout, so that the mask can be replayed.
            keep = (torch.rand_like(args[0]) >= p).to(args[0].dtype) / (1 - p)
            self.decisions.append(keep)
            return args[0].mul_(keep) if inplace else args[0] * keep
        return func(*args, **kwargs)


class _Replay(TorchFunctionMode):
    def __init__(self, decisions: list[torch.Tensor]):
        super().__init__()
        self.decisions = decisions
        self.position = 0

    def _next(self) -> torch.Tensor:
        if self.position >= len(self.decisions):
            raise RuntimeError("the replayed pass makes more piecewise decisions than the recorded one")
        decision = self.decisions[self.position]
        self.position += 1
        return decision

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU or func in _RELU_INPLACE:
            mask = self._next()
            return args[0].mul_(mask) if _relu_is_inplace(func, args, kwargs) else args[0] * mask
        if func in _MAX_POOL:
            indices = self._next()
            x = args[0]
            values = x.flatten(2).gather(2, indices.flatten(2)).view_as(indices)
            return (values, indices) if func is F.max_pool2d_with_indices or kwargs.get("return_indices") else values
        if func in _DROPOUT:
            p, training, inplace = _dropout_arguments(args, kwargs)
            if not training or p == 0:
                return args[0]
            keep = self._next()
            return args[0].mul_(keep) if inplace else args[0] * keep
        return func(*args, **kwargs)
