"""Figures: magnitude curves with error bars over seeds, and the Optuna search's history and importances."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works on a laptop without a display and on a headless node
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.tables import BASELINE, label_order, wide  # noqa: E402
from raystudy.config.sampler import IMPORTANCE_SETTINGS  # noqa: E402
from raystudy.persist.optuna_history import open_history  # noqa: E402
from raystudy.persist.record import MetricRow  # noqa: E402

CURVE_ORDER = ("AT", "MU", "CM", "CO", "LS", "IR", "JR", "ER", "SAM")  # AT's inverted U first


def magnitude_curves(tidy: pd.DataFrame, out: Path, attack: str = "pgd") -> list[tuple[str, Path]]:
    """One figure per mechanism with several magnitudes: ASR (mean over targets, per budget),
    smoothness and similarity against the magnitude; ST drawn at magnitude 0 as the reference."""
    table = wide(tidy[tidy.kind != "targets"])
    figures = []
    if table.empty:
        return figures
    single = table[table.magnitude.notna() & ~table.lgv]
    baseline = table[(table.mechanism == BASELINE) & ~table.lgv]
    mechanisms = [m for m in CURVE_ORDER if single[single.mechanism == m].magnitude.nunique() >= 2]
    asr = tidy[(tidy.name == "asr") & (tidy.attack == attack) & (tidy["mode"] == "untargeted")]
    asr = asr[asr.target == "mean"]
    budgets = sorted(int(b) for b in asr.budget.dropna().unique())
    for mechanism in mechanisms:
        rows = pd.concat([baseline.assign(magnitude=0.0), single[single.mechanism == mechanism]])
        path = out / f"curve_{mechanism}.png"
        _curve_figure(rows, mechanism, attack, budgets, path)
        figures.append((mechanism, path))
    return figures


def _curve_figure(rows: pd.DataFrame, mechanism: str, attack: str, budgets: list[int], path: Path) -> None:
    magnitudes = sorted(rows.magnitude.unique())
    positions = {m: i for i, m in enumerate(magnitudes)}  # evenly spaced: the grids are roughly geometric
    panels = [
        (
            f"ASR % ({attack}, untargeted, mean over targets)",
            [(MetricRow("asr", 0.0, attack, "untargeted", b, target="mean").key, f"{b}/255", 100) for b in budgets],
        ),
        ("smoothness (mean |λmax|)", [("smoothness/mean", None, 1)]),
        ("gradient similarity (mean over targets)", [("similarity/mean", None, 1)]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, series) in zip(axes, panels):
        for column, name, scale in series:
            if column not in rows.columns:
                continue
            stats = rows.groupby("magnitude")[column].agg(["mean", "std"]).reindex(magnitudes) * scale
            ax.errorbar(
                [positions[m] for m in magnitudes],
                stats["mean"],
                yerr=stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=name,
            )
        ax.set_title(title, fontsize=9)
        ax.set_xticks(
            range(len(magnitudes)), [("0 (ST)" if m == 0 else f"{m:g}") for m in magnitudes], rotation=45, fontsize=8
        )
        ax.set_xlabel(f"{mechanism} magnitude")
        if len(series) > 1:
            ax.legend(fontsize=7, title="budget", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)


def optuna_figures(experiment, tidy: pd.DataFrame, out: Path) -> list[tuple[str, Path]]:
    """History and parameter importances from the search's Optuna history (raystudy.persist.optuna_history);
    without it (e.g. remote storage), the history from the trial results alone."""
    import optuna

    spec = experiment.spec
    figures = []
    history = open_history(experiment.path, cache=out / "optuna_copy")
    study = None
    if history is not None:
        try:
            study = optuna.load_study(study_name=spec.name, storage=history[0])
        except Exception as err:  # the history is read from storage: whatever Optuna raises, it is at fault
            print(f"{history[1]}: not a readable Optuna history ({type(err).__name__}); history from the trials")
    if study is not None and len(study.trials) >= 1:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            figures += _study_figures(optuna, study, spec, out)
        return figures
    rows = wide(tidy[tidy.experiment == spec.name])
    if spec.search.metric in rows.columns and len(rows):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        values = rows[spec.search.metric].to_numpy()
        ax.plot(range(len(values)), values, "o", label="trial")
        best = pd.Series(values).cummax() if spec.search.mode == "max" else pd.Series(values).cummin()
        ax.plot(range(len(values)), best, "-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(spec.search.metric)
        ax.legend()
        figures.append(("optimization history", _save_axes(ax, out / f"optuna_history_{spec.name}.png")))
    return figures


def _study_figures(optuna, study, spec, out: Path) -> list[tuple[str, Path]]:
    """History and importances of the (first) objective; with several objectives, the Pareto front
    too (two or three objectives)."""
    plots = optuna.visualization.matplotlib
    names = list(spec.search.objective_metrics)
    multi = len(study.directions) > 1
    first = {"target": (lambda t: t.values[0]), "target_name": names[0]} if multi else {}
    figures = [
        (
            "optimization history",
            _save_axes(plots.plot_optimization_history(study, **first), out / f"optuna_history_{spec.name}.png"),
        )
    ]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
        # The evaluator named with its settings, not Optuna's default (raystudy/config/sampler.py).
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(**IMPORTANCE_SETTINGS)
        importance = dict(first)
        if multi:  # PED-ANOVA takes a given target as lower-is-better: a maximized objective negated
            sign = -1.0 if spec.search.modes[0] == "max" else 1.0
            importance["target"] = lambda t: sign * t.values[0]
        ax = plots.plot_param_importances(study, evaluator=evaluator, **importance)
        figures.append(("parameter importances", _save_axes(ax, out / f"optuna_importances_{spec.name}.png")))
    if multi and len(names) <= 3 and complete:
        ax = plots.plot_pareto_front(study, target_names=names)
        figures.append(("Pareto front", _save_axes(ax, out / f"optuna_pareto_{spec.name}.png")))
    return figures


def _save_axes(ax, path: Path) -> Path:
    fig = ax.figure if not hasattr(ax, "__len__") else ax[0].figure
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path


__all__ = ["magnitude_curves", "optuna_figures", "label_order"]
