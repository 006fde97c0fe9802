"""Commands that compute nothing load no torch (and no Ray): validate, plan, status, analyze (without
the similarity matrix), findings, mechanisms, and `import analysis` (README: Code layout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PROBE = """
import json, sys
from raystudy.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "torchvision", "timm", "ray") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_records import VALUES, write_experiment

    return write_experiment(tmp_path_factory.mktemp("exp"), VALUES)


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "search_spaces/table.yaml"],
        ["plan", "search_spaces/table.yaml"],
        ["plan", "search_spaces/lgv.yaml", "--gpu-memory", "80GiB"],
        ["status", "{experiment}"],
        ["analyze", "{experiment}", "--out", "{out}"],
        ["findings", "{experiment}"],
        ["mechanisms"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_command_that_computes_nothing_loads_no_torch(argv, experiment, tmp_path):
    args = [a.format(experiment=experiment, out=tmp_path / "out") for a in argv]
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"code": 0, "heavy": []}, out.stderr[-2000:]


def test_importing_the_analysis_loads_no_torch():
    modules = "analysis, raystudy.config, raystudy.mechanisms, raystudy.budget.costs"
    code = f"import sys, {modules}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
