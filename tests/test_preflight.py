"""One pre-flight before anything is written or trained: output paths and name lengths, trial folders that two
specs would share, what ``--overwrite`` may delete, and where a report or a benchmark can be written (issue #22,
items 5, 6, 12, 22, 23 and the spec cosmetics)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hostile import TINY, call, one_line_error, read_only

LONG = "x" * 300


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    """A finished two-trial comparison (one controller, two seeds)."""
    import contextlib
    import io

    from runs.compare import cli

    out = tmp_path_factory.mktemp("cmp") / "cmp"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli([*TINY, "--controllers", "constant:rate=0.1", "--seeds", "1,2", "--no-warm-up", "--out", str(out)]) == 0
    return out


# -- names and paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "compare", "pbt"])
def test_an_out_name_too_long_for_the_filesystem_is_one_line_and_writes_nothing(tmp_path, capsys, command):
    """#22 item 22: a 300-character --out gave an ENAMETOOLONG traceback (compare had written comparison.json)."""
    if command == "pbt":
        pytest.importorskip("ray.tune")  # without the ray extra, runs.pbt refuses first: it needs Ray Tune
    args = {"compare": ["--controllers", "constant", "--seeds", "1,"], "pbt": ["--population", "2"]}.get(command, [])
    code, err = call(command, [*TINY, *args, "--out", str(tmp_path / LONG)], capsys)
    one_line_error(code, err, "300 bytes", "--out")
    assert list(tmp_path.iterdir()) == []


def test_a_spec_too_long_for_a_folder_name_gets_a_shortened_trial_folder(tmp_path, capsys):
    """#22 item 22: a 300-character spec made a trial folder name the filesystem refused, after comparison.json."""
    from controllers.specs import parse_controllers

    spec = f"pid:signal=gap,window={10 ** 280}"  # a valid window: as many evaluations as there are
    assert len(parse_controllers(spec)[0]) > 255
    out = tmp_path / "cmp"
    code, err = call("compare", [*TINY, "--controllers", spec, "--seeds", "1,", "--no-warm-up", "--out", str(out)],
                     capsys)
    assert code == 0, err
    (folder,) = (out / "trials").iterdir()
    assert len(folder.name.encode()) <= 255 and folder.name.startswith("pid_signalgap")


def test_slugs_stay_distinct_and_fit_a_file_name():
    from controllers.specs import SLUG_MAX, slug

    a, b = "ppo:policy=" + "a/" * 150 + "p.safetensors", "ppo:policy=" + "a/" * 151 + "p.safetensors"
    assert len(slug(a)) <= SLUG_MAX and len(slug(b)) <= SLUG_MAX and slug(a) != slug(b)
    assert slug("constant:rate=0.1") == "constant_rate0.1"  # short specs keep their folder names


def test_bench_json_that_is_a_folder_fails_before_the_benchmark(tmp_path, capsys):
    """#22 item 23: --json <a folder> failed with IsADirectoryError after the whole benchmark ran."""
    import runs.bench

    ran = []
    real = runs.bench.run_benchmark
    runs.bench.run_benchmark = lambda *a, **k: ran.append(1) or real(*a, **k)
    try:
        code, err = call("bench", ["--preset", "tiny", "--iters", "2", "--ref-iters", "2", "--eval-passes", "1",
                                   "--untimed-iters", "1", "--rounds", "1", "--gen-repeats", "1", "--no-sampling",
                                   "--threads", "1", "--json", str(tmp_path)], capsys)
    finally:
        runs.bench.run_benchmark = real
    one_line_error(code, err, "--json", "is a folder")
    assert ran == []


# -- two specs, one folder ------------------------------------------------------------------------------

def test_specs_that_mean_one_controller_are_one_row(tmp_path, capsys):
    """#22 item 5: constant:rate=0.1 and constant:rate=+0.1 trained into one folder, the second deleting the first,
    and exited 2 only after training; every rerun failed the same way."""
    out = tmp_path / "cmp"
    args = [*TINY, "--controllers", "constant:rate=0.1,constant:rate=+0.1", "--seeds", "1,", "--no-warm-up",
            "--out", str(out)]
    for _ in range(2):  # and the rerun reuses it
        code, err = call("compare", args, capsys)
        assert code == 0, err
    assert [p.name for p in (out / "trials").iterdir()] == ["constant_rate0.1-s1"]
    assert json.loads((out / "comparison.json").read_text())["specs"] == ["constant:rate=0.1"]


