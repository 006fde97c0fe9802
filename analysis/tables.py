"""The tidy trial table and what is computed from it: the headline table and the correlations.

Everything reads `tidy_trials(...)`: one row per finished trial x metric, built from the trials'
records alone: the config columns from the record's identity and plan, the metric's dimensions
(name, attack, mode, budget, statistic, target) from its row; `metric` is the row's flat key, for
wide tables. Statistics come from numpy: Pearson r and least squares (OLS R^2), held against scipy
and statsmodels in the tests (scipy.stats alone takes a second to import).
"""

from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.records import DONE, Experiment, LoggedTrial, plan_of
from raystudy.mechanisms import MECHANISMS, mechanism_label
from raystudy.persist.record import AGGREGATE_TARGETS, DIMENSIONS, MetricRow, defended_parts, metric_key

CONFIG_COLUMNS = [
    "experiment",
    "kind",
    "trial_id",
    "mechanism",
    "label",
    "tau",
    "magnitudes",
    "magnitude",
    "seed",
    "model",
    "dataset",
    "preset",
    "lgv",
]
BASELINE = "ST"
BELOW_BASELINE_POINTS = 0.2  # ASR percentage points under ST that get marked


def trial_setting(experiment: Experiment, trial: LoggedTrial) -> dict:
    """The config columns of a trial: from its record when it finished, else from its recorded plan."""
    plan = plan_of(experiment.spec, trial)
    config = plan.train
    magnitudes = dict(config.magnitudes)
    label, tau = mechanism_label(config.mechanism, magnitudes, config.dataset, plan.lgv is not None)
    study = trial.record.get("study", {})
    return {
        "experiment": experiment.name,
        "kind": study.get("kind", experiment.spec.kind),
        "trial_id": trial.trial_id,
        "mechanism": "loaded" if plan.loaded else config.mechanism,
        "label": trial.record.get("identity", {}).get("label", plan.loaded.name if plan.loaded else label),
        "tau": tau,
        "magnitudes": json.dumps(magnitudes, sort_keys=True),
        "magnitude": next(iter(magnitudes.values())) if len(magnitudes) == 1 else float("nan"),
        "seed": config.seed,
        "model": config.model,
        "dataset": config.dataset,
        "preset": study.get("preset", experiment.spec.preset),
        "lgv": plan.lgv is not None,
    }


METRIC_COLUMNS = ["metric", "name", *DIMENSIONS, "value"]
ROW_FIELDS = ("name", *DIMENSIONS)  # what names a metric row (its key)


def tidy_trials(experiments: Iterable[Experiment]) -> pd.DataFrame:
    """One row per finished trial x metric row of its record."""
    # Built column by column: a 10,000-trial search has over half a million rows. A row's flat key
    # is computed once per distinct (name, dimensions): a study's trials share a few dozen.
    columns: dict[str, list] = {c: [] for c in CONFIG_COLUMNS + METRIC_COLUMNS}
    keys: dict[tuple, str] = {}
    for experiment in experiments:
        for trial in experiment.trials:
            if trial.status != DONE:
                continue
            setting = trial_setting(experiment, trial)
            rows = trial.record.get("metrics", [])  # MetricRow.to_dict()s, read as they are
            for c in CONFIG_COLUMNS:
                columns[c].extend([setting[c]] * len(rows))
            fields = [tuple(map(row.get, ROW_FIELDS)) for row in rows]
            for fields_of_row in fields:
                if fields_of_row not in keys:
                    keys[fields_of_row] = metric_key(*fields_of_row)
            columns["metric"].extend([keys[f] for f in fields])
            columns["name"].extend([f[0] for f in fields])
            for i, d in enumerate(DIMENSIONS, start=1):
                columns[d].extend([f[i] for f in fields])
            columns["value"].extend([float(row["value"]) for row in rows])
    # Through Arrow: its conversion of half a million strings is faster than pandas' own.
    frame = pa.table({c: columns[c] for c in CONFIG_COLUMNS + METRIC_COLUMNS}).to_pandas()
    frame["budget"] = frame["budget"].astype("Int64")
    return frame


def wide(tidy: pd.DataFrame) -> pd.DataFrame:
    """One row per trial, one column per metric."""
    if tidy.empty:
        return pd.DataFrame(columns=CONFIG_COLUMNS)
    key = ["experiment", "trial_id"]  # never NaN, unlike tau or magnitude
    metrics = tidy.pivot_table(index=key, columns="metric", values="value", aggfunc="first")
    metrics.columns.name = None
    settings = tidy[CONFIG_COLUMNS].drop_duplicates(key)
    return settings.merge(metrics.reset_index(), on=key, how="left")


