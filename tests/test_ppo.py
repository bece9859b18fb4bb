"""A short PPO run saves a policy that the ``ppo`` controller loads and that acts exactly as in the env."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from controllers import make_controller
from dyndrop import UserError
from controllers.features import FEATURE_VERSION, Featurizer, action_to_rates

ENV_ARGS = ["--max-iters", "40", "--interval", "10", "--eval-iters", "2"]


@pytest.fixture(scope="module")
def policy(chardata, tmp_path_factory):
    """Train PPO for 16 env steps (2 envs x 8) on 4-decision episodes; returns the policy's path."""
    from runs import train_policy

    out = tmp_path_factory.mktemp("ppo")
    code = train_policy.main(["--out", str(out), "--total-timesteps", "16", "--n-envs", "2", "--n-steps", "8",
                              "--batch-size", "8", "--n-epochs", "1", "--checkpoint-every", "8", "--wandb", "disabled",
                              "--no-progress", "--episode", "overfit", "--curve-regimes", "1", "--curve-seeds", "1",
                              "--curve-every", "0", *ENV_ARGS])
    assert code == 0
    return out / "policy.safetensors"


def test_the_learning_curve_deploys_the_policy_on_held_out_instances(policy):
    """Before training and after it, the policy as it was, on the episode's first held-out instance: its regret
    against the best constant there (by val), per (instance, seed), and a figure."""
    curve = json.loads((policy.parent / "learning_curve.json").read_text())
    assert curve["regimes"] == [9000] and curve["seeds"] == 1
    assert [p["env_steps"] for p in curve["points"]] == [0, 16]
    for point in curve["points"]:
        assert list(point["per_pair"]) == ["9000/0"] and point["regret"] == point["per_pair"]["9000/0"]
        assert (policy.parent / "curve" / f"policy_{point['env_steps']}.safetensors").is_file()
    assert (policy.parent / "learning_curve.png").read_bytes().startswith(b"\x89PNG")


def test_regret_is_against_the_constant_val_chooses():
    from envs.policy_training import regrets

    reference = {7: {"constant:rate=0": [{"test_loss": 2.0, "best_val_loss_full": 2.3}],
                     "constant:rate=0.1": [{"test_loss": 2.2, "best_val_loss_full": 2.1}]}}
    policy = {7: {"ppo": [{"test_loss": 2.15, "best_val_loss_full": 2.2}]}}
    assert regrets(policy, reference, "ppo") == {"7/0": pytest.approx(-0.05)}  # 2.15 - 2.2, not 2.15 - 2.0


def test_the_curves_constants_are_scored_once_per_set_of_runs(chardata, tmp_path, monkeypatch):
    """The constants of the learning curve do not depend on the policy: a second curve over the same runs reads
    them from the cache (a diverged run's nan included); other runs (here another seed count) are scored again."""
    import math

    import envs.policy_training as pt

    calls = []

    def fake_score(specs, instances, seeds, env_kwargs):
        calls.append((tuple(instances), seeds))
        return {i: {s: [{"test_loss": float("nan") if s.endswith("=0") else 2.0 + k, "best_val_loss_full": 2.1,
                         "best_val_loss": 2.1} for k in range(seeds)] for s in specs} for i in instances}

    monkeypatch.setattr(pt, "score_controllers", fake_score)
    kwargs = {"episode": "micro", "max_iters": 40, "interval": 10}
    first = pt.score_constants([9000, 9001], 1, kwargs, tmp_path)
    again = pt.score_constants([9000, 9001], 1, kwargs, tmp_path)
    assert calls == [((9000, 9001), 1)] and len(list(tmp_path.glob("*.json"))) == 1
    assert list(again) == [9000, 9001] and math.isnan(again[9000]["constant:rate=0"][0]["test_loss"])
    assert again[9001]["constant:rate=0.2"] == first[9001]["constant:rate=0.2"]
    pt.score_constants([9000, 9001], 2, kwargs, tmp_path)
    assert calls[-1] == ((9000, 9001), 2) and len(list(tmp_path.glob("*.json"))) == 2


