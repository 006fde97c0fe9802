"""The analysis on small hand-made experiments (no Ray, no training): it reads trial records only.

Each experiment here is written the way the trainable writes one (raystudy-study.json, and per
trial params.json with the plan and result.json whose final line carries the record), with
metric values chosen by hand, so every table has a known answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from analysis import correlation_table, headline_cells, headline_table, load_experiment, metric_gaps, tidy_trials
from analysis.records import DONE, FAILED
from raystudy.config import STUDY_MANIFEST, parse_space
from raystudy.persist.record import MetricRow, make_record

STUDY = {
    "name": "hand",
    "kind": "grid",
    "preset": "faithful",
    "dataset": "synthetic",
    "model": "tiny_cnn",
    "seeds": [0, 1],
    "targets": "hand_targets",
    "train": {"epochs": 2, "image_size": 16},
    "trials": [{"mechanism": "ST"}, {"mechanism": "SAM"}, {"mechanism": "MU", "magnitudes": {"p": [0.1, 0.9]}}],
}
TARGETS = ("t1", "t2")


def hook_rows(asr: float, smooth: float, similar: float) -> list[MetricRow]:
    """What the hook reports, with chosen values: ASR per target = asr (+0.1 for t2)."""
    rows = [
        MetricRow("acc", 0.8 + 0.01 * (round(100 * asr) % 7)),
        MetricRow("smoothness", smooth, statistic="mean"),
        MetricRow("smoothness", 2 * smooth, statistic="max"),
        MetricRow("similarity", similar, target="mean"),
        MetricRow("test_acc", 0.88),
        MetricRow("seconds", 1.0, statistic="smoothness"),
    ]
    values = {"t1": asr, "t2": asr + 0.1}
    for mode in ("untargeted", "targeted"):
        where = {"attack": "pgd", "mode": mode, "budget": 8}
        scale = 1.0 if mode == "untargeted" else 0.5
        rows.append(MetricRow("fooling", min(1.0, asr + 0.2) * scale, **where))
        for target, value in values.items():
            rows.append(MetricRow("asr", value * scale, target=target, **where))
        rows.append(MetricRow("asr", float(np.mean(list(values.values()))) * scale, target="mean", **where))
    rows += [MetricRow("similarity", similar + 0.01 * i, target=t) for i, t in enumerate(TARGETS)]
    return rows


def write_experiment(root: Path, values: dict, fail=(), skip=(), legacy=()) -> Path:
    """One trial folder per plan, with its record; `values[(label, seed)] = (asr, smooth, similar)`."""
    spec = parse_space(STUDY, "hand.yaml")
    folder = root / spec.name
    folder.mkdir(parents=True)
    (folder / STUDY_MANIFEST).write_text(
        json.dumps({"study": STUDY, "source": "hand.yaml", "data": None, "targets": list(TARGETS)})
    )
    for i, plan in enumerate(spec.plans):
        identity = plan.identity()
        label = identity["mechanism"] + {0.1: " τ=1", 0.9: " τ=5"}.get(identity["magnitudes"].get("p"), "")
        if (label, identity["seed"]) in skip:
            continue
        trial = folder / f"trial_{i:03d}"
        trial.mkdir()
        epoch = {"epoch": 1, "loss": 1.0, "test_acc": 0.5, "final": 0, "trial_id": f"t{i}"}
        lines = [epoch]
        if (label, identity["seed"]) in fail:
            (trial / "error.txt").write_text(
                "Traceback ...\nraystudy.training.loop.TrainingDiverged: training diverged at epoch 1\n"
            )
        else:
            rows = hook_rows(*values[(label, identity["seed"])])
            record = make_record(
                {**identity, "label": label},
                plan.to_dict(),
                {"name": spec.name, "kind": "grid", "preset": "faithful"},
                {"torch": "x"},
                rows,
            )
            final = {"final": 1, "trial_id": f"t{i}", **{r.key: r.value for r in rows}}
            if (label, identity["seed"]) in legacy:  # written before records: flat metrics, old config shape
                config = {
                    "trial": {
                        "mechanism": identity["mechanism"],
                        "magnitudes": identity["magnitudes"],
                        "seed": identity["seed"],
                    }
                }
            else:
                final["record"] = record
                config = {"plan": plan.to_dict()}
            lines.append(final)
        (trial / "params.json").write_text(
            json.dumps(config if (label, identity["seed"]) not in fail else {"plan": plan.to_dict()})
        )
        (trial / "result.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


VALUES = {
    ("ST", 0): (0.40, 5.0, 0.20),
    ("ST", 1): (0.50, 4.0, 0.22),
    ("SAM", 0): (0.60, 2.0, 0.30),
    ("SAM", 1): (0.70, 1.0, 0.34),
    ("MU τ=1", 0): (0.30, 6.0, 0.15),
    ("MU τ=1", 1): (0.35, 6.5, 0.14),
    ("MU τ=5", 0): (0.20, 7.0, 0.10),
    ("MU τ=5", 1): (0.25, 8.0, 0.12),
}


def test_tidy_rows_come_from_the_records(tmp_path):
    experiment = load_experiment(str(write_experiment(tmp_path, VALUES)))
    tidy = tidy_trials([experiment])
    assert tidy.trial_id.nunique() == 8 and sorted(tidy.drop_duplicates("trial_id").label.unique()) == [
        "MU τ=1",
        "MU τ=5",
        "SAM",
        "ST",
    ]
    row = tidy[
        (tidy.label == "SAM")
        & (tidy.seed == 1)
        & (tidy.name == "asr")
        & (tidy.target == "t2")
        & (tidy["mode"] == "untargeted")
    ].iloc[0]
    assert row.value == pytest.approx(0.8) and row.attack == "pgd" and row.budget == 8
    assert row.metric == "asr/pgd/untargeted/8/t2"
    mu = tidy[(tidy.label == "MU τ=5")].iloc[0]
    assert mu.magnitude == 0.9 and mu.tau == 5.0 and mu.preset == "faithful" and mu.dataset == "synthetic"


def test_headline_cells_are_mean_and_std_over_seeds(tmp_path):
    tidy = tidy_trials([load_experiment(str(write_experiment(tmp_path, VALUES)))])
    cells = headline_cells(tidy, "untargeted").set_index(["label", "target", "budget"])
    sam = cells.loc[("SAM", "t1", 8)]
    assert (
        sam["n"] == 2
        and sam["mean"] == pytest.approx(65.0)
        and sam["std"] == pytest.approx(np.std([60, 70], ddof=1) * 1)
    )
    targeted = headline_cells(tidy, "targeted").set_index(["label", "target", "budget"])
    assert targeted.loc[("ST", "mean", 8)]["mean"] == pytest.approx(100 * np.mean([0.45, 0.55]) * 0.5)
    table = headline_table(tidy, "untargeted")
    assert table.loc["SAM", ("t1", "8/255")].endswith("[best]") and "[↓]" in table.loc["MU τ=5", ("t1", "8/255")]
    assert table.loc["SAM", ("t1", "8/255")].startswith("65.0 ± 7.1")


def test_correlations_equal_scipy_on_the_hand_made_values(tmp_path):
    tidy = tidy_trials([load_experiment(str(write_experiment(tmp_path, VALUES)))])
    row = correlation_table(tidy).set_index(["target", "budget"]).loc[("t1", 8)]
    order = sorted(VALUES)  # any fixed order of the trials
    asr = [VALUES[k][0] for k in order]
    smooth = [VALUES[k][1] for k in order]
    assert row["n"] == 8
    assert row["r_smoothness"] == pytest.approx(scipy.stats.pearsonr(smooth, asr).statistic)
    similar_t1 = [VALUES[k][2] for k in order]  # similarity/t1 = similar + 0
    assert row["r_similarity"] == pytest.approx(scipy.stats.pearsonr(similar_t1, asr).statistic)


def test_gaps_list_failed_missing_and_incomplete_metrics(tmp_path):
    folder = write_experiment(tmp_path, VALUES, fail={("ST", 1)}, skip={("MU τ=5", 1)})
    # One finished trial lacks a metric the others have.
    result = folder / "trial_002" / "result.json"
    lines = [json.loads(line) for line in result.read_text().splitlines()]
    lines[-1]["record"]["metrics"] = [
        m for m in lines[-1]["record"]["metrics"] if not (m["name"] == "smoothness" and m.get("statistic") == "max")
    ]
    result.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    gaps = metric_gaps([load_experiment(str(folder))]).set_index("status")
    assert "training diverged at epoch 1" in gaps.loc["failed", "detail"] and gaps.loc["failed", "label"] == "ST"
    assert gaps.loc["missing", "label"] == "MU τ=5" and gaps.loc["missing", "detail"] == "never started"
    assert gaps.loc["missing metrics", "detail"] == "smoothness/max"
    tidy = tidy_trials([load_experiment(str(folder))])
    assert tidy.trial_id.nunique() == 6  # failed and never-started trials are listed, not counted


def test_trials_written_before_records_are_failed_saying_why_not_dropped(tmp_path):
    # Before 0.1.0's format a final result held flat metrics and no record (raystudy.persist.migrate).
    old = list(VALUES)[:1]
    experiment = load_experiment(str(write_experiment(tmp_path / "b", VALUES, legacy=set(old))))
    failed = [t for t in experiment.trials if t.status == FAILED]
    assert len(failed) == 1 and "written before raystudy 0.1.0" in failed[0].error
    assert sum(t.status == DONE for t in experiment.trials) == len(VALUES) - 1


def counting_reads(monkeypatch) -> dict[str, int]:
    """Counts of storage reads and listings, by what was read."""
    from raystudy.persist import storage

    counts = {"read": 0, "list": 0}
    read, listing = storage.read_bytes, storage.list_tree

    def counted_read(location, **options):
        if location.endswith(("result.json", "params.json", "error.txt")):
            counts["read"] += 1
        return read(location, **options)

    def counted_list(location):
        counts["list"] += 1
        return listing(location)

    monkeypatch.setattr(storage, "read_bytes", counted_read)
    monkeypatch.setattr(storage, "list_tree", counted_list)
    return counts


def test_a_second_analysis_lists_the_folders_and_reads_only_trials_that_may_change(tmp_path, monkeypatch):
    import os
    import shutil

    from analysis import records
    from raystudy.persist.record import ENDPOINT_ROWS_FILE

    folder = write_experiment(tmp_path, VALUES, fail=[("MU τ=5", 1)])
    (folder / "trial_001" / "adversarial").mkdir()  # images kept for an endpoint: rows may come later
    (folder / "trial_001" / "adversarial" / "clean.npz").write_bytes(b"x")
    counts = counting_reads(monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setattr(records, "READERS", 4)  # 8 folders: more than the readers, one listing of them all
    first = load_experiment(str(folder), cache=cache)
    assert counts == {"read": 8 * 2 + 1, "list": 1}  # params + result per trial, the failed one's error
    monkeypatch.setattr(records, "READERS", 32)
    counts.update(read=0, list=0)
    second = load_experiment(str(folder), cache=cache)
    assert second.trials == first.trials
    # Listed again: the failed trial (it may be resumed) and the one whose endpoint rows may come;
    # read again: the failed one only (the other's files are unchanged).
    assert counts == {"read": 2 + 1, "list": 2}

    # A settled trial is not listed again (a restarted finished trial writes the same final again).
    result = folder / "trial_000" / "result.json"
    result.write_text(result.read_text() + result.read_text().splitlines()[-1] + "\n")
    # New trials are read; endpoint rows written after the trial ended are read with its record.
    shutil.copytree(folder / "trial_002", folder / "trial_100")
    rows = [MetricRow("asr", 0.5, attack="pgd", mode="untargeted", budget=8, target="served").to_dict()]
    (folder / "trial_001" / ENDPOINT_ROWS_FILE).write_text(json.dumps(rows))
    counts.update(read=0, list=0)
    third = {t.location.rsplit("/", 1)[-1]: t for t in load_experiment(str(folder), cache=cache).trials}
    assert counts == {"read": 2 + 3 + 2, "list": 3}  # trial_100, the failed one, trial_001 (with its rows)
    assert any(r.get("target") == "served" for r in third["trial_001"].record["metrics"])
    assert third["trial_100"].record == third["trial_002"].record

    # The experiment made anew in the same place (its study record rewritten): every folder is
    # listed, and only what changed is read.
    study = folder / STUDY_MANIFEST
    study.write_text(study.read_text() + " ")
    os.utime(study, ns=(study.stat().st_mtime_ns + 10**9,) * 2)
    counts.update(read=0, list=0)
    fourth = load_experiment(str(folder), cache=cache)
    assert counts == {"read": 2 + 3, "list": 9}  # trial_000's longer result.json, the failed one
    assert [t.record for t in fourth.trials] == [t.record for t in third.values()]


def test_finished_trials_of_a_study_without_endpoints_are_read_without_listing_them(tmp_path, monkeypatch):
    from analysis import records

    folder = write_experiment(tmp_path, VALUES, fail=[("MU τ=5", 1)])
    listed = load_experiment(str(folder), cache=tmp_path / "listed").trials
    study = folder / STUDY_MANIFEST
    study.write_text(json.dumps({**json.loads(study.read_text()), "endpoints": []}))  # as `raystudy run` writes it
    (folder / "not_a_trial").mkdir()
    monkeypatch.setattr(records, "READERS", 4)  # 9 folders: more than the readers
    counts = counting_reads(monkeypatch)
    trials = load_experiment(str(folder), cache=tmp_path / "direct").trials
    assert trials == listed
    # Each folder's result.json and each trial's params.json (these hand-made rows carry no config;
    # Ray's do), then a listing of each folder that holds no finished trial (the failed trial, read
    # again with its error.txt, and the folder without a result.json).
    assert counts == {"read": 9 + 8 + 3, "list": 2}
    counts.update(read=0, list=0)
    assert load_experiment(str(folder), cache=tmp_path / "direct").trials == listed
    assert counts == {"read": 3, "list": 2}  # settled: all but the failed trial and the other folder


def test_trials_are_read_in_folder_order_whatever_finishes_first(tmp_path, monkeypatch):
    import random
    import time

    from raystudy.persist import storage

    folder = write_experiment(tmp_path, VALUES)
    read = storage.read_bytes
    monkeypatch.setattr(
        storage,
        "read_bytes",
        lambda location, **options: (time.sleep(random.random() / 50), read(location, **options))[1],
    )
    trials = load_experiment(str(folder), cache=tmp_path / "cache").trials
    assert [t.location.rsplit("/", 1)[-1] for t in trials] == sorted(t.location.rsplit("/", 1)[-1] for t in trials)


def test_an_epoch_redone_after_a_restore_counts_once_its_last_report(tmp_path):
    folder = write_experiment(tmp_path, VALUES)
    result = folder / "trial_000" / "result.json"
    lines = [json.loads(line) for line in result.read_text().splitlines()]
    epoch = lambda e, loss: {"epoch": e, "loss": loss, "test_acc": 0.5, "final": 0, "trial_id": "t0"}  # noqa: E731
    redone = [epoch(1, 1.0), epoch(2, 0.9), epoch(3, 0.8), epoch(3, 0.7), epoch(4, 0.6), lines[-1]]
    result.write_text("\n".join(json.dumps(line) for line in redone) + "\n")
    trial = next(t for t in load_experiment(str(folder), cache=tmp_path / "c").trials if t.location.endswith("000"))
    assert [(h["epoch"], h["loss"]) for h in trial.history] == [(1, 1.0), (2, 0.9), (3, 0.7), (4, 0.6)]


def test_accuracy_table_gives_each_setting_its_mean_and_spread_over_seeds(tmp_path):
    from analysis.tables import accuracy_table

    tidy = tidy_trials([load_experiment(str(write_experiment(tmp_path, VALUES)), cache=tmp_path / "c")])
    table = accuracy_table(tidy).set_index("setting")
    # hook_rows: acc = 0.8 + 0.01 * (round(100 * asr) % 7); ST's seeds have asr 0.40 and 0.50.
    st = [0.8 + 0.01 * (40 % 7), 0.8 + 0.01 * (50 % 7)]
    expected = f"{100 * np.mean(st):.1f} ± {100 * np.std(st, ddof=1):.1f}"
    assert table.loc["ST", "evaluation images (hook)"] == expected
    assert table.loc["ST", "test (last epoch)"] == "88.0 ± 0.0" and table.loc["ST", "seeds"] == 2
    assert list(table.index) == ["ST", "MU τ=1", "MU τ=5", "SAM"]  # METHOD.md's order