def label_order(labels: Iterable[str]) -> list[str]:
    """METHOD.md's mechanism order, then tau / magnitude text."""
    order = {name: i for i, name in enumerate(MECHANISMS)}

    def key(label: str):
        base = label.removeprefix("LGV-")
        mechanism = base.split(" ")[0]
        return (label.startswith("LGV-"), order.get(mechanism, len(order)), base)

    return sorted(set(labels), key=key)


def headline_cells(tidy: pd.DataFrame, mode: str, attack: str = "pgd") -> pd.DataFrame:
    """Rows: mechanism labels; one row per (label, target, budget) with mean, std (ddof=1) and n over seeds, in %."""
    rows = tidy[(tidy.name == "asr") & (tidy.attack == attack) & (tidy["mode"] == mode)].copy()
    if rows.empty:
        return pd.DataFrame(columns=["label", "target", "budget", "mean", "std", "n"])
    rows["budget"] = rows["budget"].astype(int)
    rows = rows.drop_duplicates(["label", "seed", "model", "dataset", "preset", "metric"])  # one value per seed
    grouped = rows.groupby(["label", "target", "budget"])["value"]
    cells = pd.DataFrame(
        {"mean": grouped.mean() * 100, "std": grouped.std(ddof=1).fillna(0.0) * 100, "n": grouped.count()}
    )
    return cells.reset_index()


def headline_table(tidy: pd.DataFrame, mode: str, attack: str = "pgd") -> pd.DataFrame:
    """Rows = mechanisms, columns = (target, budget): 'mean ± std' strings with marks.

    Marks are text suffixes ' [best]', ' [2nd]', ' [↓]' (best in its column, second best, below ST
    by more than 0.2 points) that each renderer turns into its own style. A cell of one seed has
    no spread ('12.5'); a cell with another number of seeds than most says so ('12.5 ± 1.0 (n=2)').
    """
    cells = headline_cells(tidy, mode, attack)
    if cells.empty:
        return pd.DataFrame()
    means = cells.pivot(index="label", columns=["target", "budget"], values="mean")
    stds = cells.pivot(index="label", columns=["target", "budget"], values="std")
    counts = cells.pivot(index="label", columns=["target", "budget"], values="n")
    usual = int(cells["n"].mode().iloc[0])
    labels = label_order(means.index)
    targets = sorted({t for t, _ in means.columns} - {"mean"}) + (
        ["mean"] if "mean" in {t for t, _ in means.columns} else []
    )
    columns = [(t, b) for t in targets for b in sorted({b for _, b in means.columns})]
    means, stds = means.reindex(index=labels, columns=columns), stds.reindex(index=labels, columns=columns)
    counts = counts.reindex(index=labels, columns=columns)
    marks = marks_for(means)
    text = means.copy().astype(object)
    for column in columns:
        for label in labels:
            mean, n = means.at[label, column], counts.at[label, column]
            if math.isnan(mean):
                text.at[label, column] = "–"
                continue
            spread = f" ± {stds.at[label, column]:.1f}" if n > 1 else ""
            seeds = f" (n={int(n)})" if n != usual else ""
            text.at[label, column] = f"{mean:.1f}{spread}{seeds}{marks.at[label, column]}"
    text.index.name = "mechanism"
    text.columns = pd.MultiIndex.from_tuples([(t, f"{b}/255") for t, b in columns], names=["target", "budget"])
    return text


