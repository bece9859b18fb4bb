"""Inputs refused before they cost anything: policy files that would not build or cannot act, a dataset with nothing
to predict, special files given as data, the env's constructor arguments, a second policy trainer on one folder
(issue #22, items 4, 7, 16, 17, 21, 24 and the cosmetics)."""
from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np
import pytest

from hostile import TINY, call, make_policy, one_line_error, rewrite_metadata


# -- policy files -------------------------------------------------------------------------------------

def test_a_network_bigger_than_its_weights_is_refused_before_it_is_built(tmp_path):
    """#22 item 16: net_arch [65536]*16 in policy.json was built before it was checked: a MemoryError traceback."""
    from controllers import make_controller
    from dyndrop import UserError

    policy = make_policy(tmp_path / "policy")
    meta = json.loads(policy.with_suffix(".json").read_text())
    rewrite_metadata(policy, network={**meta["network"], "net_arch": [65536] * 16})
    with pytest.raises(UserError, match=r"does not hold the network .* holds \d{3} numbers, that network \d{12}\)"):
        make_controller(f"ppo:policy={policy}")


def test_a_policy_with_nan_weights_is_refused_before_the_run(tmp_path, capsys):
    """#22 item 17: NaN weights passed every load check, then a torch traceback at the first control step left
    metrics.jsonl behind."""
    import torch
    from safetensors.torch import load_file, save_file

    from controllers.policy_file import sha256_of

    policy = make_policy(tmp_path / "policy")
    weights = load_file(str(policy))
    weights["action_net.weight"] = torch.full_like(weights["action_net.weight"], math.nan)
    save_file(weights, str(policy))
    rewrite_metadata(policy, weights_sha256=sha256_of(policy))
    out = tmp_path / "run"
    code, err = call("train", [*TINY, "--controller", "ppo", "--policy", str(policy), "--out", str(out)], capsys)
    one_line_error(code, err, "NaN or infinite", "action_net.weight")
    assert not out.exists()


def test_a_policy_that_overflows_mid_run_is_one_line(tmp_path, capsys):
    """Finite weights can still overflow to a NaN mean, which torch's Normal refuses with a ValueError deep in
    stable-baselines3: the controller says which policy cannot act, in one line."""
    from controllers import TrainingStats, make_controller
    from dyndrop import UserError

    controller = make_controller(f"ppo:policy={make_policy(tmp_path / 'policy')}")
    controller.reset(2)

    def overflowed(*args, **kwargs):
        raise ValueError("Expected parameter loc (Tensor of shape (1, 1)) ... to satisfy the constraint Real(), "
                         "but found invalid values:\ntensor([[nan]])")

    controller.network.predict = overflowed
    stats = TrainingStats(iteration=10, max_iters=100, lr=1e-3, train_loss_smoothed=2.0, eval_train_loss=2.0,
                          eval_val_loss=2.1, best_val_loss=2.1, best_val_iter=10, rates=(0.1, 0.1), eval_iter=10)
    with pytest.raises(UserError, match=r"gave no action \(NaN\) at iteration 10") as e:
        controller.update(stats)
    assert "\n" not in str(e.value)


def test_policy_metadata_without_bounds_names_what_is_missing(tmp_path):
    """Cosmetic of #22: "bad action bounds: 'p_min'" when p_min was missing."""
    from controllers import make_controller
    from dyndrop import UserError

    policy = make_policy(tmp_path / "policy")
    meta = json.loads(policy.with_suffix(".json").read_text())
    del meta["p_min"]
    policy.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="it has no p_min"):
        make_controller(f"ppo:policy={policy}")


def test_converting_a_bad_zip_is_one_line(tmp_path, capsys, monkeypatch):
    """Cosmetic of #22: convert_policy --trust on a bad zip printed stable-baselines3's multi-line error."""
    import stable_baselines3

    def load(*args, **kwargs):  # what sb3 says of a zip whose spaces do not match (a message over several lines)
        raise ValueError("Observation spaces do not match:\nBox(-1.0, 1.0, (10,), float32) !=\nBox(-1.0, 1.0, (3,))")

    monkeypatch.setattr(stable_baselines3.PPO, "load", load)
    bad = tmp_path / "policy.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("data", "{}")
    bad.with_suffix(".json").write_text(json.dumps({"p_min": 0.0}))
    code, err = call("convert_policy", [str(bad), "--trust"], capsys)
    assert err.startswith("warning: unpickling")  # the one line before the work, as --trust asks
    one_line_error(code, err.split("\n", 1)[1], "not a loadable", "Observation spaces do not match:; Box")


def test_every_user_error_is_printed_on_one_line(capsys):
    from dyndrop import UserError
    from runs.cli import run_cli

    def main(argv):
        raise UserError("a library said\n  something\n\non three lines")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: a library said; something; on three lines\n"


# -- data ---------------------------------------------------------------------------------------------

def test_a_text_of_one_repeated_character_is_refused_before_any_run(tmp_path, capsys):
    """#22 item 21: pid:signal=rel_gap on a text of one repeated character raised ZeroDivisionError mid-run."""
    same = tmp_path / "same.txt"
    same.write_text("a" * 5000)
    out = tmp_path / "run"
    code, err = call("train", [*TINY, "--controller", "pid:signal=rel_gap", "--data", str(same), "--out", str(out)],
                     capsys)
    one_line_error(code, err, "repeats one character")
    assert not out.exists()


