"""A remote search's Optuna history: an append-only journal mirrored in segments, so its durable
copy costs the journal's size in bytes, not that size times the number of writes."""

from __future__ import annotations

import pickle

import pytest

optuna = pytest.importorskip("optuna")

from raystudy.persist import optuna_history  # noqa: E402
from raystudy.persist.optuna_history import JournalMirror, fetch_journal, journal_storage, open_history  # noqa: E402


def search(journal: str, trials: int, after_each=lambda: None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="s", storage=journal_storage(journal), sampler=optuna.samplers.TPESampler(seed=0)
    )
    for _ in range(trials):
        trial = study.ask()
        after_each()  # the searcher uploads after a suggestion...
        study.tell(trial, trial.suggest_float("rho", 0.01, 0.5, log=True))
        after_each()  # ...and after a completion
    return study


def test_every_write_mirrored_costs_the_journals_size_in_all(tmp_path):
    local, remote = str(tmp_path / "journal.log"), str(tmp_path / "experiment" / "optuna-journal")
    mirror = JournalMirror(local, remote, interval=0)
    uploaded = []
    study = search(local, 40, lambda: uploaded.append(mirror.sync()))
    size = (tmp_path / "journal.log").stat().st_size
    assert sum(uploaded) == size  # O(trials) bytes, where copying the whole file each time is O(trials^2)
    copy = str(tmp_path / "copy.log")
    assert fetch_journal(remote, copy) == size
    again = optuna.load_study(study_name="s", storage=journal_storage(copy))
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
    assert [t.value for t in again.trials] == [t.value for t in study.trials]