def attack_table(tidy: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Rows = mechanisms, columns = (attack, budget): the headline table's cells for the hook's mean
    over the targets as they are (defended columns stay out of it), one column per attack. Empty
    when the experiments ran one attack only (the headline table says it all)."""
    rows = tidy[(tidy.name == "asr") & (tidy.target == "mean") & (tidy["mode"] == mode)]
    if rows.attack.nunique() < 2:
        return pd.DataFrame()
    # the headline layout with the attack where the target goes: same cells, spreads and marks
    table = headline_table(rows.assign(target=rows.attack, attack="pgd"), mode)
    # PGD (the headline's attack) first, then raystudy's own, then torchattack's
    order = sorted(table.columns, key=lambda c: (c[0] != "pgd", c[0].startswith("torchattack."), c[0]))
    table = table[order]
    table.columns = table.columns.set_names(["attack", "budget"])
    return table


def attack_defense_cells(tidy: pd.DataFrame, mode: str, black_box: Iterable[str] = ()) -> pd.DataFrame:
    """One row per (mechanism label, attack, defense, budget): the mean over the hook's targets
    behind the defense ("none": as they are; not the aggregates, not the `black_box` endpoints,
    which are queried for some attacks only) per trial, then mean, std (ddof=1) and n over seeds as
    in the headline table (one value per label, seed, model, dataset and preset), in %. Every attack
    against every defense, for a table or a plot of one's own."""
    columns = ["label", "attack", "defense", "budget", "mean", "std", "n"]
    rows = tidy[(tidy.name == "asr") & (tidy["mode"] == mode) & tidy.target.notna()]
    rows = rows[~rows.target.isin(AGGREGATE_TARGETS)]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    parts = rows.target.map(lambda t: defended_parts(t) or (t, "none"))
    rows = rows.assign(plain=parts.str[0], defense=parts.str[1])
    rows = rows[~rows.plain.isin(set(black_box))]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.drop_duplicates(["label", "seed", "model", "dataset", "preset", "metric"])  # as headline_cells
    per_trial = rows.groupby(["label", "seed", "model", "dataset", "preset", "attack", "defense", "budget"])["value"]
    grouped = per_trial.mean().groupby(["label", "attack", "defense", "budget"])
    cells = pd.DataFrame(
        {"mean": grouped.mean() * 100, "std": grouped.std(ddof=1).fillna(0.0) * 100, "n": grouped.count()}
    )
    return cells.reset_index()[columns]


def marks_for(means: pd.DataFrame) -> pd.DataFrame:
    """'best', 'second' and 'below' marks per cell (as text suffixes; renderers restyle them)."""
    marks = pd.DataFrame("", index=means.index, columns=means.columns)
    for column in means.columns:
        values = means[column].round(6)  # ties (equal to display precision and beyond) share a mark
        levels = sorted(values.dropna().unique(), reverse=True)
        if len(levels) >= 2:  # a column where every mechanism is equal has no best
            for label in values.index[values == levels[0]]:
                marks.at[label, column] += " [best]"
            for label in values.index[values == levels[1]]:
                marks.at[label, column] += " [2nd]"
        if BASELINE in means.index and not math.isnan(means.at[BASELINE, column]):
            below = means[column] < means.at[BASELINE, column] - BELOW_BASELINE_POINTS
            for label in means.index[below.fillna(False).to_numpy()]:
                marks.at[label, column] += " [↓]"
    return marks


ACCURACIES = {
    "train_acc": "train (last epoch, augmented)",
    "test_acc": "test (last epoch)",
    "acc": "evaluation images (hook)",
}


def accuracy_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """Per setting (a target: its model), mean ± std over seeds of the accuracies in %: how well the
    surrogates and targets fit their training data and generalize (one seed: its value alone)."""
    rows = tidy[tidy.name.isin(ACCURACIES) & tidy.target.isna()].copy()
    if rows.empty:
        return pd.DataFrame()
    rows["setting"] = rows.label.where(rows.kind != "targets", rows.model)
    stats = rows.groupby(["experiment", "setting", "name"])["value"].agg(["mean", "std", "count"])

    def cell(row) -> str:
        return f"{100 * row['mean']:.1f}" + (f" ± {100 * row['std']:.1f}" if row["count"] > 1 else "")

    present = set(rows.name.unique())
    table = stats.apply(cell, axis=1).unstack("name").reindex(columns=[c for c in ACCURACIES if c in present])
    table.columns = [ACCURACIES[c] for c in table.columns]
    seeds = rows.groupby(["experiment", "setting"])["seed"].nunique().rename("seeds")
    table = table.join(seeds).reset_index().fillna("")
    order = {label: i for i, label in enumerate(label_order(table.setting))}
    ordered = table.sort_values(["experiment", "setting"], key=lambda c: c.map(order) if c.name == "setting" else c)
    return ordered.reset_index(drop=True)  # the order is the rows' own: no index column in the report


def correlation_table(tidy: pd.DataFrame, attack: str = "pgd", mode: str = "untargeted") -> pd.DataFrame:
    """Per target and budget: Pearson r of ASR with acc, FP, smoothness, similarity; OLS R^2 on
    (smoothness, similarity) and on all four. One row per (target, budget); n = trials used."""
    surrogates = tidy[tidy.kind != "targets"]
    table = wide(surrogates)
    asr = surrogates[(surrogates.name == "asr") & (surrogates.attack == attack) & (surrogates["mode"] == mode)]
    distinct = asr[["target", "budget"]].drop_duplicates()  # not a set over every row: thousands of trials
    pairs = sorted({(t, int(b)) for t, b in distinct.itertuples(index=False) if t != "mean"})
    rows = []
    for target, budget in pairs:
        where = {"attack": attack, "mode": mode, "budget": budget}
        column = MetricRow("asr", 0.0, target=target, **where).key
        predictors = {
            "acc": MetricRow("acc", 0.0).key,
            "fooling": MetricRow("fooling", 0.0, **where).key,
            "smoothness": MetricRow("smoothness", 0.0, statistic="mean").key,
            "similarity": MetricRow("similarity", 0.0, target=target).key,
        }
        if any(p not in table.columns for p in [column, *predictors.values()]):
            continue
        data = table[[column, *predictors.values()]].dropna()
        row = {"target": target, "budget": budget, "n": len(data)}
        for name, source in predictors.items():
            row[f"r_{name}"] = _pearson(data[source], data[column])
        row["r2_smoothness_similarity"] = _r2(data[column], data[[predictors["smoothness"], predictors["similarity"]]])
        row["r2_all_four"] = _r2(data[column], data[list(predictors.values())])
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["target", "budget"]).reset_index(drop=True) if rows else pd.DataFrame()


