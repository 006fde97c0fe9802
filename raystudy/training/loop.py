"""The training loop: one model (surrogate, target, or LGV ensemble) from a TrainConfig.

SGD with momentum and weight decay, linear warm-up then cosine decay per epoch (METHOD.md), a
mechanism's recipe for each step, bf16 autocast optional, channels_last on CUDA. With an output
folder it writes a resumable checkpoint every `checkpoint_every` epochs (model, optimizer, RNG
states, history): rerun with the same folder and it continues where it stopped and ends with the
same weights as an uninterrupted run (deterministic mode). No Ray here: the Ray trainable hangs
its reporting on `on_epoch_end`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from raystudy import __version__
from raystudy.config import TrainConfig
from raystudy.core.checkpoint import (
    LGV_DIR,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_model,
    restore_train_state,
    save_model,
    save_train_state,
)
from raystudy.core.data import Dataset, dataset_for, eval_batches, random_batch, train_batches
from raystudy.core.models import build_model
from raystudy.core.precision import device_versions, phase_precision, tf32, tf32_allowed
from raystudy.errors import RaystudyError
from raystudy.mechanisms import training_step
from raystudy.mechanisms.model_state import eval_mode
from raystudy.mechanisms.sam import SAM


class TrainingDiverged(RaystudyError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for (default: cuda if torch sees one); a CUDA device that is not there is one line."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise RaystudyError(f"device {chosen} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Per-epoch lr: linear warm-up to the peak, then cosine decay to 0 (or constant)."""
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / config.warmup_epochs
    if config.schedule == "constant":
        return config.lr
    progress = (epoch - config.warmup_epochs) / max(1, config.epochs - config.warmup_epochs)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def model_meta(config: TrainConfig, dataset: Dataset) -> dict[str, Any]:
    """What a model file records: enough to rebuild it and to know where it came from."""
    return {
        "model": config.model,
        "num_classes": dataset.num_classes,
        "input_size": dataset.image_size,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "config": config.to_dict(),
        "versions": versions(config=config),
    }


def versions(device: torch.device | None = None, config: TrainConfig | None = None) -> dict[str, str]:
    """The software and accelerator a result came from and, with its config, the precision of each phase."""
    out = {"raystudy": __version__, "torch": torch.__version__, "python": platform.python_version()}
    return {**out, **device_versions(device), **(phase_precision(config.recipe(), config.precision) if config else {})}


