"""`analyze(experiments, out)`: trials.parquet/.csv, the headline tables, curves, correlations,
Optuna figures and one report (Markdown and self-contained HTML) from finished or partial experiments."""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from analysis.figures import magnitude_curves, optuna_figures
from analysis.findings import findings, findings_table
from analysis.records import Experiment, load_experiment
from analysis.tables import (
    accuracy_table,
    attack_defense_cells,
    attack_table,
    correlation_table,
    headline_table,
    metric_gaps,
    tidy_trials,
)
from raystudy.config.sampler import IMPORTANCE_EVALUATOR, IMPORTANCE_SETTINGS
from raystudy.errors import RaystudyError
from raystudy.persist import storage
from raystudy.persist.record import checked_best_config

MODES = ("untargeted", "targeted")


@dataclass
class Report:
    """Blocks rendered both to Markdown and to HTML: ('h', text), ('p', text), ('table', frame), ('img', path)."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def image(self, path: Path) -> None:
        self.blocks.append(("img", path))

    def markdown(self, root: Path) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append(f"## {value}")
            elif kind == "p":
                out.append(str(value))
            elif kind == "table":
                out.append(_markdown_table(value))
            else:
                out.append(f"![{value.stem}]({value.relative_to(root).as_posix()})")
        return "# raystudy report\n\n" + "\n\n".join(out) + "\n"

    def html(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "p":
                out.append(f"<p>{html.escape(str(value))}</p>")
            elif kind == "table":
                out.append(_html_table(value))
            else:
                data = base64.b64encode(value.read_bytes()).decode()
                out.append(f'<img alt="{html.escape(value.stem)}" src="data:image/png;base64,{data}">')
        style = (
            "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:12px}"
            "td,th{padding:2px 6px;border-bottom:1px solid #ddd}img{max-width:100%}"
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>raystudy report</title>"
            f"<style>{style}</style></head>"
            f"<body><h1>raystudy report</h1>{''.join(out)}</body></html>"
        )


def _html_table(frame: pd.DataFrame) -> str:
    """A table as a reader wants it: no pandas row numbers, headline marks as real bold and underline."""
    keep_index = not isinstance(frame.index, pd.RangeIndex)
    shown = frame.map(lambda v: _styled(html.escape(v), "<b>{}</b>", "<u>{}</u>", " ↓") if isinstance(v, str) else v)
    if keep_index:
        shown.index = [html.escape(str(i)) for i in shown.index]
        shown.index.name = None if frame.index.name is None else html.escape(str(frame.index.name))
    # Column labels hold target and endpoint names from records: escaped as the cells are.
    if isinstance(shown.columns, pd.MultiIndex):
        shown.columns = pd.MultiIndex.from_tuples([tuple(html.escape(str(p)) for p in c) for c in shown.columns])
    else:
        shown.columns = [html.escape(str(c)) for c in shown.columns]
    return shown.to_html(na_rep="–", border=0, index=keep_index, escape=False, float_format=lambda v: f"{v:.3g}")


def _markdown_table(frame: pd.DataFrame) -> str:
    frame = frame.copy()
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [" ".join(str(p) for p in c) for c in frame.columns]
    index_name = frame.index.name or ""
    frame = frame.reset_index() if index_name or not isinstance(frame.index, pd.RangeIndex) else frame
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if pd.isna(value) else f"{value:.3g}"
    return _styled(str(value).replace("|", "\\|"), "**{}**", "_{}_", " ↓")


def _styled(text: str, bold: str, second: str, down: str) -> str:
    best, sec, below = "[best]" in text, "[2nd]" in text, "[↓]" in text
    core = text.replace(" [best]", "").replace(" [2nd]", "").replace(" [↓]", "")
    core = bold.format(core) if best else second.format(core) if sec else core
    return core + (down if below else "")


LATEX_SPECIALS = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text):
    """Text as LaTeX prints it (a mechanism's or target's name may hold &, _, \\ or {...})."""
    return "".join(LATEX_SPECIALS.get(c, c) for c in text) if isinstance(text, str) else text


def render_headline(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    if kind == "markdown":
        return table.map(lambda t: _styled(t, "**{}**", "_{}_", " ↓") if isinstance(t, str) else t)
    if kind == "latex":  # labels and cells come from records: escaped before the table's own markup
        return table.rename(index=latex_escape, columns=latex_escape).map(
            lambda t: (
                _styled(latex_escape(t), "\\textbf{{{}}}", "\\underline{{{}}}", "$\\downarrow$").replace("±", "$\\pm$")
                if isinstance(t, str)
                else t
            )
        )
    return table.map(
        lambda t: t.replace(" [best]", "").replace(" [2nd]", "").replace(" [↓]", "") if isinstance(t, str) else t
    )


def analyze(
    paths: Sequence[str],
    out: str | Path,
    log: Callable[[str], None] | None = print,
    similarity: bool = False,
    matrix_images: int = 256,
) -> Path:
    """Analyse the experiments at `paths` into `out`; returns the report's path. `similarity`
    also draws the mechanism-by-mechanism similarity matrix (loads every trial's weights and
    needs the data on this machine)."""
    if not paths:
        raise RaystudyError("give at least one experiment (<storage>/<study name>)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _: None)
    experiments = []
    for path in paths:
        experiments.append(load_experiment(path))
        counts = Counter(t.status for t in experiments[-1].trials)
        say(f"read {path}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    tidy = tidy_trials(experiments)
    _write_tidy(tidy, out)
    report = Report()
    _overview(report, experiments, tidy)
    _headline(report, tidy, out)
    _attacks(report, experiments, tidy, out)
    _accuracies(report, tidy, out)
    _curves(report, tidy, out)
    _correlations(report, tidy, out)
    _findings(report, tidy, out)
    _similarity_matrix(report, experiments, out, similarity, matrix_images, say)
    _optuna(report, experiments, tidy, out)
    _gaps(report, experiments, tidy, out)
    (out / "report.md").write_text(report.markdown(out))
    (out / "report.html").write_text(report.html())
    say(f"wrote {out / 'report.md'} and report.html ({len(tidy)} metric rows)")
    return out / "report.md"


def _write_tidy(tidy: pd.DataFrame, out: Path) -> None:
    """trials.parquet and trials.csv, both from one Arrow table: Arrow's CSV writer is several times
    faster than pandas' on the half a million rows of a 10,000-trial study (NaN, missing and
    booleans are written so that pandas.read_csv reads them back as NaN, NaN and booleans)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    table = pa.Table.from_pandas(tidy, preserve_index=False)
    pyarrow.parquet.write_table(table, out / "trials.parquet")
    pyarrow.csv.write_csv(table, out / "trials.csv", pyarrow.csv.WriteOptions(quoting_style="needed"))


