"""Outages of the object store (OUTAGE_S each) in mid-study, through a loopback proxy in front of the
local S3 server: an Optuna search meets refused connections, then a store that stops answering.
Every trial finishes exactly once and the search's history reaches the bucket, with no manual resume."""

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


def checkpoints(s3, prefix: str) -> set[str]:
    return {k for k in bucket_files(s3, prefix) if "/checkpoint_" in k}


def run_through_outages(
    s3, proxy, env, space: dict, tmp_path: Path, verb: str, *outages
) -> subprocess.CompletedProcess:
    """Start the study; for each outage: wait for a new checkpoint in the bucket (trials are running
    and writing), cut the store that way, bring it back OUTAGE_S later."""
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
    prefix = f"o/{space['name']}/"
    seen: set[str] = set()
    try:
        for outage in outages:
            deadline = time.time() + 300
            while time.time() < deadline and not checkpoints(s3, prefix) - seen:
                time.sleep(0.5)
            new = checkpoints(s3, prefix) - seen
            assert new and driver.poll() is None, "trials should be writing when the store goes"
            seen |= new
            finals = sum(bool(rows) for rows in finals_in_bucket(s3, prefix.rstrip("/")).values())
            assert finals < space["search"]["num_samples"]
            outage()
            time.sleep(OUTAGE_S)
            proxy.recover()
        output, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:  # a failed assertion: the driver and its Ray go too
            driver.kill()
            driver.communicate()
    return subprocess.CompletedProcess(driver.args, driver.returncode, output, "")


def test_a_search_rides_out_refused_connections_then_a_store_that_stops_answering(s3, proxied, tmp_path):
    proxy, env = proxied
    space = smoke_search("outages_search", epochs=6)
    out = run_through_outages(s3, proxy, env, space, tmp_path, "search", proxy.refuse, proxy.hang)
    assert out.returncode == 0, out.stdout[-4000:]
    rows = finals_in_bucket(s3, "o/outages_search")
    assert len(rows) == 4 and all(finished_once(r) for r in rows.values()), rows.keys()
    assert "storage unreachable" in out.stdout  # the outages were met, and waited out
    assert bucket_files(s3, "o/outages_search/optuna-journal/")  # the search's history reached the bucket
