"""One input-identity check (the data's sha256, the policy file's, the numerics version) for resume, comparisons,
eval_policy and the suite: nothing mixes runs of other inputs, and the command a run prints works as printed
(issue #22, items 1, 2, 9, 18)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from hostile import TINY, call, make_policy, one_line_error, own_text


def test_a_comparison_refuses_its_trials_once_the_data_text_changed_and_writes_nothing(tmp_path, capsys):
    """#22 item 1: after the --data text changed, a rerun with another seed mixed old and new trials."""
    data, out = own_text(tmp_path / "d.txt"), tmp_path / "cmp"
    args = [*TINY, "--controllers", "constant:rate=0.1", "--data", str(data), "--no-warm-up", "--out", str(out)]
    assert call("compare", [*args, "--seeds", "1,"], capsys)[0] == 0
    record = (out / "comparison.json").read_text()
    own_text(data, n=6001)
    one_line_error(*call("compare", [*args, "--seeds", "1,2"], capsys), "--data text")
    assert (out / "comparison.json").read_text() == record  # the refused command is not what the folder records
    assert [p.name for p in (out / "trials").iterdir()] == ["constant_rate0.1-s1"]
    one_line_error(*call("report", [str(out)], capsys), "--data text")


def test_resume_refuses_a_replaced_policy_file(tmp_path, capsys):
    """#22 item 2: --resume ran on with another policy copied over the first, and the rate jumped mid-run."""
    policy = make_policy(tmp_path / "pA" / "policy", seed=0)
    other = make_policy(tmp_path / "pB" / "policy", seed=7)
    out = tmp_path / "run"
    assert call("train", [*TINY, "--controller", "ppo", "--policy", str(policy), "--out", str(out)], capsys)[0] == 0
    for suffix in (".safetensors", ".json"):  # cp pB/policy.* pA/
        policy.with_suffix(suffix).write_bytes(other.with_suffix(suffix).read_bytes())
    resume = ["--resume", "--out", str(out), "--max-iters", "30", "--no-progress", "--wandb", "disabled"]
    one_line_error(*call("train", resume, capsys), "the policy file differs", str(policy))
    assert json.loads((out / "summary.json").read_text())["iterations"] == 20


def test_the_resume_command_a_data_run_prints_works_as_printed(tmp_path, capsys, monkeypatch):
    """#22 item 9: after Ctrl-C of a --data run, the printed python -m runs.train --resume --out o was refused
    ("is different now"): resume checked the command line's default data, not the checkpoint's."""
    from gpt import Trainer

    data, out = own_text(tmp_path / "small.txt"), tmp_path / "o"
    real = Trainer.advance

    def ctrl_c_after_10(self, n, bar=None):
        if self.iteration >= 10:
            raise KeyboardInterrupt
        real(self, n, bar)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "advance", ctrl_c_after_10)
        code, err = call("train", [*TINY, "--data", str(data), "--out", str(out)], capsys)
    assert code == 130, err
    printed = err.strip().splitlines()[-1].split("continue with: ")[1]
    command = shlex.split(printed)
    assert command[:3] == ["python", "-m", "runs.train"], printed
    code, err = call("train", command[3:], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 20 and summary["data"]["source"] == str(data)


def test_resume_still_refuses_a_data_text_that_changed(tmp_path, capsys):
    data, out = own_text(tmp_path / "small.txt"), tmp_path / "o"
    assert call("train", [*TINY, "--data", str(data), "--out", str(out)], capsys)[0] == 0
    own_text(data, n=6001)
    one_line_error(*call("train", ["--resume", "--out", str(out), "--max-iters", "30"], capsys),
                   "--data text is different now")


def test_a_policy_that_does_not_fit_the_model_is_refused_before_any_trial(tmp_path, capsys):
    """#22 item 18: a per-layer policy for 3 layers on a 2-layer model failed only after the other trials trained."""
    policy = make_policy(tmp_path / "p3" / "policy", per_layer=True, n_layer=3)
    out = tmp_path / "cmp"
    code, err = call("compare", [*TINY, "--controllers", "constant@0,0.1,ppo", "--policy", str(policy), "--seeds", "1,",
                                 "--no-warm-up", "--out", str(out)], capsys)
    one_line_error(code, err, "3 per-layer rates", "2 layers")
    assert not out.exists()
    code, err = call("train", [*TINY, "--controller", "ppo", "--policy", str(policy), "--out", str(tmp_path / "r")],
                     capsys)
    one_line_error(code, err, "3 per-layer rates")
    assert not (tmp_path / "r").exists()


def test_every_command_asks_the_one_identity_check():
    """Resume, comparisons (so eval_policy and the suite, which run on them) and the suite's reference digests
    ask experiments.trials for the inputs' identity: one definition of what decides a run's numbers."""
    import inspect

    import experiments.suite
    import experiments.trials
    import runs.train

    assert "identity_changes(" in inspect.getsource(experiments.trials.trial_status)
    assert "identity_changes(" in inspect.getsource(runs.train.main)
    assert "inputs_identity(" in inspect.getsource(experiments.suite.run_digest)
    assert "Comparison(" in inspect.getsource(experiments.suite.regime_comparison)


def test_eval_policy_refuses_the_runs_of_a_replaced_policy(tmp_path, capsys):
    """#22 item 3: runs.eval_policy --out e.json reused an older policy's runs after the policy file changed and
    printed the old figure. eval_policy now runs on the comparison engine, whose trials record the policy's digest."""
    policy = make_policy(tmp_path / "p" / "policy", seed=0)
    other = make_policy(tmp_path / "q" / "policy", seed=7)
    args = ["--policy", str(policy), "--seeds", "9000", "--baselines", "constant:rate=0", "--max-iters", "20",
            "--out", str(tmp_path / "e")]
    assert call("eval_policy", args, capsys)[0] == 0
    for suffix in (".safetensors", ".json"):
        policy.with_suffix(suffix).write_bytes(other.with_suffix(suffix).read_bytes())
    one_line_error(*call("eval_policy", args, capsys), "the policy file differs")
    (tmp_path / "e.json").write_text("{}")  # the figures file of the old eval_policy
    one_line_error(*call("eval_policy", [*args[:-1], str(tmp_path / "e.json")], capsys), "not a folder")