def _overview(report: Report, experiments: list[Experiment], tidy: pd.DataFrame) -> None:
    report.heading("Experiments")
    rows = []
    for e in experiments:
        counts = Counter(t.status for t in e.trials)
        rows.append(
            {
                "experiment": e.name,
                "kind": e.spec.kind,
                "preset": e.spec.preset,
                "dataset": e.spec.dataset,
                "model": e.spec.model,
                "targets": ", ".join(e.record.get("targets", [])),
                **{s: counts.get(s, 0) for s in ("done", "failed", "stopped early", "incomplete", "missing")},
            }
        )
    report.table(pd.DataFrame(rows))
    report.paragraph(
        f"Every finished trial contributes one row per metric to trials.parquet ({len(tidy)} rows); "
        "the tables and figures below are computed from it."
    )


def _headline(report: Report, tidy: pd.DataFrame, out: Path) -> None:
    for mode in MODES:
        table = headline_table(tidy, mode)
        if table.empty:
            continue
        stem = out / f"headline_{mode}"
        render_headline(table, "csv").to_csv(f"{stem}.csv")
        (out / f"headline_{mode}.md").write_text(_markdown_table(render_headline(table, "markdown")) + "\n")
        (out / f"headline_{mode}.tex").write_text(render_headline(table, "latex").to_latex(escape=False))
        report.heading(f"Headline table: {mode} PGD transfer ASR (%)")
        report.paragraph(
            "Rows are training mechanisms (augmentations at τ=1 and τ=5), columns target × L∞ budget; each cell is "
            f"the mean ± standard deviation over seeds of the {mode} ASR by Definition 3 (samples both surrogate and "
            "target "
            "classify correctly). Bold: best in the column; underlined: second best; ↓: below the ST baseline by more "
            f"than {0.2} points. Also as headline_{mode}.csv / .md / .tex."
        )
        report.table(table)  # marks styled by each renderer


