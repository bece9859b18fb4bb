"""What a hostile or unlucky user gets: bad options, bad files, a second writer, a crafted policy, a full disk.

Every bad input is one line (`error: ...`), exit status 2, and no files; nothing in a policy file runs.
"""
from __future__ import annotations

import base64
import json
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from hostile import call, one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--gen-tokens", "8",
        "--no-progress", "--wandb", "disabled"]


def spawn(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"runs.{module}", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# -- every setting checked before anything is written ------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--grad-clip", "-1"], "--grad-clip"), (["--min-lr", "-0.01"], "--min-lr"),
    (["--learning-rate", "-1"], "--learning-rate"), (["--learning-rate", "nan"], "--learning-rate"),
    (["--min-lr", "0.1"], "at most --learning-rate"), (["--beta2", "1.5"], "--beta2"), (["--beta1", "-0.1"], "--beta1"),
    (["--seed", str(10**20)], "--seed"), (["--seed", "-3"], "--seed"), (["--block-size", "1"], "--block-size"),
    (["--gen-tokens", "-1"], "--gen-tokens"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--train-chars", "20"], "--train-chars"), (["--train-chars", "2000000"], "larger than the training split"),
    (["--train-chars", "many"], "--train-chars"), (["--threads", "0"], "--threads"),
    (["--compile-mode", "fast"], "--compile-mode"), (["--device", "gpu"], "--device"),
    (["--no-such-flag"], "--help"), (["--max-iters", "ten"], "--help"),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, err = call("train", [*TINY, "--out", str(out), *args], capsys)
    one_line_error(code, err, words)
    assert not out.exists()


@pytest.mark.parametrize("command, args, words", [
    ("compare", ["--controllers", "constant", "--jobs", "0"], "--jobs"),
    ("compare", ["--controllers", "constant", "--threads", "-2"], "--threads"),
    ("compare", ["--controllers", "constant", "--target", "nan"], "--target"),
    ("compare", ["--controllers", "constant", "--seeds", "1337"], "--seeds 1337,"),
    ("train", ["--max-iters", "99999999999999999999999"], "at most 10000000"),
    ("compare", ["--controllers", "constant", "--grad-clip", "-1"], "--grad-clip"),
    ("compare", ["--controllers", "constant", "--bogus"], "--help"),
    ("bench", ["--threads", "0"], "--threads"),
    ("bench", ["--beta2", "2"], "--beta2"),
    ("train_policy", ["--learning-rate", "-1"], "--learning-rate"),
    ("train_policy", ["--gamma", "2"], "--gamma"),
    ("train_policy", ["--n-envs", "0"], "--n-envs"),
    ("eval_policy", ["--policy", "x.safetensors", "--threads", "0"], "--threads"),
    ("eval_policy", ["--policy", "x.safetensors", "--max-iters", "0"], "--max-iters"),
])
def test_every_command_checks_its_options(tmp_path, capsys, command, args, words):
    out = tmp_path / "out"
    extra = {"compare": ["--out", str(out), "--preset", "tiny"], "train_policy": ["--out", str(out)]}.get(command, [])
    code, err = call(command, [*args, *extra], capsys)
    one_line_error(code, err, words)
    assert not out.exists()


# -- a policy file never runs code -------------------------------------------------------------------

class Payload:
    """Unpickling this writes a marker file: what a crafted policy .zip could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def crafted_zip(path: Path, marker: Path) -> Path:
    """A stable-baselines3-style .zip whose ``data`` holds a serialized (pickled) entry, and valid-looking
    metadata beside it (the old format's checks pass)."""
    entry = {":type:": "<class 'abc.ABCMeta'>", ":serialized:": base64.b64encode(pickle.dumps(Payload(marker))).decode()}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", json.dumps({"policy_class": entry, "observation_space": entry}))
        z.writestr("_stable_baselines3_version", "2.9.2")
    from controllers.features import FEATURE_VERSION
    path.with_suffix(".json").write_text(json.dumps({
        "feature_version": FEATURE_VERSION, "p_min": 0.0, "p_max": 0.5, "per_layer": False, "n_layer": 2,
        "preset": "tiny", "max_iters": 20, "interval": 10, "config": {}, "train_seeds": [1], "eval_seeds": [9000]}))
    return path


@pytest.mark.parametrize("command", ["train", "compare", "eval_policy", "convert_policy"])
def test_a_crafted_policy_runs_nothing(tmp_path, capsys, command):
    marker = tmp_path / "PWNED"
    evil = crafted_zip(tmp_path / "evil.zip", marker)
    args = {"train": ["--controller", "ppo", "--policy", str(evil), *TINY, "--out", str(tmp_path / "run")],
            "compare": ["--controllers", "constant,ppo", "--policy", str(evil), *TINY, "--seeds", "1",
                        "--out", str(tmp_path / "cmp")],
            "eval_policy": ["--policy", str(evil), "--seeds", "9000", "--max-iters", "10"],
            "convert_policy": [str(evil)]}[command]
    code, err = call(command, args, capsys)
    one_line_error(code, err)
    assert not marker.exists()


def test_a_crafted_file_named_like_a_policy_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = crafted_zip(tmp_path / "evil.zip", marker)
    fake = tmp_path / "evil.safetensors"
    fake.write_bytes(evil.read_bytes())
    from controllers.features import Featurizer
    from controllers.policy_file import POLICY_FORMAT, sha256_of
    meta = json.loads(evil.with_suffix(".json").read_text())
    fake.with_suffix(".json").write_text(json.dumps({
        **meta, "format": POLICY_FORMAT, "weights_sha256": sha256_of(fake),
        "network": {"obs_dim": Featurizer.dim, "n_actions": 1, "net_arch": [64, 64], "activation": "tanh", "log_std_init": 0.0}}))
    code, err = call("train", ["--controller", "ppo", "--policy", str(fake), *TINY, "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "safetensors")
    assert not marker.exists()


# -- output folders: one writer, and --overwrite deletes only a run -----------------------------------

def test_overwrite_refuses_a_folder_with_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = call("train", [*TINY, "--out", str(out), "--overwrite"], capsys)
    one_line_error(code, err, "thesis.tex")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / "summary.json").write_text("{}")  # it even looks like a run
    monkeypatch.chdir(tmp_path)
    for out in (".", ".."):
        code, err = call("train", [*TINY, "--out", out, "--overwrite"], capsys)
        one_line_error(code, err)
    assert (tmp_path / "keep.txt").exists()


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    link = tmp_path / "link"
    (tmp_path / "target").mkdir()
    link.symlink_to(tmp_path / "target")
    for out, words in ((file, "existing file"), (link, "symlink"), (Path("/proc/dyndrop-test/run"), "cannot write")):
        code, err = call("train", [*TINY, "--out", str(out)], capsys)
        one_line_error(code, err, words)
    assert not list((tmp_path / "target").iterdir())


def test_overwrite_replaces_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert call("train", [*TINY, "--out", str(out)], capsys)[0] == 0
    code, err = call("train", [*TINY, "--out", str(out)], capsys)
    one_line_error(code, err, "already holds a run")
    assert call("train", [*TINY, "--out", str(out), "--overwrite", "--seed", "7"], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 7


@pytest.mark.parametrize("second", [["--overwrite"], ["--resume"]])
def test_a_second_writer_is_refused_and_named(tmp_path, capsys, second):
    out = tmp_path / "run"
    first = spawn("train", *TINY, "--max-iters", "100000", "--eval-interval", "50", "--out", str(out))
    try:
        wait_for(out / "ckpt_last.pt", first)
        code, err = call("train", [*TINY, "--out", str(out), *second], capsys)
        one_line_error(code, err, "in use by pid", str(first.pid))
    finally:
        first.kill()
        first.communicate()


def test_a_second_comparison_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--controllers", "constant", "--seeds", "1", "--no-warm-up", "--threads", "1", *TINY, "--out", str(out)]
    first = spawn("compare", *args[:-2], "--max-iters", "100000", "--out", str(out))
    try:
        wait_for(out / "comparison.json", first)
        code, err = call("compare", args, capsys)
        one_line_error(code, err, "in use by pid")
    finally:
        first.kill()
        first.communicate()


# -- resume always has a way forward ------------------------------------------------------------------

def test_resume_before_the_first_checkpoint_starts_afresh(tmp_path, capsys, monkeypatch):
    from gpt import Trainer

    out = tmp_path / "run"

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "evaluate", interrupted)  # Ctrl-C before anything was saved
        code, err = call("train", [*TINY, "--out", str(out)], capsys)
    assert code == 130 and "--resume" in err
    assert not (out / "ckpt_last.pt").exists()
    code, err = call("train", [*TINY, "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["iterations"] == 20


def test_resume_refuses_other_settings_and_extends_max_iters(tmp_path, capsys):
    out = tmp_path / "run"
    assert call("train", [*TINY, "--controller", "linear", "--out", str(out)], capsys)[0] == 0
    code, err = call("train", ["--resume", "--out", str(out), "--controller", "pid", "--learning-rate", "0.01",
                               "--n-embd", "32", "--no-progress"], capsys)
    one_line_error(code, err, "--controller pid", "--learning-rate 0.01", "--n-embd 32")
    code, err = call("train", ["--resume", "--out", str(out), "--max-iters", "30", "--no-progress",
                               "--wandb", "disabled"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val/loss" in r] == [0, 10, 20, 30]
    assert json.loads((out / "summary.json").read_text())["iterations"] == 30


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc = spawn("train", *TINY, "--max-iters", "100000", "--eval-interval", "50", "--out", str(out))
    wait_for(out / "ckpt_last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "--resume" in err and "Traceback" not in err
    done = torch.load(out / "ckpt_last.pt", weights_only=True)["iteration"]
    res = subprocess.run([sys.executable, "-m", "runs.train", "--resume", "--out", str(out), "--max-iters",
                          str(done + 10), "--no-progress", "--wandb", "disabled"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "summary.json").read_text())["iterations"] == done + 10


def test_sigterm_stops_a_comparison_with_workers_now_and_the_rerun_finishes_it(tmp_path):
    """SIGTERM reaches the comparison's process only, not its workers: leaving the process pool waited for the
    running trials and then ran every queued one before exiting 143 (all 6 finished here)."""
    out = tmp_path / "cmp"
    args = [*TINY, "--max-iters", "150", "--eval-interval", "50", "--gen-tokens", "0", "--controllers",
            "constant:rate=0", "constant:rate=0.1", "--seeds", "1,2,3", "--jobs", "2", "--out", str(out)]
    proc = spawn("compare", *args)
    deadline = time.monotonic() + 120
    while not list(out.glob("trials/*/summary.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "rerun the same command" in err and "Traceback" not in err, err
    assert len(list(out.glob("trials/*/summary.json"))) < 6  # the queued trials did not run
    res = subprocess.run([sys.executable, "-m", "runs.compare", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(list(out.glob("trials/*/summary.json"))) == 6


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys, monkeypatch):
    from gpt import Trainer

    out = tmp_path / "run"
    real = Trainer.advance

    def crash_after_10(self, n, bar=None):
        if self.iteration >= 10:
            raise KeyboardInterrupt
        real(self, n, bar)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "advance", crash_after_10)
        assert call("train", [*TINY, "--out", str(out)], capsys)[0] == 130
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 12, "train/lo')  # the kill came in the middle of a line
    assert call("train", [*TINY, "--out", str(out), "--resume"], capsys)[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["iter"] <= 20 for line in lines)


# -- files the project reads: one line naming the file ------------------------------------------------

def damage(ckpt: dict, how: str) -> dict:
    if how == "missing key":
        del ckpt["optimizer"]
    elif how == "setting from another version":
        ckpt["config"]["warp_drive"] = True
    elif how == "optimizer groups":
        ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][:1]
    elif how == "empty controller state":
        ckpt["controller"] = {}
    elif how == "not a dict":
        ckpt = [1, 2, 3]
    return ckpt


@pytest.mark.parametrize("how", ["missing key", "setting from another version", "optimizer groups",
                                 "empty controller state", "not a dict"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, how):
    out = tmp_path / "run"
    assert call("train", [*TINY, "--controller", "pid", "--out", str(out)], capsys)[0] == 0
    path = out / "ckpt_last.pt"
    torch.save(damage(torch.load(path, weights_only=True), how), path)
    code, err = call("train", ["--resume", "--out", str(out), "--no-progress", "--wandb", "disabled"], capsys)
    one_line_error(code, err, "ckpt_last.pt")


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import gpt.trainer

    out = tmp_path / "run"
    real, saves = gpt.trainer.atomic_save, []

    def fill_up(obj, path):
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(gpt.trainer, "atomic_save", fill_up)
    code, err = call("train", [*TINY, "--out", str(out)], capsys)
    one_line_error(code, err, "No space left", "last good checkpoint")
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["iteration"] == 0


@pytest.mark.parametrize("victim, content", [("comparison.json", ""), ("comparison.json", "{oops"),
                                             ("trial.json", "[]"), ("summary.json", "")])
def test_corrupt_comparison_files_name_the_file(tmp_path, capsys, victim, content):
    out = tmp_path / "cmp"
    args = ["--controllers", "constant", "--seeds", "1", "--no-warm-up", "--threads", "1", *TINY, "--out", str(out)]
    assert call("compare", args, capsys)[0] == 0
    path = out / victim if victim == "comparison.json" else next((out / "trials").glob(f"*/{victim}"))
    path.write_text(content)
    code, err = call("report", [str(out)], capsys)
    one_line_error(code, err, str(path))
    if victim != "comparison.json":  # a rerun reads the trial files too
        code, err = call("compare", args, capsys)
        one_line_error(code, err, str(path))


def test_divergence_in_the_warm_up_is_recorded_not_a_crash(tmp_path, capsys):
    out = tmp_path / "cmp"
    # a batch size no other test uses: the warm-up runs once per process and model shape
    code, err = call("compare", ["--controllers", "constant@0,0.1", "--seeds", "1", "--threads", "1", *TINY,
                                 "--batch-size", "5", "--learning-rate", "1e30", "--min-lr", "0", "--weight-decay", "0",
                                 "--out", str(out)],
                     capsys)
    one_line_error(code, err, "diverged")
    assert len(list((out / "trials").glob("*/diverged.json"))) == 2
