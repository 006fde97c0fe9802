"""Checkpoints load safely: code-running pickles and truncated files are refused with clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from raystudy.checkpoint import MODEL_FORMAT, load_model, save_model
from raystudy.errors import RaystudyError
from raystudy.models import build_model

META = {"model": "tiny_cnn", "num_classes": 3, "input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip(tmp_path):
    model = build_model("tiny_cnn", 3, input_size=8)
    save_model(tmp_path / "m.pt", model, META)
    loaded, meta = load_model(tmp_path / "m.pt")
    assert meta == META and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_malicious_pickle_is_refused(tmp_path):
    torch.save({"format": MODEL_FORMAT, "meta": "{}", "state_dict": {}, "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(RaystudyError, match="refused to load"):
        load_model(tmp_path / "evil.pt")


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    save_model(tmp_path / "m.pt", build_model("tiny_cnn", 3, input_size=8), META)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RaystudyError, match="not a readable checkpoint"):
        load_model(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(RaystudyError, match="not a raystudy-model/1 file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(RaystudyError, match="does not exist"):
        load_model(tmp_path / "none.pt")