def _attacks(report: Report, experiments: list[Experiment], tidy: pd.DataFrame, out: Path) -> None:
    black_box = {name for e in experiments for name in e.record.get("endpoints") or []}
    for mode in MODES:
        table = attack_table(tidy, mode)
        if table.empty:
            continue
        render_headline(table, "csv").to_csv(out / f"attacks_{mode}.csv")
        cells = attack_defense_cells(tidy, mode, black_box)
        cells.to_csv(out / f"attacks_by_defense_{mode}.csv", index=False)
        report.heading(f"Transfer ASR by attack: {mode} (%)")
        report.paragraph(
            "Each cell: the mean ± standard deviation over seeds of the ASR averaged over the targets as they are "
            "(the headline's mean column), one column per attack; marks as in the headline table. Also as "
            f"attacks_{mode}.csv; every attack against the targets behind every defense (mean over those "
            f"targets) is in attacks_by_defense_{mode}.csv."
        )
        report.table(table)


def _accuracies(report: Report, tidy: pd.DataFrame, out: Path) -> None:
    table = accuracy_table(tidy)
    if table.empty:
        return
    table.to_csv(out / "accuracy.csv", index=False)
    report.heading("Accuracy (%)")
    report.paragraph(
        "Mean ± standard deviation over seeds: on the training data in the last epoch (with its augmentation "
        "and mechanism), on the test set after it, and on the evaluation images the hook attacks. Also as "
        "accuracy.csv."
    )
    report.table(table)


def _curves(report: Report, tidy: pd.DataFrame, out: Path) -> None:
    figures = magnitude_curves(tidy, out)
    if not figures:
        return
    report.heading("Curves over each mechanism's magnitude")
    for mechanism, path in figures:
        what = (
            "the adversarial-training budget ε (little robustness: ASR should rise then fall, an inverted U)"
            if mechanism == "AT"
            else f"{mechanism}'s magnitude"
        )
        report.paragraph(
            f"{mechanism}: untargeted PGD ASR (mean over targets, one line per budget), smoothness (mean "
            f"|λmax| of the input Hessian, smaller = smoother) and gradient similarity to the targets against "
            f"{what}; ST is drawn at magnitude 0; error bars are the standard deviation over seeds."
        )
        report.image(path)


def _correlations(report: Report, tidy: pd.DataFrame, out: Path) -> None:
    table = correlation_table(tidy)
    if table.empty:
        return
    table.to_csv(out / "correlations.csv", index=False)
    report.heading("Correlations with the transfer ASR")
    report.paragraph(
        "Per target and budget (untargeted PGD), over all finished trials: Pearson r between the ASR and "
        "the surrogate's clean accuracy, fooling probability, smoothness and gradient similarity to that "
        "target, and the R² of OLS regressions of the ASR on (smoothness, similarity) and on all four "
        "(least squares with an intercept). NaN where too few trials or no variation."
    )
    report.table(table)


def _findings(report: Report, tidy: pd.DataFrame, out: Path) -> None:
    verdicts = findings(tidy)
    (out / "findings.json").write_text(json.dumps([v.to_dict() for v in verdicts], indent=1, ensure_ascii=False))
    report.heading("The paper's findings")
    report.paragraph(
        "Each finding as operational checks, paired over seeds, targets and budgets (mean difference "
        "and 95% t interval; Pearson r with a Fisher-z interval for F6): supported when every check's "
        "interval lies on the claimed side, not supported when one lies on the other side, inconclusive "
        "otherwise, not enough trials when the experiments lack a needed setting "
        "(`raystudy findings` prints the same; analysis/findings.py defines the checks)."
    )
    report.table(findings_table(verdicts))


