"""Comparisons (`python -m runs.compare`) and their report (`python -m runs.report`) on the tiny preset."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dyndrop import UserError
from controllers import parse_controllers
from experiments.stats import holm, mean_ci, paired_test, pick_baseline, tost, verdict
from runs.compare import cli as compare_cli
from runs.report import cli as report_cli

# 40 steps, evaluations every 10 on 2 batches: about a second per trial on 2 CPU cores.
SHORT = ["--preset", "tiny", "--max-iters", "40", "--eval-interval", "10", "--eval-iters", "2", "--gen-tokens", "8",
         "--threads", "1", "--no-progress", "--wandb", "disabled"]
CONTROLLERS = ["--controllers", "constant@0,0.1", "linear"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- controller lists -------------------------------------------------------------------------------

def test_sweeps_expand_and_parameters_keep_their_commas():
    assert parse_controllers("constant@0,0.1,0.2,linear,pid") == [
        "constant:rate=0", "constant:rate=0.1", "constant:rate=0.2", "linear", "pid"]
    assert parse_controllers(["linear:start=0.3,end=0", "val_loss"]) == ["linear:start=0.3,end=0", "val_loss"]
    assert parse_controllers("linear:end=0@start=0.1,0.3,early") == [
        "linear:end=0,start=0.1", "linear:end=0,start=0.3", "early"]
    assert parse_controllers("pid@signal=gap,val_slope") == ["pid:signal=gap", "pid:signal=val_slope"]
    assert parse_controllers("constant@0.1,constant:rate=0.1,linear,linear") == ["constant:rate=0.1", "linear"]


@pytest.mark.parametrize("text", ["", "0.1,linear", "nosuch@1,2"])
def test_bad_controller_lists_are_user_errors(text):
    with pytest.raises(UserError):
        parse_controllers(text)


# -- statistics -------------------------------------------------------------------------------------

def test_mean_ci_is_the_student_t_interval():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert mean - low == pytest.approx(high - mean)
    assert mean_ci([2.0, 2.0]) == (2.0, 2.0, 2.0)
    m1, l1, h1 = mean_ci([5.0, math.nan])  # nan ignored; one value has no interval
    assert m1 == 5.0 and math.isnan(l1) and math.isnan(h1)


def test_paired_test_pairs_by_seed_and_baseline_is_best_constant():
    base = {1: 1.50, 2: 1.60, 3: 1.55}
    better = {1: 1.45, 2: 1.56, 3: 1.50, 4: 9.9}  # seed 4 has no partner and is left out
    test = paired_test(better, base)
    assert test["n"] == 3 and test["delta"] == pytest.approx(-0.0466667, abs=1e-6)
    assert 0.0 < test["p"] < 0.05  # consistent small improvement over seed-to-seed variation
    assert math.isnan(paired_test(base, base)["p"])
    assert pick_baseline({"constant:rate=0": [1.6, 1.7], "constant:rate=0.2": [1.5, 1.6], "pid": [1.0]}) \
        == "constant:rate=0.2"
    assert pick_baseline({"pid": [1.0]}) is None


def test_holm_tost_and_the_verdict():
    # Holm: sorted 0.01, 0.03, 0.04 times 3, 2, 1, then running maxima: 0.03, 0.06, 0.06
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": math.nan}, nan_ok=True)
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert tost([0.001, -0.002, 0.0005, 0.001, 0.0]) < 0.05  # tight around 0: within ±0.01
    assert tost([0.02, 0.03, 0.025]) > 0.5  # clearly outside
    assert tost([0.0, 0.05, -0.05]) > 0.05  # around 0 but too noisy to show it
    assert verdict(-0.02, 0.01, math.nan) == "better" and verdict(0.02, 0.01, 0.9) == "worse"
    assert verdict(0.001, 0.5, 0.01) == "equivalent (±0.01)" and verdict(0.001, 0.5, 0.3) == "not shown"


# -- a whole comparison ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "tiny2x3"
    assert compare_cli([*CONTROLLERS, "--seeds", "2", "--out", str(out), *SHORT]) == 0
    return out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def test_table_has_every_figure_with_ordered_cis_a_baseline_and_p_values(comparison):
    results = json.loads((comparison / "results.json").read_text())
    rows, meta = results["rows"], results["meta"]
    assert [r["controller"] for r in rows] == ["constant:rate=0", "constant:rate=0.1", "linear"]
    assert len(results["trials"]) == 6 and meta["trials_finished"] == 6 and meta["concurrent_trials"] == [1]
    for row in rows:
        assert row["n"] == 2 and row["diverged"] == 0
        for key in ("test_loss", "best_val_loss_full", "best_val_loss", "final_train_loss", "total_train_time_s",
                    "train_tokens_per_s", "inference_tokens_per_s"):
            assert row[key] is not None and row[key] > 0, (row["controller"], key)
            assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"], (row["controller"], key)
        assert row["best_val_loss"] < 4.17  # better than the untrained model's ln(65)
    baselines = [r for r in rows if r["baseline"]]
    assert len(baselines) == 1 and baselines[0]["controller"].startswith("constant:")
    base = baselines[0]
    # the baseline is the constant with the lowest val loss (full split); rows are compared by their test loss
    full = {r["controller"]: r["best_val_loss_full"] for r in rows if r["controller"].startswith("constant")}
    assert base["best_val_loss_full"] == min(full.values())
    assert meta["baseline"] == base["controller"] and meta["headline"] == "test_loss"
    assert "iters_to_target" not in base  # no --target: no time-to-target columns
    tested = [r for r in rows if not r["baseline"]]
    assert {r["controller"]: r["p_holm"] for r in tested} == pytest.approx(
        holm({r["controller"]: r["p_value"] for r in tested}))
    for row in tested:
        assert 0.0 <= row["p_value"] <= row["p_holm"] <= 1.0 and row["pairs"] == 2
        assert row["delta_test_loss_low"] <= row["delta_test_loss"] <= row["delta_test_loss_high"]
        trials = {t["seed"]: t["test_loss"] for t in results["trials"] if t["controller"] == row["controller"]}
        base_trials = {t["seed"]: t["test_loss"] for t in results["trials"] if t["controller"] == meta["baseline"]}
        assert row["delta_test_loss"] == pytest.approx(sum(trials[s] - base_trials[s] for s in trials) / len(trials))
        assert row["verdict"] == verdict(row["delta_test_loss"], row["p_holm"], row["p_equivalent"])

    md = (comparison / "results.md").read_text()
    assert f"**{base['controller']}** (baseline)" in md and "linear" in md and "p (Holm)" in md
    with (comparison / "results.csv").open() as f:
        assert [r["controller"] for r in csv.DictReader(f)] == [r["controller"] for r in rows]


def test_runs_of_a_seed_share_init_and_evaluation_batches(comparison):
    first_val = {}
    for trial in (comparison / "trials").iterdir():
        records = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        seed = json.loads((trial / "summary.json").read_text())["seed"]
        first_val.setdefault(seed, set()).add(next(r["val/loss"] for r in records if "val/loss" in r))
        assert any("perf/wall_time_s" in r for r in records)
    assert all(len(v) == 1 for v in first_val.values())  # same seed: same model at step 0, same batches
    assert len({v.pop() for v in first_val.values()}) == 2  # different seeds differ


def test_rerun_skips_finished_trials_and_changed_settings_are_refused(comparison, capsys):
    summaries = sorted((comparison / "trials").glob("*/summary.json"))
    assert len(summaries) == 6
    before = {p: p.stat().st_mtime_ns for p in summaries}
    assert compare_cli([*CONTROLLERS, "--seeds", "2", "--out", str(comparison), *SHORT]) == 0
    assert "6 already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in summaries} == before

    assert compare_cli([*CONTROLLERS, "--seeds", "2", "--out", str(comparison), *SHORT, "--max-iters", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "max_iters" in err and "\n" not in err
    assert {p: p.stat().st_mtime_ns for p in summaries} == before


def test_report_writes_html_and_png_figures(comparison):
    assert report_cli([str(comparison)]) == 0
    page = (comparison / "report.html").read_text()
    for name in ("val_loss", "dropout_rate", "gap", "best_val"):
        png = comparison / "figures" / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 150, name
        assert f"alt='{name}'" in page
    assert "(baseline)" in page and "constant:rate=0.1" in page


@pytest.mark.parametrize("args", [
    ["--controllers", "nosuch", "--seeds", "1"],
    ["--controllers", "constant", "--seeds", "0"],
    ["--controllers", "constant", "--jobs", "0"],
    ["--controllers", "constant,linear", "--policy", "p.zip"],
    ["--controllers", "constant", "--baseline", "linear"],
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args):
    assert compare_cli([*args, "--out", str(tmp_path / "c"), *SHORT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_a_target_adds_iterations_to_it_per_seed_and_paired(comparison, tmp_path):
    out = tmp_path / "target"
    import shutil

    shutil.copytree(comparison, out)
    assert compare_cli([*CONTROLLERS, "--seeds", "2", "--out", str(out), *SHORT, "--target", "4.0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["target_val_loss"] == 4.0
    for t in results["trials"]:  # every run passes 4.0 nats at its second evaluation or sooner
        assert t["iters_to_target"] in (0, 10) and t["secs_to_target"] >= 0
    for row in results["rows"]:
        assert row["reached_target"] == 2 and "p_iters_to_target" in row
    assert "iters to target" in (out / "results.md").read_text()


def test_report_of_a_folder_without_a_comparison_is_an_error(tmp_path, capsys):
    assert report_cli([str(tmp_path)]) == 2
    assert "runs.compare" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_workers_give_the_same_results_as_one_process(comparison, tmp_path):
    out = tmp_path / "parallel"
    assert compare_cli(["--controllers", "constant@0,0.1", "--seeds", "1", "--jobs", "2", "--out", str(out), *SHORT]) == 0
    rows = {r["controller"]: r for r in _rows(out)}
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["concurrent_trials"] == [2] and rows["constant:rate=0"]["concurrent_trials"] == "2"
    sequential = {(t["controller"], t["seed"]): t["best_val_loss"]
                  for t in json.loads((comparison / "results.json").read_text())["trials"]}
    for spec in ("constant:rate=0", "constant:rate=0.1"):
        assert rows[spec]["best_val_loss"] == sequential[(spec, 1337)]  # one thread each: bitwise the same


def test_offline_comparison_puts_every_wandb_run_under_one_folder(tmp_path):
    """`wandb leet <out>/wandb` browses the whole comparison: every trial's run and the table's sit there,
    and wandb's own reader finds each trial's best_val_loss in its summary."""
    import shutil
    import subprocess

    out = tmp_path / "cmp"
    args = [a for a in SHORT if a not in ("--wandb", "disabled")]
    assert compare_cli([*args, "--wandb", "offline", "--controllers", "constant@0,0.1", "--seeds", "1",
                        "--out", str(out)]) == 0
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # two trials and the table
    assert not list((out / "trials").glob("*/wandb"))
    wandb_cli = shutil.which("wandb")
    assert wandb_cli, "the wandb command comes with the wandb package"
    summaries = {}
    for run in runs:
        res = subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", str(run)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        record = json.loads(res.stdout)
        summaries[record["name"]] = record["summary"]
    assert set(summaries) == {"constant:rate=0-s1337", "constant:rate=0.1-s1337", "cmp-table"}
    for name in ("constant:rate=0-s1337", "constant:rate=0.1-s1337"):
        assert 0 < summaries[name]["best_val_loss"] < 4.2, summaries[name]


WORKER_OF_A_KILLED_PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from experiments.comparison import exit_with_parent

def pid_then_sleep():
    return os.getpid()

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),))
    print(pool.submit(pid_then_sleep).result(), flush=True)
    os._exit(137)  # as kill -9 would: the pool gets no chance to stop its worker
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_exits_when_the_comparison_process_is_killed(tmp_path):
    """A comparison killed with SIGKILL must not leave workers training into its folder."""
    script = tmp_path / "parent.py"
    script.write_text(WORKER_OF_A_KILLED_PARENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 137, res.stderr
    worker = int(res.stdout.split()[0])
    for _ in range(300):  # the worker polls every PARENT_POLL_S; allow a loaded machine a minute
        if not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, 9)
        raise AssertionError("the worker of a killed comparison was still running a minute later")
