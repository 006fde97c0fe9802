"""Model zoo: CIFAR variants of torchvision architectures, timm models for ImageNet-sized data.

Every model built here takes [0, 1] pixels: the dataset normalization is its first layer, so
attacks and metrics work in pixel space (as torchattacks expects). All models end in an adaptive
pooling layer, so they also accept the enlarged images of the DI attack.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from raystudy.config.train import CIFAR_MAX_INPUT, CIFAR_MODEL_NAMES, check_model_name
from raystudy.core.data import CIFAR10_MEAN, CIFAR10_STD
from raystudy.errors import RaystudyError

# Inputs at most CIFAR_MAX_INPUT pixels get the CIFAR variants (3x3 stem, no early down-sampling).


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer of every model. With `size`, the images are
    first resized (bilinear, differentiable) to the side a loaded model was trained at, so that
    attacks stay in the dataset's pixels while each model sees its own input size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def _cifar_resnet(factory: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        net = factory(weights=None, num_classes=num_classes)
        # CIFAR stem: 3x3 stride-1 convolution, no max-pool (the ImageNet stem would shrink 32 px to 8).
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        return net

    return build


def _cifar_vgg16(num_classes: int) -> nn.Module:
    from torchvision.models import vgg16_bn

    net = vgg16_bn(weights=None)
    # Five max-pools take 32 px to 1 px: a single linear classifier on the 512 features.
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(512, num_classes)
    return net


def _cifar_densenet121(num_classes: int) -> nn.Module:
    from torchvision.models import densenet121

    net = densenet121(weights=None, num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.features.pool0 = nn.Identity()
    return net


def _cifar_inception_v3(num_classes: int) -> nn.Module:
    from torchvision.models import inception_v3
    from torchvision.models.inception import BasicConv2d

    net = inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=num_classes)
    # The usual CIFAR variant: one 3x3 stride-1 convolution to 192 channels replaces the stem.
    net.Conv2d_1a_3x3 = BasicConv2d(3, 192, kernel_size=3, stride=1, padding=1)
    for name in ("Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"):
        setattr(net, name, nn.Identity())
    return net


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head: fast enough for CPU tests."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    """He et al.'s CIFAR residual block: two 3x3 convolutions with BN, a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        reshape = stride != 1 or c_in != c_out
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if reshape
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet8(num_classes: int, width: int = 16) -> nn.Module:
    """He et al.'s CIFAR ResNet-8 (one block per stage, widths 16-32-64): a ResNet small enough to
    train on CPU, for real-data studies at CPU scale."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _BasicBlock(width, width, 1),
        _BasicBlock(width, 2 * width, 2),
        _BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def vgg_small(num_classes: int, width: int = 16) -> nn.Module:
    """A VGG in miniature (conv-BN-ReLU pairs at widths 16, 32, 64 with max-pools, no residuals):
    a CPU-scale target whose architecture differs from ResNet-8's."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (width, 2 * width, 4 * width):
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


def _torchvision(name: str) -> Callable[..., nn.Module]:
    import torchvision.models

    return getattr(torchvision.models, name)


CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda c: _cifar_resnet(_torchvision("resnet18"))(c),
    "resnet50": lambda c: _cifar_resnet(_torchvision("resnet50"))(c),
    "vgg16": _cifar_vgg16,
    "inception_v3": _cifar_inception_v3,
    "densenet121": _cifar_densenet121,
    "tiny_cnn": TinyCNN,
    "resnet8": resnet8,
    "vgg_small": vgg_small,
}


assert tuple(sorted(CIFAR_MODELS)) == CIFAR_MODEL_NAMES, "the config's model list and the builders must agree"


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    input_size: int = 32,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    resize_to: int | None = None,
) -> nn.Module:
    """Build `name` for images of `input_size` pixels, normalization included.

    Small inputs (CIFAR-sized) use the CIFAR variants in `CIFAR_MODELS`; larger ones any timm
    model by name (`pretrained=True` loads timm's weights, which needs the network).
    """
    check_model_name(name, input_size)
    if input_size <= CIFAR_MAX_INPUT:
        if pretrained:
            raise RaystudyError(f"no pretrained weights for the CIFAR variant of {name!r}")
        net = CIFAR_MODELS[name](num_classes)
    else:
        net = create_timm(name, num_classes, pretrained)
        if pretrained:  # fine-tuning keeps the normalization the weights were trained with
            mean, std = net.pretrained_cfg.get("mean", mean), net.pretrained_cfg.get("std", std)
    return nn.Sequential(Normalize(mean, std, resize_to), net)


def create_timm(name: str, num_classes: int | None, pretrained: bool, **kwargs) -> nn.Module:
    """A timm model; num_classes None keeps the pretrained head's classes."""
    import timm

    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # hub download failures surface as these
        if not pretrained:
            raise
        local = kwargs.get("pretrained_cfg_overlay", {}).get("file")
        if local:  # a local state dict: it exists (checked before), so it is of another architecture
            raise RaystudyError(f"{local!r} does not fit {name!r}: {str(err)[:300]}") from err
        weights = timm.models.get_pretrained_cfg(name)
        source = getattr(weights, "hf_hub_id", None) or getattr(weights, "url", None) or "timm's default"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise RaystudyError(
            f"the pretrained weights of {name!r} ({source}) are not in the cache and could not be downloaded "
            f"({type(err).__name__}: {reason[:120]}); fetch them once where the network reaches the hub: "
            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" (they land in the Hugging "
            "Face cache, HF_HOME, to copy to every node), or give a local file (weights: FILE)"
        ) from err


class Ensemble(nn.Module):
    """Mean logits of several models (an LGV collection). Attacks use one member per iteration."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise RaystudyError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)
