"""Input-transformation defenses in front of a target (raystudy.config.defense names them).

`defended(target, steps, seed)` is the target as deployed behind its defense: the trial-end hook
measures clean accuracy and transfer ASR through it and never takes a gradient through it (the
surrogate's AEs are crafted on the surrogate alone). A defense that is not differentiable (JPEG,
bit depth, median) refuses an input that requires a gradient rather than pass a meaningless one.
Inputs and outputs are [0, 1] pixels, (N, C, H, W).
"""

from __future__ import annotations

import hashlib
import io
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from raystudy.config.defense import RESIZE_PAD_RATIO, DefenseStep, defense_name


class JpegCompression(nn.Module):
    """Each image encoded as JPEG at `quality` by PIL (its default 4:2:0 chroma subsampling) and
    decoded again: what a service that recompresses its uploads shows its model."""

    def __init__(self, quality: int) -> None:
        super().__init__()
        self.quality = quality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([self._round_trip(image) for image in pixels])
        return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).float() / 255

    def _round_trip(self, image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, format="JPEG", quality=self.quality
        )
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("L" if image.shape[-1] == 1 else "RGB"))
        return decoded[..., None] if decoded.ndim == 2 else decoded


class BitDepth(nn.Module):
    """Each channel quantized to `bits` bits: round(x * (2^bits - 1)) / (2^bits - 1) (Xu et al. 2018)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.levels = 2**bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels


class MedianFilter(nn.Module):
    """A `size` x `size` median over each channel, the border reflected (Xu et al. 2018)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.size // 2
        padded = F.pad(x, (half, half, half, half), mode="reflect")
        windows = padded.unfold(2, self.size, 1).unfold(3, self.size, 1)  # (N, C, H, W, k, k)
        return windows.reshape(*x.shape, -1).median(dim=-1).values


class ResizePad(nn.Module):
    """Random resize-and-pad (Xie et al. 2018): each image resized bilinearly to a side drawn from
    [side, padded) and zero-padded at a random offset to padded = floor(side * ratio). An image's
    draws depend only on `seed` and its 8-bit content: the same image gets the same transformation
    whatever batch, order or run it comes in (what makes a defended column reproducible)."""

    def __init__(self, ratio: float, seed: int) -> None:
        super().__init__()
        self.ratio, self.seed = ratio, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        padded = max(side + 1, int(side * self.ratio))
        out = x.new_zeros(*x.shape[:2], padded, padded)
        contents = to_uint8(x).cpu().numpy()  # one transfer for the batch, not one per image
        for i, image in enumerate(x):
            generator = torch.Generator().manual_seed(self._seed_of(contents[i]))
            new = int(torch.randint(side, padded, (1,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, padded - new + 1, (2,), generator=generator))
            resized = F.interpolate(image[None], size=(new, new), mode="bilinear", align_corners=False)[0]
            out[i, :, top : top + new, left : left + new] = resized
        return out

    def _seed_of(self, pixels: np.ndarray) -> int:
        """The image's own seed: from the study's and its 8-bit pixels (C, H, W)."""
        digest = hashlib.sha256(self.seed.to_bytes(8, "little", signed=True) + pixels.tobytes()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DefendedTarget(nn.Module):
    """A target behind its defense, as deployed."""

    def __init__(self, target: nn.Module, defense: nn.Sequential, differentiable: bool, name: str) -> None:
        super().__init__()
        self.target, self.defense, self.differentiable, self.name = target, defense, differentiable, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and not self.differentiable:
            raise RuntimeError(f"the defense {self.name} is not differentiable: no gradient is taken through it")
        return self.target(self.defense(x))


def defended(target: nn.Module, steps: tuple[DefenseStep, ...], seed: int) -> DefendedTarget:
    """`target` behind the defense `steps` (applied left to right); its random draws seeded from
    `seed` and the defense's name (not its place in a list of defenses)."""
    seed = seed + zlib.crc32(defense_name(steps).encode())
    layers = []
    for i, step in enumerate(steps):
        if step.kind == "jpeg":
            layers.append(JpegCompression(int(step.value)))
        elif step.kind == "bits":
            layers.append(BitDepth(int(step.value)))
        elif step.kind == "median":
            layers.append(MedianFilter(int(step.value)))
        else:
            layers.append(ResizePad(step.value or RESIZE_PAD_RATIO, seed + i))
    differentiable = all(step.differentiable for step in steps)
    return DefendedTarget(target, nn.Sequential(*layers), differentiable, defense_name(steps))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels as the 8-bit image they would be saved as."""
    return (x.detach() * 255).round().clamp(0, 255).to(torch.uint8)
