"""Saving and safe loading of model files and resumable training states.

Everything is loaded with `torch.load(weights_only=True)`: a file that would run code when
unpickled is refused, and a truncated or foreign file gives a RaystudyError, not a crash in torch.
Writes go to a temporary file first and are renamed into place, so a crash mid-write never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raystudy.errors import RaystudyError

if TYPE_CHECKING:
    from raystudy.config import TrainConfig

MODEL_FORMAT = "raystudy-model/1"
STATE_FORMAT = "raystudy-train-state/1"

# A training run's folder.
STATE_FILE = "checkpoint.pt"  # resumable training state (latest)
MODEL_FILE = "model.pt"  # final weights, what `evaluate` and targets load
METRICS_FILE = "metrics.json"  # per-epoch records
LGV_DIR = "lgv"  # LGV snapshots


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def safe_load(path: Path, expected_format: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RaystudyError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise RaystudyError(
            f"refused to load {str(path)!r}: it holds objects other than tensors and plain data "
            f"(loading it could run code); only raystudy checkpoints are accepted ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise RaystudyError(f"{str(path)!r} is not a readable checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise RaystudyError(f"{str(path)!r} is not a {expected_format} file (found {found!r})")
    return payload


def save_model(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights plus what rebuilds the model: name, classes, input size, normalization, config."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save({"format": MODEL_FORMAT, "meta": json.dumps(meta, sort_keys=True), "state_dict": state}, path)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model file written by `save_model` (eval mode)."""
    from raystudy.core.models import build_model

    payload = safe_load(path, MODEL_FORMAT)
    meta = json.loads(payload["meta"])
    model = build_model(
        meta["model"],
        meta["num_classes"],
        input_size=meta["input_size"],
        mean=meta["mean"],
        std=meta["std"],
        resize_to=meta.get("resize_to"),
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise RaystudyError(f"{str(path)!r} does not match the {meta['model']!r} architecture: {err}") from err
    return model.to(device).eval(), meta


def save_train_state(path: Path, config: TrainConfig, model, optimizer, epoch: int, history: list[dict]) -> None:
    """The resumable state after `epoch`: config, weights, optimizer, RNG states, per-epoch history."""
    atomic_save(
        {
            "format": STATE_FORMAT,
            "config": config.to_json(),
            "epoch": epoch,
            "history": json.dumps(history),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": _device_rng(model),
        },
        path,
    )


def restore_train_state(state_path: Path, config: TrainConfig, model, optimizer, device) -> tuple[int, list[dict]]:
    """Load a training state written by an earlier run of the same config; returns (epoch, history)."""
    state = safe_load(state_path, STATE_FORMAT, map_location=device)
    saved = type(config).from_dict(json.loads(state["config"]))
    if saved != config:
        raise RaystudyError(
            f"{str(state_path.parent)!r} holds a run with other settings ({', '.join(config.differences(saved))}); "
            "use another --out or the same settings"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if device.type == "cuda" and state["rng_cuda"]:  # the trial's own device (older files: all devices, first)
        torch.cuda.set_rng_state(state["rng_cuda"][0].cpu(), device)
    return int(state["epoch"]), json.loads(state["history"])


def _device_rng(model: nn.Module) -> list[torch.Tensor]:
    """The CUDA generator state of the model's device only: asking for every visible device's
    would create a context on each, and a resume on fewer devices could not restore them."""
    device = next(model.parameters()).device
    return [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
