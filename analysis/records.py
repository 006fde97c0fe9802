"""Reading Ray Tune experiments offline: no Ray, no cluster, local paths or storage URIs.

An experiment is what `raystudy run/search/targets` wrote: `raystudy-study.json` (the study file,
the evaluation images, the targets) and one folder per trial holding Ray's `params.json` (the
trial's plan), `result.json` (one JSON line per report; the line with `final: 1` carries the
trial's record: identity, plan, versions and metric rows, see raystudy.persist.record) and, if it failed,
`error.txt`. Trials are found by those files and identified by their recorded plan, never by
folder names. Trials written before records are not read (raystudy.persist.migrate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raystudy.config import STUDY_MANIFEST, StudySpec, TrialPlan, parse_space
from raystudy.errors import RaystudyError
from raystudy.persist import storage
from raystudy.persist.record import (
    ADVERSARIAL_DIR,
    ENDPOINT_ROWS_FILE,
    checked_manifest,
    checked_metric_rows,
)

DONE, FAILED, INCOMPLETE, MISSING, STOPPED = "done", "failed", "incomplete", "missing", "stopped early"
TRIAL_FILES = ("params.json", "result.json", "error.txt", ENDPOINT_ROWS_FILE)
READERS = 32  # trials read at once: an object store answers each request in tens of milliseconds
CACHE_FORMAT = 3  # one file per experiment, shared config and record kept once, settled trials marked


@dataclass(frozen=True)
class LoggedTrial:
    experiment: str
    trial_id: str
    config: dict[str, Any]  # the Ray config (grid: {"plan": {...}}; search: the sampled values)
    status: str  # done, failed, stopped early (ASHA), incomplete (no final yet) or missing
    final: dict[str, Any] = field(default_factory=dict)  # the final result (flat metrics for Ray)
    record: dict[str, Any] = field(default_factory=dict)  # the trial's record (raystudy.persist.record); {} unless done
    history: tuple[dict[str, Any], ...] = ()
    error: str = ""
    location: str = ""  # the trial's folder (where its checkpoints are), "" if it never ran
    plan: TrialPlan | None = field(default=None, compare=False)  # set on load: see plan_of


@dataclass(frozen=True)
class Experiment:
    path: str
    name: str
    spec: StudySpec
    record: dict[str, Any]
    trials: tuple[LoggedTrial, ...]


def load_experiment(path: str, cache: Path | None = None) -> Experiment:
    """Read an experiment. Trials are read concurrently, and a finished trial's record is kept in
    `cache` (default: $RAYSTUDY_CACHE/analysis), so a second analysis lists the experiment's
    folders and reads only the trials that are new or may still change."""
    location = storage.normalize(path)
    with ThreadPoolExecutor(1) as pool:
        folders = pool.submit(storage.list_dirs, location)  # on an object store, while the cache is parsed
        study_file = storage.file_entry(storage.join(location, STUDY_MANIFEST))
        if study_file is None:
            raise RaystudyError(
                f"{path} is not a raystudy experiment (no {STUDY_MANIFEST}; pass <storage>/<study name>)"
            )
        where = storage.join(location, STUDY_MANIFEST)
        record = checked_manifest(storage.read_json(where), where)
        spec = parse_space(record["study"], record["source"], record.get("data"))
        kept = _TrialCache(location, cache, study_file)
        # Written since studies record their endpoints: none, so no trial's files can change after it ended.
        no_endpoints = record.get("endpoints") == []
        trials = _read_trials(location, spec.name, kept, folders.result(), no_endpoints)
    trials = [_written_before_records(t) if t.final and not t.record else t for t in trials]
    trials = [_with_plan(spec, t) for t in trials]
    trials += _missing(spec, trials)
    return Experiment(location, spec.name, spec, record, tuple(trials))


def _read_trials(
    location: str, experiment: str, kept: "_TrialCache", folders: list[str], no_endpoints: bool = False
) -> list[LoggedTrial]:
    """Every trial folder (one holding params.json) of the experiment's `folders`, in folder order.
    Settled trials (see _TrialCache) come from the cache; the others' files are listed (each
    folder, or the whole experiment when most are unsettled) and read. In a study without
    endpoints, finished trials are first read without listing them (see _read_finished)."""
    trials: dict[str, LoggedTrial | None] = {f: kept.settled(f) for f in folders}
    unsettled = [f for f, trial in trials.items() if trial is None]
    if no_endpoints and len(unsettled) > READERS:
        trials.update(_read_finished(location, experiment, kept, unsettled))
        unsettled = [f for f, trial in trials.items() if trial is None]
    files = _trial_files(location, unsettled)
    for folder in unsettled:
        if "params.json" not in files.get(folder, {}):
            del trials[folder]  # not a trial's folder (or one Ray has only begun to write)

    def fingerprint(folder: str) -> dict:
        return {name: [e.size, e.mtime_ns] for name, e in sorted(files[folder].items()) if name in TRIAL_FILES}

    def read(folder: str) -> LoggedTrial:
        trial = _read_trial(location, experiment, folder, set(files[folder]))
        if trial.status == DONE:  # a finished trial never changes; others may go on
            # ... except for its endpoint rows, which the query phase may (re)write after it ended.
            kept.put(folder, fingerprint(folder), trial, settled=ADVERSARIAL_DIR not in files[folder])
        return trial

    # Cached trials are read here (local files); only the others go to the pool of storage readers.
    to_read = [f for f, trial in trials.items() if trial is None]
    for folder in to_read:
        trials[folder] = kept.get(folder, fingerprint(folder))
    to_read = [f for f in to_read if trials[f] is None]
    with ThreadPoolExecutor(READERS) as pool:
        trials.update(zip(to_read, pool.map(read, to_read)))
    kept.save()
    return [trials[f] for f in sorted(trials)]


def _read_finished(location: str, experiment: str, kept: "_TrialCache", folders: list[str]) -> dict:
    """The finished trials among `folders`, from their result.json alone, read 32 at a time (one
    request each, no listing: a recursive listing pages 1,000 objects a request, checkpoints
    included). Only for a study without endpoints: nothing is written into a finished trial's
    folder after its final result, so it is settled at once. Other folders map to None."""

    def read(folder: str) -> LoggedTrial | None:
        result = storage.read_bytes(storage.join(location, folder, "result.json"), missing_ok=True)
        if result is None:
            return None  # not a trial, or one that has not reported yet: listed
        trial = _read_trial(location, experiment, folder, {"params.json", "result.json"}, result)
        if trial.status != DONE:
            return None  # its error.txt, if any, is found by listing it
        kept.put(folder, {}, trial, settled=True)  # no fingerprint: settled, and re-checked if made anew
        return trial

    with ThreadPoolExecutor(READERS) as pool:
        return dict(zip(folders, pool.map(read, folders)))


def _trial_files(location: str, folders: list[str]) -> dict[str, dict[str, storage.FileEntry]]:
    """The trial files (and whether images were kept for endpoints) of these folders: each folder
    listed on its own, concurrently, when they are few; else one recursive listing of the whole
    experiment (an object store pages it 1,000 objects a request, checkpoints included)."""
    if len(folders) <= READERS:
        with ThreadPoolExecutor(READERS) as pool:
            listings = pool.map(lambda f: [(f, e) for e in storage.list_tree(storage.join(location, f))], folders)
            entries = [(f, e.path, e) for listing in listings for f, e in listing]
    else:
        wanted = set(folders)
        entries = [(*e.path.partition("/")[::2], e) for e in storage.list_tree(location)]
        entries = [(f, name, e) for f, name, e in entries if f in wanted]
    files: dict[str, dict[str, storage.FileEntry]] = {}
    for folder, name, entry in entries:
        if name in TRIAL_FILES:
            files.setdefault(folder, {})[name] = entry
        elif name.startswith(f"{ADVERSARIAL_DIR}/"):
            files.setdefault(folder, {})[ADVERSARIAL_DIR] = entry
    return files


class _TrialCache:
    """Finished trials' records on this machine: one file per experiment, read once and written back
    when an analysis read finished trials it did not hold.

    A finished trial is settled: its final result is kept in the experiment and a restarted trial
    reports it again unchanged (raystudy.cluster.trainable), so its files are not even listed again, unless
    it kept images for black-box endpoints (the query phase may write its endpoint rows later) or
    the experiment was made anew (its study record changed). Other cached trials are taken when
    their files' sizes and times are unchanged."""

    def __init__(self, location: str, root: Path | None, study_file: storage.FileEntry) -> None:
        if root is None:
            root = Path(os.environ.get("RAYSTUDY_CACHE", Path.home() / ".cache" / "raystudy")).expanduser() / "analysis"
        self.path = root / f"{hashlib.sha1(location.encode()).hexdigest()[:16]}.json"
        self.study = [study_file.size, study_file.mtime_ns]
        self.kept: dict[str, dict] = {}
        self.valid: dict[str, dict] = {}  # entries found valid now (the reader threads put one key each)
        self.new_entries = False
        self.same_experiment = False
        try:
            kept = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if kept.get("format") == CACHE_FORMAT:
            self.kept = kept["trials"]
            self.same_experiment = kept.get("study") == self.study

    def settled(self, folder: str) -> LoggedTrial | None:
        entry = self.kept.get(folder)
        if entry is None or not entry["settled"] or not self.same_experiment:
            return None
        self.valid[folder] = entry
        return _expanded(entry["trial"])

    def get(self, folder: str, fingerprint: dict) -> LoggedTrial | None:
        entry = self.kept.get(folder)
        if entry is None or entry["fingerprint"] != fingerprint:
            return None
        self.valid[folder] = entry
        return _expanded(entry["trial"])

    def put(self, folder: str, fingerprint: dict, trial: LoggedTrial, settled: bool) -> None:
        self.valid[folder] = {"fingerprint": fingerprint, "trial": _compact(trial), "settled": settled}
        self.new_entries = True

    def save(self) -> None:
        """Keep what this analysis found valid, nothing else: an entry for a folder that is gone, or
        one of an experiment made anew, must not answer for a later trial of the same name."""
        if self.valid.keys() == self.kept.keys() and self.same_experiment and not self.new_entries:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "study": self.study, "trials": self.valid}))
            tmp.replace(self.path)
        except OSError:
            pass  # a cache that cannot be written costs a re-read next time, nothing more


