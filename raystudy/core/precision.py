"""The device a trial runs on and the arithmetic it uses, chosen explicitly and recorded.

Device: from the trial's resources, never from what torch happens to see. Ray 2.60 no longer
hides GPUs from actors that asked for none, so `gpu: 0` must mean the CPU even on a GPU machine,
and a trial given a GPU share whose torch sees no CUDA device is an error, not a silent CPU run.
Ray makes a trial's GPU the first visible one (CUDA_VISIBLE_DEVICES), hence `cuda:0`.

TF32: torch's flags `backends.cuda.matmul.allow_tf32` and `backends.cudnn.allow_tf32` are process
globals (a Ray worker runs many trials and phases). TF32 keeps 10 mantissa bits, which swallows
input perturbations of a few rounding steps (AT at eps <= 0.05, IR/JR's input gradients, finite
differences), so it is allowed only for training steps that take none of those, and never in the
trial-end hook, whose smoothness (Hessian-vector products) and similarity are input gradients.
Each phase sets the flags and restores them after (`tf32`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from raystudy.errors import RaystudyError

# A CUDA context (~0.5-1 GiB) sits outside torch's per-process memory fraction: a trial's cap
# leaves this much of its share for it, so four 0.25 trials fit one card with their contexts.
CUDA_CONTEXT_BYTES = 1 << 30
FORCED_DEVICE = "RAYSTUDY_DEVICE"


def device_for_share(gpu: float) -> torch.device:
    """The device of a trial with `gpu` GPUs (its resources): the CPU for 0, else cuda:0.
    RAYSTUDY_DEVICE=cpu runs every trial on the CPU whatever its share (a cluster's GPU scheduling
    tried out with fake GPU resources, as tests/test_autoscaling.py does)."""
    if gpu > 1:
        raise RaystudyError(f"resources: gpu={gpu:g}: a trial uses one device; give at most 1")
    forced = os.environ.get(FORCED_DEVICE, "")
    if forced not in ("", "cpu"):
        raise RaystudyError(f"{FORCED_DEVICE}={forced!r}: the only device it can force is cpu")
    if gpu == 0 or forced == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RaystudyError(
            f"this trial was given gpu={gpu:g} but torch sees no CUDA device (a CPU-only torch, or "
            "CUDA_VISIBLE_DEVICES empty): set resources: gpu: 0 to run on the CPU"
        )
    return torch.device("cuda", 0)


def memory_fraction(gpu: float, total_bytes: int) -> float:
    """torch's per-process cap for a share `gpu` of a card of `total_bytes`, less the context."""
    return max(0.05, gpu - CUDA_CONTEXT_BYTES / total_bytes)


def tf32_allowed(recipe) -> bool:
    """A training step (a Recipe, or its StepShape) may use TF32 unless it depends on small input
    or weight perturbations."""
    return not (recipe.input_sensitive or recipe.takes_finite_differences)


def phase_precision(recipe, autocast: str) -> dict[str, str]:
    """What a record says of the arithmetic: TF32 in training and in the hook, and autocast."""
    return {"tf32_train": str(tf32_allowed(recipe)), "tf32_hook": "False", "autocast": autocast}


def tf32_flags() -> dict[str, bool]:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


@contextmanager
def tf32(enabled: bool):
    """TF32 on or off for matmuls and convolutions inside the block; the flags found are restored."""
    previous = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous["matmul"]
        torch.backends.cudnn.allow_tf32 = previous["cudnn"]


def device_versions(device: torch.device | None = None) -> dict[str, str]:
    """What a record says of the accelerator: CUDA and cuDNN versions, and the GPU's name."""
    out = {"cuda": torch.version.cuda or "none", "cudnn": str(torch.backends.cudnn.version() or "none")}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
