"""Checkpoints load safely: code-running pickles and truncated files are refused with clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from raystudy.core.checkpoint import MODEL_FORMAT, load_model, save_model
from raystudy.core.models import build_model
from raystudy.errors import RaystudyError

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


class RecordsRestore:
    """Stands for Ray's trainable: keeps what restore() was handed."""

    __name__ = "run_trial"

    def restore(self, checkpoint_path):
        self.restored = checkpoint_path
        return "restored"


def _trial_folder(tmp_path, kept: dict[str, bool]):
    """A trial folder holding checkpoint folders; True: with its state file, False: cut short."""
    from raystudy.core.checkpoint import STATE_FILE

    for age, (name, complete) in enumerate(kept.items()):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / STATE_FILE).write_bytes(b"state")
            os.utime(tmp_path / name / STATE_FILE, (1e9 + age, 1e9 + age))  # written in the order given
    return tmp_path


def _restore(tmp_path, named: str):
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    from raystudy.cluster import ray_internals
    from raystudy.core.checkpoint import STATE_FILE

    trainable = ray_internals.restoring_newest_checkpoint(RecordsRestore, STATE_FILE)()
    result = _TrainingResult(checkpoint=Checkpoint.from_directory(tmp_path / named), metrics={"epoch": 1})
    return trainable, trainable.restore(result)


def test_a_checkpoint_that_still_exists_is_restored_as_ray_names_it(tmp_path):
    _trial_folder(tmp_path, {"checkpoint_000000": True, "checkpoint_000001": True})
    trainable, _ = _restore(tmp_path, "checkpoint_000000")
    assert trainable.restored.checkpoint.path == str(tmp_path / "checkpoint_000000")


def test_a_deleted_checkpoint_is_replaced_by_the_newest_complete_one(tmp_path):
    # A killed driver's snapshot names checkpoint 0, which retention deleted after 2 and 3 were
    # reported; 4 was cut short by the crash (no state file).
    _trial_folder(tmp_path, {"checkpoint_000002": True, "checkpoint_000003": True, "checkpoint_000004": False})
    trainable, _ = _restore(tmp_path, "checkpoint_000000")
    assert trainable.restored.checkpoint.path == str(tmp_path / "checkpoint_000003")
    assert trainable.restored.metrics == {"epoch": 1}


def test_the_newest_is_the_last_written_not_the_highest_numbered(tmp_path):
    # The first crash left 5 and 6 behind; the restored trial numbered its checkpoints from 3 again.
    _trial_folder(tmp_path, {"checkpoint_000005": True, "checkpoint_000006": True, "checkpoint_000004": True})
    trainable, _ = _restore(tmp_path, "checkpoint_000003")
    assert trainable.restored.checkpoint.path == str(tmp_path / "checkpoint_000004")


def test_with_no_checkpoint_left_the_trial_trains_from_the_start(tmp_path):
    _trial_folder(tmp_path, {"checkpoint_000001": False})
    trainable, returned = _restore(tmp_path, "checkpoint_000000")
    assert returned is None and not hasattr(trainable, "restored")
