"""Shared fixtures: tiny synthetic data and models, CPU only, a private cache folder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

# No network here: hub look-ups fail at once instead of retrying (read when huggingface_hub imports).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


MAX_WORKERS = 4  # test processes (pytest-xdist's `-n auto`, pyproject's addopts): each may start a Ray


def pytest_xdist_auto_num_workers(config):
    """One test process per core, at most MAX_WORKERS: every Ray end-to-end test starts Ray processes
    of its own, and more of them at once than cores only makes each slower."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):  # pytest-xdist's own override
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(usable_cores(), MAX_WORKERS))


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The files of the longest Ray end-to-end tests, longest first (about 100 s down to 40 s each on 2
# busy cores): they start first, so the test processes end together on quick tests.
LONGEST_FIRST = (
    "test_serve.py",
    "test_calibration.py",
    "test_autoscaling.py",
    "test_search_confirm.py",
    "test_outage.py",
    "test_local_ray.py",
    "test_cloud.py",
    "test_study.py",
    "test_cluster.py",
)


def pytest_collection_modifyitems(config, items):
    """Longest first (LONGEST_FIRST, then the other Ray end-to-end tests, marked slow, then the quick
    ones): pytest-xdist's worksteal hands each process the next test from the front of its queue and
    lets an idle one take from the back, so the last tests to start are the quick ones."""

    def rank(item) -> tuple[int, int]:
        if item.get_closest_marker("slow") is None:
            return (2, 0)
        name = item.path.name
        return (0, LONGEST_FIRST.index(name)) if name in LONGEST_FIRST else (1, 0)

    items.sort(key=rank)


def torch_threads() -> int:
    """The cores per test process: torch's threads spin while they wait, so more threads than cores
    (two test processes of two threads each on two cores) slows every test down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, usable_cores() // workers))


@pytest.fixture(scope="session", autouse=True)
def _own_home(tmp_path_factory):
    """A HOME of this test process's own: Ray 2.60 keeps a local cluster's token in ~/.ray, and two
    test processes starting local Rays at once must not write one another's token (nor the user's)."""
    home = tmp_path_factory.mktemp("home")
    previous = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = previous


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Every test writes decoded data into a throw-away cache, never the user's.
    monkeypatch.setenv("RAYSTUDY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("RAYSTUDY_DATA", raising=False)
    torch.set_num_threads(torch_threads())


@pytest.fixture
def synthetic():
    from raystudy.core.data import make_synthetic

    return make_synthetic(n_train=256, n_test=128, num_classes=4, image_size=16, seed=0)


ROOT = Path(__file__).resolve().parents[1]
RAYSTUDY = [sys.executable, "-m", "raystudy"]
# The smoke study (search_spaces/smoke.yaml): the tiny study most Ray tests vary; never modified in place.
SMOKE = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())


def run_raystudy(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """The `raystudy` command in a subprocess, its output captured (`kwargs`: subprocess.run's)."""
    return subprocess.run(RAYSTUDY + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def raystudy_here(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `raystudy` command run in this process, for commands that refuse or finish before any Ray
    or training starts: the same exit status and output as `run_raystudy`, without the 3 s a new
    interpreter spends importing torch. `env` is added to the environment and `cwd` entered for the
    call; both are restored after it, with whatever the command set (Ray's loopback setting)."""
    import contextlib
    import io

    from raystudy.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit:  # argparse's errors and --help
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["raystudy", *map(str, args)], code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def smoke_storage(tmp_path_factory):
    """A storage path holding the smoke targets and the smoke study (search_spaces/smoke_targets.yaml,
    smoke.yaml) as `raystudy targets` and `raystudy run` write them, written once per session in
    this process without Ray (tests/world.py: each trial through the function Ray's trainable
    wraps). Later tests add their experiments beside them. The smoke study through the command
    line and Ray is test_study's."""
    from world import write_experiment

    cache = tmp_path_factory.getbasetemp() / "cache"
    os.environ["RAYSTUDY_CACHE"] = str(cache)
    root = tmp_path_factory.mktemp("storage")
    write_experiment(yaml.safe_load((ROOT / "search_spaces" / "smoke_targets.yaml").read_text()), root)
    write_experiment(SMOKE, root)
    return root


# A grid a warm-started search starts from (tests/test_warm_start.py, test_study's search): SAM&JR at
# two radii inside smoke_search's ranges and ST outside them, trained and measured as smoke_search is.
WARM_GRID_RADII = (0.05, 0.2)


@pytest.fixture(scope="session")
def warm_grid(smoke_storage) -> Path:
    """The grid above, written once per test process beside the smoke study (tests/world.py)."""
    from world import write_experiment

    space = smoke_search("warm_grid")
    space.pop("search")
    space.update(
        kind="grid", trials=[{"mechanism": "SAM&JR", "magnitudes": {"rho": list(WARM_GRID_RADII)}}, {"mechanism": "ST"}]
    )
    return write_experiment(space, smoke_storage)


def final_rows(experiment: Path) -> dict[str, list[dict]]:
    """Per trial folder of a local experiment, the results that carry the hook's metrics (final == 1)."""
    import json

    out = {}
    for path in experiment.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [r for r in rows if r.get("final") == 1]
    return out


def finished_once(final_rows: list[dict]) -> bool:
    """A trial finished, and was not run again: Ray may log a restarted trial's final result twice
    (it records trial ends with a delay, so a trial that finished just before its driver died is
    restarted), but the trial then reports its kept result, the same record, not a new one."""
    return bool(final_rows) and all(r["record"] == final_rows[0]["record"] for r in final_rows)


BUCKET = "studies"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 endpoint with an empty bucket; yields the environment a user would set."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "RAYSTUDY_S3_ENDPOINT": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    import boto3

    boto3.client(
        "s3",
        endpoint_url=env["RAYSTUDY_S3_ENDPOINT"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def raystudy_in_env(env: dict, *args, cwd: Path, home: Path, timeout=600) -> subprocess.CompletedProcess:
    """The `raystudy` command as a user of the S3 endpoint runs it: `env` on top of this process's,
    its own HOME and working folder."""
    home.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, **env, "HOME": str(home)}
    full.pop("AWS_ENDPOINT_URL", None)  # only RAYSTUDY_S3_ENDPOINT points at the server
    try:
        return subprocess.run(
            RAYSTUDY + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full
        )
    except subprocess.TimeoutExpired as err:  # say where it stood: the tails, not pytest's cut repr
        pytest.fail(f"raystudy {' '.join(map(str, args))} ran past {timeout} s:\n{_tails(err)}")


def _tails(err: subprocess.TimeoutExpired, chars: int = 6000) -> str:
    def text(value) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) else value or ""

    return f"--- stdout (end) ---\n{text(err.stdout)[-chars:]}\n--- stderr (end) ---\n{text(err.stderr)[-chars:]}"


def _client(env: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["RAYSTUDY_S3_ENDPOINT"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def put_smoke_targets(env: dict, smoke_storage: Path, prefix: str) -> None:
    """The session's trained smoke targets, copied to s3://studies/<prefix>/smoke_targets/targets/
    (where a study on that storage finds them): tests of the cloud path that are not about
    training targets there do not train them again (test_cloud does)."""
    client = _client(env)
    for path in (smoke_storage / "smoke_targets" / "targets").iterdir():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/smoke_targets/targets/{path.name}", Body=path.read_bytes())


def bucket_keys(env: dict, prefix: str) -> list[str]:
    """The names of the objects under s3://studies/<prefix>."""
    pages = _client(env).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def bucket_files(env: dict, prefix: str, suffix: str = "", where=None) -> dict[str, bytes]:
    """The objects under s3://studies/<prefix> (ending in `suffix`, with a name `where` accepts),
    read through the same S3 API; one deleted between listing and reading (Ray drops old
    checkpoints) is left out."""
    client = _client(env)
    out = {}
    for key in bucket_keys(env, prefix):
        if not key.endswith(suffix) or (where is not None and not where(key)):
            continue
        try:
            out[key] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            continue
    return out


def put_in_bucket(env: dict, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        _client(env).put_object(Bucket=BUCKET, Key=key, Body=body)


def finals_in_bucket(env: dict, experiment: str) -> dict[str, list[dict]]:
    """Per trial folder of an experiment in the bucket, the results that carry the hook's metrics."""
    import json

    finals = {}
    for key, body in bucket_files(env, experiment + "/", "/result.json").items():
        rows = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        finals[key.split("/")[-2]] = [r for r in rows if r.get("final") == 1]
    return finals


def smoke_search(name: str, epochs: int = 2, **search) -> dict:
    """The smoke search (search_spaces/smoke_optuna.yaml: a small seeded SAM&JR Optuna search) named
    `name`, with `epochs` and the `search` keys given."""
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke_optuna.yaml").read_text())
    space.update(name=name, train={**space["train"], "epochs": epochs})
    space["search"].update(search)
    return space
