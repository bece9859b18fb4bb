"""End-to-end behaviour of the trainer and `python -m runs.train`: outputs, resume, errors, compile."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controllers import Controller, make_controller
from gpt import Trainer, make_config
from gpt.trainer import Diverged, load_checkpoint
from runs.train import cli

SHORT = ["--preset", "tiny", "--max-iters", "40", "--eval-interval", "10", "--eval-iters", "2",
         "--gen-tokens", "8", "--no-progress", "--wandb", "disabled"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_summary_metrics_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert cli(["--controller", "linear:start=0.3,end=0.0", "--out", str(out), *SHORT]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_val_loss", "best_val_iter", "final_train_loss", "final_val_loss", "total_train_time_s",
                "train_tokens_per_s", "inference_tokens_per_s", "recompiles", "controller", "preset", "seed"):
        assert key in summary, key
    assert summary["controller"] == "linear" and summary["preset"] == "tiny" and summary["iterations"] == 40
    assert summary["best_val_loss"] < 4.17  # better than the untrained model's ln(65)
    records = read_metrics(out)
    rates = [r["dropout/rate"] for r in records if "dropout/rate" in r]
    assert rates == pytest.approx([0.3 * (1 - i / 4) for i in range(4)])  # one per control step, decaying
    assert [r["iter"] for r in records if "val/loss" in r] == [0, 10, 20, 30, 40]
    assert (out / "ckpt_last.pt").exists() and (out / "ckpt_best.pt").exists()
    assert not list(out.glob("*.tmp"))
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)  # loads with weights_only
    assert ckpt["iteration"] == 40


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["--controller", "constant", "--out", str(out), *SHORT]) == 0
    capsys.readouterr()
    assert cli(["--controller", "constant", "--out", str(out), *SHORT]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["--controller", "pid:signal=gap,setpoint=0,kp=2.0,ki=2.0,start=0", *SHORT, "--max-iters", "60"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli([*args, "--out", str(full)]) == 0

    real_advance = Trainer.advance

    def crash_at_35(self, n, bar=None):
        if self.iteration + n > 35:
            real_advance(self, 35 - self.iteration, bar)
            raise KeyboardInterrupt
        real_advance(self, n, bar)

    monkeypatch.setattr(Trainer, "advance", crash_at_35)
    assert cli([*args, "--out", str(part)]) == 130
    assert torch.load(part / "ckpt_last.pt", weights_only=True)["iteration"] == 30
    monkeypatch.setattr(Trainer, "advance", real_advance)
    assert cli(["--resume", "--out", str(part), "--no-progress", "--wandb", "disabled"]) == 0

    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert a["best_val_loss"] == b["best_val_loss"]
    assert a["final_train_loss"] == b["final_train_loss"]
    assert a["final_rates"] == b["final_rates"]
    assert a["controller_explanation"] == b["controller_explanation"]  # where the rate changed travels in checkpoints
    assert a["controller_explanation"].startswith("PID (gap) held 0 until iteration ")
    strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in recs]
    assert strip(read_metrics(full)) == strip(read_metrics(part))  # the same history, no duplicates


def test_checkpoint_holds_the_state_of_the_moment_it_was_saved(chardata, tmp_path, monkeypatch):
    """The background writer saves a snapshot: training on while the file is written changes nothing in it."""
    import threading

    import gpt.trainer
    go, real_save = threading.Event(), gpt.trainer.atomic_save

    def held_save(obj, path):  # the write starts only once training has moved on
        assert go.wait(timeout=60)
        real_save(obj, path)

    monkeypatch.setattr(gpt.trainer, "atomic_save", held_save)
    cfg = make_config("tiny", eval_iters=1, gen_tokens=0, progress=False, out=str(tmp_path))
    trainer = Trainer(cfg, make_controller("constant:rate=0.1"), data=chardata)
    trainer.advance(5)
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    last = trainer.save_checkpoint(best=True)
    trainer.advance(5)
    go.set()
    trainer.checkpoints.wait()
    for path in (last, tmp_path / "ckpt_best.pt"):
        ckpt = load_checkpoint(path)
        assert ckpt["iteration"] == 5 and ckpt["optimizer"]["state"][0]["step"].item() == 5
        assert all(torch.equal(ckpt["model"][k], v) for k, v in expected.items())
    trainer.advance(1)
    trainer.save_checkpoint(wait=True)  # a new last; best stays the iteration-5 file
    assert load_checkpoint(last)["iteration"] == 11
    assert load_checkpoint(tmp_path / "ckpt_best.pt")["iteration"] == 5


def test_best_is_copied_where_hard_links_are_unsupported(tmp_path, monkeypatch):
    import os

    from gpt.trainer import link_or_copy

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    src, dst = tmp_path / "last", tmp_path / "best"
    src.write_bytes(b"first")
    dst.write_bytes(b"older best")
    link_or_copy(src, dst)
    src.write_bytes(b"second")  # a later `last` must not change `best`
    assert dst.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["best", "last"]


def test_a_failed_checkpoint_write_is_raised(chardata, tmp_path, monkeypatch):
    import gpt.trainer

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpt.trainer, "atomic_save", full_disk)
    cfg = make_config("tiny", eval_iters=1, gen_tokens=0, progress=False, out=str(tmp_path))
    trainer = Trainer(cfg, make_controller("constant"), data=chardata)
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint(wait=True)


class Flipper(Controller):
    """Changes the rate at every control step, through zero and back."""
    name = "flipper"

    def _reset(self):
        self.k = 0

    def _update(self, stats):
        self.k += 1
        return [0.0, 0.05, 0.1, 0.2, 0.3][self.k % 5]


@pytest.mark.parametrize("attention_dropout", ["manual", "fused"])
def test_compiled_model_does_not_recompile_when_the_rate_changes(chardata, attention_dropout):
    torch._dynamo.reset()
    cfg = make_config("tiny", max_iters=30, eval_interval=5, eval_iters=1, gen_tokens=0, compile=True,
                      checkpoint=False, progress=False, attention_dropout=attention_dropout)
    trainer = Trainer(cfg, Flipper(), data=chardata)
    trainer.train()  # 6 control steps: every rate of the cycle, through 0 and back, has been seen
    seen = trainer.recompiles
    if attention_dropout == "manual":
        assert seen in (0, 1)  # at most the graph without dropout, built once
    for _ in range(10):  # another two cycles: nothing new to build
        trainer.control()
        trainer.advance(3)
    trainer.evaluate()
    assert trainer.recompiles == seen


def test_divergence_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step = Trainer._train_step

    def poisoned(self):
        real_step(self)
        if self.iteration > 25:
            self._acc[0] = float("nan")

    monkeypatch.setattr(Trainer, "_train_step", poisoned)
    assert cli(["--controller", "constant", "--out", str(out), *SHORT]) == 1
    err = capsys.readouterr().err
    assert "nan" in err and "ckpt_last.pt" in err
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["iteration"] == 20
    assert not (out / "summary.json").exists()


def test_trainer_raises_diverged_on_nan_eval(chardata, monkeypatch):
    cfg = make_config("tiny", max_iters=10, eval_interval=5, eval_iters=1, gen_tokens=0, checkpoint=False,
                      progress=False)
    trainer = Trainer(cfg, make_controller("constant"), data=chardata)
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(Diverged):
        trainer.train()


def test_merged_evaluation_scores_the_same_batches(chardata):
    """k batches per pass (uneven last pass included) give the mean of the one-batch-per-pass losses."""
    losses = []
    for merge in (1, 3, 8):
        cfg = make_config("tiny", max_iters=0, eval_iters=8, eval_merge=merge, checkpoint=False, progress=False)
        trainer = Trainer(cfg, make_controller("constant"), data=chardata)
        result = trainer.evaluate()
        losses.append((result["train_loss"], result["val_loss"]))
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-5)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runs.train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--controller", "nope"], "unknown controller"),
    (["--preset", "huge"], "unknown preset"),
    (["--controller", "pid:kq=1"], "bad parameter"),
    (["--controller", "pid:kp=abc"], "not a valid"),
    (["--controller", "constant:rate=1.5"], "[0, 1)"),
    (["--data", "/nonexistent/input.txt"], "dataset not found"),
    (["--eval-merge", "0"], "--eval-merge"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_files(tmp_path, args, words):
    out = tmp_path / "run"
    res = run_cli(*SHORT, "--out", str(out), *args, cwd=Path(__file__).parents[1])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_unreadable_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_last.pt").write_bytes(b"not a checkpoint")
    res = run_cli("--resume", "--out", str(out), "--no-progress", cwd=Path(__file__).parents[1])
    assert res.returncode == 2 and "unreadable" in res.stderr and "Traceback" not in res.stderr


def test_offline_wandb_run_is_written(tmp_path):
    out = tmp_path / "run"
    args = [a for a in SHORT if a not in ("--wandb", "disabled")]
    assert cli(["--controller", "pid", "--out", str(out), *args, "--wandb", "offline"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
