"""The local Ray a command starts: every socket of its processes on 127.0.0.1, its token owner-only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# Run in a fresh interpreter with its own HOME: lists the listening TCP sockets of every process
# descending from it (the GCS, raylet, agents and workers it started), then shuts Ray down.
PROBE = r"""
import json, os, sys
from raystudy.cluster.local_ray import init_local_ray, ray_token_file

def listening_inodes():
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[fields[9]] = fields[1]
    return found

def descends_from_me(pid):
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False

init_local_ray(num_cpus=1, include_dashboard=False)
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker too
inodes, addresses = listening_inodes(), []
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid() or not descends_from_me(int(pid)):
        continue
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        continue
    addresses += [inodes[l[8:-1]] for l in links if l.startswith("socket:[") and l[8:-1] in inodes]
ray.shutdown()
print(json.dumps({"addresses": addresses, "token": oct(ray_token_file().stat().st_mode & 0o777)}))
"""

IPV4_LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
IPV6_LOOPBACK = ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


def probe(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets through Linux's /proc")
def test_a_local_ray_listens_on_loopback_only_and_its_token_is_the_owners(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray").chmod(0o755)
    found = probe(home)
    hosts = {address.split(":")[0] for address in found["addresses"]}
    assert len(found["addresses"]) >= 3  # the GCS, the raylet, a worker: something was listed
    assert hosts <= {IPV4_LOOPBACK, *IPV6_LOOPBACK}, found["addresses"]
    assert found["token"] == "0o600"
    assert stat.S_IMODE((home / ".ray").stat().st_mode) == 0o700


def test_an_older_token_readable_by_others_is_made_the_owners(tmp_path, monkeypatch):
    from raystudy.cluster.local_ray import keep_token_private, ray_token_file

    monkeypatch.setenv("HOME", str(tmp_path))
    ray_token_file().parent.mkdir()
    ray_token_file().write_text("secret")
    ray_token_file().chmod(0o644)
    keep_token_private()
    assert stat.S_IMODE(ray_token_file().stat().st_mode) == 0o600


@pytest.mark.slow
def test_a_local_ray_is_its_own_even_where_another_ray_runs(tmp_path):
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--block"],
        env=env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},  # on loopback, as raystudy's own are
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    probe = (
        "import ray\nfrom raystudy.cluster.local_ray import init_local_ray\n"
        "init_local_ray(num_cpus=1, include_dashboard=False)\n"
        "print(ray.get_runtime_context().gcs_address)\nray.shutdown()\n"
    )
    for _ in range(240):  # until the other cluster's GCS answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert not out.stdout.strip().splitlines()[-1].endswith(f":{port}")  # not the other cluster
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
