"""The similarity matrix between mechanisms: gradient similarity of a surrogate trained with one
mechanism (row) to a model trained with another (column), same architecture, different seeds.

The trials' final weights come from their last Ray checkpoint (loaded weights-only), the images
from the experiment's recorded evaluation set; so this needs the data on the analysing machine.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.records import DONE, Experiment, LoggedTrial
from analysis.tables import label_order, trial_setting
from raystudy.config import TrainConfig
from raystudy.core.checkpoint import STATE_FILE, STATE_FORMAT, safe_load
from raystudy.core.data import dataset_for
from raystudy.core.models import build_model
from raystudy.errors import RaystudyError
from raystudy.metrics.similarity import gradient_cosine, input_gradients
from raystudy.persist import storage


def similarity_matrix(experiment: Experiment, n_images: int = 256, device: str = "cpu") -> pd.DataFrame:
    """Rows: surrogate mechanism, columns: model mechanism; mean cosine over pairs with different
    seeds (empty if the experiment has no such pairs)."""
    settings = {t.trial_id: trial_setting(experiment, t) for t in experiment.trials if t.status == DONE and t.location}
    trials = [t for t in experiment.trials if t.trial_id in settings and not settings[t.trial_id]["lgv"]]
    if not any(
        settings[a.trial_id]["seed"] != settings[b.trial_id]["seed"] for a, b in itertools.combinations(trials, 2)
    ):
        return pd.DataFrame()
    dataset = _dataset(experiment, trials[0])
    x, y = _images(experiment, dataset, n_images, device)
    gradients = {t.trial_id: input_gradients(_model(t, experiment, dataset, device), x, y) for t in trials}
    cells: dict[tuple[str, str], list[float]] = {}
    for a, b in itertools.permutations(trials, 2):
        sa, sb = settings[a.trial_id], settings[b.trial_id]
        if sa["seed"] != sb["seed"] and sa["model"] == sb["model"]:
            cosine = float(gradient_cosine(gradients[a.trial_id], gradients[b.trial_id]).mean())
            cells.setdefault((sa["label"], sb["label"]), []).append(cosine)
    labels = label_order({label for pair in cells for label in pair})
    matrix = pd.DataFrame(np.nan, index=pd.Index(labels, name="surrogate"), columns=pd.Index(labels, name="model"))
    for (row, column), values in cells.items():
        matrix.at[row, column] = float(np.mean(values))
    return matrix


def _dataset(experiment: Experiment, trial: LoggedTrial):
    return dataset_for(_config(trial), experiment.spec.data)


def _images(experiment: Experiment, dataset, n_images: int, device: str):
    """The first `n_images` of the recorded evaluation set (a seeded random order)."""
    indices = experiment.record.get("eval_indices")
    if not indices:
        raise RaystudyError(f"{experiment.path}: no evaluation images recorded")
    split = dataset.test.subset(np.asarray(indices[:n_images]))
    return split.images.float().div(255).to(device), split.labels.to(device)


def _config(trial: LoggedTrial) -> TrainConfig:
    return TrainConfig.from_dict(trial.record["plan"]["train"])


def _model(trial: LoggedTrial, experiment: Experiment, dataset, device: str) -> torch.nn.Module:
    """The trial's final weights: its last checkpoint (written at the last epoch)."""
    checkpoints = sorted(d for d in storage.list_dirs(trial.location) if d.startswith("checkpoint_"))
    if not checkpoints:
        raise RaystudyError(f"trial {trial.trial_id} of {experiment.name} kept no checkpoint")
    data = storage.read_bytes(storage.join(trial.location, checkpoints[-1], STATE_FILE))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / STATE_FILE
        path.write_bytes(data)
        state = safe_load(path, STATE_FORMAT)
    model = build_model(
        _config(trial).model, dataset.num_classes, input_size=dataset.image_size, mean=dataset.mean, std=dataset.std
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def heatmap(matrix: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 1.0 + 0.55 * len(matrix))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix.to_numpy(float), cmap="viridis")
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(matrix.index)), matrix.index, fontsize=8)
    for (i, j), value in np.ndenumerate(matrix.to_numpy(float)):
        if not np.isnan(value):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < np.nanmean(matrix.to_numpy(float)) else "black",
            )
    ax.set_xlabel("model (mechanism)")
    ax.set_ylabel("surrogate (mechanism)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path