def test_uploads_are_batched_by_time_and_forced_at_the_end(tmp_path, monkeypatch):
    from types import SimpleNamespace

    clock = iter(range(0, 10_000, 1))  # one second per look at the clock: about one per write
    monkeypatch.setattr(optuna_history, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    local, remote = str(tmp_path / "journal.log"), str(tmp_path / "remote")
    mirror = JournalMirror(local, remote, interval=10)
    search(local, 20, mirror.sync)
    segments = sorted(p.name for p in (tmp_path / "remote").iterdir())
    assert 3 <= len(segments) <= 5  # 40 writes, one upload per 10 s
    mirror.sync(force=True)
    assert fetch_journal(remote, str(tmp_path / "copy.log")) == (tmp_path / "journal.log").stat().st_size


def test_overlapping_segments_add_only_their_new_bytes_and_a_gap_ends_the_journal(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "000000000000000.log").write_bytes(b"abcdef")
    (remote / "000000000000004.log").write_bytes(b"efgh")  # re-uploaded from offset 4 after a restore
    (remote / "000000000000020.log").write_bytes(b"zz")  # a segment after a lost one
    assert fetch_journal(str(remote), str(tmp_path / "j.log")) == 8
    assert (tmp_path / "j.log").read_bytes() == b"abcdefgh"


def test_open_history_reads_a_local_database_in_place_and_a_remote_journal_by_copy(tmp_path, monkeypatch):
    assert open_history(str(tmp_path / "nothing")) is None
    local_experiment = tmp_path / "local"
    local_experiment.mkdir()
    optuna.create_study(study_name="s", storage=f"sqlite:///{local_experiment / 'optuna.db'}")
    url, what = open_history(str(local_experiment))
    assert url == f"sqlite:///{local_experiment / 'optuna.db'}" and "live" in what
    # A remote experiment: its journal segments, fetched to this machine's cache.
    monkeypatch.setattr(optuna_history.storage, "is_uri", lambda location: "remote" in str(location))
    remote = tmp_path / "remote_exp"
    search(str(tmp_path / "j.log"), 5)
    JournalMirror(str(tmp_path / "j.log"), str(remote / "optuna-journal")).sync(force=True)
    history, what = open_history(str(remote), cache=tmp_path / "cache")
    assert "copy" in what and len(optuna.load_study(study_name="s", storage=history).trials) == 5


def test_what_the_segments_hold_ignores_unfinished_uploads(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "000000000000000.log").write_bytes(b"abc")
    (remote / "000000000000003.log").write_bytes(b"defg")
    (remote / "000000000000007.log.tmp123").write_bytes(b"half")  # a write cut by a lost driver
    assert optuna_history.uploaded_bytes(str(remote)) == 7


def _orphan_search(tmp_path):
    from raystudy.cluster.experiment import Experiment, history_of
    from raystudy.config import parse_space

    experiment = tmp_path / "orphan"
    experiment.mkdir()
    space = {"name": "orphan", "kind": "search", "targets": "t", "search": {"mechanism": "SAM", "num_samples": 3}}
    space["search"]["params"] = {"rho": {"low": 0.01, "high": 0.5}}
    return history_of(Experiment(parse_space(space, "orphan.yaml"), space, str(experiment), {}))


def _ray_result(rho: float, final: bool, value: float = 0.5, error=None, stopped=False):
    from types import SimpleNamespace

    metrics = {"final": 1, "asr/pgd/untargeted/8/mean": value} if final else {"final": 0, "epoch": 1}
    if stopped:
        metrics["done"] = True
    return SimpleNamespace(config={"rho": rho}, metrics=metrics, error=error)


def test_the_history_agrees_with_rays_results_when_a_tune_phase_ends(tmp_path):
    from raystudy.cluster.searcher import reconcile

    searcher = _orphan_search(tmp_path)
    searcher.start()
    study = searcher.study
    study.tell(study.ask({"rho": optuna.distributions.FloatDistribution(0.01, 0.5)}), 0.9)

    def asked() -> float:
        return study.ask().suggest_float("rho", 0.01, 0.5)

    asked()  # asked, then the driver was lost before Ray recorded the trial: failed
    held, finished, errored, stopped = asked(), asked(), asked(), asked()
    results = [
        _ray_result(held, final=False),  # Ray holds it, unfinished: a resume goes on with it
        _ray_result(finished, final=True, value=0.6),  # told after the last upload: its values now
        _ray_result(errored, final=False, error=RuntimeError("x")),
        _ray_result(stopped, final=False, stopped=True),  # stopped by ASHA
        _ray_result(0.25, final=True, value=0.7),  # a finished trial the history lacks: added back
    ]
    reconcile(searcher, results, "final")
    trials = optuna.load_study(study_name="orphan", storage=f"sqlite:///{tmp_path / 'orphan' / 'optuna.db'}").trials
    expected = ["COMPLETE", "FAIL", "RUNNING", "COMPLETE", "FAIL", "PRUNED", "COMPLETE"]
    assert [t.state.name for t in trials] == expected
    assert trials[3].values == [0.6] and trials[6].params == {"rho": 0.25} and trials[6].values == [0.7]
    reconcile(searcher, results, "final")  # told once: a second reconcile changes nothing
    assert [t.state.name for t in searcher.study.get_trials(deepcopy=False)] == expected


def test_a_reopened_history_does_not_draw_its_first_values_again(tmp_path):
    searcher = _orphan_search(tmp_path)
    searcher.start()
    first = [searcher.suggest(str(i))["rho"] for i in range(3)]
    again = pickle.loads(pickle.dumps(searcher))  # a resumed driver: the history reopened from storage
    assert again.suggest("3")["rho"] not in first


def test_a_journal_this_machine_extended_is_kept_and_its_tail_uploaded(tmp_path):
    from raystudy.persist.optuna_history import resume_journal

    remote, local = tmp_path / "segments", tmp_path / "local.log"
    remote.mkdir()
    (remote / "000000000000000.log").write_bytes(b"line1\n")
    local.write_bytes(b"line1\nline2\n")  # the driver's last write, not uploaded before the phase ended
    assert resume_journal(str(remote), str(local)) == 6 and local.read_bytes() == b"line1\nline2\n"
    mirror = JournalMirror(str(local), str(remote), uploaded=6)
    assert mirror.sync(force=True) == 6 and fetch_journal(str(remote), str(tmp_path / "again.log")) == 12
    local.write_bytes(b"other\n")  # another experiment's journal once had this URI: replaced
    assert resume_journal(str(remote), str(local)) == 12 and local.read_bytes() == b"line1\nline2\n"
