"""Verdicts on the paper's findings from hand-made experiments whose answer is known: a world where
every finding holds, and for each finding a world where it does not. The experiments are written
as the trainable writes them (records in result.json) and read through the real analysis path."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import headline_cells, load_experiment, tidy_trials
from analysis.findings import CONTRADICTED, NOT_ENOUGH, SUPPORTED, _Data, _ranking, findings
from raystudy.config import STUDY_MANIFEST, parse_space
from raystudy.persist.record import MetricRow, make_record

TARGETS = ("t1", "t2", "t3")
BUDGETS = (4, 8)
SEEDS = [0, 1, 2]
# (mechanism, magnitudes) -> (PGD ASR, smoothness eigenvalue, similarity): the paper's picture.
PAPER = {
    ("ST", ()): (0.40, 10.0, 0.30),
    ("AT", (("epsilon", 0.01),)): (0.50, 7.0, 0.29),
    ("AT", (("epsilon", 0.03),)): (0.55, 5.0, 0.28),
    ("AT", (("epsilon", 1.0),)): (0.20, 4.0, 0.15),
    ("MU", (("p", 0.9),)): (0.30, 9.5, 0.25),
    ("CM", (("p", 0.9),)): (0.28, 9.0, 0.24),
    ("LS", (("p", 0.5),)): (0.33, 8.5, 0.26),
    ("CO", (("size", 24),)): (0.38, 9.8, 0.29),
    ("IR", (("lambda_ir", 0.5),)): (0.50, 3.0, 0.31),
    ("JR", (("lambda_jr", 0.0001),)): (0.52, 3.5, 0.32),
    ("ER", (("lambda_er", 0.05),)): (0.45, 8.0, 0.30),
    ("SAM", (("rho", 0.1),)): (0.58, 7.0, 0.35),
    ("SAM&IR", (("lambda_ir", 0.5), ("rho", 0.1))): (0.70, 2.5, 0.37),
    ("SAM&JR", (("lambda_jr", 0.0001), ("rho", 0.1))): (0.72, 2.4, 0.38),
}
LGV_ASR = {"ST": 0.50, "SAM&JR": 0.80}


def noise(*parts) -> float:
    """A small deterministic wobble per (setting, seed, target, budget)."""
    return 0.004 * math.sin(sum((i + 1.7) * hash_float(p) for i, p in enumerate(parts)))


def hash_float(part) -> float:
    return sum(ord(c) for c in str(part)) * 0.37


def rows_for(mechanism, magnitudes, seed, world, attacks_asr) -> list[MetricRow]:
    asr, smooth, similar = world[(mechanism, magnitudes)]
    rows = [
        MetricRow("acc", 0.9),
        MetricRow("smoothness", smooth * (1 + 5 * noise(mechanism, seed)), statistic="mean"),
        MetricRow("smoothness", 2 * smooth, statistic="max"),
    ]
    for i, target in enumerate(TARGETS):
        rows.append(MetricRow("similarity", similar + 0.01 * i + noise(mechanism, seed, target), target=target))
        for attack, value in attacks_asr(mechanism, asr).items():
            for budget in BUDGETS:
                v = value + 0.02 * i + 0.05 * (budget == 8) + noise(mechanism, magnitudes, seed, target, budget)
                rows.append(MetricRow("asr", v, attack=attack, mode="untargeted", budget=budget, target=target))
    rows.append(MetricRow("similarity", similar, target="mean"))
    return rows


def pgd_mi_dim(mechanism, asr):
    return {"pgd": asr, "mi": asr + 0.1, "dim": asr + 0.12}


def write_world(root: Path, world=PAPER, attacks_asr=pgd_mi_dim, lgv=True, name="world") -> Path:
    trials = [{"mechanism": m, "magnitudes": dict(g)} for m, g in world]
    if lgv:
        trials += [{"mechanism": "ST", "lgv": True}, {"mechanism": "SAM&JR", "lgv": True}]
    study = {
        "name": name,
        "kind": "grid",
        "preset": "faithful",
        "dataset": "synthetic",
        "model": "tiny_cnn",
        "seeds": SEEDS,
        "targets": "hand_targets",
        "train": {"epochs": 2, "image_size": 16},
        "trials": trials,
    }
    spec = parse_space(study, f"{name}.yaml")
    folder = root / name
    folder.mkdir(parents=True)
    (folder / STUDY_MANIFEST).write_text(
        json.dumps({"study": study, "source": f"{name}.yaml", "data": None, "targets": list(TARGETS)})
    )
    for i, plan in enumerate(spec.plans):
        identity = plan.identity()
        mechanism, magnitudes = identity["mechanism"], tuple(sorted(identity["magnitudes"].items()))
        if plan.lgv is not None:
            rows = rows_for(mechanism, magnitudes, identity["seed"], world, lambda m, a: {"pgd": LGV_ASR[m]})
        else:
            rows = rows_for(mechanism, magnitudes, identity["seed"], world, attacks_asr)
        record = make_record(identity, plan.to_dict(), {"name": name, "kind": "grid"}, {"torch": "x"}, rows)
        trial = folder / f"trial_{i:03d}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"plan": plan.to_dict()}))
        final = {"final": 1, "trial_id": f"t{i}", "record": record}
        (trial / "result.json").write_text(json.dumps(final) + "\n")
    return folder


def verdicts_of(folder: Path) -> dict:
    return {v.finding: v for v in findings(tidy_trials([load_experiment(str(folder))]))}


def test_every_finding_holds_in_the_papers_world(tmp_path):
    verdicts = verdicts_of(write_world(tmp_path))
    # F7 per attack family too: MI stabilizes the gradient, DIM transforms the input.
    families = {"F7 gradient stabilization": SUPPORTED, "F7 input transformation": SUPPORTED}
    assert {k: v.verdict for k, v in verdicts.items()} == {f"F{i}": SUPPORTED for i in range(1, 8)} | families
    f1 = verdicts["F1"]
    assert "AT epsilon=0.03 > ST (asr)" in f1.statistic and "n = 18 pairs" in f1.statistic  # 3 seeds x 3 x 2
    assert "Δ = +15" in f1.checks[0].statistic  # 0.55 - 0.40, in points
    assert any("R² of OLS" in c.what for c in verdicts["F6"].checks)


def changed(setting_values: dict) -> dict:
    return {**PAPER, **setting_values}


BROKEN = {
    "F1": changed({("AT", (("epsilon", 0.01),)): (0.30, 7.0, 0.29), ("AT", (("epsilon", 0.03),)): (0.32, 5.0, 0.28)}),
    "F2": changed({("AT", (("epsilon", 1.0),)): (0.20, 14.0, 0.15)}),
    "F3": changed({("MU", (("p", 0.9),)): (0.50, 9.5, 0.34)}),
    "F4": changed({("IR", (("lambda_ir", 0.5),)): (0.50, 12.0, 0.31)}),
    "F5": changed({("SAM", (("rho", 0.1),)): (0.30, 7.0, 0.35)}),
    "F6": {k: (asr, smooth, 0.60 - asr) for k, (asr, smooth, _) in PAPER.items()},
}


@pytest.mark.parametrize("finding", sorted(BROKEN))
def test_a_finding_that_does_not_hold_is_not_supported(tmp_path, finding):
    verdicts = verdicts_of(write_world(tmp_path, BROKEN[finding]))
    assert verdicts[finding].verdict == CONTRADICTED, verdicts[finding].statistic


def test_better_surrogates_that_fall_behind_under_mi_fail_f7(tmp_path):
    def mi_reverses(mechanism, asr):
        return {"pgd": asr, "mi": 0.7 if mechanism == "ST" else 0.3, "dim": asr + 0.1}

    verdicts = verdicts_of(write_world(tmp_path, attacks_asr=mi_reverses))
    assert verdicts["F7"].verdict == CONTRADICTED
    assert verdicts["F5"].verdict == SUPPORTED  # PGD alone still says SAM beats ST


def test_lgv_ensembles_that_reverse_the_order_fail_f7(tmp_path, monkeypatch):
    monkeypatch.setitem(LGV_ASR, "ST", 0.95)
    verdicts = verdicts_of(write_world(tmp_path))
    assert verdicts["F7"].verdict == CONTRADICTED
    assert any(c.what.startswith("LGV-SAM&JR") and c.verdict == CONTRADICTED for c in verdicts["F7"].checks)


def newer_attacks(mechanism, asr):
    bsr = 1 - asr  # the order reversed
    return {"pgd": asr, "mi": asr + 0.1, "torchattack.VMIFGSM": asr + 0.12, "torchattack.BSR": bsr}


def defended_world(tmp_path, monkeypatch, world=PAPER) -> Path:
    """newer_attacks' world with every target also behind JPEG under PGD (ST 0.9, the rest 0.1) and
    the hook's mean over the targets as they are per attack and budget."""
    plain_rows = rows_for

    def with_defended(mechanism, magnitudes, seed, world, attacks_asr):
        rows = plain_rows(mechanism, magnitudes, seed, world, attacks_asr)
        asr = [r for r in rows if r.name == "asr"]
        behind = [
            MetricRow(
                "asr", 0.9 if mechanism == "ST" else 0.1, r.attack, r.mode, r.budget, target=f"{r.target}+jpeg:75"
            )
            for r in asr
            if r.attack == "pgd"
        ]
        means = [
            MetricRow("asr", sum(r.value for r in same) / len(same), attack, "untargeted", budget, target="mean")
            for attack, budget in sorted({(r.attack, r.budget) for r in asr})
            for same in [[r for r in asr if (r.attack, r.budget) == (attack, budget)]]
        ]
        return rows + behind + means

    monkeypatch.setattr(sys.modules[__name__], "rows_for", with_defended)
    return write_world(tmp_path, world, attacks_asr=newer_attacks, lgv=False)


