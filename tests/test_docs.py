"""The README and docs/ name only options that exist: every `--option` on a `python -m runs.X` line is one of
runs.X's options, and every other `--option` in the prose is an option of some command (or of a tool we name)."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("train", "train_policy", "eval_policy", "compare", "suite", "report", "bench", "convert_policy", "pbt")
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


def test_every_link_leads_somewhere_and_the_readme_is_a_front_door():
    """Each relative link in the README and docs/ names a file that exists, and an anchor one of its headings."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                bad.append(f"{doc.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                bad.append(f"{doc.name}: {target} (no such heading)")
    assert not bad, bad


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+\s+(.*)$", doc.read_text(), flags=re.M)}


def command_lines() -> list[tuple[str, str, str]]:
    """Every ``python -m runs.X ...`` in the README and docs/: (file, command, its arguments)."""
    found = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")  # join continued command lines
        for line in text.splitlines():
            for m in re.finditer(r"python -m runs\.(\w+)(.*?)(?:$|&&|#|;|`|\|)", line):
                found.append((doc.name, m.group(1), m.group(2)))
    return found


def test_every_command_line_parses_with_its_commands_parser():
    """The commands the docs show are accepted by the real argument parsers, as a user would paste them."""
    import shlex

    bad = []
    assert len(command_lines()) > 20
    for doc, command, rest in command_lines():
        module = importlib.import_module(f"runs.{command}")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module.parse_args(shlex.split(rest.replace("...", "")))
        except SystemExit as e:  # --help exits 0
            if e.code:
                bad.append(f"{doc}: runs.{command}{rest} -> exit {e.code}: {err.getvalue().strip()}")
        except Exception as e:  # a parser that validates (train_policy) says why in one line
            bad.append(f"{doc}: runs.{command}{rest} -> {type(e).__name__}: {e}")
    assert not bad, bad


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


# -- docs/integrations.md: its example scripts exist, take the options it shows, and run ---------------------------

EXAMPLES = ROOT / "docs" / "examples"


def example(name: str):
    """The example script ``docs/examples/NAME.py`` as a module (its ``main(argv)`` runs it)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_integrations_doc_shows_only_existing_examples_and_their_options():
    pytest.importorskip("transformers")
    text = (ROOT / "docs" / "integrations.md").read_text()
    shown = re.findall(r"python docs/examples/(\w+)\.py(.*)", text)
    assert {name for name, _ in shown} == {"gpt2_dropout", "hf_trainer", "lightning_gpt2", "compile_recompiles"}
    bad = []
    for name, rest in shown:
        if name == "lightning_gpt2" and importlib.util.find_spec("lightning") is None:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            example(name).main(["--help"])
        bad += [f"{name}.py {o}" for o in OPTION.findall(rest.split("#")[0]) if o not in OPTION.findall(out.getvalue())]
    assert not bad, bad


TINY = ["--data", str(ROOT / "README.md"), "--train-chars", "3000", "--max-iters", "4", "--eval-interval", "2",
        "--eval-iters", "4", "--block-size", "32"]
"""Any UTF-8 text will do: the README, 4 steps, an evaluation every 2."""


def test_integrations_plain_loop_example_runs(tmp_path):
    pytest.importorskip("transformers")
    result = example("gpt2_dropout").main(TINY + ["--controller", "constant:rate=0.1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["test_loss"] == result["test_loss"] and math.isfinite(saved["test_loss"])
    assert [h["iter"] for h in saved["history"]] == [0, 2, 4] and saved["history"][-1]["rates"] == [0.1, 0.1]


def test_integrations_hf_trainer_example_runs(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    trainer = example("hf_trainer").main(TINY + ["--out", str(tmp_path)])
    dropout = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "DynamicDropoutCallback")
    assert trainer.state.global_step == 4 and dropout.scheduler.tracker.eval_iter == 4


def test_integrations_lightning_example_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    trainer = example("lightning_gpt2").main(TINY)
    dropout = next(c for c in trainer.callbacks if type(c).__name__ == "DynamicDropoutCallback")
    assert trainer.global_step == 4 and dropout.scheduler.tracker.eval_iter == 4
