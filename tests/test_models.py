"""The model zoo: CIFAR variants take [0,1] 32 px images (and DI's larger ones), timm offline errors."""

from __future__ import annotations

import pytest
import torch

from raystudy.core.models import CIFAR_MODELS, Normalize, build_model
from raystudy.errors import RaystudyError


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_cifar_models_accept_32px_and_enlarged_inputs(name):
    model = build_model(name, 10).eval()
    assert isinstance(model[0], Normalize)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert model(torch.rand(1, 3, 48, 48)).shape == (1, 10)  # DI pads images up to 1.5x


def test_resnet18_is_the_cifar_variant():
    net = build_model("resnet18", 10)[1]
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RaystudyError, match="known: densenet121, inception_v3, resnet18"):
        build_model("resnet19", 10)
    with pytest.raises(RaystudyError, match="not a timm model"):
        build_model("resnet19", 10, input_size=224)


def test_timm_model_for_imagenette_and_offline_pretrained_error(monkeypatch):
    model = build_model("resnet18", 10, input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert type(model[1]).__module__.startswith("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here; a user offline sees the same
    with pytest.raises(
        RaystudyError, match=r"pretrained weights of 'mobilenetv2_100' \(timm/mobilenetv2_100.ra_in1k\)"
    ):
        build_model("mobilenetv2_100", 10, pretrained=True, input_size=224)