def test_saves_policy_metadata_and_checkpoints(policy):
    meta = json.loads(policy.with_suffix(".json").read_text())
    assert meta["feature_version"] == FEATURE_VERSION
    assert (meta["p_min"], meta["p_max"], meta["per_layer"], meta["preset"]) == (0.0, 0.5, False, "tiny")
    assert meta["reward"] == "best_val" and meta["sb3_version"] and meta["num_timesteps"] == 16
    assert (policy.parent / "checkpoints" / "policy_8.safetensors").is_file()
    assert (policy.parent / "checkpoints" / "policy_8.json").is_file()
    assert (policy.parent / "progress.csv").is_file()


@pytest.fixture(scope="module")
def sb3_model(chardata):
    """A PPO model in memory, trained for 16 env steps on 4-decision episodes."""
    from stable_baselines3 import PPO

    from envs.policy_training import make_vec_env

    venv = make_vec_env(2, dict(max_iters=40, interval=10, config={"eval_iters": 2}), seed=0)
    model = PPO("MlpPolicy", venv, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu",
                policy_kwargs=dict(log_std_init=-0.5, net_arch=[64, 64]))
    return model.learn(16)


def test_controller_acts_like_the_sb3_model(sb3_model, tmp_path):
    """Saved to the policy format and loaded back, the network acts exactly as the model that was trained."""
    from envs import DropoutEnv
    from envs.policy_training import save_policy

    path = save_policy(sb3_model, tmp_path / "p", DropoutEnv(max_iters=40, interval=10).metadata_dict())
    assert path.suffix == ".safetensors"
    model = sb3_model
    controller = make_controller("ppo", policy=str(path))
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs = rng.uniform(Featurizer.low, Featurizer.high).astype(np.float32)
        expected, _ = model.predict(obs, deterministic=True)
        np.testing.assert_array_equal(controller.act(obs), expected.reshape(-1))
        assert controller.act(obs).tolist() == controller.act(obs).tolist()  # deterministic


def test_env_and_controller_see_the_same_features(policy, chardata):
    """An env episode driven by the model and a Trainer run under ``ppo`` give identical obs and rates."""
    from controllers.policy_file import load_policy
    from envs import DropoutEnv, episode_config
    from gpt import Trainer

    model, _ = load_policy(policy)
    env = DropoutEnv(max_iters=40, interval=10, config={"eval_iters": 2})
    obs, _ = env.reset(options={"instance": 9001})
    env_obs, env_rates, done = [], [], False
    while not done:
        env_obs.append(obs)
        action, _ = model.predict(obs, deterministic=True)
        obs, _, done, _, info = env.step(action)
        env_rates.append(info["rates"])

    controller = make_controller("ppo", policy=str(policy))
    seen, rates = [], []
    observe, update = controller.featurizer.observe, controller.update
    controller.featurizer.observe = lambda stats: seen.append(observe(stats)) or seen[-1]
    controller.update = lambda stats: rates.append(update(stats)) or rates[-1]
    cfg = episode_config("tiny", 40, 10, seed=9001, **env.config_overrides)
    summary = Trainer(cfg, controller, data=chardata).train()
    np.testing.assert_array_equal(np.array(seen), np.array(env_obs))
    assert rates == env_rates
    assert summary["best_val_loss"] == info["best_val_loss"]


