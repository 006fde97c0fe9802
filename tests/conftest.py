"""Shared fixtures: tiny synthetic data and models, CPU only, a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

# No network here: hub look-ups fail at once instead of retrying (read when huggingface_hub imports).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Every test writes decoded data into a throw-away cache, never the user's.
    monkeypatch.setenv("RAYSTUDY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("RAYSTUDY_DATA", raising=False)
    torch.set_num_threads(2)


@pytest.fixture
def synthetic():
    from raystudy.data import make_synthetic

    return make_synthetic(n_train=256, n_test=128, num_classes=4, image_size=16, seed=0)
