"""Imports point one way: runs -> bench -> experiments, envs -> gpt -> controllers -> dyndrop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"dyndrop", "controllers", "gpt", "envs", "experiments", "bench", "runs"}
ALLOWED = {
    "dyndrop": set(),
    "controllers": {"dyndrop"},
    "gpt": {"controllers", "dyndrop"},
    "envs": {"gpt", "controllers", "dyndrop"},
    "experiments": {"gpt", "controllers", "dyndrop"},
    "bench": {"experiments", "envs", "gpt", "controllers", "dyndrop"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages a module imports (anywhere in it, also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_package_imports_one_above_it(package):
    bad = {f"{p.relative_to(ROOT)} imports {other}" for p in (ROOT / package).glob("*.py")
           for other in imported_packages(p) - ALLOWED[package] - {package}}
    assert not bad, sorted(bad)


def test_gpt_holds_only_the_model_data_trainer_config_and_tracking():
    modules = {p.stem for p in (ROOT / "gpt").glob("*.py")} - {"__init__"}
    assert modules <= {"model", "data", "trainer", "population", "config", "tracking"}, modules