def test_pid_on_a_loss_of_zero_reads_no_gap():
    from controllers import TrainingStats, make_controller

    pid = make_controller("pid:signal=rel_gap")
    pid.reset(2)
    stats = TrainingStats(iteration=10, max_iters=100, lr=1e-3, train_loss_smoothed=0.0, eval_train_loss=0.0,
                          eval_val_loss=0.0, best_val_loss=0.0, best_val_iter=10, rates=(0.1, 0.1), eval_iter=10)
    assert all(math.isfinite(r) for r in pid.update(stats))


@pytest.mark.parametrize("kind", ["fifo", "loop", "broken"])
def test_a_special_file_given_as_data_says_what_it_is(tmp_path, capsys, kind):
    """Cosmetic of #22: a FIFO or a symlink loop given as --data was reported as "no file"."""
    path = tmp_path / "data"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        path.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(path)
    else:
        path.symlink_to(tmp_path / "nowhere")
    words = {"fifo": "FIFO", "loop": "cannot be followed", "broken": "which does not exist"}[kind]
    one_line_error(*call("train", [*TINY, "--data", str(path), "--out", str(tmp_path / "run")], capsys), words)
    assert not (tmp_path / "run").exists()


# -- the env --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(reward_scale=math.nan), "reward_scale"), (dict(reward_scale=math.inf), "reward_scale"),
    (dict(terminal_weight=math.inf), "terminal_weight"), (dict(divergence_penalty=math.nan), "divergence_penalty"),
    (dict(p_min=math.nan), "p_min"), (dict(max_iters=2.5), "max_iters"), (dict(per_layer="yes"), "per_layer"),
    (dict(train_seeds=(1, -2)), "train_seeds"), (dict(config={"seed": 5}), r"reset\(options"),
    (dict(config={"eval_interval": 4}), "interval"), (dict(config={"max_iters": 40}, max_iters=32), "disagree"),
    (dict(config={"eval_iters": "2"}), "--eval-iters"),
])
def test_the_env_refuses_settings_the_command_line_refuses(chardata, kwargs, words):
    """#22 item 7: reward_scale=nan gave NaN rewards, terminal_weight=inf infinite ones."""
    import gymnasium as gym

    import envs  # noqa: F401
    from dyndrop import UserError

    with pytest.raises(UserError, match=words):
        gym.make("DynamicDropout-v0", episode="tiny", **kwargs)


def test_the_env_takes_any_setting_in_config(chardata):
    """#22 item 24: config={"max_iters": 5} raised TypeError "multiple values" though docs/rl.md lists it."""
    import gymnasium as gym

    import envs  # noqa: F401

    env = gym.make("DynamicDropout-v0", episode="tiny", interval=8, config={"max_iters": 16, "eval_iters": 1}).unwrapped
    assert env.max_iters == 16 and env.base_config.max_iters == 16 and env.base_config.eval_iters == 1
    assert env.metadata_dict()["config"] == {"eval_iters": 1}  # what a policy records: eval_policy rebuilds from it
    env.reset(seed=0)
    steps = 0
    while True:
        obs, reward, done, _, _ = env.step(np.zeros(1, dtype=np.float32))
        steps += 1
        assert np.isfinite(obs).all() and math.isfinite(reward)
        if done:
            break
    assert steps == 2


def test_a_nan_action_is_refused_as_the_docs_say(chardata):
    """Cosmetic of #22: the docs said actions are clipped, yet a NaN action raised deep inside; now the docs say a
    NaN is refused, and it is, with a ValueError (gymnasium's way) naming it."""
    import gymnasium as gym

    import envs  # noqa: F401
    from controllers.features import action_to_rates

    assert action_to_rates([np.inf], 0.0, 0.5, 2) == (0.5, 0.5) and action_to_rates([-7.0], 0.1, 0.5, 2) == (0.1, 0.1)
    env = gym.make("DynamicDropout-v0", episode="tiny", max_iters=8, interval=4, config={"eval_iters": 1}).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan], dtype=np.float32))


# -- one writer per folder --------------------------------------------------------------------------------

def test_a_second_policy_trainer_on_one_folder_is_refused(tmp_path, capsys):
    """#22 item 4: two runs.train_policy at once on one --out both exited 0, with progress.csv interleaved."""
    from dyndrop.folders import FolderLock

    out = tmp_path / "p"
    with FolderLock(out, "policy"):  # the first one
        code, err = call("train_policy", ["--out", str(out), "--episode", "tiny", "--total-timesteps", "4",
                                          "--n-envs", "2", "--n-steps", "2", "--batch-size", "4", "--n-epochs", "1",
                                          "--wandb", "disabled", "--checkpoint-every", "0", "--no-progress"], capsys)
        one_line_error(code, err, "in use by pid", str(os.getpid()))
    assert sorted(p.name for p in out.iterdir()) == [".dyndrop.lock"]


def test_a_model_too_big_for_the_machine_is_one_line_before_anything_is_allocated(tmp_path, capsys):
    """Beyond #22's list: --n-embd 100000000 allocated 26 GB for the embedding alone, then died with a traceback
    (or took the machine's memory with it)."""
    import torch

    from gpt.trainer import available_bytes

    if available_bytes(torch.device("cpu")) is None:
        pytest.skip("this platform does not say how much memory is free: the run would try to allocate it")
    out = tmp_path / "run"
    code, err = call("train", [*TINY, "--n-embd", "100000000", "--out", str(out)], capsys)
    one_line_error(code, err, "--n-embd 100000000", "GiB free")
    one_line_error(*call("train", [*TINY, "--batch-size", "10000000", "--out", str(out)], capsys), "--batch-size")
    assert not out.exists()
    import gymnasium as gym

    import envs  # noqa: F401
    from dyndrop import UserError

    with pytest.raises(UserError, match="GiB free"):  # the env builds its model at every reset
        gym.make("DynamicDropout-v0", episode="tiny", config={"n_embd": 10**8})
