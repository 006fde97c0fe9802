"""The device comes from the trial's resources and TF32 is set per phase, restored, and recorded
(raystudy.core.precision). CUDA's presence is faked: these hold on any machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from raystudy.config import EvalConfig, TrainConfig
from raystudy.core.precision import CUDA_CONTEXT_BYTES, device_for_share, memory_fraction, tf32, tf32_flags
from raystudy.errors import RaystudyError


@pytest.fixture
def flags_restored():
    before = tf32_flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before["matmul"], before["cudnn"]


def test_gpu_0_is_the_cpu_even_where_cuda_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for_share(0) == torch.device("cpu")
    assert device_for_share(0.25) == torch.device("cuda", 0)


def test_raystudy_device_cpu_forces_the_cpu_for_fake_gpu_clusters(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RAYSTUDY_DEVICE", "cpu")
    assert device_for_share(0.5) == torch.device("cpu")
    monkeypatch.setenv("RAYSTUDY_DEVICE", "tpu")
    with pytest.raises(RaystudyError, match="the only device it can force is cpu"):
        device_for_share(0.5)


def test_a_gpu_share_without_cuda_is_one_line_not_a_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RaystudyError, match="gpu=0.25 but torch sees no CUDA device") as err:
        device_for_share(0.25)
    assert "\n" not in str(err.value)
    with pytest.raises(RaystudyError, match="a trial uses one device"):
        device_for_share(2)


def test_a_shared_gpus_cap_leaves_room_for_the_cuda_context():
    card = 24 * CUDA_CONTEXT_BYTES
    assert memory_fraction(0.25, card) == pytest.approx(0.25 - 1 / 24)
    assert memory_fraction(0.25, 4 * CUDA_CONTEXT_BYTES) == 0.05  # a floor, never zero or negative


def tiny(mechanism: str, **overrides) -> TrainConfig:
    values = dict(dataset="synthetic", model="tiny_cnn", epochs=1, batch_size=32, n_train=64, n_test=32)
    return TrainConfig.from_preset("faithful", mechanism=mechanism, image_size=16, seed=0, **values, **overrides)


@pytest.mark.parametrize("mechanism, expected", [("ST", True), ("SAM", True), ("AT", False), ("JR", False)])
def test_training_sets_tf32_for_its_mechanism_and_leaves_the_flags_as_it_found_them(
    mechanism, expected, flags_restored
):
    from raystudy.training.loop import train

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False  # an odd state
    seen = []
    train(tiny(mechanism), on_epoch_end=lambda record, path, model: seen.append(tf32_flags()), device="cpu", log=None)
    assert seen == [{"matmul": expected, "cudnn": expected}]
    assert tf32_flags() == {"matmul": True, "cudnn": False}


@pytest.mark.parametrize("deterministic", [True, False])
def test_training_leaves_cudnn_autotuning_and_deterministic_algorithms_as_it_found_them(deterministic):
    from raystudy.training.loop import train

    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    seen = []
    try:
        torch.backends.cudnn.benchmark = deterministic  # the opposite of what the run sets
        train(
            tiny("ST", deterministic=deterministic),
            on_epoch_end=lambda *_: seen.append(
                (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
            ),
            device="cpu",
            log=None,
        )
        assert seen == [(not deterministic, deterministic)]  # in force while it trains
        assert torch.backends.cudnn.benchmark == deterministic and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])


def test_a_phase_restores_the_flags_even_when_it_fails(flags_restored):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with pytest.raises(ValueError), tf32(False):
        assert tf32_flags() == {"matmul": False, "cudnn": False}
        raise ValueError("a phase failed")
    assert tf32_flags() == {"matmul": True, "cudnn": True}


class FlagRecorder(nn.Module):
    """A tiny classifier that notes the TF32 flags in force at every forward pass."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3 * 8 * 8, 4)
        self.flags = []

    def forward(self, x):
        self.flags.append(tf32_flags())
        return self.layer(x.flatten(1))


def test_the_hook_measures_in_fp32_whatever_the_training_left(flags_restored):
    from raystudy.core.data import make_synthetic
    from raystudy.metrics.hook import make_eval_set, measure_surrogate

    data = make_synthetic(16, 16, image_size=8, seed=0, num_classes=4)
    config = EvalConfig(n_eval=8, budgets=(8,), attacks=("pgd",), steps=2, smoothness_samples=2, batch_size=8)
    surrogate, target = FlagRecorder(), FlagRecorder()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    measure_surrogate(surrogate, {"t": target}, make_eval_set(data.test, 4, config), config)
    assert surrogate.flags and target.flags
    assert all(f == {"matmul": False, "cudnn": False} for f in surrogate.flags + target.flags)
    assert tf32_flags() == {"matmul": True, "cudnn": True}


def test_the_record_names_the_accelerator_and_each_phases_precision():
    from raystudy.training.loop import versions

    record = versions(torch.device("cpu"), tiny("AT"))
    assert {"cuda", "cudnn", "torch"} <= set(record) and "gpu" not in record
    assert (record["tf32_train"], record["tf32_hook"], record["autocast"]) == ("False", "False", "fp32")
    assert versions(torch.device("cpu"), tiny("ST"))["tf32_train"] == "True"


def test_a_local_study_without_a_gpu_gives_its_trials_the_cpu(monkeypatch):
    from raystudy.cluster.experiment import with_gpu_share
    from raystudy.config import load_space
    from raystudy.core.precision import device_for_share

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "table.yaml")
    assert spec.resources.gpu > 0
    assert device_for_share(with_gpu_share(spec, 0).resources.gpu) == torch.device("cpu")
    assert with_gpu_share(spec, spec.resources.gpu) is spec


def test_train_and_evaluate_name_a_missing_cuda_device_in_one_line(monkeypatch):
    from raystudy.errors import RaystudyError
    from raystudy.training.loop import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None).type == "cpu" and pick_device("cpu").type == "cpu"
    with pytest.raises(RaystudyError, match="device cuda asked for, but torch sees 0 CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RaystudyError, match="device cuda:3 asked for, but torch sees 1 CUDA device"):
        pick_device("cuda:3")