def test_f7_per_attack_family_and_per_defended_target(tmp_path, monkeypatch):
    """Gradient-stabilizing attacks keep the order, an input transformation (BSR) reverses it, and
    behind JPEG ST transfers best: each family and defense has its own verdict and statistic."""
    verdicts = verdicts_of(defended_world(tmp_path, monkeypatch))
    assert verdicts["F7 gradient stabilization"].verdict == SUPPORTED
    assert "torchattack.VMIFGSM" in verdicts["F7 gradient stabilization"].claim
    assert verdicts["F7 input transformation"].verdict == CONTRADICTED
    assert verdicts["F7 behind jpeg:75"].verdict == CONTRADICTED
    assert "behind jpeg:75" in verdicts["F7 behind jpeg:75"].checks[0].what
    # The plain targets' findings are measured without the defended columns: SAM still beats ST.
    assert verdicts["F5"].verdict == SUPPORTED and "F7 architecture" not in verdicts
    # Beside each verdict, how far the order under PGD holds: kept under VMI-FGSM, reversed under BSR
    # (but for the two settings tied under PGD, which the same noise orders alike), and behind JPEG
    # ST moves from the middle (5 below, 8 above) to the top with the rest tied: (5 - 8) / sqrt(91 x 13).
    ranking = {c.what: c for v in verdicts.values() for c in v.checks if c.what.startswith("order of")}
    kept = ranking["order of the surrogates under PGD kept under torchattack.VMIFGSM"]
    assert kept.verdict == "reported" and kept.statistic.startswith("Kendall τ = +1.00 over 14 surrogates")
    reversed_ = ranking["order of the surrogates under PGD kept under torchattack.BSR"].statistic
    assert reversed_.startswith(f"Kendall τ = {-1 + 2 / 91:+.2f}"), reversed_
    behind = ranking["order of the surrogates under PGD kept under pgd, behind jpeg:75"].statistic
    assert behind.startswith(f"Kendall τ = {-3 / math.sqrt(91 * 13):+.2f}") and "behind jpeg:75: ST 90.0 >" in behind


