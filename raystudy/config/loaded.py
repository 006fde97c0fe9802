"""Models a study loads instead of training: timm's published weights, or a local weights file.

A trial (or target) entry names one with

    - {model: timm/vit_base_patch16_224.augreg_in21k_ft_in1k, pretrained: true}   # timm's weights
    - {model: timm/vit_base_patch16_224, weights: vit_b16_sam.safetensors}     # a state dict for it
    - {weights: runs/surrogate/model.pt}                                        # a raystudy model file

Such a trial trains nothing: it goes straight to the trial-end hook (or, in a targets study, is
saved as a target), and its record says where the weights came from (raystudy.core.pretrained).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from raystudy.config.train import check_name, show
from raystudy.errors import RaystudyError

TIMM_PREFIX = "timm/"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class LoadedModel:
    # A timm model name, with its pretrained tag (vit_base_patch16_224.sam_in1k); None for a
    # raystudy model file, which names its own architecture.
    architecture: str | None = None
    pretrained: bool = False  # timm's published weights (Hugging Face hub, or its local cache)
    weights: str | None = None  # a local file: a state dict for `architecture`, or a raystudy model file

    @property
    def name(self) -> str:
        """What tables and target files call it: the timm name with its tag for timm's weights,
        else the weights file's name (vit_b16_sam.safetensors: vit_b16_sam)."""
        return self.architecture if self.pretrained else Path(self.weights).stem

    def describe(self) -> str:
        if self.weights:
            return f"{self.name} from {self.weights}"
        return f"{self.name} (timm's pretrained weights)"

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "pretrained": self.pretrained, "weights": self.weights}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LoadedModel | None":
        return None if values is None else cls(**values)


def parse_loaded(model: str | None, pretrained: bool, weights: str | None) -> LoadedModel | None:
    """The loaded model an entry names, or None for a model the study trains."""
    timm_name = model[len(TIMM_PREFIX) :] if model and model.startswith(TIMM_PREFIX) else None
    if not timm_name and not pretrained and weights is None:
        return None
    if pretrained and weights:
        raise RaystudyError("give pretrained: true (timm's weights) or weights: FILE, not both")
    if model and not timm_name:
        raise RaystudyError(
            f"model={model!r}: a loaded model is named timm/<name> (e.g. timm/vit_base_patch16_224.sam_in1k); "
            "a raystudy model file needs no model"
        )
    if timm_name is not None and not pretrained and weights is None:
        raise RaystudyError(
            f"model={model!r} is loaded, not trained: add pretrained: true (timm's weights) or weights: FILE"
        )
    if pretrained and timm_name is None:
        raise RaystudyError("pretrained: true needs model: timm/<name>")
    if weights is not None:
        suffix = Path(weights).suffix
        if timm_name and suffix not in STATE_DICT_SUFFIXES:
            raise RaystudyError(f"weights={weights!r}: a state dict file ends in {', '.join(STATE_DICT_SUFFIXES)}")
        if not timm_name and suffix != ".pt":
            raise RaystudyError(
                f"weights={weights!r}: without model: timm/<name> this must be a raystudy model file (.pt)"
            )
        check_name(f"weights={show(weights)}: the model's name", Path(weights).stem)
        weights = _absolute(weights)
    if timm_name is not None:
        _check_timm_name(timm_name)
    return LoadedModel(timm_name, pretrained, weights)


def _absolute(path: str) -> str:
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError, ValueError) as err:  # ~nobody/w.pt, a NUL byte, a loop of links
        raise RaystudyError(f"weights={show(path)} is not a usable path ({err})") from None


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise RaystudyError(f"unknown timm model {name!r} (timm.list_models(pretrained=True) lists them)")