# Ray copies the trial's config into every result row, and the final row holds the record: the cache
# keeps each once and puts them back on read (a third of the bytes to parse).
_CONFIG, _RECORD = "<the trial's config>", "<the trial's record>"


def _compact(trial: LoggedTrial) -> dict:
    def shared(row: dict) -> dict:
        out = {k: (_CONFIG if k == "config" and v == trial.config else v) for k, v in row.items()}
        if "record" in out and out["record"] == trial.record:
            out["record"] = _RECORD
        return out

    values = {f.name: getattr(trial, f.name) for f in dataclasses.fields(trial) if f.name != "plan"}
    return {**values, "final": shared(trial.final), "history": [shared(r) for r in trial.history]}


def _expanded(values: dict) -> LoggedTrial:
    def restored(row: dict) -> dict:
        out = dict(row)
        if out.get("config") == _CONFIG:
            out["config"] = values["config"]
        if out.get("record") == _RECORD:
            out["record"] = values["record"]
        return out

    history = tuple(restored(r) for r in values["history"])
    return LoggedTrial(**{**values, "final": restored(values["final"]), "history": history})


def _read_trial(
    location: str, experiment: str, folder: str, present: set[str], result: bytes | None = None
) -> LoggedTrial:
    """The trial in `folder`, whose files are `present`; `result`: its result.json, if already read.
    Files that are not what Ray and raystudy write (storage is not trusted) make a failed trial
    that says so, not a traceback of the whole analysis."""
    try:
        return _parse_trial(location, experiment, folder, present, result)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RaystudyError) as err:
        if isinstance(err, RaystudyError) and str(err).startswith("cannot "):
            raise  # the store is unreachable: not the trial's fault
        why = f"its files cannot be read as a trial's ({type(err).__name__}: {str(err)[:160]})"
        return LoggedTrial(experiment, folder, {}, FAILED, error=why, location=storage.join(location, folder))


