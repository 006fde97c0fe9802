"""A study on an autoscaling cluster: Ray's real autoscaler and monitor with the fake multi-node
provider (worker nodes are local processes with fake GPUs). A head without GPUs, a GPU worker type
scaling from 0: trials asking for half a GPU wait for workers, run on them, finish once; a worker
killed mid-trial (a lost spot instance) costs its trials a restart from their last checkpoint; the
workers are gone again after the idle timeout.

The cluster is started as Ray's `AutoscalingCluster` starts it, on a port of its own, and stopped by
ending its own processes (they carry a marker in their environment): `AutoscalingCluster` runs
`ray stop --force`, which would end every other test's Ray too."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import SMOKE

from analysis import load_experiment

IDLE_TIMEOUT_MINUTES = 0.2

pytestmark = pytest.mark.slow


class FakeMultinodeCluster:
    """Ray's fake multi-node autoscaling cluster (ray.cluster_utils.AutoscalingCluster's config and
    start command) on its own port, its processes marked so that only they are stopped."""

    def __init__(self, head_cpus: int, worker_types: dict):
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            self.port = s.getsockname()[1]
        # Where the fake nodes look for the head (the provider's `gcs_address`): this machine's
        # address as Ray sees it, which the head binds to.
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.marker = f"RAYSTUDY_TEST_CLUSTER={uuid.uuid4().hex}"
        self.head_cpus = head_cpus
        self.config = {
            "cluster_name": "fake_multinode",
            "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self.address,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                **worker_types,
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {"ssh_user": "ubuntu"},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self, folder: Path, env: dict) -> None:
        config = folder / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        # To a file, not a pipe: the daemons `ray start` leaves behind would hold a pipe open.
        log = (folder / "ray_start.log").open("w")
        key, value = self.marker.split("=")
        env = {
            **env,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            key: value,
        }
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the nodes on this machine's address, as above
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--port={self.port}",
            f"--num-cpus={self.head_cpus}",
        ]
        subprocess.run(command + [f"--autoscaling-config={config}"], env=env, check=True, stdout=log, stderr=log)

    def shutdown(self) -> None:
        """SIGKILL every process of this cluster: the head's, the monitor's and the fake nodes'."""
        killed = kill_marked(self.marker.encode())
        while killed:
            time.sleep(0.2)
            killed = kill_marked(self.marker.encode())


def gpu_workers(marker: bytes) -> list[str]:
    """Node ids of the live fake GPU worker nodes of this cluster: their raylets, read from /proc
    (this process never joins the cluster, so its Ray state, token included, plays no part)."""
    nodes = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" or not (
                proc / "exe"
            ).resolve().name == "raylet":
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if marker in environ and b"RAY_NODE_TYPE_NAME=gpu_worker" in environ:
            nodes += [
                e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RAY_OVERRIDE_NODE_ID_FOR_TESTING=")
            ]
    return nodes


def kill_node(node_id: str) -> int:
    """SIGKILL every process of a fake node (its raylet and its workers, which carry the node's id
    in their environment), as a vanished spot instance takes them all at once."""
    return kill_marked(f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode())


def kill_marked(marker: bytes) -> int:
    """SIGKILL every process of this user with `marker` (NAME=VALUE) in its environment."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


def results(experiment: Path) -> dict[str, list[dict]]:
    out = {}
    for path in experiment.glob("trial_*/result.json"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def node_of_running_trial(experiment: Path, epochs: int) -> str | None:
    """The node of a trial in mid-training (reported epoch 2 or later, not its last): its trial
    process's environment names the fake node it runs on."""
    for rows in results(experiment).values():
        last = rows[-1] if rows else {}
        if not any(r.get("final") == 1 for r in rows) and 2 <= last.get("epoch", 0) < epochs:
            try:
                environ = (Path("/proc") / str(last["pid"]) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"RAY_OVERRIDE_NODE_ID_FOR_TESTING="):
                    return entry.split(b"=", 1)[1].decode()
    return None


