"""Older experiment formats, in one place: what this version reads, resumes or refuses, and how.

Manifest formats (`raystudy-study.json`'s "format"):
- "raystudy-study/2" (0.2.0 on): adds the phases done, the Optuna storage URL and the format.
- no format: written by 0.1.0. Read as format 2 with no phase done (`current_manifest`). Its grids
  and targets studies resume: Ray's pickled state names 0.1.0's module paths (the study builder
  was `raystudy.study`), which `old_module_paths` maps to today's while Ray restores it. Its
  searches do not resume: Ray pickled 0.1.0's Optuna searcher class by value (a subclass of Ray's
  OptunaSearch reading its private state), which this version replaced by
  raystudy.cluster.searcher; `raystudy resume` says so in one line (finish the search with
  raystudy 0.1.0, or analyse it as it is: `raystudy analyze` reads it).

No longer read (formats of development builds before 0.1.0's release format): trial configs
without a plan (`{"trial": {...}}`), final results without a trial record (the analysis shows such
a trial as failed, saying why) and model files naming `lgv_base` (refused by name). A search whose
history is a sqlite file copied into a bucket (before journals) is read by the analysis and the
dashboard (raystudy.persist.optuna_history) but not resumed. No torch, no Ray.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from raystudy.errors import RaystudyError

MANIFEST_FORMAT = "raystudy-study/2"
# 0.1.0's flat modules, by what Ray may have pickled of them (tests/data/experiments-0.1.0).
MOVED_MODULES = {
    "raystudy.study": "raystudy.cluster.experiment",
    "raystudy.storage": "raystudy.persist.storage",
    "raystudy.optuna_history": "raystudy.persist.optuna_history",
    "raystudy.tracking": "raystudy.cluster.tracking",
    "raystudy.trainable": "raystudy.cluster.trainable",
}


def format_of(manifest: dict[str, Any]) -> str:
    return manifest.get("format") or "0.1.0"


def current_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest as this version writes it (0.1.0's: no phase done, no Optuna storage URL)."""
    return {"phases_done": [], "optuna_storage": None, **manifest, "format": MANIFEST_FORMAT}


def check_resumable(manifest: dict[str, Any], location: str) -> None:
    version = format_of(manifest)
    if version not in ("0.1.0", MANIFEST_FORMAT):
        raise RaystudyError(f"{location} was written in format {version!r}, newer than this raystudy reads: upgrade")
    if version == "0.1.0" and manifest["study"].get("kind") == "search":
        raise RaystudyError(
            f"{location} is a search started by raystudy 0.1.0, whose Optuna searcher this version cannot restore: "
            "finish it with raystudy 0.1.0 (git checkout v0.1.0, commit 7b95841; pip install -e .), or analyse it "
            f"as it is (`raystudy analyze {location}`)"
        )


@contextmanager
def old_module_paths() -> Iterator[None]:
    """0.1.0's module names resolve to today's modules while Ray unpickles an experiment's state."""
    added = [old for old in MOVED_MODULES if old not in sys.modules]
    for old in added:
        sys.modules[old] = importlib.import_module(MOVED_MODULES[old])
    try:
        yield
    finally:
        for old in added:
            sys.modules.pop(old, None)