def _parse_trial(location: str, experiment: str, folder: str, present: set[str], result: bytes | None) -> LoggedTrial:
    base = storage.join(location, folder)
    rows = []
    if result is None and "result.json" in present:
        result = storage.read_bytes(storage.join(base, "result.json"))
    if result is not None:
        for line in result.decode(errors="replace").splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a line cut by a crash mid-write (or not Ray's)
                if isinstance(row, dict):
                    rows.append(row)
    finals = [r for r in rows if r.get("final") == 1]
    # Ray writes the trial's config into every result row: params.json only for a trial without one
    # (one request less per trial on an object store).
    config = next((r["config"] for r in reversed(rows) if isinstance(r.get("config"), dict)), None)
    if config is None:
        config = storage.read_json(storage.join(base, "params.json"))
    error = ""
    if "error.txt" in present:
        lines = storage.read_bytes(storage.join(base, "error.txt")).decode(errors="replace").strip().splitlines()
        error = lines[-1] if lines else "unknown error"
    stopped = bool(rows) and rows[-1].get("done") is True  # a scheduler (ASHA) ended it before the hook
    status = DONE if finals else FAILED if error else STOPPED if stopped else INCOMPLETE
    trial_id = (rows[-1].get("trial_id") if rows else None) or folder
    # A restored trial may report an epoch again (Ray logs a result before it registers that epoch's
    # checkpoint): the history keeps each epoch once, its last report.
    epochs = {_epoch(r, i): r for i, r in enumerate(rows) if r.get("final") != 1}
    history = tuple(sorted(epochs.values(), key=lambda r: (not isinstance(r.get("epoch"), int), _epoch(r, 0))))
    final = finals[-1] if finals else {}
    record = final.get("record", {})
    if not isinstance(record, dict) or not all(isinstance(record.get(k, {}), dict) for k in _RECORD_MAPPINGS):
        raise ValueError("its final result's record is not a record (a mapping of mappings and metric rows)")
    checked_metric_rows(record.get("metrics", []), storage.join(base, "result.json"))
    if finals and ENDPOINT_ROWS_FILE in present:  # the black-box targets' rows, written after the trial
        where = storage.join(base, ENDPOINT_ROWS_FILE)
        extra = checked_metric_rows(storage.read_json(where), where)
        record = {**record, "metrics": list(record.get("metrics", [])) + extra}
    return LoggedTrial(experiment, str(trial_id), config, status, final, record, history, error, base)


_RECORD_MAPPINGS = ("identity", "plan", "study", "versions")  # a trial record's parts that are mappings


def _epoch(row: dict, index: int):
    """A result row's epoch (a whole number), else its position: what the history is keyed by."""
    epoch = row.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else f"row{index}"


def plan_of(spec: StudySpec, trial: LoggedTrial) -> TrialPlan:
    """The trial's plan: from its record when it finished, else from the config Ray recorded."""
    if trial.plan is not None:
        return trial.plan
    if trial.record:
        return TrialPlan.from_dict(trial.record["plan"])
    return spec.plan_from_ray(trial.config)


def _with_plan(spec: StudySpec, trial: LoggedTrial) -> LoggedTrial:
    """The trial with its plan read once (every table asks for it). One that cannot be read is left
    to plan_of, which raises where a table needs that plan, as it did before plans were kept."""
    try:
        return dataclasses.replace(trial, plan=plan_of(spec, trial))
    except (RaystudyError, KeyError, TypeError, ValueError, AttributeError):
        return trial


def _written_before_records(trial: LoggedTrial) -> LoggedTrial:
    """A finished trial without a record was written before records (before raystudy 0.1.0's
    release format): no longer read (raystudy.persist.migrate), shown as failed with the reason."""
    reason = "its final result holds no trial record (written before raystudy 0.1.0): not read"
    return dataclasses.replace(trial, status=FAILED, error=reason)


def _missing(spec: StudySpec, trials: list[LoggedTrial]) -> list[LoggedTrial]:
    """Grid points the study defines but no trial folder holds (a study stopped before starting them)."""
    if spec.kind == "search":
        return []
    seen = {t.plan for t in trials if t.plan is not None}  # plans compare as their keys do: not where the data is
    return [
        LoggedTrial(spec.name, f"missing-{i}", {"plan": plan.to_dict()}, MISSING, plan=plan)
        for i, plan in enumerate(spec.plans)
        if plan not in seen
    ]
