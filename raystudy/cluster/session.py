"""The driver's Ray session: a local Ray or a cluster's, with the settings every worker must see and
no credential among them."""

from __future__ import annotations

import os

from raystudy.cluster import ray_internals  # checks the Ray version before any Ray work
from raystudy.cluster.local_ray import init_local_ray
from raystudy.persist import storage

# Settings every worker must see as the driver does; never a secret: Ray stores a runtime_env in its
# job table (readable through the dashboard) and prints it to runtime_env_agent.log. Credentials reach
# workers from the provider's chain on a cluster (instance profile, service account) and from the
# inherited environment on a local Ray.
WORKER_ENVIRONMENT = (
    "RAYSTUDY_CACHE",
    "RAYSTUDY_DATA",
    "RAYSTUDY_DEVICE",
    "HF_HUB_OFFLINE",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# A variable whose name holds one of these carries a credential (AWS_ACCESS_KEY_ID included).
CREDENTIAL_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "KEY")


def init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table reporter with our columns
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # hook metrics exist only at the end
    if ray.is_initialized():
        return
    storage.configure_s3_endpoint()
    ray_internals.keep_credentials_out_of_trial_runtime_envs(is_credential)
    runtime_env = worker_runtime_env(os.environ)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        init_local_ray(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)


def worker_runtime_env(environment: dict[str, str]) -> dict | None:
    """The runtime_env that carries WORKER_ENVIRONMENT to every worker: data and cache folders, the
    object store's endpoint and region (tests/test_secrets.py: no secret among them)."""
    passed = {k: environment[k] for k in WORKER_ENVIRONMENT if k in environment}
    return {"env_vars": passed} if passed else None


def is_credential(name: str) -> bool:
    return any(marker in name.upper() for marker in CREDENTIAL_MARKERS)
