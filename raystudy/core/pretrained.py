"""Loading the models a study does not train (raystudy.config.loaded), and saying where they came from.

timm's weights load through timm itself (`pretrained=True`, from the Hugging Face hub or its local
cache; a local state dict through timm's `pretrained_cfg_overlay={"file": ...}`, the same loader
with the same key filters), so a file behaves exactly as the published weights would. Each model
keeps the normalization and input size its weights were trained with (`Normalize`'s resize): the
attacks work in the dataset's [0, 1] pixels whatever the model's own resolution.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raystudy.config.loaded import LoadedModel
from raystudy.core.checkpoint import load_model
from raystudy.core.models import Normalize, create_timm
from raystudy.errors import RaystudyError

READ_CHUNK = 1 << 20


def load_loaded_model(loaded: LoadedModel, num_classes: int, image_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """(the model in eval mode, on the CPU, taking [0, 1] pixels of `image_size`; its provenance)."""
    if loaded.weights is not None and not Path(loaded.weights).is_file():
        raise RaystudyError(
            f"weights file {loaded.weights!r} does not exist on this machine (copy it to every node, or "
            "use model: timm/<name> with pretrained: true)"
        )
    if loaded.architecture is None:
        model, meta = load_model(Path(loaded.weights))
        provenance = {"source": "raystudy model file", "architecture": meta["model"]}
    else:
        model, provenance = _timm_model(loaded, image_size)
    classes = _classes(model, image_size)
    if classes != num_classes:
        raise RaystudyError(
            f"{loaded.describe()} predicts {classes} classes; the dataset has {num_classes} "
            "(a loaded model is used as published: its head is not replaced)"
        )
    if loaded.weights is not None:
        provenance.update(file=loaded.weights, file_sha256=file_sha256(Path(loaded.weights)))
    provenance["weights_sha256"] = state_dict_sha256(model)
    return model.eval(), provenance


def _timm_model(loaded: LoadedModel, image_size: int) -> tuple[nn.Module, dict[str, Any]]:
    overlay = {"pretrained_cfg_overlay": {"file": loaded.weights}} if loaded.weights else {}
    net = create_timm(loaded.architecture, None, pretrained=True, **overlay)
    cfg = net.pretrained_cfg
    side = int(cfg.get("input_size", (3, image_size, image_size))[-1])
    model = nn.Sequential(Normalize(cfg["mean"], cfg["std"], side if side != image_size else None), net)
    provenance = {
        "source": "local state dict for timm" if loaded.weights else "timm pretrained",
        "architecture": loaded.architecture,
        "hf_hub_id": cfg.get("hf_hub_id"),
        "input_size": side,
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
    }
    return model, provenance


def model_meta(
    model: nn.Module, provenance: dict[str, Any], image_size: int, classes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """What `raystudy.core.checkpoint.load_model` needs to rebuild a loaded timm model from its saved file."""
    normalize = model[0]
    return {
        "classes": list(classes),
        "model": provenance["architecture"],
        "num_classes": _classes(model, image_size),
        "input_size": image_size,
        "mean": normalize.mean.flatten().tolist(),
        "std": normalize.std.flatten().tolist(),
        "resize_to": normalize.size,
        "loaded_from": provenance,
    }


def _classes(model: nn.Module, image_size: int) -> int:
    with torch.no_grad():
        return int(model.eval()(torch.zeros(1, 3, image_size, image_size)).shape[1])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """A digest of the weights as loaded (names, shapes, dtypes and bytes, in name order): the same
    weights give the same digest whichever file or cache they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
