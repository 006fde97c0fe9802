"""No secret leaves the driver through Ray: with recognizable fake credentials in the environment, a
study on a local S3 server still reads and writes the bucket, and the secret values are nowhere in
the Ray session folder (logs included), the GCS job table or any object in the bucket. With a local
Ray (targets, a grid with MLflow, status and the report too) in tests/test_cloud.py; here a two-node
Ray over loopback, and the pieces that decide what reaches the workers."""

from __future__ import annotations

import os
import shutil
import tempfile
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


@pytest.mark.slow
def test_secrets_stay_out_of_the_job_table_on_a_two_node_ray(secret_env, smoke_storage, tmp_path, monkeypatch):
    from ray._raylet import GcsClient
    from ray.cluster_utils import Cluster

    env, secrets, ray_tmp = secret_env
    # The nodes are started as a provider would start them: with the credentials in their
    # environment (an instance profile stands in for them on a real cluster).
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    storage = f"s3://{BUCKET}/secrets_cluster"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        # The targets as trained once this session (test_cloud trains them on S3 with secrets around).
        put_smoke_targets(env, smoke_storage, "secrets_cluster")
        args = ("run", small_study(tmp_path, "secret_cluster"), "--storage", storage, "--address", cluster.address)
        out = raystudy_in_env(env, *args, cwd=tmp_path, home=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        jobs = GcsClient(address=cluster.address).get_all_job_info()
        assert len(jobs) >= 1  # the driver is in the table
        table = b"".join(job.SerializeToString() for job in jobs.values())
        assert b"RAYSTUDY_CACHE" in table  # the non-secret settings did travel in the runtime_env
        assert [v for v in secrets if v.encode() in table] == []
    finally:
        cluster.shutdown()
    assert files_holding(ray_tmp, secrets) == []
    assert objects_holding(env, "secrets_cluster/", secrets) == []
    assert len(bucket_files(env, "secrets_cluster/secret_cluster/", "/result.json")) == 2  # S3 worked