def test_the_report_tables_every_attack_and_every_defense(tmp_path, monkeypatch):
    """The report's table by attack holds the hook's mean over the plain targets, mean and spread
    over seeds, PGD first; the long table has every attack behind every defense, by hand."""
    from analysis.report import analyze
    from analysis.tables import attack_defense_cells, attack_table

    world = {k: v for k, v in PAPER.items() if k[0] in ("ST", "JR", "SAM")}
    folder = defended_world(tmp_path, monkeypatch, world)
    tidy = tidy_trials([load_experiment(str(folder))])
    table = attack_table(tidy, "untargeted")
    assert [a for a, _ in table.columns][:2] == ["pgd", "pgd"] and table.columns[-1][0] == "torchattack.VMIFGSM"
    sam = [0.58 + 0.02 * i + noise("SAM", (("rho", 0.1),), seed, t, 8) for seed in SEEDS for i, t in enumerate(TARGETS)]
    per_seed = [sum(sam[3 * k : 3 * k + 3]) / 3 for k in range(3)]  # SAM under PGD at 8/255: + 0.05
    mean = 100 * (sum(per_seed) / 3 + 0.05)
    spread = 100 * statistics.stdev(per_seed)
    assert table.loc["SAM", ("pgd", "8/255")].startswith(f"{mean:.1f} ± {spread:.1f}")
    assert table.loc["ST", ("torchattack.BSR", "8/255")].endswith("[best]")  # BSR reverses the order
    cells = attack_defense_cells(tidy, "untargeted").set_index(["label", "attack", "defense", "budget"])
    assert cells.loc[("SAM", "pgd", "none", 8), "mean"] == pytest.approx(mean)
    assert cells.loc[("ST", "pgd", "jpeg:75", 8), "mean"] == pytest.approx(90.0)
    assert cells.loc[("SAM", "pgd", "jpeg:75", 8), ["mean", "std", "n"]].tolist() == pytest.approx([10.0, 0.0, 3])
    assert ("SAM", "mi", "jpeg:75", 8) not in cells.index  # measured behind JPEG under PGD only
    # A search's aggregates and a black-box endpoint (queried under some attacks only) stay out.
    extra = tidy[(tidy.name == "asr") & (tidy.target == "t1")].assign(value=0.99)
    more = pd.concat(
        [
            tidy,
            *(
                extra.assign(target=t, metric=extra.metric.str.replace("/t1", f"/{t}"))
                for t in ("objective", "held_out", "our_api")
            ),
        ]
    )
    again = attack_defense_cells(more, "untargeted", black_box=["our_api"]).set_index(cells.index.names)
    assert again["mean"].tolist() == pytest.approx(cells["mean"].tolist()) and len(again) == len(cells)
    with_api = attack_defense_cells(more, "untargeted").set_index(cells.index.names)
    assert with_api.loc[("SAM", "pgd", "none", 8), "mean"] > mean + 5  # not filtered: it would move
    # Two trials of one label and seed (two experiments): the headline's choice, the first in the table.
    twice = pd.concat([tidy, tidy[tidy.label == "SAM"].assign(trial_id="zz", value=0.0)])
    first = attack_defense_cells(twice, "untargeted").set_index(cells.index.names)
    assert first["mean"].tolist() == pytest.approx(cells["mean"].tolist())
    zero_first = pd.concat([tidy[tidy.label == "SAM"].assign(trial_id="00", value=0.0), tidy])
    headline = headline_cells(zero_first, "untargeted").set_index(["label", "target", "budget"])
    defense_cells = attack_defense_cells(zero_first, "untargeted").set_index(cells.index.names)
    assert defense_cells.loc[("SAM", "pgd", "none", 8), "mean"] == headline.loc[("SAM", "mean", 8), "mean"] == 0.0
    report = analyze([str(folder)], tmp_path / "report", log=None).read_text()
    assert "## Transfer ASR by attack: untargeted (%)" in report
    assert "| experiment | setting |" in report and "| index |" not in report  # the accuracy table
    assert (tmp_path / "report" / "attacks_by_defense_untargeted.csv").exists()


