"""The code base passes its linter (ruff, configured in pyproject.toml: lines <= 120)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

FOLDERS = ["raystudy", "analysis", "tests", "benchmarks"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, *command, *FOLDERS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def module_imports(path: Path) -> set[str]:
    """The project modules a file imports, at any depth (inside functions too), except imports
    made only for type checking."""
    import ast

    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for child in block.body
        for node in ast.walk(child)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_no_import_cycles():
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for folder in ("raystudy", "analysis")
        for p in (ROOT / folder).rglob("*.py")
    }
    graph = {m: {n for n in module_imports(p) if n in files and n != m} for m, p in files.items()}
    # A package's __init__ importing its own modules is its face, not a cycle.
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep) :] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# The Ray wing: the only package that imports ray (Ray Serve's reference endpoint included). Training,
# metrics, configuration, planning and analysis import none, so they run and are tested without it.
RAY_WING = "raystudy.cluster"


def project_modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for folder in ("raystudy", "analysis")
        for p in (ROOT / folder).rglob("*.py")
    }


def test_only_the_ray_wing_imports_ray():
    importers = {
        module
        for module, path in project_modules().items()
        if any(name == "ray" or name.startswith("ray.") for name in module_imports(path))
    }
    assert importers and all(m.startswith(RAY_WING + ".") for m in importers), sorted(importers)


# The package's layers, lowest first: a package imports only from its own floor or below (the
# README's "Code layout" draws them). Modules at the top of raystudy/ count as packages of their own.
FLOORS = [
    {"raystudy", "raystudy.errors"},
    {"raystudy.mechanisms", "raystudy.persist"},
    {"raystudy.config"},
    {"raystudy.core", "raystudy.budget", "raystudy.blackbox"},
    {"raystudy.metrics"},
    {"raystudy.training", "analysis"},
    {"raystudy.cluster"},
    {"raystudy.cli"},
    {"raystudy.__main__"},
]


def floor_of(module: str) -> int:
    parts = module.split(".")
    package = parts[0] if parts[0] == "analysis" else ".".join(parts[:2])
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def test_no_package_imports_a_higher_floor():
    modules = project_modules()
    upward = [
        f"{module} -> {name}"
        for module, path in modules.items()
        for name in module_imports(path)
        if name in modules and floor_of(name) > floor_of(module)
    ]
    assert not upward, upward