def _similarity_matrix(
    report: Report, experiments: list[Experiment], out: Path, wanted: bool, n_images: int, say
) -> None:
    report.heading("Similarity matrix between mechanisms")
    if not wanted:
        report.paragraph(
            "Not drawn: run `raystudy analyze --similarity-matrix` (it loads every trial's final weights "
            "and needs the data on this machine)."
        )
        return
    from analysis.similarity_matrix import heatmap, similarity_matrix  # torch: only when drawn

    drawn = False
    for experiment in (e for e in experiments if e.spec.kind == "grid"):
        say(f"similarity matrix of {experiment.name}: loading the trials' weights")
        try:
            matrix = similarity_matrix(experiment, n_images)
        except RaystudyError as err:
            report.paragraph(f"{experiment.name}: not drawn ({err}).")
            continue
        if matrix.empty:
            continue
        matrix.to_csv(out / f"similarity_matrix_{experiment.name}.csv")
        report.paragraph(
            f"{experiment.name}: mean per-sample cosine between the input gradients of a surrogate trained "
            "with the row's mechanism and a model trained with the column's mechanism (same architecture, "
            f"different seeds, averaged over such pairs), on {n_images} evaluation images."
        )
        report.image(
            heatmap(matrix, out / f"similarity_matrix_{experiment.name}.png", f"gradient similarity: {experiment.name}")
        )
        drawn = True
    if not drawn:
        report.paragraph("No experiment holds trials of one architecture with different seeds: nothing to draw.")


def _sampler_statement(experiment: Experiment) -> str:
    """What drew the samples, as the experiment's manifest recorded it (read from storage: only
    plain names and numbers are shown)."""
    settings = experiment.record.get("search_settings")
    sampler = settings.get("sampler") if isinstance(settings, dict) else None
    if not isinstance(sampler, dict) or not isinstance(sampler.get("name"), str):
        return (
            "Optuna's TPE sampler with the defaults of the Optuna that ran the search "
            "(not recorded: the search was started before raystudy recorded its sampler)"
        )
    plain = (str, int, float, bool, type(None))
    options = ", ".join(f"{k}={v}" for k, v in sampler.items() if k != "name" and isinstance(v, plain))
    version = settings.get("optuna") if isinstance(settings.get("optuna"), str) else "unknown"
    seed = settings.get("seed") if isinstance(settings.get("seed"), int) else "unknown"
    return f"Optuna {version}'s {sampler['name']} sampler ({options or 'no options'}; seed {seed})"


def _optuna(report: Report, experiments: list[Experiment], tidy: pd.DataFrame, out: Path) -> None:
    for experiment in (e for e in experiments if e.spec.kind == "search"):
        figures = optuna_figures(experiment, tidy, out)
        if not figures:
            continue
        search = experiment.spec.search
        report.heading(f"Optuna search: {experiment.name}")
        report.paragraph(
            f"The objective is {search.objective_metric} ({search.mode}imized) "
            f"over {', '.join(p.name for p in search.params)}: its value per trial in "
            f"order with the best so far, and each parameter's importance ({IMPORTANCE_EVALUATOR}: "
            f"{', '.join(f'{k}={v}' for k, v in IMPORTANCE_SETTINGS.items())}). "
            f"Samples drawn by {_sampler_statement(experiment)}."
        )
        report.paragraph(_selection_statement(experiment))
        known = _warm_start_table(experiment)
        if known is not None:
            report.paragraph(_warm_start_statement(experiment, len(known)))
        for _, path in figures:
            report.image(path)
        if known is not None and len(known):
            report.table(known)
        front = _pareto_table(experiment)
        if front is not None:
            report.table(front)
        confirmed = (_best_config(experiment) or {}).get("confirmed")
        if confirmed:
            report.paragraph(
                f"Confirmation ({confirmed['experiment']}): the top configurations retrained with seeds "
                f"{confirmed['seeds']}, next to baselines trained with the same seeds; mean ± std over seeds."
            )
            report.table(_confirmed_table(confirmed["rows"]))


