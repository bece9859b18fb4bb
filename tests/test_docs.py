"""The README and docs/ name only options that exist: every `--option` on a `python -m runs.X` line is one of
runs.X's options, and every other `--option` in the prose is an option of some command (or of a tool we name)."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("train", "train_policy", "eval_policy", "compare", "report", "bench", "convert_policy", "pbt")
# options of other tools the docs show (pip, pytest, wandb, ray start, the GPU check's environment)
FOREIGN = {"--summary", "--json", "--help", "--no-deps", "--user", "--head", "--port"}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def help_options(command: str) -> set[str]:
    module = importlib.import_module(f"runs.{command}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return set(OPTION.findall(out.getvalue()))


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    return {c: help_options(c) for c in COMMANDS}


def test_docs_exist_and_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    for name in ("training", "controllers", "rl", "comparisons", "benchmark", "results"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


def test_every_command_line_uses_that_commands_options(options):
    bad = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")  # join continued command lines
        for line in text.splitlines():
            for m in re.finditer(r"python -m runs\.(\w+)(.*?)(?:$|&&|#|;|`)", line):
                command, rest = m.group(1), m.group(2)
                assert command in options, f"{doc.name}: unknown command runs.{command}"
                bad += [f"{doc.name}: runs.{command} {o}" for o in OPTION.findall(rest) if o not in options[command]]
    assert not bad, bad


def test_every_option_in_the_prose_exists(options):
    known = set().union(*options.values()) | FOREIGN
    bad = [f"{doc.name}: {o}" for doc in DOCS for o in OPTION.findall(doc.read_text()) if o not in known]
    assert not bad, sorted(set(bad))
