"""Every cell of the analysis tables, compared whole against an independent computation on the
hand-made experiment of test_analysis_records (numpy and scipy on the chosen values), so that a
wrong mean, spread, mark, column or row order changes an assertion."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from test_analysis_records import TARGETS, VALUES, write_experiment

from analysis import correlation_table, headline_table, load_experiment, metric_gaps, tidy_trials, wide
from analysis.tables import CONFIG_COLUMNS, _no_final, accuracy_table, label_order, marks_for

ORDER = ["ST", "MU τ=1", "MU τ=5", "SAM"]  # METHOD.md's mechanism order


@pytest.fixture
def tidy(tmp_path):
    return tidy_trials([load_experiment(str(write_experiment(tmp_path, VALUES)), cache=tmp_path / "c")])


def asr_of(label: str, seed: int, target: str, mode: str) -> float:
    """The hand-made ASR (test_analysis_records.hook_rows): t2 = t1 + 0.1, mean = their mean; targeted halves."""
    t1 = VALUES[(label, seed)][0]
    value = {"t1": t1, "t2": t1 + 0.1, "mean": np.mean([t1, t1 + 0.1])}[target]
    return value * (0.5 if mode == "targeted" else 1.0)


def expected_cell(label: str, target: str, mode: str, seeds=(0, 1)) -> tuple[float, str]:
    values = [100 * asr_of(label, s, target, mode) for s in seeds]
    mean = np.mean(values)
    text = f"{mean:.1f}" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else "")
    return mean, text


@pytest.mark.parametrize("mode", ["untargeted", "targeted"])
def test_headline_table_every_cell_mark_row_and_column(tidy, mode):
    table = headline_table(tidy, mode)
    assert list(table.index) == ORDER and table.index.name == "mechanism"
    assert list(table.columns) == [(t, "8/255") for t in ("t1", "t2", "mean")]
    assert list(table.columns.names) == ["target", "budget"]
    for target in ("t1", "t2", "mean"):
        means = {label: expected_cell(label, target, mode)[0] for label in ORDER}
        # SAM is best and ST second in every column; both MU settings sit more than 0.2 points under ST.
        marks = {"SAM": " [best]", "ST": " [2nd]", "MU τ=1": " [↓]", "MU τ=5": " [↓]"}
        assert sorted(means, key=means.get, reverse=True)[:2] == ["SAM", "ST"]
        for label in ORDER:
            assert table.loc[label, (target, "8/255")] == expected_cell(label, target, mode)[1] + marks[label]


def test_a_cell_with_fewer_seeds_than_most_says_so_and_has_no_spread(tmp_path):
    folder = write_experiment(tmp_path, VALUES, skip={("MU τ=5", 1)})
    table = headline_table(tidy_trials([load_experiment(str(folder), cache=tmp_path / "c")]), "untargeted")
    assert table.loc["MU τ=5", ("t1", "8/255")] == f"{100 * VALUES[('MU τ=5', 0)][0]:.1f} (n=1) [↓]"
    assert table.loc["ST", ("t1", "8/255")] == expected_cell("ST", "t1", "untargeted")[1] + " [2nd]"


def test_marks_share_ties_skip_equal_columns_and_mark_below_baseline_only_past_the_margin():
    means = pd.DataFrame(
        {
            "tie": [50.0, 50.0, 40.0, np.nan],
            "flat": [30.0, 30.0, 30.0, 30.0],
            "edge": [20.0, 19.8, 19.79, 25.0],
        },
        index=["ST", "SAM", "MU", "CO"],
    )
    marks = marks_for(means)
    assert marks["tie"].tolist() == [" [best]", " [best]", " [2nd] [↓]", ""]
    assert marks["flat"].tolist() == ["", "", "", ""]
    # 19.8 is 0.2 under ST (not more): no mark; 19.79 is: marked.
    assert marks["edge"].tolist() == [" [2nd]", "", " [↓]", " [best]"]
    no_baseline = marks_for(means.drop(index="ST"))
    assert "[↓]" not in "".join(no_baseline.to_numpy().ravel())


def test_correlation_table_every_column_against_scipy_and_least_squares(tidy):
    table = correlation_table(tidy).set_index(["target", "budget"])
    assert list(table.index) == [("t1", 8), ("t2", 8)]
    assert list(table.columns) == [
        "n",
        "r_acc",
        "r_fooling",
        "r_smoothness",
        "r_similarity",
        "r2_smoothness_similarity",
        "r2_all_four",
    ]
    keys = sorted(VALUES)
    for i, target in enumerate(TARGETS):
        asr = np.array([asr_of(*k, target, "untargeted") for k in keys])
        acc = np.array([0.8 + 0.01 * (round(100 * VALUES[k][0]) % 7) for k in keys])
        fooling = np.array([min(1.0, VALUES[k][0] + 0.2) for k in keys])
        smooth = np.array([VALUES[k][1] for k in keys])
        similar = np.array([VALUES[k][2] + 0.01 * i for k in keys])
        row = table.loc[(target, 8)]
        assert row["n"] == 8
        for name, x in (("acc", acc), ("fooling", fooling), ("smoothness", smooth), ("similarity", similar)):
            assert row[f"r_{name}"] == pytest.approx(scipy.stats.pearsonr(x, asr).statistic, rel=1e-9)
        for column, predictors in (
            ("r2_smoothness_similarity", [smooth, similar]),
            ("r2_all_four", [acc, fooling, smooth, similar]),
        ):
            design = np.column_stack([np.ones(len(asr)), *predictors])
            fitted = design @ np.linalg.lstsq(design, asr, rcond=None)[0]
            r2 = 1 - np.sum((asr - fitted) ** 2) / np.sum((asr - asr.mean()) ** 2)
            assert row[column] == pytest.approx(r2, rel=1e-6)


def test_correlations_need_three_trials_and_spread(tidy):
    few = tidy[tidy.seed == 0]
    few = few[few.label.isin(["ST", "SAM"])]
    row = correlation_table(few).iloc[0]
    assert row["n"] == 2 and np.isnan(row["r_smoothness"]) and np.isnan(row["r2_all_four"])
    assert correlation_table(tidy, mode="targeted").set_index(["target", "budget"]).loc[("t1", 8), "n"] == 8
    assert correlation_table(tidy, attack="dim").empty


def test_wide_has_one_row_per_trial_with_its_own_values(tidy):
    table = wide(tidy)
    assert len(table) == 8 and list(table.columns[: len(CONFIG_COLUMNS)]) == CONFIG_COLUMNS
    for (label, seed), (asr, smooth, similar) in VALUES.items():
        row = table[(table.label == label) & (table.seed == seed)].iloc[0]
        assert row["asr/pgd/untargeted/8/t2"] == pytest.approx(asr + 0.1)
        assert row["smoothness/max"] == pytest.approx(2 * smooth) and row["similarity/t2"] == pytest.approx(
            similar + 0.01
        )


def test_tidy_trial_columns_come_from_the_plan_and_record(tidy):
    sam = tidy[(tidy.label == "SAM") & (tidy.seed == 1)].iloc[0]
    assert sam.experiment == "hand" and sam.kind == "grid" and sam.mechanism == "SAM" and sam.model == "tiny_cnn"
    assert json.loads(sam.magnitudes) == {"rho": 0.1} and sam.magnitude == 0.1 and not sam.lgv
    assert sorted(tidy.trial_id.unique()) == [f"t{i}" for i in range(8)]
    assert len(tidy) == 8 * len(tidy[tidy.trial_id == "t0"])  # every trial reports the same rows
    assert tidy.budget.dtype == "Int64"


def test_accuracy_table_whole(tidy):
    table = accuracy_table(tidy)
    assert list(table.columns) == ["experiment", "setting", "test (last epoch)", "evaluation images (hook)", "seeds"]
    assert table.setting.tolist() == ORDER and (table.experiment == "hand").all() and (table.seeds == 2).all()
    for label in ORDER:
        acc = [0.8 + 0.01 * (round(100 * VALUES[(label, s)][0]) % 7) for s in (0, 1)]
        row = table[table.setting == label].iloc[0]
        assert row["evaluation images (hook)"] == f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc, ddof=1):.1f}"
    one_seed = accuracy_table(tidy[tidy.seed == 0])
    assert one_seed[one_seed.setting == "ST"].iloc[0]["test (last epoch)"] == "88.0"


def test_gaps_whole_frame(tmp_path):
    folder = write_experiment(tmp_path, VALUES, fail={("ST", 1)}, skip={("MU τ=5", 1)})
    result = folder / "trial_002" / "result.json"
    lines = [json.loads(line) for line in result.read_text().splitlines()]
    keep = {"acc", "test_acc"}  # drop every hook metric but these: more than 12 are missing
    lines[-1]["record"]["metrics"] = [m for m in lines[-1]["record"]["metrics"] if m["name"] in keep]
    result.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    gaps = metric_gaps([load_experiment(str(folder), cache=tmp_path / "c")])
    assert list(gaps.columns) == ["experiment", "label", "seed", "status", "detail"]
    assert gaps[["label", "seed", "status"]].values.tolist() == [
        ["ST", 1, "failed"],
        ["SAM", 0, "missing metrics"],
        ["MU τ=5", 1, "missing"],
    ]
    missing = gaps.iloc[1]["detail"]
    assert missing.endswith(" ...") and len(missing.removesuffix(" ...").split(", ")) == 12
    assert missing.startswith("asr/pgd/targeted/8/mean, asr/pgd/targeted/8/t1")  # sorted
    assert "seconds" not in missing and (gaps.experiment == "hand").all()


def test_label_order_and_unfinished_reasons():
    labels = ["SAM", "LGV-SAM", "zzz", "MU τ=5", "ST", "MU τ=1", "LGV-ST", "AT", "ST"]
    assert label_order(labels) == ["ST", "MU τ=1", "MU τ=5", "AT", "SAM", "zzz", "LGV-ST", "LGV-SAM"]
    assert _no_final("incomplete") == "no final result yet (running or interrupted)"
    assert _no_final("missing") == "never started"
    assert _no_final("stopped early").startswith("stopped by ASHA")
    assert _no_final("odd") == "odd"


def test_a_trials_status_error_history_and_id_come_from_its_files(tmp_path):
    """Each state a trial folder can be in, written by hand: done, failed (its error's last line),
    stopped early by the scheduler (done without a final result), incomplete; a line cut by a crash
    is skipped and the lines after it are kept; the history is in epoch order, rows without an epoch last."""
    folder = write_experiment(tmp_path, VALUES)
    trials = sorted(p for p in folder.glob("trial_*"))

    def rewrite(trial, rows, error=None):
        text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
        (trial / "result.json").write_text(text)
        if error is not None:
            (trial / "error.txt").write_text(error)

    final = [json.loads(line) for line in (trials[0] / "result.json").read_text().splitlines()][-1]
    epoch = lambda e, **kw: {"epoch": e, "loss": 1.0 / e, "final": 0, "trial_id": "x", **kw}  # noqa: E731
    rewrite(trials[0], [epoch(2), '{"epoch": 3, "lo', epoch(1), {"note": "no epoch", "final": 0}, final])
    rewrite(trials[1], [epoch(1)], error="Traceback\n  ...\nValueError: first\nRuntimeError: the last line\n")
    rewrite(trials[2], [epoch(1), epoch(2, done=True)])
    rewrite(trials[3], [epoch(1)])
    (trials[4] / "result.json").write_text("")
    got = {t.location.rsplit("/", 1)[-1]: t for t in load_experiment(str(folder), cache=tmp_path / "c").trials}
    done, failed, stopped, incomplete, empty = (got[t.name] for t in trials[:5])
    assert (done.status, failed.status, stopped.status, incomplete.status) == (
        "done",
        "failed",
        "stopped early",
        "incomplete",
    )
    assert [h.get("epoch") for h in done.history] == [1, 2, None] and done.trial_id == final["trial_id"]
    assert failed.error == "RuntimeError: the last line" and stopped.error == "" and incomplete.trial_id == "x"
    assert empty.status == "incomplete" and empty.trial_id == trials[4].name and empty.history == ()


def test_cells_count_each_seed_once_across_experiments_and_one_seed_has_no_spread(tmp_path):
    from analysis import headline_cells

    a = load_experiment(str(write_experiment(tmp_path / "a", VALUES)), cache=tmp_path / "c")
    b = load_experiment(str(write_experiment(tmp_path / "b", VALUES)), cache=tmp_path / "c")
    cells = headline_cells(tidy_trials([a, b]), "untargeted").set_index(["label", "target", "budget"])
    assert (cells["n"] == 2).all()  # the same seeds in two experiments are not four samples
    one = headline_cells(tidy_trials([a])[lambda t: t.seed == 0], "untargeted")
    assert (one["std"] == 0).all() and (one["n"] == 1).all()


def test_a_missing_cell_is_a_dash_and_the_rest_of_its_column_still_reads_as_numbers(tidy):
    table = headline_table(tidy[~((tidy.label == "ST") & (tidy.target == "t1") & (tidy.name == "asr"))], "untargeted")
    assert table.loc["ST", ("t1", "8/255")] == "–"
    for label in ORDER[1:]:
        assert table.loc[label, ("t1", "8/255")].startswith(expected_cell(label, "t1", "untargeted")[1])


def test_pearson_and_r2_at_the_edges_of_what_they_can_tell():
    """r needs three pairs and spread in both; R² needs more points than its predictors plus one and
    spread in y. Just inside each edge the value is scipy's / least squares', just outside it is NaN."""
    import statsmodels.api as sm

    from analysis.tables import _pearson, _r2

    def pearson(x, y):
        return _pearson(pd.Series(x, dtype=float), pd.Series(y, dtype=float))

    assert np.isnan(pearson([0, 1], [0, 1]))  # two pairs: a line through any two points
    assert pearson([0, 1, 2], [0, 1, 2.5]) == pytest.approx(scipy.stats.pearsonr([0, 1, 2], [0, 1, 2.5]).statistic)
    assert pearson([0, 0, 1], [1, 2, 4]) == pytest.approx(scipy.stats.pearsonr([0, 0, 1], [1, 2, 4]).statistic)
    assert pearson([1, 2, 3], [5, 5, 7]) == pytest.approx(scipy.stats.pearsonr([1, 2, 3], [5, 5, 7]).statistic)
    assert np.isnan(pearson([1, 1, 1], [0, 1, 2])) and np.isnan(pearson([0, 1, 2], [3, 3, 3]))

    def r2(y, x):
        return _r2(pd.Series(y, dtype=float), pd.DataFrame(x, dtype=float))

    two = {"a": [0, 1, 2, 3, 5], "b": [1, 0, 1, 0, 1]}
    y = [1, 2, 2, 4, 3]
    design = sm.add_constant(np.column_stack([two["a"], two["b"]]))
    assert r2(y, two) == pytest.approx(sm.OLS(y, design).fit().rsquared)  # statsmodels' OLS, independently
    collinear = {"a": two["a"], "twice_a": [2 * v for v in two["a"]]}
    assert r2(y, collinear) == pytest.approx(sm.OLS(y, sm.add_constant(np.array(two["a"], float))).fit().rsquared)
    assert np.isnan(r2(y[:3], {k: v[:3] for k, v in two.items()}))  # 3 points, 2 predictors + intercept
    assert not np.isnan(r2(y[:4], {k: v[:4] for k, v in two.items()}))  # 4 points: one to spare
    assert not np.isnan(r2([1, 1, 2, 2, 1], two))  # two values of y are spread enough
    assert np.isnan(r2([2, 2, 2, 2, 2], two))
