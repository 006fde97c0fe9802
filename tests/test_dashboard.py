"""`raystudy dashboard`: a search's Optuna history opened in optuna-dashboard, from a local
experiment (live), a copy of the one mirrored into an S3 experiment, or an RDB URL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BUCKET

from raystudy.cluster.dashboard import optuna_storage_url
from raystudy.errors import RaystudyError
from raystudy.persist import storage

optuna = pytest.importorskip("optuna")


def make_history(folder: Path, name: str = "smoke_search", trials: int = 3) -> Path:
    """An experiment folder holding an Optuna history like a search's."""
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{folder / storage.OPTUNA_DB}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("rho", 0.01, 0.5), n_trials=trials)
    return folder


def test_a_local_experiment_is_opened_in_place(tmp_path):
    experiment = make_history(tmp_path / "exp")
    url, what = optuna_storage_url(str(experiment), tmp_path / "cache")
    assert url == f"sqlite:///{experiment / storage.OPTUNA_DB}" and "live" in what
    assert len(optuna.load_study(study_name="smoke_search", storage=url).trials) == 3


def test_an_experiment_without_a_history_is_one_clear_error(tmp_path):
    (tmp_path / "grid").mkdir()
    with pytest.raises(RaystudyError, match="no Optuna history in .*--optuna-storage"):
        optuna_storage_url(str(tmp_path / "grid"), tmp_path / "cache")


def test_an_rdb_url_is_used_as_given_and_its_password_is_not_printed(tmp_path):
    url, what = optuna_storage_url("postgresql://user:hunter2@db.internal/optuna", tmp_path)
    assert url == "postgresql://user:hunter2@db.internal/optuna" and "hunter2" not in what


@pytest.mark.slow
def test_the_history_mirrored_into_an_s3_experiment_is_copied(s3, tmp_path, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    local = make_history(tmp_path / "exp", trials=4) / storage.OPTUNA_DB
    remote = f"s3://{BUCKET}/dashboard/smoke_search"
    storage.write_bytes(f"{remote}/{storage.OPTUNA_DB}", local.read_bytes())
    url, what = optuna_storage_url(remote, tmp_path / "cache")
    assert url.startswith(f"sqlite:///{tmp_path / 'cache'}") and "copy" in what
    assert len(optuna.load_study(study_name="smoke_search", storage=url).trials) == 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_command_serves_the_studys_history(tmp_path):
    pytest.importorskip("optuna_dashboard", reason="the optional extra raystudy[dashboard]")
    experiment = make_history(tmp_path / "exp", trials=5)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "raystudy", "dashboard", str(experiment), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAYSTUDY_CACHE": str(tmp_path / "cache")},
    )
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    studies = json.loads(answer.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "the dashboard did not answer"
        assert [s["study_name"] for s in studies] == ["smoke_search"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}") as answer:
            assert len(json.loads(answer.read())["trials"]) == 5
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/dashboard/" in output


def test_the_command_without_its_extra_names_the_extra(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util as u\n_f = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 'optuna_dashboard' else _f(n, *a)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "raystudy", "dashboard", str(make_history(tmp_path / "exp"))],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(hide)},
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "pip install 'raystudy[dashboard]'" in out.stderr
