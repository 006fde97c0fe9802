"""The install a newcomer gets: CI runs the README's commands verbatim, the installed environment holds
no HTTP stack with published advisories, no stale caps, and optional extras fail with the line that
installs them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT
from packaging.version import Version

from raystudy.config import EvalConfig
from raystudy.errors import RaystudyError

# Fixed in requests 2.32.4 (.netrc credentials leaked to other hosts) and urllib3 2.5 (redirects
# followed despite retries disabled, proxy handling): the oldest releases without those advisories.
FLOORS = {"requests": "2.32.4", "urllib3": "2.5"}


def readme_setup_commands() -> list[str]:
    """The command lines of the README's first bash block (comments and blank lines dropped)."""
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_exactly_the_readmes_two_commands():
    commands = readme_setup_commands()
    assert len(commands) == 2
    printed = subprocess.run(["bash", ROOT / ".ci" / "run", "--print"], capture_output=True, text=True, check=True)
    assert printed.stdout.splitlines() == commands
    install, tests = commands
    # The pip a stock venv ships is upgraded before anything is resolved, and the tests are pytest.
    steps = [s.strip() for s in install.split("&&")]
    assert steps.index("pip install --upgrade pip") < min(i for i, s in enumerate(steps) if "-e" in s)
    assert tests.endswith("python -m pytest")
    # CI adds no install step of its own: every pip in .ci/run is the README's.
    assert "pip install" not in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_installed_http_stack_has_no_published_advisories(package):
    installed = Version(importlib.metadata.version(package))
    assert installed >= Version(FLOORS[package]), f"{package} {installed} is older than {FLOORS[package]}"


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_stale_pin_or_cap_in_the_default_or_test_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    default, test = project["dependencies"], project["optional-dependencies"]["test"]
    names = [re.split(r"[\[<>=~! ]", d)[0].lower() for d in default + test]
    assert "torchattacks" not in names  # pins requests~=2.25.1: an optional extra only
    capped = [d for d in default + test + project["optional-dependencies"]["tracking"] if "<" in d]
    assert not [d for d in capped if d.lower().startswith(("mlflow", "setuptools"))], capped
    assert project["optional-dependencies"]["autoattack"] == ["torchattacks>=3.5"]


def test_autoattack_without_its_extra_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks" else real(name))
    config = EvalConfig(attacks=("pgd", "autoattack"))  # an experiment that used it can still be read
    with pytest.raises(RaystudyError, match=r"pip install 'raystudy\[autoattack\]'"):
        config.check_installed()
    EvalConfig(attacks=("pgd", "dim")).check_installed()  # the paper's attacks need no extra


def test_no_shipped_study_needs_an_optional_extra():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        assert "autoattack" not in path.read_text().lower(), path.name


def test_validate_refuses_autoattack_without_its_extra_in_one_line(tmp_path):
    import yaml

    space = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    space["evaluation"] = {**space.get("evaluation", {}), "attacks": ["pgd", "autoattack"]}
    path = tmp_path / "with_autoattack.yaml"
    path.write_text(yaml.safe_dump(space))
    hide = tmp_path / "hide"
    hide.mkdir()
    # A module that refuses to be found stands in for the missing package, in a fresh interpreter.
    (hide / "sitecustomize.py").write_text(
        "import importlib.util as u\n_f = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 'torchattacks' else _f(n, *a)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(hide)}
    out = subprocess.run(
        [sys.executable, "-m", "raystudy", "validate", str(path)], capture_output=True, text=True, env=env
    )
    assert out.returncode != 0
    assert "pip install 'raystudy[autoattack]'" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_experiment_that_used_autoattack_is_analysed_without_its_extra(monkeypatch):
    from raystudy.config import parse_space

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks" else real(name))
    space = {"name": "aa", "targets": "t", "trials": [{"mechanism": "ST"}], "evaluation": {"attacks": ["autoattack"]}}
    assert parse_space(space, "aa.yaml").evaluation.attacks == ("autoattack",)  # reading needs no torchattacks
