"""benchmarks/throughput.py times what training runs: its precision set around each step and put
back, its baseline under the mechanism's flags, and packed copies that fail reported, never a hang."""

from __future__ import annotations

import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput  # noqa: E402

from raystudy.config import TrainConfig  # noqa: E402
from raystudy.core.precision import tf32_flags  # noqa: E402


def test_each_step_runs_under_its_mechanisms_precision_and_leaves_the_flags_as_found():
    seen = []
    step = lambda: seen.append(tf32_flags())  # noqa: E731
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        throughput.under_training_flags(TrainConfig.from_preset("fast", mechanism="AT"), step)()
        throughput.under_training_flags(TrainConfig.from_preset("fast", mechanism="ST"), step)()
        st_beside_jr = throughput.under_training_flags(
            TrainConfig.from_preset("fast", mechanism="ST"),
            step,
            TrainConfig.from_preset("fast", mechanism="JR").recipe(),
        )
        st_beside_jr()
        assert seen == [
            {"matmul": False, "cudnn": False},
            {"matmul": True, "cudnn": True},
            {"matmul": False, "cudnn": False},
        ]
        assert tf32_flags() == {"matmul": True, "cudnn": True}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_training_layout_is_channels_last_on_cuda_only():
    x = torch.rand(2, 3, 4, 4)
    assert throughput.training_layout(torch.device("cpu"))(x) is x
    assert throughput.training_layout(torch.device("cuda"))(x).is_contiguous(memory_format=torch.channels_last)


def test_a_packed_copy_that_fails_is_reported_and_nothing_hangs(monkeypatch, capsys):
    monkeypatch.setattr(throughput, "PACKING_TIMEOUT", 60)
    args = Namespace(
        packing=2, batch_size=8, image_size=16, model="no_such_model", warmup=0, steps=1, packing_mechanisms=None
    )
    rows = [{"mechanism": "ST", "penalty_gradient": "exact", "preset": "fast", "seconds_per_step": 0.01}]
    start = time.monotonic()
    assert throughput.time_packing(args, torch.device("cpu"), rows) == {}
    assert time.monotonic() - start < 120
    assert "ST                           2 at once: failed (RaystudyError" in capsys.readouterr().out