def test_the_order_is_taken_over_what_every_surrogate_measured_alike(tmp_path, monkeypatch):
    """SAM&JR > SAM > JR > ST under PGD and BSR alike at every shared key, BSR far stronger at 8/255,
    and SAM's BSR at 8/255 missing: averaged as they come SAM would fall below JR; over the pairs
    all measured (4/255), the order holds. LGV ensembles are ranked with the others."""
    world = {k: v for k, v in PAPER.items() if k[0] in ("ST", "JR", "SAM", "SAM&JR")}
    plain_rows = rows_for

    def without_sams_bsr_at_8(mechanism, magnitudes, seed, world, attacks_asr):
        rows = plain_rows(mechanism, magnitudes, seed, world, attacks_asr)
        if {r.attack for r in rows if r.name == "asr"} == {"pgd"}:  # an LGV ensemble: BSR as for the others
            rows += [dataclasses.replace(r, attack="torchattack.BSR", value=r.value - 0.1) for r in rows if r.attack]
        rows = [
            dataclasses.replace(r, value=r.value + 0.3) if (r.attack, r.budget) == ("torchattack.BSR", 8) else r
            for r in rows
        ]
        return [r for r in rows if not (mechanism == "SAM" and r.attack == "torchattack.BSR" and r.budget == 8)]

    monkeypatch.setattr(sys.modules[__name__], "rows_for", without_sams_bsr_at_8)
    same_order = lambda mechanism, asr: {"pgd": asr, "torchattack.BSR": asr - 0.1}  # noqa: E731
    verdicts = verdicts_of(write_world(tmp_path, world, attacks_asr=same_order, lgv=True))
    check = next(c for c in verdicts["F7 input transformation"].checks if c.what.startswith("order of"))
    assert check.statistic.startswith("Kendall τ = +1.00 over 6 surrogates, 3 target × budget pairs ("), check.statistic

    def names(order: str) -> list[str]:
        return [part.split(" ")[0] for part in order.rstrip(")").split(" > ")]

    pgd, bsr = check.statistic.split("(PGD: ", 1)[1].split("; torchattack.BSR: ")
    assert names(pgd) == names(bsr) == ["LGV-SAM&JR", "SAM&JR", "SAM", "JR", "LGV-ST", "ST"]
    # A setting whose every ASR under the attack is NaN (no image both classify correctly) is left out.
    tidy = tidy_trials([load_experiment(str(tmp_path / "world"))])
    d = _Data(tidy[tidy.kind != "targets"].copy())
    sam = next(s for s in d.settings if s.mechanism == "SAM")
    d.frame.loc[(d.frame.mechanism == "SAM") & (d.frame.attack == "torchattack.BSR"), "value"] = math.nan
    statistic = _ranking(d, "torchattack.BSR", None).statistic
    assert (
        statistic.startswith("Kendall τ = +1.00 over 5 surrogates, 6 target × budget pairs")
        and str(sam) not in statistic
    )