def test_state_dict_roundtrip(policy):
    from gpt.trainer import Trainer  # noqa: F401  (torch is loaded anyway by the policy)

    a = make_controller("ppo", policy=str(policy))
    a.reset(2)
    from controllers import TrainingStats
    stats = [TrainingStats(i, 100, 1e-3, 2.5, 2.4 - i / 100, 2.5 - i / 200, 2.5 - i / 200, i, (0.1, 0.1), eval_iter=i)
             for i in (0, 10, 20)]
    for s in stats[:2]:
        a.update(s)
    b = make_controller("ppo", policy=str(policy))
    b.reset(2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain Python values only
    assert a.update(stats[2]) == b.update(stats[2])


def copy_policy(policy: Path, to: Path, **meta_changes) -> Path:
    """A copy of the policy (weights and metadata) at ``to``, its metadata changed by ``meta_changes``."""
    shutil.copy(policy, to)
    meta = json.loads(policy.with_suffix(".json").read_text())
    to.with_suffix(".json").write_text(json.dumps({**meta, **meta_changes}))
    return to


def test_mismatched_or_missing_metadata_is_refused(policy, tmp_path):
    bad = tmp_path / "policy.safetensors"
    shutil.copy(policy, bad)
    with pytest.raises(UserError, match="no metadata"):
        make_controller("ppo", policy=str(bad))
    meta = json.loads(policy.with_suffix(".json").read_text())
    network = meta["network"]
    for change, match in ((dict(feature_version="dyndrop-features-v0"), "features"),
                          (dict(p_max=1.5), "bounds"), (dict(per_layer=True, n_layer=None), "n_layer"),
                          (dict(per_layer=True, n_layer=2), "actions"), (dict(format="sb3"), "format"),
                          (dict(network={**network, "net_arch": [32, 32]}), "does not hold the network"),
                          (dict(network={**network, "activation": "gelu"}), "activation"),
                          (dict(weights_sha256="0" * 64), "does not match its metadata")):
        copy_policy(policy, bad, **change)
        with pytest.raises(UserError, match=match):
            make_controller("ppo", policy=str(bad))
    bad.with_suffix(".json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        make_controller("ppo", policy=str(bad))
    copy_policy(policy, bad)
    with pytest.raises(UserError, match="p_max=0.5, not 0.3"):
        make_controller("ppo:p_max=0.3", policy=str(bad))
    with pytest.raises(UserError, match="needs a policy"):
        make_controller("ppo")
    with pytest.raises(UserError, match="does not exist"):
        make_controller("ppo", policy=str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserError, match="convert_policy"):
        make_controller("ppo", policy=str(tmp_path / "old.zip"))


def test_cli_refuses_a_mismatch_in_one_line(policy, tmp_path, capsys):
    from runs import train

    bad = copy_policy(policy, tmp_path / "p.safetensors", feature_version="old")
    code = train.cli(["--controller", "ppo", "--policy", str(bad), "--preset", "tiny", "--max-iters", "0",
                      "--out", str(tmp_path / "run"), "--wandb", "disabled"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "features" in err


def test_action_mapping_is_shared():
    """The controller and the env both map actions with features.action_to_rates."""
    import controllers.ppo as ppo
    from envs import dropout_env
    assert ppo.action_to_rates is action_to_rates and dropout_env.action_to_rates is action_to_rates


def test_repr_round_trips(policy):
    """tests/test_controllers.py round-trips every controller built without arguments; ppo needs a policy."""
    ctrl = make_controller("ppo", policy=str(policy))
    assert make_controller(repr(ctrl)).params() == ctrl.params()


def test_eval_policy_prints_the_table(policy, capsys, tmp_path):
    from runs import eval_policy

    assert eval_policy.main(["--policy", str(policy), "--seeds", "9000", "9001", "--baselines", "constant@0,0.1",
                             "--max-iters", "20", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "test loss" in out and "p (Holm)" in out and "(baseline)" in out
    assert any(line.startswith(f"| ppo:policy={policy}") for line in out.splitlines())


# -- one road for the policy: --policy PATH is short for ppo:policy=PATH -------------------------------

TINY_RUN = ["--preset", "tiny", "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--gen-tokens", "0",
            "--no-progress", "--wandb", "disabled"]


def test_with_policy_folds_the_path_into_the_spec():
    from controllers import with_policy
    assert with_policy("ppo", "p.zip") == "ppo:policy=p.zip"
    assert with_policy("ppo:p_min=0", "p.zip") == "ppo:p_min=0,policy=p.zip"  # the policy is not dropped
    assert with_policy("ppo:policy=p.zip", "p.zip") == "ppo:policy=p.zip"
    assert with_policy("constant:rate=0.1", "p.zip") == "constant:rate=0.1"
    assert with_policy("ppo", None) == "ppo"
    with pytest.raises(UserError, match="give one of them"):
        with_policy("ppo:policy=a.zip", "b.zip")


def test_train_takes_the_policy_either_way(policy, tmp_path):
    from runs import train

    curves = []
    for i, controller in enumerate((["--controller", "ppo", "--policy", str(policy)],
                                    ["--controller", f"ppo:policy={policy}"],
                                    ["--controller", "ppo:p_min=0", "--policy", str(policy)])):
        out = tmp_path / f"run{i}"
        assert train.cli([*controller, *TINY_RUN, "--out", str(out)]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves.append([(r["iter"], r.get("val/loss"), r.get("dropout/rate")) for r in records])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["controller_params"]["policy"] == str(policy)
    assert curves[0] == curves[1] == curves[2]


def test_compare_takes_the_policy_either_way(policy, tmp_path):
    from runs import compare

    args = [*TINY_RUN, "--threads", "1", "--seeds", "1", "--no-warm-up"]
    tables = []
    for i, controllers in enumerate((["--controllers", "constant@0,ppo", "--policy", str(policy)],
                                     ["--controllers", f"constant@0,ppo:policy={policy}"])):
        out = tmp_path / f"cmp{i}"
        assert compare.cli([*args, *controllers, "--out", str(out)]) == 0
        table = json.loads((out / "results.json").read_text())
        tables.append({r["controller"]: r["best_val_loss"] for r in table["rows"]})
        assert sorted(p.name for p in (out / "trials").iterdir())[0].startswith("constant")
    assert tables[0] == tables[1] and f"ppo:policy={policy}" in tables[0]


def test_eval_policy_takes_the_policy_either_way(policy, tmp_path):
    from runs import eval_policy

    results = []
    for i, controller in enumerate((["--policy", str(policy)], ["--controller", f"ppo:policy={policy}"])):
        out = tmp_path / f"eval{i}"
        assert eval_policy.cli([*controller, "--seeds", "9000", "--baselines", "constant:rate=0.0",
                                "--max-iters", "20", "--out", str(out)]) == 0
        results.append({r["controller"]: r["test_loss"] for r in json.loads((out / "results.json").read_text())["rows"]})
    assert results[0] == results[1]


def test_eval_policy_reuses_finished_episodes_and_refuses_a_changed_setting_or_policy(policy, tmp_path, capsys):
    """PID on a named episode: a second call reuses the finished trials; another --max-iters into the same
    folder, or a policy file replaced under the same path, is refused in one line instead of mixed in."""
    import shutil

    from runs import eval_policy

    out = tmp_path / "eval"
    args = ["--controller", "pid", "--episode", "tiny", "--seeds", "9000", "--baselines", "constant@0,0.1",
            "--max-iters", "20", "--out", str(out)]
    assert eval_policy.cli(args) == 0
    summaries = sorted((out / "trials").glob("*/summary.json"))
    assert len(summaries) == 3
    before = {p: p.stat().st_mtime_ns for p in summaries}
    assert eval_policy.cli(args) == 0
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    capsys.readouterr()
    assert eval_policy.cli([*args[:-4], "--max-iters", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_iters" in err[0]

    mine = tmp_path / "mine"  # a policy evaluated, then replaced by another file at the same path
    shutil.copytree(policy.parent, mine)
    mine_policy = mine / policy.name
    ppo_args = ["--policy", str(mine_policy), "--seeds", "9000", "--baselines", "constant:rate=0.0",
                "--max-iters", "20", "--out", str(tmp_path / "eval-ppo")]
    assert eval_policy.cli(ppo_args) == 0
    mine_policy.write_bytes(mine_policy.read_bytes())  # same bytes: still the same policy
    assert eval_policy.cli(ppo_args) == 0
    from controllers.policy_file import metadata_path

    meta = json.loads(metadata_path(mine_policy).read_text())
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(mine_policy))
    weights = {k: v + 0.01 if v.dtype == torch.float32 else v for k, v in weights.items()}
    save_file(weights, str(mine_policy))
    from controllers.policy_file import sha256_of

    metadata_path(mine_policy).write_text(json.dumps({**meta, "weights_sha256": sha256_of(mine_policy)}))
    capsys.readouterr()
    assert eval_policy.cli(ppo_args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the policy file differs" in err[0]
