"""An outage of the object store (OUTAGE_S) in mid-study, through a loopback proxy in front of the
local S3 server: refused connections during a grid study, a store that stops answering during an
Optuna search. Every trial finishes exactly once, with no manual resume."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    BUCKET,
    RAYSTUDY,
    SMOKE,
    bucket_files,
    finals_in_bucket,
    finished_once,
    put_smoke_targets,
    smoke_search,
)
from outage_proxy import OutageProxy

OUTAGE_S = 15  # past the storage backoff's first retries (0.5, 1, 2, 4, 8 s): sure to meet a trial's report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxied(s3, smoke_storage):
    """The targets in the bucket, and a proxy in front of the S3 server that the studies go through."""
    host, port = s3["RAYSTUDY_S3_ENDPOINT"].removeprefix("http://").split(":")
    proxy = OutageProxy((host, int(port)))
    env = {**s3, "RAYSTUDY_S3_ENDPOINT": proxy.endpoint, "RAYSTUDY_STORAGE_OUTAGE_S": "120"}
    put_smoke_targets(s3, smoke_storage, "o")
    return proxy, env


def run_through_outage(s3, proxy, env, space: dict, tmp_path: Path, verb: str, outage) -> subprocess.CompletedProcess:
    """Start the study, cut the store once a trial has checkpointed, bring it back OUTAGE_S later."""
    path = tmp_path / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space))
    driver = subprocess.Popen(
        RAYSTUDY + [verb, str(path), "--storage", f"s3://{BUCKET}/o", "--num-cpus", "2"],
        cwd=tmp_path,
        env={**os.environ, **env, "HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    prefix = f"o/{space['name']}/"
    while time.time() < deadline and not any("/checkpoint_" in k for k in bucket_files(s3, prefix)):
        time.sleep(0.5)
    assert sum(bool(rows) for rows in finals_in_bucket(s3, prefix.rstrip("/")).values()) < len(
        space.get("trials", [1] * 9)
    )
    outage()
    time.sleep(OUTAGE_S)
    proxy.recover()
    output, _ = driver.communicate(timeout=900)
    return subprocess.CompletedProcess(driver.args, driver.returncode, output, "")


def test_a_grid_study_rides_out_refused_connections(s3, proxied, tmp_path):
    proxy, env = proxied
    space = dict(SMOKE, name="refused", trials=[{"mechanism": m} for m in ("ST", "SAM", "LS", "CO")])
    space["train"] = {**SMOKE["train"], "epochs": 6}
    out = run_through_outage(s3, proxy, env, space, tmp_path, "run", proxy.refuse)
    assert out.returncode == 0, out.stdout[-4000:]
    rows = finals_in_bucket(s3, "o/refused")
    assert len(rows) == 4 and all(finished_once(r) for r in rows.values()), rows.keys()
    assert "storage unreachable" in out.stdout  # the outage was met, and waited out


def test_a_search_rides_out_a_store_that_stops_answering(s3, proxied, tmp_path):
    proxy, env = proxied
    space = smoke_search("hung_search", epochs=6)
    out = run_through_outage(s3, proxy, env, space, tmp_path, "search", proxy.hang)
    assert out.returncode == 0, out.stdout[-4000:]
    rows = finals_in_bucket(s3, "o/hung_search")
    assert len(rows) == 4 and all(finished_once(r) for r in rows.values()), rows.keys()
    assert bucket_files(s3, "o/hung_search/optuna-journal/")  # the search's history reached the bucket
