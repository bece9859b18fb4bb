"""Imports point one way: runs -> bench -> experiments, envs -> gpt -> integrations -> controllers -> dyndrop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"dyndrop", "controllers", "integrations", "gpt", "envs", "experiments", "bench", "runs"}
ALLOWED = {
    "dyndrop": set(),
    "controllers": {"dyndrop"},
    "integrations": {"controllers", "dyndrop"},  # and torch; transformers and lightning only in hf.py, lightning.py
    "gpt": {"integrations", "controllers", "dyndrop"},
    "envs": {"gpt", "integrations", "controllers", "dyndrop"},
    "experiments": {"gpt", "integrations", "controllers", "dyndrop"},
    "bench": {"experiments", "envs", "gpt", "integrations", "controllers", "dyndrop"},
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


def test_only_the_callback_modules_import_their_frameworks():
    """``import integrations`` stays light: transformers only in integrations/hf.py, Lightning only in lightning.py."""
    frameworks = {"hf.py": "transformers", "lightning.py": "lightning"}
    bad = []
    for path in (ROOT / "integrations").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  and n.level == 0}
        bad += [f"{path.name} imports {m}" for m in set(frameworks.values()) & names if frameworks.get(path.name) != m]
    assert not bad, bad
