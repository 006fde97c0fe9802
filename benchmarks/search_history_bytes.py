"""Benchmark: bytes a remote search uploads to keep its Optuna history durable, before and after.

    python benchmarks/search_history_bytes.py --trials 200 --json results/search_history_bytes.json

Runs a TPE study of `--trials` trials (a cheap objective over SAM&JR's two magnitudes) and, after
every write the searcher makes (a suggestion, a result), uploads its history as raystudy did
before (the whole sqlite database copied) and as it does now (the journal's new bytes as one
segment, raystudy.persist.optuna_history.JournalMirror), each into a local folder standing in for the
bucket. Prints the bytes and objects uploaded by each and the final size of each history.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raystudy.persist.optuna_history import JournalMirror, journal_storage  # noqa: E402


def run(trials: int, storage, after_each) -> None:
    study = optuna.create_study(study_name="s", storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(trials):
        trial = study.ask()
        after_each()
        rho = trial.suggest_float("rho", 0.01, 0.5, log=True)
        lam = trial.suggest_float("lambda_jr", 1e-6, 1.0, log=True)
        study.tell(trial, -((math.log10(rho) + 1) ** 2) - (math.log10(lam) + 4) ** 2 / 10)
        after_each()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="history_bytes_"))
    database, copies = work / "optuna.db", {"bytes": 0, "objects": 0}

    def copy_database() -> None:  # before: the whole file after every write
        copies["bytes"] += database.stat().st_size
        copies["objects"] += 1

    run(args.trials, f"sqlite:///{database}", copy_database)
    mirror = JournalMirror(str(work / "journal.log"), str(work / "bucket" / "optuna-journal"), interval=0)
    segments = {"bytes": 0, "objects": 0}

    def upload_segment() -> None:  # now: the journal's new bytes after every write
        sent = mirror.sync()
        segments["bytes"] += sent
        segments["objects"] += bool(sent)

    run(args.trials, journal_storage(mirror.local), upload_segment)
    report = {
        "command": "python " + " ".join(sys.argv),
        "trials": args.trials,
        "before_sqlite_copies": {**copies, "history_bytes": database.stat().st_size},
        "after_journal_segments": {**segments, "history_bytes": (work / "journal.log").stat().st_size},
    }
    print(
        f"{args.trials} trials: sqlite copies {copies['bytes'] / 1e6:.1f} MB in {copies['objects']} uploads "
        f"(database {database.stat().st_size / 1e3:.0f} KB); journal segments {segments['bytes'] / 1e6:.2f} MB "
        f"in {segments['objects']} uploads (journal {(work / 'journal.log').stat().st_size / 1e3:.0f} KB)"
    )
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
