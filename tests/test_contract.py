"""One contract for what a run records and what a trial folder holds, and no special cases in the paths:
records built in one place, a trial folder written by one class, derived settings that cannot go stale, a
trainer that always has a controller, executors as a registry."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dyndrop import UserError
from gpt.config import canonical_settings, make_config


def test_derived_settings_follow_a_replaced_run_length():
    """``dataclasses.replace(cfg, max_iters=...)`` used to keep the old ``lr_decay_iters``: the cosine decay then
    ended at the old length, and the rest of the longer run sat at ``min_lr``."""
    from gpt.trainer import lr_at

    cfg = make_config("tiny")
    longer = dataclasses.replace(cfg, max_iters=2 * cfg.max_iters)
    assert longer.decay_iters == longer.max_iters and longer.control_every == longer.eval_interval
    assert lr_at(longer, cfg.max_iters) > 2 * longer.min_lr  # half-way through the longer run's decay
    assert lr_at(longer, longer.max_iters) == pytest.approx(longer.min_lr)
    fresh = make_config("tiny", max_iters=2 * cfg.max_iters)
    assert [lr_at(longer, i) for i in range(0, 600, 37)] == [lr_at(fresh, i) for i in range(0, 600, 37)]
    assert dataclasses.replace(cfg, eval_interval=7).control_every == 7
    assert make_config("tiny", lr_decay_iters=100).decay_iters == 100  # given explicitly, it stays


def test_configs_saved_with_resolved_derived_settings_compare_equal_to_new_ones():
    cfg = dataclasses.asdict(make_config("tiny"))
    old = {**cfg, "lr_decay_iters": cfg["max_iters"], "control_interval": cfg["eval_interval"]}  # as saved before
    assert canonical_settings(old) == canonical_settings(cfg)
    assert canonical_settings({**old, "lr_decay_iters": 7}) != canonical_settings(cfg)


def test_a_trainer_without_a_controller_holds_the_rate_it_is_given(chardata, tmp_path):
    from controllers import HoldRate
    from gpt import Trainer

    cfg = make_config("tiny", max_iters=20, eval_interval=10, eval_iters=1, gen_tokens=0, checkpoint=False,
                      progress=False, wandb="disabled", out=str(tmp_path))
    trainer = Trainer(cfg, data=chardata)
    assert isinstance(trainer.controller, HoldRate)
    trainer.set_dropout(0.15)
    summary = trainer.train()
    assert summary["controller"] == "hold" and summary["final_rates"] == [0.15, 0.15]
    assert trainer.state_dict()["controller_name"] == "hold"


def test_records_are_built_in_one_place():
    """Every path that trains (trainer, population trainer, PBT member) imports its records from gpt.tracking, and
    its rate records from the dropout scheduler that foreign loops use too (integrations)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    builders = {"train/eval_loss": "gpt/tracking.py", "train/loss": "gpt/tracking.py", "val/loss": "gpt/tracking.py",
                "perf/wall_time_s": "gpt/tracking.py", "dropout/rate": "integrations/scheduler.py"}
    for name, builder in builders.items():
        found = [p.relative_to(root).as_posix() for folder in ("gpt", "integrations", "experiments", "envs", "bench")
                 for p in (root / folder).glob("*.py") if f'"{name}":' in p.read_text()]  # a key being set
        assert found == [builder], (name, found)


def test_executors_are_a_registry_and_a_bad_name_is_one_line(tmp_path, capsys):
    from experiments.comparison import EXECUTORS, Comparison
    from runs.compare import cli

    assert set(EXECUTORS) == {"local", "population", "ray"}
    comparison = Comparison(cfg=make_config("tiny"), specs=["constant:rate=0"], seeds=[1], out=tmp_path / "c",
                            executor="population", population=3)
    assert comparison.runner.concurrent() == 3 and comparison.job(comparison.trials[0], False).concurrent == 3
    assert comparison.runner.batched_iterations(7) == 3 * comparison.cfg.max_iters
    with pytest.raises(UserError, match="--executor"):
        Comparison(cfg=make_config("tiny"), specs=["constant:rate=0"], seeds=[1], out=tmp_path / "d", executor="gpu")
    with pytest.raises(SystemExit) as stop:  # argparse's choices, in the project's one-line form
        cli(["--preset", "tiny", "--controllers", "constant@0", "--executor", "gpu", "--out", str(tmp_path / "e")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--executor" in err[0]
    assert not (tmp_path / "e").exists()


def test_a_trial_folder_is_written_in_one_order(tmp_path, chardata):
    from experiments.trials import TrialFolder, TrialJob, trial_status
    from controllers import make_controller

    cfg = make_config("tiny", max_iters=10, out=str(tmp_path / "t"), wandb="disabled", progress=False)
    job = TrialJob(cfg=cfg, spec="constant:rate=0.1", name="n", group="g", comparison="c", concurrent=2, threads=1)
    folder = TrialFolder(job)
    folder.start()
    assert json.loads((folder.out / "trial.json").read_text())["controller"] == "constant:rate=0.1"
    assert trial_status(folder.out, cfg, job.spec) == "todo"  # started, not finished
    logger = folder.logger(make_controller(job.spec))
    logger.log({"iter": 0, "val/loss": 3.0})
    summary = folder.finish(logger, {"best_val_loss": 3.0}, "sampled text")
    assert summary["comparison"] == "c" and summary["concurrent_trials"] == 2 and summary["torch_threads"] == 1
    assert json.loads((folder.out / "summary.json").read_text())["controller_spec"] == "constant:rate=0.1"
    assert (folder.out / "sample.txt").read_text() == "sampled text"
    assert trial_status(folder.out, cfg, job.spec) == "done"
    folder.start()  # a rerun starts from an empty folder
    assert sorted(p.name for p in folder.out.iterdir() if not p.name.startswith(".")) == ["trial.json"]
    assert folder.diverge(None, "boom", 3) == {"diverged": "boom"}
    assert trial_status(folder.out, cfg, job.spec) == "diverged"
    assert math.isfinite(json.loads((folder.out / "diverged.json").read_text())["iteration"])