def _warm_start_statement(experiment: Experiment, known: int) -> str:
    """What a warm-started search knew before its first suggestion (its manifest's `warm_start`)."""
    entry = experiment.record["warm_start"]
    parts = []
    for source in entry.get("sources", []):
        skipped = ", ".join(f"{n} {reason}" for reason, n in source.get("skipped", {}).items())
        parts.append(
            f"{source['experiment']}: {source['added']} of {source['trials']}"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    return (
        f"Warm start: the sampler knew {known} finished trial(s) of earlier experiments before its first "
        f"suggestion ({'; '.join(parts) or 'none named'}). They were not retrained: the table after the figures "
        f"lists them; in the figures drawn from the Optuna history they are its first {known} trials; the "
        "winner above is chosen among the search's own trials."
    )


def _warm_start_table(experiment: Experiment) -> pd.DataFrame | None:
    """The warm start's trials, best first, each with its experiment and trial (None: no warm start)."""
    entry = experiment.record.get("warm_start")
    if not entry:
        return None
    search = experiment.spec.search
    rows = [
        {
            "warm start from": t["experiment"],
            "trial": t["trial_id"],
            **t["params"],
            **dict(zip(search.objective_metrics, t["values"])),
        }
        for t in entry.get("trials", [])
    ]
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(search.objective_metric, ascending=search.mode == "min", kind="stable")
    return table


def _best_config(experiment: Experiment) -> dict | None:
    location = storage.join(storage.normalize(experiment.path), "best_config.json")
    best = storage.read_json(location, limit=16 << 20, missing_ok=True)
    return None if best is None else checked_best_config(best, location)


def _selection_statement(experiment: Experiment) -> str:
    """What the winner was selected on and what it is tested on (best_config.json of the search)."""
    search = experiment.spec.search
    best = _best_config(experiment)
    if best is None:
        return "No trial has finished with the objective yet: no winner."
    if search.multi_objective:
        what = f"The Pareto front over {', '.join(best['metrics'])} holds {len(best['pareto_front'])} trials (below)"
        if not search.objective_targets:
            return what + ", selected on every target they are scored on."
        return what + f", selected on {', '.join(best['selected_on'])} and tested on {', '.join(best['tested_on'])}."
    if not search.objective_targets:
        return (
            f"The winner ({best['metric']} = {best['value']:.4f}) was selected on every target it is "
            "scored on, with one seed: its score is optimistic. Name `objective_targets` to hold targets out."
        )
    held = best.get("held_out_value")
    return (
        f"Selected on {', '.join(best['selected_on'])} ({best['metric']} = {best['value']:.4f}); "
        f"tested on {', '.join(best['tested_on'])}: {best['held_out_metric']} = "
        f"{'n/a' if held is None else f'{held:.4f}'}. The held-out score is the unbiased one."
    )


def _confirmed_table(rows: list[dict]) -> pd.DataFrame:
    def pm(row: dict, name: str) -> str:
        mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
        if mean is None:
            return "n/a"
        return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    table = []
    for row in rows:
        entry = {"role": row["role"], "surrogate": row["label"], "seeds": row["seeds"]}
        entry[row["objective_metric"]] = pm(row, "objective")
        if "held_out_metric" in row:
            entry[row["held_out_metric"]] = pm(row, "held_out")
        table.append(entry)
    return pd.DataFrame(table)


def _pareto_table(experiment: Experiment) -> pd.DataFrame | None:
    best = _best_config(experiment)
    if not best or "pareto_front" not in best:
        return None
    rows = []
    for entry in best["pareto_front"]:
        row = {k: v for k, v in entry["config"].items() if not isinstance(v, dict)}
        row.update(zip(best["metrics"], entry["values"]))
        if "held_out_value" in entry:
            row[best["held_out_metric"]] = entry["held_out_value"]
        rows.append(row)
    return pd.DataFrame(rows)


def _gaps(report: Report, experiments: list[Experiment], tidy: pd.DataFrame, out: Path) -> None:
    gaps = metric_gaps(experiments, tidy)
    gaps.to_csv(out / "gaps.csv", index=False)
    report.heading("Failed, unfinished or missing trials and metrics")
    if gaps.empty:
        report.paragraph("None: every trial the studies define finished with every metric.")
    else:
        report.paragraph(
            f"{len(gaps)} entries (also in gaps.csv). These trials and metrics are left out of the tables "
            "above, not counted as zero."
        )
        report.table(gaps)
