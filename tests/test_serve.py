"""`raystudy serve` for real (Ray Serve on 127.0.0.1) as the black-box target of a study: the query
phase at the end of `raystudy run` gets through injected 429s and 500s, the endpoint's ASR equals
the white-box hook's for the same model, the service killed mid-query leaves a one-line failure,
and `raystudy resume` finishes without any image asked twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import RAYSTUDY
from world import write_experiment

from raystudy.blackbox.query import load_endpoints
from raystudy.persist.record import ENDPOINT_ROWS_FILE

pytestmark = pytest.mark.slow
SERVE_READY_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(model: Path, port: int, log: Path, *faults: str) -> subprocess.Popen:
    errors = log.with_name(log.name + ".stderr")  # what the test shows if the service never answers
    with open(errors, "ab") as stderr:
        service = subprocess.Popen(
            RAYSTUDY
            + ["serve", str(model), "--port", str(port), "--top-k", "1", "--labels-only", "--request-log", str(log)]
            + list(faults),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.time() + SERVE_READY_S
    while time.time() < deadline and service.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                import requests

                if requests.post(f"http://127.0.0.1:{port}/", data=b"", timeout=30).status_code == 400:
                    return service
        except OSError:
            pass
        time.sleep(1)
    stop(service)
    raise AssertionError(f"raystudy serve did not answer in time: {errors.read_text()[-2000:]}")


def stop(service: subprocess.Popen) -> None:
    """Kill the service and every process of its session, and wait until they are gone: Ray gives its
    workers (the HTTP proxy, the replica) process groups of their own, which outlive the service's by
    seconds on a busy machine, the proxy holding the port a service started next would listen on."""
    try:
        os.killpg(service.pid, signal.SIGKILL)
    except ProcessLookupError:  # stopped already
        pass
    service.wait()
    deadline = time.time() + 120
    while left := session_processes(service.pid):
        assert time.time() < deadline, f"processes of the killed service still running: {left}"
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of a session, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(sid) == session and state != "Z":
            found.append(int(stat.parent.name))
    return found


def run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(RAYSTUDY + [str(a) for a in args], capture_output=True, text=True, timeout=900, env=env)


def test_a_served_target_behind_faults_killed_and_resumed(tmp_path):
    port = free_port()
    storage = tmp_path / "s"
    base = {"dataset": "synthetic", "model": "tiny_cnn", "preset": "faithful", "max_failures": 0}
    base["train"] = {"epochs": 2, "batch_size": 32, "lr": 0.05, "n_train": 512, "n_test": 128, "image_size": 16}
    endpoint = {"name": "served", "url": f"http://127.0.0.1:{port}/", "top_k": 1, "rate": 200, "retries": 5}
    # Long enough for a loaded machine: a request the client gives up on while the replica still
    # answers it is asked again, and the log (rightly) shows that image twice.
    endpoint["timeout_s"] = 300
    targets = {
        **base,
        "name": "bb_targets",
        "kind": "targets",
        "trials": [{"model": "tiny_cnn"}, {"endpoint": endpoint}],
    }
    grid = {**base, "name": "bb", "targets": "bb_targets", "trials": [{"mechanism": "ST"}]}
    grid["evaluation"] = {"n_eval": 32, "budgets": [8], "smoothness_samples": 8, "steps": 5}
    for name, space in (("targets", targets), ("grid", grid)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(space))
    # The targets written without Ray (tests/world.py): the served model and the endpoint beside it.
    write_experiment(targets, storage, source=str(tmp_path / "targets.yaml"))  # where the query phase reads it
    model = storage / "bb_targets" / "targets" / "tiny_cnn.pt"
    assert model.is_file() and [e.name for e in load_endpoints(str(model.parent))] == ["served"]
    log = tmp_path / "answered.log"
    service = start_service(model, port, log, "--burst-429", "10:2", "--every-500", "13")
    try:
        out = run("run", tmp_path / "grid.yaml", "--storage", storage, "--num-cpus", 2)
    finally:
        stop(service)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trial = next((storage / "bb").glob("trial_*"))
    rows = {tuple(r.get(k) for k in ("name", "mode", "target")): r["value"] for r in _record(trial)["metrics"]}
    endpoint_rows = json.loads((trial / ENDPOINT_ROWS_FILE).read_text())
    support = rows[("support", None, "tiny_cnn")]
    for r in endpoint_rows:
        # The served model is the white-box target: the same success, image by image, except where
        # the replica's one-image forward pass (its own thread count, its own kernels) and the hook's
        # batched one round a near-tie of the top two logits apart: at most one image either way.
        if r["name"] == "asr":
            assert abs(r["value"] - rows[("asr", r["mode"], "tiny_cnn")]) <= 1 / support + 1e-9
    answered = log.read_text().split()
    assert len(answered) == len(set(answered)) == 32 * 3  # clean + untargeted + targeted, 8/255

    from analysis import headline_table, load_experiment, tidy_trials  # the endpoint is a column like any target

    table = headline_table(tidy_trials([load_experiment(str(storage / "bb"), cache=tmp_path / "c")]), "untargeted")
    assert {t for t, _ in table.columns} == {"tiny_cnn", "served", "mean"}
    served, white = (float(table.loc["ST", (t, "8/255")].split()[0]) for t in ("served", "tiny_cnn"))
    assert abs(served - white) <= 100 / support + 1e-6

    # Killed mid-query: the same kept images asked again from scratch (answers and rows removed, no
    # second training run); the query phase fails in one line and keeps its answers, and `resume`
    # (its trials done) runs the query phase only and asks no image twice.
    shutil.rmtree(storage / "bb" / "endpoint-cache")
    (trial / ENDPOINT_ROWS_FILE).unlink()
    log.unlink()
    service = start_service(model, port, log, "--down-after", "40")
    driver = subprocess.Popen(
        RAYSTUDY + ["query", str(storage / "bb")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 900  # on a machine that may be busy
        while not log.exists() or len(log.read_text().split()) < 40:  # then it answers 503 only
            assert driver.poll() is None, driver.communicate()
            assert time.time() < deadline, "the query phase did not reach 40 answers"
            time.sleep(0.5)
        stop(service)  # killed while the query phase retries
        stdout, stderr = driver.communicate(timeout=900)
    finally:
        driver.kill()  # all three only if still running
        driver.wait()
        stop(service)
    assert driver.returncode != 0 and "Traceback" not in stderr
    assert "endpoint 'served'" in stderr and "answers so far are kept" in stderr, stderr[-2000:]
    before = log.read_text().split()
    service = start_service(model, port, log)
    try:
        out = run("resume", storage / "bb", "--num-cpus", 2)
    finally:
        stop(service)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    answered = log.read_text().split()
    assert len(before) == 40 and len(answered) == len(set(answered)) == 32 * 3
    assert json.loads((trial / ENDPOINT_ROWS_FILE).read_text()) == endpoint_rows  # the same answers, the same rows


def _record(trial: Path) -> dict:
    lines = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
    return next(line["record"] for line in reversed(lines) if line.get("final") == 1)
