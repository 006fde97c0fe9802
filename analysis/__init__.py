"""Offline analysis of raystudy experiments (no Ray): records, tables, figures, report.

from analysis import analyze, load_experiment, tidy_trials
analyze(["~/raystudy_results/table"], "report/")
"""

from analysis.records import Experiment, LoggedTrial, load_experiment
from analysis.report import analyze
from analysis.tables import correlation_table, headline_cells, headline_table, metric_gaps, tidy_trials, wide

__all__ = [
    "Experiment",
    "LoggedTrial",
    "analyze",
    "correlation_table",
    "headline_cells",
    "headline_table",
    "load_experiment",
    "metric_gaps",
    "tidy_trials",
    "wide",
]
