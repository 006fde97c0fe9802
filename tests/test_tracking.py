"""`--log-to`: a trial's per-epoch curves and final hook metrics in MLflow (a local file store) and
TensorBoard event files, tagged with the trial's mechanism, magnitudes and seed; W&B offline."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import RAYSTUDY, ROOT, SMOKE, raystudy_here


def tensorboard_scalars(event_file: Path) -> dict[str, list[float]]:
    """Scalars of a TensorBoard event file (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, at = event_file.read_bytes(), {}, 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = Event.FromString(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append(value.simple_value)
    return out


def run_tracked(smoke_storage, tmp_path, trackers: str, env=None) -> subprocess.CompletedProcess:
    space = dict(
        SMOKE, name=f"tracked_{trackers.replace(',', '_')}", trials=[{"mechanism": "LS", "magnitudes": {"p": 0.3}}]
    )
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(space))
    return subprocess.run(
        RAYSTUDY + ["run", str(path), "--storage", str(smoke_storage), "--num-cpus", "2", "--log-to", trackers],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_mlflow_and_tensorboard_hold_the_trial(smoke_storage, tmp_path, monkeypatch):
    out = run_tracked(smoke_storage, tmp_path, "mlflow,tensorboard")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked_mlflow_tensorboard")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (
        run.data.tags["mechanism"] == "LS" and run.data.tags["magnitudes"] == "p=0.3" and run.data.tags["seed"] == "0"
    )
    assert run.data.params["plan/train/mechanism"] == "LS"
    epochs = SMOKE["train"]["epochs"]
    history = client.get_metric_history(run.info.run_id, "epoch")  # one point per epoch, then the final report
    assert sorted(m.value for m in history)[:epochs] == list(range(1, epochs + 1))
    assert 0 <= run.data.metrics["asr.pgd.untargeted.8.mean"] <= 1  # the final hook metrics
    assert "acc" in run.data.metrics and "acc.tiny_cnn_s1" in run.data.metrics
    assert not any(name.startswith(("config", "record")) for name in run.data.metrics)
    (events,) = (smoke_storage / "tracked_mlflow_tensorboard").glob("trial_*/events.out.tfevents.*")
    scalars = tensorboard_scalars(events)
    assert len(scalars["ray/tune/test_acc"]) >= epochs and "ray/tune/asr/pgd/untargeted/8/mean" in scalars


@pytest.mark.slow
def test_wandb_writes_an_offline_run(smoke_storage, tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_DIR": str(tmp_path), "WANDB_API_KEY": "", "HOME": str(tmp_path)}
    out = run_tracked(smoke_storage, tmp_path, "wandb", env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert list(tmp_path.glob("**/offline-run-*")), "an offline W&B run directory"


def test_unknown_tracker_is_a_one_line_error(tmp_path):
    out = raystudy_here("run", ROOT / "search_spaces" / "smoke.yaml", "--storage", tmp_path, "--log-to", "mlflow,comet")
    assert out.returncode == 2 and "unknown tracker(s) comet; valid: tensorboard, mlflow, wandb" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