def test_specs_that_would_share_a_folder_are_refused_before_anything_is_written(tmp_path):
    from dyndrop import UserError
    from experiments.comparison import Comparison
    from gpt.config import make_config

    specs = ["ppo:policy=a/p.safetensors", "ppo:policy=ap.safetensors"]  # one slug: ppo_policyap.safetensors
    with pytest.raises(UserError, match="would share the trial folders"):
        Comparison(cfg=make_config("tiny"), specs=specs, seeds=[1], out=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_spec_lists_are_written_one_way_and_a_key_counts_once():
    """Cosmetics of #22: constant@0.1,0.10 made two identical rows; pbt:population=2,population=3 took the last."""
    from controllers import make_controller, parse_controllers
    from dyndrop import UserError
    from experiments.pbt import PBT, pbt_settings

    assert parse_controllers("constant@0.1,0.10,+0.1,1e-1") == ["constant:rate=0.1"]
    assert parse_controllers("constant@0,0.2,linear:end=0@start=0.1,pid:kp=2.0") == [
        "constant:rate=0", "constant:rate=0.2", "linear:end=0,start=0.1", "pid:kp=2"]
    for bad in ("constant:rate=0.1,rate=0.2", "pid:kp=1,kp=1"):
        with pytest.raises(UserError, match="given twice"):
            parse_controllers(bad)
        with pytest.raises(UserError, match="given twice"):
            make_controller(bad)
    with pytest.raises(UserError, match="given twice"):
        pbt_settings(parse_controllers("pbt:population=2,population=3", rows=(PBT,))[0])


# -- what --overwrite may delete --------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_train_never_writes_into_a_comparison(comparison, tmp_path, capsys, flags):
    """#22 item 6: runs.train --out <a comparison> --overwrite deleted the whole comparison."""
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = call("train", [*TINY, "--out", str(out), *flags], capsys)
    one_line_error(code, err, "holds a comparison", "choose another --out")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_of_a_folder_holding_a_comparison_is_refused_by_the_one_place_that_deletes():
    """clear_run_folder, which every --overwrite goes through, refuses a comparison whoever calls it."""
    import tempfile

    from dyndrop import UserError
    from dyndrop.folders import clear_run_folder

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials" / "constant_rate0-s1").mkdir(parents=True)
        with pytest.raises(UserError, match="holds a comparison"):
            clear_run_folder(tmp)
        assert (Path(tmp) / "trials" / "constant_rate0-s1").is_dir()


# -- a report where it can be written -------------------------------------------------------------------

def test_a_report_of_a_read_only_comparison_says_so_and_writes_elsewhere_on_request(comparison, tmp_path, capsys):
    """#22 item 12: runs.report on a read-only comparison folder gave a PermissionError traceback."""
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    elsewhere = tmp_path / "report"
    with read_only(out):
        code, err = call("report", [str(out)], capsys)
        one_line_error(code, err, str(out), "--out")
        code, err = call("report", [str(out), "--out", str(elsewhere)], capsys)
        assert code == 0, err
    assert (elsewhere / "report.html").is_file() and (elsewhere / "figures" / "val_loss.png").is_file()
    assert (elsewhere / "results.json").is_file() and not (out / "report.html").exists()


def test_a_refusal_lists_only_the_settings_the_user_changed(comparison, tmp_path, capsys):
    """Cosmetic of #22: a refusal listed the derived lr_decay_iters beside the max_iters the user changed."""
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    args = [*TINY, "--controllers", "constant:rate=0.1", "--seeds", "1,2", "--no-warm-up", "--out", str(out)]
    line = one_line_error(*call("compare", [*args, "--max-iters", "30"], capsys), "max_iters: 20 -> 30")
    assert "lr_decay_iters" not in line and "control_interval" not in line
