"""cluster.yaml against Ray's own schema; a real multi-node Ray on loopback losing a worker
mid-study; targets loaded safely on the nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT

from raystudy.errors import RaystudyError


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, ray_schema())
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1 and config["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "raystudy" in c for c in config["setup_commands"])
    text = (ROOT / "cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.pop("provider"),
        lambda c: c.update(idle_timeout_minutes="ten"),
        lambda c: c.update(max_wokers=3),
        lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
    ],
)
def test_a_broken_cluster_yaml_fails_the_schema(break_it):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_targets_with_code_in_them_are_refused(tmp_path):
    import torch

    from raystudy.core.checkpoint import MODEL_FORMAT
    from raystudy.training.trial import load_targets as _load_targets

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "storage" / "evil_targets" / "targets"
    folder.mkdir(parents=True)
    torch.save({"format": MODEL_FORMAT, "meta": "{}", "state_dict": {}, "x": RunsCode()}, folder / "evil.pt")
    with pytest.raises(RaystudyError, match="refused to load"):
        _load_targets(str(tmp_path / "storage"), "evil_targets", tmp_path / "work", "cpu")
    (folder / "evil.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RaystudyError, match="not a readable checkpoint"):
        _load_targets(str(tmp_path / "storage"), "evil_targets", tmp_path / "work", "cpu")


def final_rows(experiment: Path) -> dict[str, int]:
    counts = {}
    for result in experiment.glob("trial_*/result.json"):
        counts[result.parent.name] = sum(
            json.loads(line).get("final") == 1 for line in result.read_text().splitlines() if line.strip()
        )
    return counts


@pytest.mark.slow
def test_study_on_two_worker_nodes_survives_losing_one(smoke_storage, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster
    from ray.tune import ExperimentAnalysis

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node and the driver on 127.0.0.1
    smoke = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    smoke.update(
        name="two_nodes",
        max_failures=3,
        resources={"cpu": 1, "custom": {"trial_slot": 1}},
        train={**smoke["train"], "epochs": 6, "n_train": 2048},
        trials=[{"mechanism": "ST"}, {"mechanism": "SAM"}, {"mechanism": "LS"}, {"mechanism": "CO"}],
    )
    space = tmp_path / "two_nodes.yaml"
    space.write_text(yaml.safe_dump(smoke))
    experiment = smoke_storage / "two_nodes"

    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        # Trials need `trial_slot`, which only the workers have: they run there, not on the head.
        workers = [
            cluster.add_node(num_cpus=1, resources={"trial_slot": 1}, node_ip_address="127.0.0.1") for _ in range(2)
        ]
        cluster.wait_for_nodes()
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raystudy",
                "run",
                str(space),
                "--storage",
                str(smoke_storage),
                "--address",
                cluster.address,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 300
        # Both running trials have checkpointed (one at least twice): whichever dies can resume.
        while time.time() < deadline and not (
            len({p.parent for p in experiment.glob("trial_*/checkpoint_*")}) >= 2
            and list(experiment.glob("trial_*/checkpoint_000001"))
        ):
            time.sleep(0.2)
        assert sum(final_rows(experiment).values()) < 4, "the node should go while trials still run"
        cluster.remove_node(workers[0])  # both workers are busy: the trial on this one dies with it
        lost_at = time.time()
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-4000:]
    finally:
        cluster.shutdown()
    counts = final_rows(experiment)
    assert len(counts) == 4 and set(counts.values()) == {1}, counts  # every trial finished, exactly once
    trials = ExperimentAnalysis(str(experiment)).trials
    failures = sum(t.num_failures for t in trials)
    assert failures >= 1  # a trial was lost with the node and retried on the other one
    for trial in (t for t in trials if t.num_failures):
        rows = [
            json.loads(line) for line in (Path(trial.path) / "result.json").read_text().splitlines() if line.strip()
        ]
        epochs = [r["epoch"] for r in rows if r.get("final") == 0]
        assert epochs.count(1) == 1 and epochs[-1] == 6, epochs  # resumed from its checkpoint, not from epoch 1
    print(
        f"two-node study: node removed after {lost_at - started:.1f}s, finished after {time.time() - started:.1f}s, "
        f"{failures} trial failure(s) recovered"
    )


def pip_installs(commands: list[str]) -> list[str]:
    """The package arguments of every `pip install` in shell commands (flags dropped)."""
    import shlex

    out = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            if "pip" in words and "install" in words:
                out += [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    return out


def test_cluster_nodes_install_what_the_readme_installs():
    readme = (ROOT / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    wanted = [w.replace(".[test]", "raystudy[test]") for w in pip_installs([setup])]
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    installed = [
        w.replace("/home/ubuntu/raystudy[test]", "raystudy[test]") for w in pip_installs(config["setup_commands"])
    ]
    assert installed == wanted == ["pip", "torch==2.14.1", "torchvision==0.29.1", "raystudy[test]"]
    # The head's extra Ray (the dashboard) is the version every node gets from pyproject.toml.
    pinned = next(d for d in _dependencies() if d.startswith("ray[tune]=="))
    (head_ray,) = [w for w in pip_installs(config["head_setup_commands"]) if w.startswith("ray[")]
    assert head_ray.split("==")[1] == pinned.split("==")[1]


def _dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_every_node_starts_with_token_authentication_and_the_same_token():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"  # one token, from the user
    assert not [k for k in yaml.safe_dump(config).split() if "AUTH_TOKEN=" in k]  # no token in the config
