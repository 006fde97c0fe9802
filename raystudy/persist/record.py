"""A trial's record: who the trial is, how it was trained, with which versions, and what it measured.

The trainable reports one record with its final result (`result["record"]`); the analysis builds
every table from these records alone. A metric is a row with its dimensions, so nothing
downstream takes a metric's name apart:

    MetricRow("asr", 0.42, attack="pgd", mode="untargeted", budget=8, target="vgg16")
    MetricRow("smoothness", 3.1, statistic="mean")
    MetricRow("test_acc", 0.91)

`MetricRow.key` is the flat name Ray's progress table, ASHA and Optuna use
(`asr/pgd/untargeted/8/vgg16`, `smoothness/mean`, `test_acc`). No torch and no Ray here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from raystudy.errors import RaystudyError

RECORD_FORMAT = "raystudy-trial/1"
FINAL_FILE = "raystudy-final.json"  # a trial's final result, kept in its folder of the experiment
ENDPOINT_ROWS_FILE = "raystudy-endpoint-rows.json"  # its black-box targets' rows (raystudy.blackbox.query), beside it
ADVERSARIAL_DIR = "adversarial"  # the images its hook kept for the endpoints (raystudy.blackbox.query), beside it
DIMENSIONS = ("attack", "mode", "budget", "statistic", "target")
TARGETS_DIR = "targets"  # <storage>/<targets study>/targets/<name>.pt (and <name>.endpoint.json)


def targets_location(storage_path: str, targets_study: str) -> str:
    """Where a targets study keeps its trained targets and endpoint specs."""
    from raystudy.persist import storage

    return storage.join(storage_path, targets_study, TARGETS_DIR)


@dataclass(frozen=True)
class MetricRow:
    name: str  # acc, smoothness, similarity, similarity_min, asr, asr_all, support, fooling, seconds, test_acc...
    value: float
    attack: str | None = None  # pgd, mi, di, dim, autoattack
    mode: str | None = None  # untargeted, targeted
    budget: int | None = None  # L-inf budget in 1/255
    statistic: str | None = None  # smoothness: mean | max; seconds: which part of the hook
    target: str | None = None  # a target's name, or "mean" over the targets

    @property
    def key(self) -> str:
        return metric_key(self.name, self.attack, self.mode, self.budget, self.statistic, self.target)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "value"}


def metric_key(name: str, attack=None, mode=None, budget=None, statistic=None, target=None) -> str:
    """A row's flat name (`MetricRow.key`), from its fields: also for rows read as plain dicts."""
    parts = [name]
    if attack is not None:
        parts += [attack, mode, str(budget)]
    parts += [p for p in (statistic, target) if p is not None]
    return "/".join(parts)


def flat(rows: Iterable[MetricRow]) -> dict[str, float]:
    return {row.key: row.value for row in rows}


# Target names reserved for rows aggregated over targets: every target, the search's objective
# targets, and the targets held out from it.
AGGREGATE_TARGETS = ("mean", "objective", "held_out")
# The input-transformation defenses a target can be measured behind (raystudy.config.defense): its
# rows name it `<target>+<defense>`, e.g. `resnet50+jpeg:75` or `vgg16+bits:4+median:3`.
DEFENSE_KINDS = ("jpeg", "bits", "median", "resize_pad")


def is_defended(target: str | None) -> bool:
    """Whether a row's target is a target behind a defense: another column of that target, never
    averaged with the targets as they are."""
    return defended_parts(target) is not None


def defended_parts(target: str | None) -> tuple[str, str] | None:
    """(the target, the defense) of `<target>+<defense>`: the defense is the longest tail of
    `+`-separated steps that are all defenses' (`resnet50+augmix+jpeg:75` is resnet50+augmix behind
    jpeg:75); None for a target as it is. A target or endpoint whose own name would read as defended
    is refused when the study file is read (raystudy.config.study)."""
    if not isinstance(target, str) or "+" not in target:
        return None
    parts = target.split("+")
    for i in range(1, len(parts)):
        if all(step.split(":", 1)[0] in DEFENSE_KINDS for step in parts[i:]) and parts[i - 1]:
            return "+".join(parts[:i]), "+".join(parts[i:])
    return None