def _pearson(x: pd.Series, y: pd.Series) -> float:
    """Pearson's r; NaN with fewer than 3 values or no spread in x or y."""
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan")
    xc, yc = x.to_numpy(float), y.to_numpy(float)
    xc, yc = xc - xc.mean(), yc - yc.mean()
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)  # scaled first, as scipy does: no overflow
    return float(np.clip(xc @ yc, -1.0, 1.0))


def _r2(y: pd.Series, x: pd.DataFrame) -> float:
    """R^2 of the ordinary least-squares fit of y on x with an intercept. Collinear predictors still
    have an R^2 (the fit's, not unique weights): lstsq takes the minimum-norm solution."""
    if len(y) <= x.shape[1] + 1 or y.nunique() < 2:
        return float("nan")
    target = y.to_numpy(float)
    design = np.column_stack([np.ones(len(target)), x.to_numpy(float)])
    weights = np.linalg.lstsq(design, target, rcond=None)[0]
    residual = target - design @ weights
    centred = target - target.mean()
    return float(1.0 - residual @ residual / (centred @ centred))


def metric_gaps(experiments: Iterable[Experiment], tidy: pd.DataFrame | None = None) -> pd.DataFrame:
    """Trials that did not finish (failed, incomplete, missing) and finished trials lacking a
    metric that other finished trials of the same experiment have. `tidy`: the experiments'
    tidy_trials table, if already built."""
    experiments = list(experiments)
    expected, held = _shared_metrics(tidy_trials(experiments) if tidy is None else tidy)
    rows = []
    for experiment in experiments:
        for trial in experiment.trials:
            if trial.status == DONE:
                absent = sorted(expected.get(experiment.name, set()) - held(experiment.name, trial.trial_id))
                if not absent:
                    continue  # finished with every metric: nothing to list
                status, detail = "missing metrics", ", ".join(absent[:12]) + (" ..." if len(absent) > 12 else "")
            else:
                status, detail = trial.status, trial.error or _no_final(trial.status)
            setting = trial_setting(experiment, trial)
            rows.append(
                {
                    "experiment": experiment.name,
                    "label": setting["label"],
                    "seed": setting["seed"],
                    "status": status,
                    "detail": detail,
                }
            )
    return pd.DataFrame(rows, columns=["experiment", "label", "seed", "status", "detail"])


# The training summary every trial reports; a mechanism's own loss parts ('jr', 'ir') are not expected of others.
SHARED_TRAINING_METRICS = {"acc", "test_acc", "train_acc", "loss"}


def _shared_metrics(tidy: pd.DataFrame):
    """The keys of the finite metrics every finished trial should have (the hook's, with a
    dimension, not timings, and the shared training summary): per experiment, those any of its
    trials has, and a function (experiment, trial_id) -> those the trial has."""
    has_dimension = tidy[list(DIMENSIONS)].notna().any(axis=1)
    kept = tidy[
        tidy.value.notna() & (tidy.name != "seconds") & (has_dimension | tidy.name.isin(SHARED_TRAINING_METRICS))
    ].drop_duplicates(["experiment", "trial_id", "metric"])
    expected = {e: set(metrics.unique()) for e, metrics in kept.groupby("experiment")["metric"]}
    counts = kept.groupby(["experiment", "trial_id"]).size().to_dict()
    # Only a trial with fewer metrics than its experiment's has its own set looked up (few, if any).
    short = {key for key, n in counts.items() if n < len(expected[key[0]])}
    lacking = kept[pd.MultiIndex.from_frame(kept[["experiment", "trial_id"]]).isin(list(short))]
    partial = {key: set(metrics) for key, metrics in lacking.groupby(["experiment", "trial_id"])["metric"]}

    def held(experiment: str, trial_id: str) -> set[str]:
        if (experiment, trial_id) not in counts:
            return set()
        return partial.get((experiment, trial_id), expected[experiment])

    return expected, held


def _no_final(status: str) -> str:
    return {
        "incomplete": "no final result yet (running or interrupted)",
        "missing": "never started",
        "stopped early": "stopped by ASHA on the proxy ASR (pruned in the Optuna study)",
    }.get(status, status)