def test_trials_scale_workers_up_from_zero_survive_a_lost_worker_and_scale_down(smoke_storage, tmp_path, monkeypatch):
    space = dict(
        SMOKE,
        name="autoscaled",
        trials=[{"mechanism": m} for m in ("ST", "SAM", "LS", "CO")],
        train={**SMOKE["train"], "epochs": 6},
        resources={"cpu": 1, "gpu": 0.5},
        max_failures=3,
    )
    path = tmp_path / "autoscaled.yaml"
    path.write_text(yaml.safe_dump(space))
    cluster = FakeMultinodeCluster(
        2, {"gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}
    )
    # The fake GPUs schedule the trials; they train on the CPU (raystudy.core.precision).
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAYSTUDY_DEVICE": "cpu",
        # Token authentication on, said to the nodes and the driver: Ray 2.60 turns it on by itself
        # only for a cluster it finds on its own (no address), not for a driver given `--address`.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # the cluster's token, as a provider hands it to every node
    }
    monkeypatch.setenv("PATH", env["PATH"])  # the fake nodes' processes from this environment
    monkeypatch.setenv("RAYSTUDY_DEVICE", "cpu")  # the fake nodes started below inherit it
    driver = None
    try:
        cluster.start(tmp_path, env)
        marker = cluster.marker.encode()
        counts = [(0.0, len(gpu_workers(marker)))]
        start = time.time()
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raystudy",
                "run",
                str(path),
                "--storage",
                str(smoke_storage),
                "--address",
                cluster.address,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        experiment = smoke_storage / "autoscaled"
        killed = None
        while driver.poll() is None and time.time() - start < 480:
            counts.append((time.time() - start, len(gpu_workers(marker))))
            if killed is None:
                killed = node_of_running_trial(experiment, epochs=6)
                if killed is not None:
                    assert kill_node(killed) > 0
            time.sleep(0.5)
        output = driver.communicate(timeout=60)[0]
        assert driver.returncode == 0, output[-4000:]
        assert killed is not None, "the worker should be lost mid-study"
        deadline = time.time() + 120  # idle timeout (12 s) plus the autoscaler's reaction
        while time.time() < deadline and gpu_workers(marker):
            counts.append((time.time() - start, len(gpu_workers(marker))))
            time.sleep(1)
        counts.append((time.time() - start, len(gpu_workers(marker))))
    finally:
        if driver is not None and driver.poll() is None:  # a failed assertion: the driver goes too
            driver.kill()
            driver.wait()
        cluster.shutdown()

    workers = [n for _, n in counts]
    assert workers[0] == 0 and max(workers) >= 1 and workers[-1] == 0, counts  # 0 -> >=1 -> 0
    trials = results(experiment)
    assert len(trials) == 4
    for name, rows in trials.items():
        assert sum(r.get("final") == 1 for r in rows) == 1, name  # finished exactly once
        epochs = [r["epoch"] for r in rows if r.get("final") == 0]
        assert sorted(set(epochs)) == list(range(1, 7)), (name, epochs)  # every epoch reported
        # What Ray guarantees: a restored trial goes on from its last persisted checkpoint. Ray logs an
        # epoch's result before it registers that epoch's checkpoint, so a worker lost in between
        # costs that one epoch, redone after the restore; never more per restore.
        restores = sum(1 for r in rows[1:] if r.get("iterations_since_restore") == 1)
        assert len(epochs) - len(set(epochs)) <= restores, (name, epochs)
    # The analysis counts a redone epoch once (its last report).
    histories = {t.trial_id: [h["epoch"] for h in t.history] for t in load_experiment(str(experiment)).trials}
    assert all(h == sorted(set(h)) for h in histories.values()), histories
    # The lost worker's trials went on from their checkpoints: restored, not restarted from epoch 1.
    restored = [
        rows for rows in trials.values() if any(r["iterations_since_restore"] < r["training_iteration"] for r in rows)
    ]
    assert restored, "a trial of the lost worker should have resumed from its checkpoint"
    for rows in restored:
        assert [r["epoch"] for r in rows if r.get("final") == 0].count(1) == 1