def test_kendalls_tau_b_is_scipys():
    import numpy as np
    import scipy.stats

    from analysis.findings import kendall_tau_b

    rng = np.random.default_rng(0)
    for n in (3, 4, 9):
        for _ in range(20):
            x, y = rng.integers(0, 4, n).tolist(), rng.integers(0, 4, n).tolist()  # with ties
            expected = scipy.stats.kendalltau(x, y).statistic
            assert kendall_tau_b(x, y) == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1 and math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau_b([1, 2, math.nan], [1, 2, 3]))


def test_missing_settings_say_not_enough_trials(tmp_path):
    small = {k: v for k, v in PAPER.items() if k[0] in ("ST", "SAM", "IR")}
    verdicts = verdicts_of(write_world(tmp_path, small, lgv=False))
    for finding in ("F1", "F2", "F3", "F4"):
        assert verdicts[finding].verdict == NOT_ENOUGH, finding
    assert "not in the experiments" in verdicts["F4"].statistic  # ER, and JR, are missing


def test_findings_command_prints_the_verdicts_and_writes_json(tmp_path):
    folder = write_world(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "raystudy", "findings", str(folder), "--json", str(tmp_path / "f.json")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("SUPPORTED:") == 9 and "95% CI" in out.stdout
    saved = json.loads((tmp_path / "f.json").read_text())
    families = ["F7 gradient stabilization", "F7 input transformation"]
    assert [v["finding"] for v in saved] == [f"F{i}" for i in range(1, 8)] + families
    missing = subprocess.run(
        [sys.executable, "-m", "raystudy", "findings", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
