"""No secret leaves the driver through Ray: with recognizable fake credentials in the environment, a
study on a local S3 server still reads and writes the bucket, and the secret values are nowhere in
the Ray session folder (logs included), the GCS job table or any object in the bucket. With a local
Ray (targets, a grid with MLflow, status and the report too) in tests/test_cloud.py; here a two-node
Ray over loopback, and the pieces that decide what reaches the workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import BUCKET, SMOKE, bucket_files, put_smoke_targets, raystudy_in_env

from raystudy.cluster.session import WORKER_ENVIRONMENT, is_credential, worker_runtime_env

SECRET_NAMES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)


def fake_secrets() -> dict[str, str]:
    """One recognizable, unique value per secret-bearing variable."""
    tag = uuid.uuid4().hex[:12]
    return {name: f"rsfake{name.lower().replace('_', '')}{tag}" for name in SECRET_NAMES}


def test_no_worker_variable_is_a_secret():
    assert all(is_credential(name) for name in [*SECRET_NAMES, "AWS_ACCESS_KEY_ID", "MY_ENDPOINT_API_KEY"])
    assert not [name for name in WORKER_ENVIRONMENT if is_credential(name)]
    environment = {**fake_secrets(), "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_REGION": "eu-west-1", "HOME": "/h"}
    assert worker_runtime_env(environment) == {"env_vars": {"AWS_REGION": "eu-west-1"}}


def test_wandb_logging_actor_gets_no_key_in_its_runtime_env(monkeypatch):
    from ray.air.integrations import wandb as ray_wandb
    from ray.air.integrations.wandb import WandbLoggerCallback

    from raystudy.cluster.tracking import _wandb_callback

    seen = []
    monkeypatch.setattr(ray_wandb, "wandb", ray_wandb.wandb or object())  # wandb itself is an optional extra
    monkeypatch.setattr(
        WandbLoggerCallback, "_start_logging_actor", lambda self, *a, **k: seen.append(os.environ.get("WANDB_API_KEY"))
    )
    monkeypatch.setenv("WANDB_API_KEY", "rsfake-wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    _wandb_callback("s")._start_logging_actor(object(), [])
    assert seen == [None] and os.environ["WANDB_API_KEY"] == "rsfake-wandb"  # hidden, then restored


def files_holding(root: Path, values: list[str]) -> list[str]:
    """Every file under root whose bytes contain one of the values."""
    needles = [v.encode() for v in values]
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # a socket or a file removed while walking
                continue
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


def objects_holding(env: dict, prefix: str, values: list[str]) -> list[str]:
    objects = bucket_files(env, prefix)
    assert objects, f"nothing was written under s3://{BUCKET}/{prefix}"
    return [f"{key}: {v}" for key, body in objects.items() for v in values if v.encode() in body]


@pytest.fixture
def secret_env(s3):
    """The S3 environment plus fake secrets, a short Ray temp folder (socket paths are short)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    secrets = fake_secrets()
    yield {**s3, **secrets, "RAY_TMPDIR": str(ray_tmp)}, list(secrets.values()), ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


def small_study(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(SMOKE, name=name, trials=[{"mechanism": "ST"}, {"mechanism": "SAM"}])))
    return path


def start_node(env: dict, log: Path, *args: str) -> subprocess.Popen:
    """`ray start --block` (a head or a worker on 127.0.0.1) in a session of its own, ended with it."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1"]
    command += ["--node-ip-address=127.0.0.1", *args]
    with log.open("a") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()


JOB_TABLE = """
import sys
from ray._raylet import GcsClient
jobs = GcsClient(address=sys.argv[1]).get_all_job_info()
sys.stdout.buffer.write(b"".join(job.SerializeToString() for job in jobs.values()))
"""


@pytest.mark.slow
def test_secrets_and_the_ray_token_stay_out_of_the_job_table_on_a_two_node_ray_with_token_auth(
    secret_env, smoke_storage, tmp_path
):
    """A two-node Ray with token authentication on (`RAY_AUTH_MODE=token`, the token given as Ray
    reads it from the environment), its nodes started as a provider starts them, with the
    credentials in their environment (an instance profile stands in for them on a real cluster).
    A study runs there through `--address`; a client with another token is refused; the token, like
    the cloud keys, is nowhere: job table, session folder (logs included), bucket, records."""
    env, secrets, ray_tmp = secret_env
    token = "rsfakeraytoken" + uuid.uuid4().hex
    cluster_env = {
        **os.environ,
        **env,
        "HOME": str(tmp_path / "home"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node and the driver on 127.0.0.1
    }
    secrets = [*secrets, token]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    storage = f"s3://{BUCKET}/secrets_cluster"
    log = tmp_path / "nodes.log"
    nodes = [start_node(cluster_env, log, "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false")]
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(address.split(":")[1])), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "the head did not start: " + log.read_text()[-2000:]
                time.sleep(0.5)
        nodes.append(start_node(cluster_env, log, f"--address={address}"))
        # The targets as trained once this session (test_cloud trains them on S3 with secrets around).
        put_smoke_targets(env, smoke_storage, "secrets_cluster")
        run_env = {k: v for k, v in cluster_env.items() if k != "HOME"}
        args = ("run", small_study(tmp_path, "secret_cluster"), "--storage", storage, "--address", address)
        out = raystudy_in_env(run_env, *args, cwd=tmp_path, home=tmp_path / "home")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert not [v for v in secrets if v in out.stdout + out.stderr]
        table = subprocess.run([sys.executable, "-c", JOB_TABLE, address], env=cluster_env, capture_output=True)
        assert table.returncode == 0, table.stderr[-2000:]
        assert b"RAYSTUDY_CACHE" in table.stdout  # the driver is in the table, its non-secret settings with it
        assert [v for v in secrets if v.encode() in table.stdout] == []
        wrong = subprocess.run(
            [sys.executable, "-c", JOB_TABLE, address],
            env={**cluster_env, "RAY_AUTH_TOKEN": "not-the-token"},
            capture_output=True,
            timeout=120,
        )
        assert wrong.returncode != 0 and b"InvalidAuthToken" in wrong.stderr  # token authentication is on
    finally:
        for node in reversed(nodes):
            stop_node(node)
    assert files_holding(ray_tmp, secrets) == []
    assert files_holding(tmp_path, secrets) == []  # the driver's folder, its HOME
    assert objects_holding(env, "secrets_cluster/", secrets) == []
    assert len(bucket_files(env, "secrets_cluster/secret_cluster/", "/result.json")) == 2  # S3 worked
