"""Verdicts on the paper's findings (F1-F7), each with the statistic behind it, from trial records.

Every finding is a list of checks. A check compares two settings (mechanism, magnitudes, LGV) on
one metric, paired over what both measured (seed, target, budget): the mean paired difference and
its 95% t interval. A check is *supported* when the interval lies on the claimed side of 0,
*contradicted* when it lies on the other side, *inconclusive* when it covers 0, and *not enough
trials* when fewer than two pairs exist. A correlation check (F6) uses Pearson r with a Fisher-z
interval instead. A finding is supported when all its checks are, not supported when any check
is contradicted, and otherwise inconclusive (or not enough trials when a check lacks its trials).

The ASR is the untargeted PGD ASR per target (Definition 3), over every budget the experiments
measured; smoothness is the mean top input-Hessian eigenvalue (lower = smoother); similarity is
per target. Magnitudes: a mechanism's default when present, MU/CM/CO/LS at their largest
magnitude present (the paper's τ=5). No torch and no Ray here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.special

from analysis.tables import _pearson, _r2, wide
from raystudy.mechanisms import get_mechanism
from raystudy.persist.record import AGGREGATE_TARGETS, MetricRow, defended_parts, is_defended

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_ENOUGH = "supported", "not supported", "inconclusive", "not enough trials"
REPORTED = "reported"  # a figure shown beside the checks (F6's R²), not a check
CLAIMS = {
    "F1": "AT's ASR over ε is an inverted U: some small ε beats ST and the largest ε falls below that peak",
    "F2": "AT's smoothness improves (falls) and its similarity falls as ε grows",
    "F3": "MU, CM, LS at their larger magnitude lower similarity and ASR against ST; CO lowers ASR least",
    "F4": "IR and JR improve smoothness over ST, more than ER does",
    "F5": "SAM beats ST; SAM&JR and SAM&IR are the best surrogates overall",
    "F6": "across trials, ASR correlates positively with similarity and negatively with the eigenvalue",
    "F7": "the better surrogates stay better under MI, DIM and LGV",
}
AUGMENTATIONS = ("MU", "CM", "LS")
# F7 per attack family (the transfer literature's grouping): raystudy's attacks and torchattack's
# (`torchattack.<Name>`). PGD, I-FGSM, FGSM and AutoAttack are the baselines, in no family.
ATTACK_FAMILIES = {
    "gradient stabilization": ("mi", "MIFGSM", "NIFGSM", "VMIFGSM", "VNIFGSM", "GRA", "MIG"),
    "input transformation": (
        "di",
        "dim",
        "DIFGSM",
        "TIFGSM",
        "SINIFGSM",
        "SSA",
        "BSR",
        "Admix",
        "L2T",
        "DeCoWA",
        "MuMoDIG",
    ),
    "architecture": ("SGM", "BPA"),
    "feature level": ("FIA", "NAA", "ILPD", "DANAA", "BFA", "DR", "FDA"),
}


def attack_family(attack: str) -> str | None:
    name = attack.split(".", 1)[1] if attack.startswith("torchattack.") else attack
    return next((family for family, members in ATTACK_FAMILIES.items() if name in members), None)


@dataclass(frozen=True)
class Setting:
    mechanism: str
    magnitudes: str  # JSON, as in the tidy table
    lgv: bool = False

    def __str__(self) -> str:
        values = json.loads(self.magnitudes)
        text = self.mechanism + (" " + ",".join(f"{k}={v:g}" for k, v in values.items()) if values else "")
        return f"LGV-{text}" if self.lgv else text


@dataclass(frozen=True)
class Check:
    what: str
    verdict: str
    statistic: str


@dataclass(frozen=True)
class Verdict:
    finding: str
    claim: str
    verdict: str
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def statistic(self) -> str:
        return "; ".join(f"{c.what}: {c.statistic}" for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "finding": self.finding,
            "claim": self.claim,
            "verdict": self.verdict,
            "checks": [vars(c) for c in self.checks],
        }


def findings(tidy: pd.DataFrame) -> list[Verdict]:
    """F1-F7 on the finished surrogate trials of `tidy` (analysis.tables.tidy_trials)."""
    surrogates = tidy[tidy.kind != "targets"] if not tidy.empty else tidy
    data = _Data(surrogates)
    checks = {
        "F1": _f1(data),
        "F2": _f2(data),
        "F3": _f3(data),
        "F4": _f4(data),
        "F5": _f5(data),
        "F6": _f6(surrogates),
        "F7": _f7(data),
    }
    verdicts = [Verdict(k, CLAIMS[k], _combine(c), tuple(c)) for k, c in checks.items()]
    return verdicts + _f7_generalized(data)


def render(verdicts: list[Verdict]) -> str:
    """The verdicts as text: one line per finding, then its checks with their statistics."""
    lines = []
    for v in verdicts:
        lines.append(f"{v.finding}  {v.verdict.upper()}: {v.claim}")
        lines += [f"      [{c.verdict}] {c.what}: {c.statistic}" for c in v.checks]
    return "\n".join(lines)


def findings_table(verdicts: list[Verdict]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"finding": v.finding, "verdict": v.verdict, "claim": v.claim, "statistic": v.statistic} for v in verdicts]
    )


def _combine(checks: list[Check]) -> str:
    verdicts = [c.verdict for c in checks if c.verdict != REPORTED]
    if not verdicts or NOT_ENOUGH in verdicts and CONTRADICTED not in verdicts:
        return NOT_ENOUGH
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


class _Data:
    """The per-(setting, seed, target, budget) values of the metrics the findings use."""

    def __init__(self, surrogates: pd.DataFrame) -> None:
        self.frame = surrogates
        distinct = surrogates[["mechanism", "magnitudes", "lgv"]].drop_duplicates()
        self.settings = sorted(
            {Setting(m, g, bool(lgv)) for m, g, lgv in distinct.itertuples(index=False)},
            key=lambda s: (s.lgv, s.mechanism, _magnitude(s)),
        )
        self.dataset = surrogates.dataset.iloc[0] if len(surrogates) else "cifar10"

    def values(self, setting: Setting, metric: str, attack: str = "pgd", defense: str | None = None) -> pd.Series:
        """One value per (seed, target, budget) key; smoothness has no target or budget. `defense`:
        the targets behind that defense (keyed by the target), else the targets as they are."""
        f = self.frame
        rows = f[(f.mechanism == setting.mechanism) & (f.magnitudes == setting.magnitudes) & (f.lgv == setting.lgv)]
        if metric == "asr":
            rows = rows[(rows.name == "asr") & (rows.attack == attack) & (rows["mode"] == "untargeted")]
        elif metric == "smoothness":
            rows = rows[(rows.name == "smoothness") & (rows.statistic == "mean")]
        else:
            rows = rows[rows.name == metric]
        # The targets as they are: a defended target's column is checked apart (not paired with them).
        rows = rows[~rows.target.isin(AGGREGATE_TARGETS)]
        # (masks as booleans: an empty map's object dtype would select columns instead of rows)
        if defense is None:
            rows = rows[~rows.target.map(is_defended).astype(bool)]
        else:
            suffix = f"+{defense}"
            parts = rows.target.map(defended_parts)
            rows = rows[parts.map(lambda p: bool(p) and p[1] == defense).astype(bool)]
            rows = rows.assign(target=rows.target.str[: -len(suffix)])
        keys = list(zip(rows.seed, rows.target.fillna("-"), rows.budget.fillna(-1).astype(int)))
        return pd.Series(rows.value.to_numpy(float), index=pd.MultiIndex.from_tuples(keys) if keys else None)

    def of(self, mechanism: str, lgv: bool = False) -> list[Setting]:
        return [s for s in self.settings if s.mechanism == mechanism and s.lgv == lgv]

    def default(self, mechanism: str, lgv: bool = False) -> Setting | str:
        """The mechanism at its default magnitudes when present, else its smallest one present; its
        name (what is missing) when absent."""
        present = self.of(mechanism, lgv)
        wanted = json.dumps(get_mechanism(mechanism).default_magnitudes(self.dataset), sort_keys=True)
        absent = f"LGV-{mechanism}" if lgv else mechanism
        return next((s for s in present if s.magnitudes == wanted), present[0] if present else absent)

    def largest(self, mechanism: str) -> Setting | str:
        present = self.of(mechanism)
        return present[-1] if present else mechanism

    def mean(self, setting: Setting, metric: str = "asr", attack: str = "pgd") -> float:
        values = self.values(setting, metric, attack)
        return float(values.mean()) if len(values) else float("nan")

    def compare(
        self,
        a: Setting | str,
        b: Setting | str,
        metric: str,
        side: str,
        attack: str = "pgd",
        defense: str | None = None,
    ) -> Check:
        """Check `a side b` ('>' or '<') on `metric`, paired over the keys both measured; a str is a
        setting the experiments lack. `defense`: on the targets behind it."""
        what = f"{a} {side} {b} ({metric}{'' if attack == 'pgd' or metric != 'asr' else ', ' + attack}"
        what += f", behind {defense})" if defense else ")"
        missing = [x for x in (a, b) if isinstance(x, str)]
        if missing:
            return Check(what, NOT_ENOUGH, f"{' and '.join(missing)} not in the experiments")
        left, right = self.values(a, metric, attack, defense), self.values(b, metric, attack, defense)
        shared = left.index.intersection(right.index)
        differences = (left[shared] - right[shared]).to_numpy(float)
        return Check(what, *_paired_verdict(differences, side, scale=100 if metric == "asr" else 1))


def _magnitude(setting: Setting) -> float:
    values = list(json.loads(setting.magnitudes).values())
    return float(values[0]) if values else 0.0


def _paired_verdict(differences: np.ndarray, side: str, scale: float) -> tuple[str, str]:
    n = len(differences)
    if n < 2:
        return NOT_ENOUGH, f"{n} paired value(s)"
    mean = differences.mean()
    half = scipy.special.stdtrit(n - 1, 0.975) * differences.std(ddof=1) / math.sqrt(n)
    low, high = mean - half, mean + half
    unit = " pts" if scale == 100 else ""
    text = f"Δ = {scale * mean:+.3g}{unit}, 95% CI [{scale * low:+.3g}, {scale * high:+.3g}], n = {n} pairs"
    claimed_side = low > 0 if side == ">" else high < 0
    other_side = high < 0 if side == ">" else low > 0
    return (SUPPORTED if claimed_side else CONTRADICTED if other_side else INCONCLUSIVE), text


def _f1(d: _Data) -> list[Check]:
    st, at = d.default("ST"), d.of("AT")
    if isinstance(st, str) or len(at) < 2:
        return [Check("ST and AT at two or more ε", NOT_ENOUGH, f"{len(d.of('ST'))} ST, {len(at)} AT ε")]
    peak = max(at[:-1], key=d.mean)  # the best ε below the largest
    return [d.compare(peak, st, "asr", ">"), d.compare(peak, at[-1], "asr", ">")]


def _f2(d: _Data) -> list[Check]:
    at = d.of("AT")
    if len(at) < 2:
        return [Check("AT at two or more ε", NOT_ENOUGH, f"{len(at)} AT ε")]
    return [d.compare(at[-1], at[0], "smoothness", "<"), d.compare(at[-1], at[0], "similarity", "<")]


def _f3(d: _Data) -> list[Check]:
    st = d.default("ST")
    checks = []
    for mechanism in AUGMENTATIONS:
        strong = d.largest(mechanism)
        checks += [d.compare(strong, st, "similarity", "<"), d.compare(strong, st, "asr", "<")]
    cutout = d.largest("CO")
    present = [d.largest(m) for m in AUGMENTATIONS if d.of(m)]
    checks += [d.compare(cutout, other, "asr", ">") for other in present] or [
        Check("CO > MU, CM, LS (asr)", NOT_ENOUGH, "no MU, CM or LS")
    ]
    return checks


def _f4(d: _Data) -> list[Check]:
    st, er = d.default("ST"), d.default("ER")
    checks = []
    for mechanism in ("IR", "JR"):
        regularized = d.default(mechanism)
        checks += [d.compare(regularized, st, "smoothness", "<"), d.compare(regularized, er, "smoothness", "<")]
    return checks


def _f5(d: _Data) -> list[Check]:
    st, sam = d.default("ST"), d.default("SAM")
    best = [d.default("SAM&JR"), d.default("SAM&IR")]
    others = [s for s in d.settings if not s.lgv and s.mechanism not in ("SAM&JR", "SAM&IR")]
    rival = max(others, key=d.mean) if others else "another surrogate"  # the strongest other one
    return [d.compare(sam, st, "asr", ">")] + [d.compare(s, rival, "asr", ">") for s in best]


def _f6(surrogates: pd.DataFrame) -> list[Check]:
    table = wide(surrogates[~surrogates.lgv] if len(surrogates) else surrogates)
    asr = surrogates[(surrogates.name == "asr") & (surrogates.attack == "pgd") & (surrogates["mode"] == "untargeted")]
    pairs = sorted({(t, int(b)) for t, b in zip(asr.target, asr.budget) if t not in AGGREGATE_TARGETS})
    smooth = MetricRow("smoothness", 0.0, statistic="mean").key
    checks = []
    for target, budget in pairs:
        column = MetricRow("asr", 0.0, attack="pgd", mode="untargeted", budget=budget, target=target).key
        similar = MetricRow("similarity", 0.0, target=target).key
        if any(c not in table.columns for c in (column, similar, smooth)):
            continue
        data = table[[column, similar, smooth]].dropna()
        where = f"{target}, {budget}/255"
        checks.append(_correlation(f"r(ASR, similarity) > 0 ({where})", data[similar], data[column], ">"))
        checks.append(_correlation(f"r(ASR, eigenvalue) < 0 ({where})", data[smooth], data[column], "<"))
        checks.append(Check(f"R² of OLS(ASR ~ smoothness + similarity) ({where})", REPORTED, _r2_text(data)))
    return checks or [Check("ASR, smoothness and similarity of surrogates", NOT_ENOUGH, "no such trials")]


def _correlation(what: str, x: pd.Series, y: pd.Series, side: str) -> Check:
    n = len(x)
    if n < 4 or x.nunique() < 2 or y.nunique() < 2:
        return Check(what, NOT_ENOUGH, f"{n} trials")
    r = _pearson(x, y)
    half = 1.96 / math.sqrt(n - 3)
    z = math.atanh(max(min(r, 0.999999), -0.999999))
    low, high = math.tanh(z - half), math.tanh(z + half)
    text = f"r = {r:+.2f}, 95% CI [{low:+.2f}, {high:+.2f}], n = {n} trials"
    supported = low > 0 if side == ">" else high < 0
    contradicted = high < 0 if side == ">" else low > 0
    return Check(what, SUPPORTED if supported else CONTRADICTED if contradicted else INCONCLUSIVE, text)


def _r2_text(data: pd.DataFrame) -> str:
    r2 = _r2(data.iloc[:, 0], data.iloc[:, 1:])
    return "too few trials" if math.isnan(r2) else f"R² = {r2:.2f} (n = {len(data)})"


def _f7(d: _Data) -> list[Check]:
    st = d.default("ST")
    if isinstance(st, str):
        return [Check("ST present", NOT_ENOUGH, "no ST")]
    candidates = [s for s in d.settings if not s.lgv and s.mechanism != "ST"]
    better = [s for s in candidates if d.compare(s, st, "asr", ">").verdict == SUPPORTED]
    if not better:
        return [Check("a surrogate better than ST under PGD", NOT_ENOUGH, "none is (95% CI above ST)")]
    checks = []
    attacks = sorted(set(d.frame.attack.dropna()) & {"mi", "dim"})
    for setting in better:
        checks += [d.compare(setting, st, "asr", ">", attack=a) for a in attacks]
        if d.of(setting.mechanism, lgv=True):  # its LGV ensemble against ST's
            checks.append(d.compare(d.default(setting.mechanism, lgv=True), d.default("ST", lgv=True), "asr", ">"))
    if not attacks and not d.of("ST", lgv=True):
        checks.append(Check("MI, DIM or LGV measured", NOT_ENOUGH, "only PGD without LGV"))
    return checks


def _better_than_st(d: _Data) -> tuple[Setting | str, list[Setting]]:
    """ST, and the surrogates better than it under PGD (95% CI above it)."""
    st = d.default("ST")
    if isinstance(st, str):
        return st, []
    candidates = [s for s in d.settings if not s.lgv and s.mechanism != "ST"]
    return st, [s for s in candidates if d.compare(s, st, "asr", ">").verdict == SUPPORTED]


def _f7_generalized(d: _Data) -> list[Verdict]:
    """F7 per attack family and per defended target, where the experiments measured them: the
    surrogates better than ST under PGD against ST under each attack of the family (on the targets
    as they are), and under PGD on the targets behind each defense."""
    if d.frame.empty:
        return []
    st, better = _better_than_st(d)
    asr = d.frame[d.frame.name == "asr"]
    attacks = sorted(set(asr.attack.dropna()))
    defenses = sorted({parts[1] for parts in map(defended_parts, asr.target.dropna()) if parts})
    groups = {
        f"F7 {family}": (family, [a for a in attacks if attack_family(a) == family], None) for family in ATTACK_FAMILIES
    }
    groups.update({f"F7 behind {defense}": (defense, ["pgd"], defense) for defense in defenses})
    out = []
    for key, (what, members, defense) in groups.items():
        if not members:
            continue
        claim = (
            f"the better surrogates stay better under {what} attacks ({', '.join(members)})"
            if defense is None
            else f"the better surrogates stay better against the targets behind {defense} (PGD)"
        )
        if not better:
            checks = [Check("a surrogate better than ST under PGD", NOT_ENOUGH, "none is (95% CI above ST)")]
        else:
            checks = [d.compare(s, st, "asr", ">", attack=a, defense=defense) for s in better for a in members]
        checks += [_ranking(d, attack, defense) for attack in members]
        out.append(Verdict(key, claim, _combine(checks), tuple(checks)))
    return out


def _ranking(d: _Data, attack: str, defense: str | None) -> Check:
    """How far the surrogates' order by mean ASR under PGD (targets as they are) holds under `attack`
    (behind `defense`): Kendall's tau-b over the settings (LGV ensembles too) measured under both,
    each setting's ASR averaged over seeds, then over the (target, budget) pairs that most settings
    measured under both (an order of like with like; a setting lacking one of them is left out),
    and both orders. A figure beside the verdict, which stays with the paired comparisons: at a few
    seeds the order of close surrogates is partly noise, which the figure alone cannot tell apart."""
    where = f"{attack}, behind {defense}" if defense else attack
    what = f"order of the surrogates under PGD kept under {where}"
    per_pair = {}  # setting -> (PGD, attack) mean ASR per (target, budget), over seeds
    for s in d.settings:
        # NaN: no image both models classify correctly (Definition 3): not a measurement
        pgd, other = d.values(s, "asr").dropna(), d.values(s, "asr", attack, defense).dropna()
        if len(pgd) and len(other):
            a, b = pgd.groupby(level=[1, 2]).mean(), other.groupby(level=[1, 2]).mean()
            both = a.index.intersection(b.index)
            if len(both):
                per_pair[s] = (a[both], b[both])
    # The (target, budget) pairs the most settings measured under both; the settings measuring all of them.
    counts = Counter(key for a, _ in per_pair.values() for key in a.index)
    most = max(counts.values(), default=0)
    keys = sorted(key for key, n in counts.items() if n == most)
    ranked = {s: (a, b) for s, (a, b) in per_pair.items() if set(keys) <= set(a.index)}
    if len(ranked) < 3:
        return Check(what, REPORTED, f"{len(ranked)} surrogates measured the same pairs under both (3 give an order)")
    pairs = [(s, float(a[keys].mean()), float(b[keys].mean())) for s, (a, b) in ranked.items()]
    tau = kendall_tau_b([a for _, a, _ in pairs], [b for _, _, b in pairs])

    def order(column: int) -> str:
        return " > ".join(f"{p[0]} {p[column] * 100:.1f}" for p in sorted(pairs, key=lambda p: -p[column]))

    left = f", {len(per_pair) - len(ranked)} measured on other pairs left out" if len(ranked) < len(per_pair) else ""
    over = f"{len(pairs)} surrogates, {len(keys)} target × budget pairs{left}"
    return Check(what, REPORTED, f"Kendall τ = {tau:+.2f} over {over} (PGD: {order(1)}; {where}: {order(2)})")


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking counted as scipy.stats.kendalltau does); nan when
    one side is all ties or a value is nan."""
    if any(math.isnan(v) for v in [*x, *y]):
        return float("nan")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    scale = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / scale if scale else float("nan")