def evaluate_accuracy(model: nn.Module, split, batch_size: int = 1000, autocast=None) -> float:
    correct = torch.zeros((), device=split.labels.device)
    with eval_mode(model), torch.no_grad(), autocast or nullcontext():
        for x, y in eval_batches(split, batch_size):
            correct += (model(_layout(x)).argmax(1) == y).sum()
    return float(correct) / len(split)


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def _layout_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _layout(batch[0]), batch[1]


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _build(config: TrainConfig, dataset: Dataset, device: torch.device) -> nn.Module:
    if config.init_checkpoint:
        model, meta = load_model(Path(config.init_checkpoint))
        if meta["model"] != config.model or meta["num_classes"] != dataset.num_classes:
            raise RaystudyError(
                f"--init {config.init_checkpoint!r} is a {meta['model']} with {meta['num_classes']} classes, "
                f"not a {config.model} for {dataset.name}"
            )
    else:
        model = build_model(
            config.model, dataset.num_classes, config.pretrained, dataset.image_size, dataset.mean, dataset.std
        )
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def train(
    config: TrainConfig,
    dataset: Dataset | None = None,
    out_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict[str, float], Path | None, nn.Module], None] | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Train per `config`; resumes from `out_dir/checkpoint.pt` when present.

    `on_epoch_end(epoch_stats, checkpoint_path, model)` runs after every epoch; `checkpoint_path` is the
    state written at that epoch, or None. Raises TrainingDiverged on a non-finite loss.
    """
    dev = pick_device(device)
    with _global_algorithm_flags_restored():
        seed_everything(config.seed, config.deterministic)
        out = Path(out_dir) if out_dir is not None else None
        if dataset is None:
            dataset = dataset_for(config)
        dataset = dataset.to(dev)
        model = _build(config, dataset, dev)
        recipe = config.recipe()
        with tf32(tf32_allowed(recipe)):  # raystudy.core.precision: per phase, restored after
            return _train(config, dataset, model, recipe, dev, out, on_epoch_end, log)


@contextmanager
def _global_algorithm_flags_restored():
    """cuDNN autotuning and deterministic algorithms are process-wide: set for this training run
    (seed_everything), then put back as they were for whatever the process runs next."""
    benchmark = torch.backends.cudnn.benchmark
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(config, dataset, model, recipe, dev, out, on_epoch_end, log) -> TrainResult:
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sam = SAM(model.parameters(), recipe.sam_rho) if recipe.sam_rho else None
    start, history = 0, []
    if out is not None and (out / STATE_FILE).is_file():
        start, history = restore_train_state(out / STATE_FILE, config, model, optimizer, dev)
        _say(log, f"resuming {out} after epoch {start}/{config.epochs}")
    autocast = _autocast(config, dev)
    # LGV snapshots of the epochs already done; a resumed epoch rewrites its own by index.
    snapshots = [out / LGV_DIR / f"model_{i:03d}.pt" for i in range(start * config.snapshots_per_epoch)] if out else []
    for epoch in range(start, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        epoch_stats = _run_epoch(config, dataset, model, recipe, optimizer, sam, autocast, epoch, out, snapshots)
        # at the training batch: a forward pass without a graph holds less than the step it follows
        epoch_stats["test_acc"] = evaluate_accuracy(model, dataset.test, config.batch_size, autocast=autocast)
        history.append(epoch_stats)
        _say(log, _epoch_line(epoch_stats, config.epochs))
        state_path = None
        if out is not None and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
            state_path = out / STATE_FILE
            save_train_state(state_path, config, model, optimizer, epoch + 1, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch_stats, state_path, model)
    if out is not None:
        save_model(out / MODEL_FILE, model, model_meta(config, dataset))
        (out / METRICS_FILE).write_text(
            json.dumps({"config": config.to_dict(), "versions": versions(dev, config), "epochs": history}, indent=1)
        )
    return TrainResult(model, history, snapshots)


def _run_epoch(config, dataset, model, recipe, optimizer, sam, autocast, epoch, out, snapshots) -> dict[str, float]:
    model.train()
    sums: dict[str, torch.Tensor] = {}
    n_batches = max(1, len(dataset.train) // min(config.batch_size, len(dataset.train)))
    snapshot_after = _snapshot_steps(n_batches, config.snapshots_per_epoch)
    seen, started = 0, time.perf_counter()
    for step, (x, y) in enumerate(train_batches(dataset.train, config.batch_size)):
        partners = lambda n=y.shape[0]: _layout_batch(random_batch(dataset.train, n))  # noqa: E731 (MU/CM only)
        parts = training_step(model, recipe, optimizer, _layout(x), y, dataset.num_classes, sam, autocast, partners)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value
        seen += y.shape[0]
        if step in snapshot_after and out is not None:
            snapshots.append(_save_snapshot(out, model, config, dataset, len(snapshots)))
    if dataset.train.labels.is_cuda:
        torch.cuda.synchronize(dataset.train.labels.device)
    seconds = time.perf_counter() - started
    epoch_stats = {
        "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_s": seen / seconds,
    }
    epoch_stats.update({k: float(v) / n_batches for k, v in sums.items() if k != "correct"})
    epoch_stats["train_acc"] = float(sums["correct"]) / seen
    if not math.isfinite(epoch_stats["loss"]):
        raise TrainingDiverged(
            f"training diverged at epoch {epoch + 1}: loss is {epoch_stats['loss']} (lr {epoch_stats['lr']:g})"
        )
    return epoch_stats


def _snapshot_steps(n_batches: int, per_epoch: int) -> set[int]:
    """Steps (0-based) after which LGV saves a model: evenly spread, the last one ending the epoch
    (at most one per step, so an epoch shorter than `per_epoch` steps saves one after each step)."""
    return {math.ceil((k + 1) * n_batches / per_epoch) - 1 for k in range(per_epoch)} if per_epoch else set()


def _save_snapshot(out: Path, model, config, dataset, index: int) -> Path:
    path = out / LGV_DIR / f"model_{index:03d}.pt"
    save_model(path, model, model_meta(config, dataset))
    return path


def _epoch_line(r: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(r['epoch'])}/{epochs}  loss {r['loss']:.4f}  train {100 * r['train_acc']:.1f}%  "
        f"test {100 * r['test_acc']:.1f}%  lr {r['lr']:.4g}  {r['images_per_s']:.0f} img/s  {r['seconds']:.1f}s"
    )


def _say(log, text: str) -> None:
    if log is not None:
        log(text)
