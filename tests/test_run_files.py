"""One tolerant reader for the files a run leaves (``metrics.jsonl``, ``summary.json``), used by every command:
a summary that is not one is one line naming the file; a metrics line that holds no record is skipped with a
warning, and a torn last line is dropped on resume (issue #22, items 8, 19, 20)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hostile import TINY, call, one_line_error


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    """A finished comparison of one controller on two seeds."""
    import contextlib
    import io

    from runs.compare import cli

    out = tmp_path_factory.mktemp("files") / "cmp"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli([*TINY, "--controllers", "constant:rate=0.1", "--seeds", "1,2", "--no-warm-up", "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(comparison, tmp_path) -> Path:
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    return out


@pytest.mark.parametrize("summary, words", [
    ({}, "no best_val_loss"),  # item 8: counted as a seed (n=2, figures from one), exit 0
    ({"best_val_loss": "1.5", "test_loss": 2.0}, "best_val_loss is '1.5', not a number"),  # item 20: TypeError
    ({"best_val_loss": 1.5, "test_loss": [2.0]}, "test_loss"),
    ({"best_val_loss": 1.5, "device_name": ["cpu"]}, "device_name"),
])
def test_a_summary_that_is_not_one_is_one_line_naming_the_file(copy, capsys, summary, words):
    path = copy / "trials" / "constant_rate0.1-s2" / "summary.json"
    path.write_text(json.dumps(summary))
    one_line_error(*call("report", [str(copy)], capsys), str(path), words)
    args = [*TINY, "--controllers", "constant:rate=0.1", "--seeds", "1,2", "--no-warm-up", "--out", str(copy)]
    one_line_error(*call("compare", args, capsys), str(path), words)  # the rerun reads it with the same reader


def test_a_stray_byte_in_metrics_is_a_warning_in_the_report(copy, capsys):
    """#22 item 19: printf '\\xff' >> metrics.jsonl gave a UnicodeDecodeError traceback in runs.report."""
    path = copy / "trials" / "constant_rate0.1-s1" / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b"\xff")
    lines = len(path.read_bytes().splitlines())
    code, err = call("report", [str(copy)], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {path}: line {lines} holds no metrics record; skipped"], err
    assert "Traceback" not in err
    assert json.loads((copy / "results.json").read_text())["rows"][0]["n"] == 2


def test_a_stray_byte_in_metrics_is_dropped_on_resume(tmp_path, capsys):
    """#22 item 19: the same byte gave a UnicodeDecodeError traceback in --resume."""
    out = tmp_path / "run"
    assert call("train", [*TINY, "--out", str(out)], capsys)[0] == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff")
    code, err = call("train", ["--resume", "--out", str(out), "--max-iters", "30"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val/loss" in r] == [0, 10, 20, 30]


@pytest.mark.parametrize("line", [b'{"iter": 5, "val/loss": "low"}', b'{"iter": "5"}', b'{"iter": true}',
                                  b'[1, 2]', b'{"iter": -1}', b'\xff\xfe', b'{"iter": 5, "train/loss": [1]}'])
def test_a_line_that_holds_no_record_is_skipped_with_a_warning(tmp_path, capsys, line):
    from gpt.tracking import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"iter": 0, "val/loss": 4.0}\n' + line + b'\n{"iter": 10, "val/loss": 3.0, "pbt/member": "a"}\n')
    assert [r["iter"] for r in read_records(path)] == [0, 10]
    assert capsys.readouterr().err == f"warning: {path}: line 2 holds no metrics record; skipped\n"
    path.write_bytes(b'{"iter": 0, "val/loss": 4.0}\n' + line)
    assert [r["iter"] for r in read_records(path, drop_torn_last=True)] == [0]  # a torn last line, silently
    assert capsys.readouterr().err == ""
