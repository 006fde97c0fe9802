"""Offline analysis end to end on a real (smoke) run: tidy table, headline cells, figures, report, gaps.

The tables' known answers are checked on hand-made records in test_analysis_records.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import analyze, headline_cells, load_experiment, tidy_trials
from raystudy.errors import RaystudyError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(smoke_storage, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    analyze([str(smoke_storage / "smoke"), str(smoke_storage / "smoke_targets")], out, log=None)
    return out


def test_every_finished_trial_appears_once(smoke_storage, report):
    tidy = pd.read_parquet(report / "trials.parquet")
    smoke = tidy[tidy.experiment == "smoke"]
    assert smoke.trial_id.nunique() == 5
    assert not smoke.duplicated(["trial_id", "metric"]).any()
    assert sorted(smoke.drop_duplicates("trial_id").label) == ["MU τ=1", "MU τ=5", "SAM", "SAM&JR", "ST"]
    assert {"mechanism", "magnitude", "seed", "model", "dataset", "preset"} <= set(tidy.columns)
    assert len(pd.read_csv(report / "trials.csv")) == len(tidy)


def test_headline_cell_equals_mean_and_std_by_hand(smoke_storage):
    tidy = tidy_trials([load_experiment(str(smoke_storage / "smoke"))])
    cells = headline_cells(tidy, "untargeted")
    cell = cells[(cells.label == "SAM") & (cells.target == "tiny_cnn_s1") & (cells.budget == 16)].iloc[0]
    values = tidy[(tidy.label == "SAM") & (tidy.metric == "asr/pgd/untargeted/16/tiny_cnn_s1")].value.to_numpy()
    assert cell["n"] == len(values) == 1
    assert cell["mean"] == pytest.approx(100 * values.mean())
    # Several seeds: pool two copies of the experiment as seeds 0 and 1 and check the std (ddof=1).
    twin = tidy.copy()
    twin["seed"] = 1
    twin["value"] = twin["value"] * 0.5
    both = headline_cells(pd.concat([tidy, twin]), "untargeted")
    pooled = both[(both.label == "SAM") & (both.target == "mean") & (both.budget == 16)].iloc[0]
    raw = tidy[(tidy.label == "SAM") & (tidy.metric == "asr/pgd/untargeted/16/mean")].value.iloc[0]
    assert pooled["n"] == 2
    assert pooled["mean"] == pytest.approx(100 * np.mean([raw, raw * 0.5]))
    assert pooled["std"] == pytest.approx(100 * np.std([raw, raw * 0.5], ddof=1))


def test_figures_exist_and_the_report_links_them(report):
    pngs = sorted(report.glob("*.png"))
    assert [p.name for p in pngs] == ["curve_MU.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert png.with_suffix(".svg").is_file()
    text = (report / "report.md").read_text()
    assert "](curve_MU.png)" in text and "Headline table: untargeted" in text and "Correlations" in text
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    for name in ("headline_untargeted.csv", "headline_untargeted.tex", "headline_targeted.md", "correlations.csv"):
        assert (report / name).stat().st_size > 0
    assert (
        "\\textbf" in (report / "headline_untargeted.tex").read_text()
        or "\\underline" in (report / "headline_untargeted.tex").read_text()
    )


def test_failed_trial_and_missing_metric_are_listed(smoke_storage, tmp_path):
    experiment = tmp_path / "smoke"
    shutil.copytree(smoke_storage / "smoke", experiment)
    folders = sorted(p.parent for p in experiment.glob("*/params.json"))
    failed, partial = folders[0], folders[1]
    lines = (failed / "result.json").read_text().splitlines()
    (failed / "result.json").write_text("\n".join(line for line in lines if json.loads(line).get("final") != 1) + "\n")
    diverged = "raystudy.training.loop.TrainingDiverged: training diverged at epoch 2"
    (failed / "error.txt").write_text(f"Traceback ...\n{diverged}\n")
    lines = (partial / "result.json").read_text().splitlines()
    final = json.loads(lines[-1])
    final.pop("smoothness/max")
    final["record"]["metrics"] = [
        m for m in final["record"]["metrics"] if not (m["name"] == "smoothness" and m.get("statistic") == "max")
    ]
    (partial / "result.json").write_text("\n".join(lines[:-1] + [json.dumps(final)]) + "\n")
    out = tmp_path / "report"
    analyze([str(experiment)], out, log=None)
    gaps = pd.read_csv(out / "gaps.csv")
    assert set(gaps.status) == {"failed", "missing metrics"}
    assert "training diverged at epoch 2" in gaps[gaps.status == "failed"].detail.iloc[0]
    assert gaps[gaps.status == "missing metrics"].detail.iloc[0] == "smoothness/max"
    tidy = pd.read_parquet(out / "trials.parquet")
    assert tidy.trial_id.nunique() == 4  # the failed trial is listed, not counted
    assert "training diverged" in (out / "report.md").read_text()


def test_not_an_experiment_is_a_one_line_error(tmp_path):
    with pytest.raises(RaystudyError, match="is not a raystudy experiment"):
        load_experiment(str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "raystudy", "analyze", str(tmp_path), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "not a raystudy experiment" in out.stderr
    )


def test_similarity_matrix_between_mechanisms(smoke_storage, tmp_path):
    from conftest import SMOKE
    from world import write_experiment

    # Two seeds of two mechanisms, written without Ray (the analysis is the subject, not Ray).
    trials = [{"mechanism": "ST"}, {"mechanism": "SAM"}]
    study = dict(SMOKE, name="two_seeds", seeds=[0, 1], trials=trials, train={**SMOKE["train"], "epochs": 1})
    write_experiment(study, smoke_storage)
    report = tmp_path / "report"
    analyze([str(smoke_storage / "two_seeds")], report, log=None, similarity=True, matrix_images=64)
    matrix = pd.read_csv(report / "similarity_matrix_two_seeds.csv", index_col=0)
    assert list(matrix.index) == ["ST", "SAM"] and list(matrix.columns) == ["ST", "SAM"]
    values = matrix.to_numpy()
    assert np.isfinite(values).all() and (np.abs(values) <= 1).all()
    assert np.allclose(values, values.T)  # cosine is symmetric and so is the set of seed pairs
    assert (report / "similarity_matrix_two_seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert "](similarity_matrix_two_seeds.png)" in (report / "report.md").read_text()


def test_html_report_renders_marks_and_has_no_index_column(report):
    import re

    page = (report / "report.html").read_text()
    assert "**" not in page and not re.search(r">_[^<]*_<", page) and "[best]" not in page and "[2nd]" not in page
    assert "<b>" in page or "<u>" in page  # best / second best as real bold and underline
    assert not re.search(r"<tbody>\s*<tr>\s*<th>0</th>", page)  # no pandas row numbers in plain tables
    # The smoke study has one seed: its cells show the value alone, without a "± 0.0" spread.
    assert "± 0.0" not in page


def test_report_screenshot_in_a_headless_browser(report, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium on this machine (Debian: apt-get install chromium)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            (report / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