def objective_rows(rows: Iterable[MetricRow], metric: str, objective_targets: Iterable[str]) -> list[MetricRow]:
    """For a search metric averaged over targets (e.g. asr/pgd/untargeted/8/mean): the same metric
    averaged over the objective targets only (target 'objective') and over the others ('held_out')."""
    name, attack, mode, budget, _ = metric.split("/")
    family = [
        r
        for r in rows
        if (r.name, r.attack, r.mode, str(r.budget)) == (name, attack, mode, budget)
        and r.target not in AGGREGATE_TARGETS
        and not is_defended(r.target)  # a target behind a defense is another column, not another target
    ]
    chosen = set(objective_targets)
    out = []
    for label, members in (
        ("objective", [r for r in family if r.target in chosen]),
        ("held_out", [r for r in family if r.target not in chosen]),
    ):
        if members:
            value = sum(r.value for r in members) / len(members)
            out.append(MetricRow(name, value, attack, mode, int(budget), target=label))
    return out


def training_rows(epoch_record: Mapping[str, Any]) -> list[MetricRow]:
    """The last epoch's numbers (loss and its parts, accuracies, speed) as rows without dimensions."""
    return [
        MetricRow(name, float(value))
        for name, value in epoch_record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def make_record(
    identity: Mapping[str, Any],
    plan: Mapping[str, Any],
    study: Mapping[str, Any],
    versions: Mapping[str, str],
    rows: Iterable[MetricRow],
) -> dict[str, Any]:
    """The record the trainable reports: plain nested JSON."""
    return {
        "format": RECORD_FORMAT,
        "identity": dict(identity),
        "plan": dict(plan),
        "study": dict(study),
        "versions": dict(versions),
        "metrics": [row.to_dict() for row in rows],
    }


def rows_of(record: Mapping[str, Any]) -> list[MetricRow]:
    return [MetricRow(**row) for row in record.get("metrics", [])]


def checked_manifest(manifest: Any, location: str) -> dict[str, Any]:
    """A study manifest (`raystudy-study.json`) read back from storage: the shape checked here, the
    study it holds by parse_space as any study file is."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("study"), dict):
        raise RaystudyError(f"{location}: not a study manifest (a JSON object holding the study it ran)")
    for key in ("source", "data", "storage", "format", "optuna_storage"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise RaystudyError(f"{location}: its {key} must be text")
    for key in ("targets", "endpoints", "phases_done"):  # names of targets, endpoints, phases
        if manifest.get(key) is not None and not _is_list_of(manifest[key], str):
            raise RaystudyError(f"{location}: its {key} must be a list of names")
    for key in ("eval_indices", "eval_target_classes"):  # the evaluation set: image and class indices
        value = manifest.get(key)
        if value is not None and not (_is_list_of(value, int) and all(0 <= i < 1 << 31 for i in value)):
            raise RaystudyError(f"{location}: its {key} must be a list of non-negative whole numbers")
    if manifest.get("warm_start") is not None:
        _check_warm_start(manifest["warm_start"], location)
    return {**manifest, "source": manifest.get("source") or location, "data": manifest.get("data")}


def _check_warm_start(entry: Any, location: str) -> None:
    """A search manifest's `warm_start` (raystudy.cluster.warm_start): per earlier experiment its
    counts; per trial kept its experiment, id, searched values and finite objective values."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RaystudyError(f"{location}: its warm_start is not one ({what})")

    need(isinstance(entry, dict), "a mapping")
    sources, trials = entry.get("sources", []), entry.get("trials", [])
    need(isinstance(sources, list) and isinstance(trials, list), "sources and trials must be lists")
    for source in sources:
        need(isinstance(source, dict) and isinstance(source.get("experiment"), str), "a source's experiment")
        need(all(_is_count(source.get(k)) for k in ("trials", "added")), "a source's counts")
        skipped = source.get("skipped", {})
        need(
            isinstance(skipped, dict) and all(isinstance(k, str) and _is_count(v) for k, v in skipped.items()),
            "skipped",
        )
    for trial in trials:
        need(
            isinstance(trial, dict) and _is_list_of([trial.get("experiment"), trial.get("trial_id")], str),
            "a trial's name",
        )
        params = trial.get("params")
        need(
            isinstance(params, dict) and all(isinstance(v, str) or finite_number(v) for v in params.values()),
            "a trial's params",
        )
        values = trial.get("values")
        need(
            isinstance(values, list) and bool(values) and all(map(finite_number, values)),
            "a trial's values",
        )


def checked_metric_rows(rows: Any, location: str) -> list[dict[str, Any]]:
    """Metric rows (`MetricRow.to_dict()`s) read back from storage: each a mapping whose name and
    dimensions are text (a budget a whole number) and whose value is a number, so the tables and
    findings built from them meet no other shape."""
    if not isinstance(rows, list):
        raise RaystudyError(f"{location}: its metric rows are not a list")
    for row in rows:
        fine = (
            isinstance(row, dict)
            and set(row) <= {"name", "value", *DIMENSIONS}
            and isinstance(row.get("name"), str)
            and (_is_number(row.get("value")) and (isinstance(row["value"], float) or finite_number(row["value"])))
            and all(row.get(d) is None or isinstance(row[d], str) for d in DIMENSIONS if d != "budget")
            and (row.get("budget") is None or (isinstance(row["budget"], int) and not isinstance(row["budget"], bool)))
        )
        if not fine:
            raise RaystudyError(f"{location}: a metric row is not one ({str(row)[:120]})")
    return rows


def checked_best_config(best: Any, location: str) -> dict[str, Any]:
    """`best_config.json` of a search read back from storage: the fields the report and confirm
    read, each of the type they read it as."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RaystudyError(f"{location}: not a search's best configuration ({what})")

    need(isinstance(best, dict), "a JSON object")
    names = {"metrics", "modes", "selected_on", "tested_on"}
    for key in names & set(best):
        need(_is_list_of(best[key], str), f"{key} must be a list of names")
    for key in {"metric", "held_out_metric"} & set(best):
        need(isinstance(best[key], str), f"{key} must be a metric name")
    for key in {"value", "held_out_value"} & set(best):
        need(best[key] is None or _is_number(best[key]), f"{key} must be a number")
    need(isinstance(best.get("config", {}), dict), "config must be a mapping")
    if "pareto_front" in best:
        front = best["pareto_front"]
        need(isinstance(front, list) and isinstance(best.get("metrics"), list), "pareto_front needs metrics")
        for entry in front:
            need(isinstance(entry, dict) and isinstance(entry.get("config"), dict), "a front entry's config")
            values = entry.get("values")
            need(_is_list_of(values, (int, float)) and len(values) == len(best["metrics"]), "a front entry's values")
            held = entry.get("held_out_value")
            need(held is None or _is_number(held), "a front entry's held_out_value")
    confirmed = best.get("confirmed")
    if confirmed is not None:
        need(isinstance(confirmed, dict), "confirmed must be a mapping")
        need(isinstance(confirmed.get("experiment"), str), "confirmed's experiment")
        need(_is_list_of(confirmed.get("seeds"), int), "confirmed's seeds")
        need(isinstance(confirmed.get("rows"), list), "confirmed's rows")
        for row in confirmed["rows"]:
            need(isinstance(row, dict), "a confirmed row")
            for key in ("role", "label", "objective_metric"):
                need(isinstance(row.get(key), str), f"a confirmed row's {key}")
            seeds = row.get("seeds")
            need(isinstance(seeds, int) and not isinstance(seeds, bool), "a confirmed row's seeds (a count)")
            need(isinstance(row.get("magnitudes", {}), dict), "a confirmed row's magnitudes")
            for key, value in row.items():
                if key.endswith(("_mean", "_std")):
                    need(value is None or _is_number(value), f"a confirmed row's {key}")
            need(isinstance(row.get("held_out_metric", ""), str), "a confirmed row's held_out_metric")
    return best


def finite_number(value: Any) -> bool:
    """A number a float holds, not infinite or NaN (JSON's integers have no bound: 1e400 as digits)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list_of(value: Any, kind) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
