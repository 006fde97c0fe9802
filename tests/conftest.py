"""Shared fixtures: tiny synthetic data and models, CPU only, a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

# No network here: hub look-ups fail at once instead of retrying (read when huggingface_hub imports).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def pytest_collection_modifyitems(config, items):
    """Tests marked `ends_every_ray` (they run `ray stop --force`) go last, after every other Ray."""
    items.sort(key=lambda item: item.get_closest_marker("ends_every_ray") is not None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Every test writes decoded data into a throw-away cache, never the user's.
    monkeypatch.setenv("RAYSTUDY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("RAYSTUDY_DATA", raising=False)
    torch.set_num_threads(2)


@pytest.fixture
def synthetic():
    from raystudy.data import make_synthetic

    return make_synthetic(n_train=256, n_test=128, num_classes=4, image_size=16, seed=0)


ROOT = Path(__file__).resolve().parents[1]


def run_raystudy(*args, timeout=600):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "raystudy", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def smoke_storage(tmp_path_factory):
    """A storage path with the smoke targets trained and the smoke study run (once per session)."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    os.environ["RAYSTUDY_CACHE"] = str(cache)
    root = tmp_path_factory.mktemp("storage")
    targets = run_raystudy("targets", ROOT / "search_spaces" / "smoke_targets.yaml", "--storage", root, "--num-cpus", 2)
    assert targets.returncode == 0, targets.stdout[-3000:] + targets.stderr[-3000:]
    study = run_raystudy("run", ROOT / "search_spaces" / "smoke.yaml", "--storage", root, "--num-cpus", 2)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    return root


def final_rows(experiment: Path) -> dict[str, list[dict]]:
    """Per trial folder of a local experiment, the results that carry the hook's metrics (final == 1)."""
    import json

    out = {}
    for path in experiment.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [r for r in rows if r.get("final") == 1]
    return out


def finished_once(final_rows: list[dict]) -> bool:
    """A trial finished, and was not run again: Ray may log a restarted trial's final result twice
    (it records trial ends with a delay, so a trial that finished just before its driver died is
    restarted), but the trial then reports its kept result, the same record, not a new one."""
    return bool(final_rows) and all(r["record"] == final_rows[0]["record"] for r in final_rows)
