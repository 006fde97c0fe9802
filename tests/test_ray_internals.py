"""Ray's internals are reached from one module, and only with the Ray version they were tested on."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from raystudy.errors import RaystudyError

PRIVATE = ("ray.tune.execution", "ray.tune.trainable", "_start_logging_actor", "_trial_runs", "_ot_", "._storage")


def test_another_ray_version_is_one_line_naming_the_tested_one():
    from raystudy.cluster import ray_internals

    ray_internals.check_ray_version(ray_internals.TESTED_RAY)
    with pytest.raises(
        RaystudyError, match=r"Ray 2\.60\.0's internals .* Ray 2\.61\.0 is installed: install ray\[tune\]==2\.60\.0"
    ):
        ray_internals.check_ray_version("2.61.0")


def test_the_command_line_says_it_in_one_line(tmp_path):
    code = (
        "import sys, ray; ray.__version__ = '2.61.0'; from raystudy.cli import main; "
        "sys.exit(main(['resume', sys.argv[1]]))"
    )
    (tmp_path / "exp").mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "exp")], capture_output=True, text=True, cwd=ROOT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Ray 2.61.0 is installed" in lines[0], out.stderr[-2000:]


def test_only_ray_internals_reaches_below_rays_public_api():
    reaching = {
        str(path.relative_to(ROOT))
        for folder in ("raystudy", "analysis")
        for path in (ROOT / folder).rglob("*.py")
        if any(marker in path.read_text() for marker in PRIVATE)
    }
    assert reaching == {"raystudy/cluster/ray_internals.py"}, reaching
