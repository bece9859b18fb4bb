"""DynamicDropout-v0: the gymnasium and sb3 checkers, determinism, instances, rewards, the featurizer."""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest

from controllers import TrainingStats
from dyndrop import UserError
from controllers.features import FEATURES, Featurizer, action_to_rates

# A shortened tiny episode: 4 decisions of 10 steps, 2 evaluation batches per split (~0.5 s).
SHORT = dict(max_iters=40, interval=10, config={"eval_iters": 2})


@pytest.fixture(scope="module")
def env_cls(chardata):
    import envs
    return envs.DropoutEnv


def run_episode(env, actions, **reset_kwargs):
    obs, _ = env.reset(**reset_kwargs)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(np.array(a, dtype=np.float32).reshape(env.action_space.shape))
        observations.append(obs)
        rewards.append(r)
        if terminated or truncated:
            break
    return np.array(observations), np.array(rewards), info


def test_import_controllers_is_torch_free():
    import subprocess
    code = "import sys, controllers; print('torch' in sys.modules or 'stable_baselines3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_registered_and_checkers_pass(env_cls):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = gym.make("DynamicDropout-v0", **SHORT)
    assert isinstance(env.unwrapped, env_cls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        gym_check(env.unwrapped, skip_render_check=True)
        sb3_check(env_cls(**SHORT), warn=True)
    per_layer = env_cls(per_layer=True, **SHORT)
    assert per_layer.action_space.shape == (per_layer.base_config.n_layer,)
    gym_check(per_layer, skip_render_check=True)


def test_same_seed_same_observations_and_rewards(env_cls):
    env = env_cls(**SHORT)
    actions = [-1.0, 0.3, 1.0, -0.2]
    o1, r1, i1 = run_episode(env, actions, seed=7)
    o2, r2, i2 = run_episode(env_cls(**SHORT), actions, seed=7)
    assert i1["instance"] == i2["instance"]
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    assert len(r1) == 4 and i1["iteration"] == 40
    assert all(env.observation_space.contains(o) for o in o1)


def test_instances_disjoint_and_selectable(env_cls):
    import envs
    assert not set(envs.TRAIN_SEEDS) & set(envs.EVAL_SEEDS)
    env = env_cls(**SHORT)
    drawn = {env.reset(seed=s)[1]["instance"] for s in range(20)}
    assert drawn <= set(envs.TRAIN_SEEDS) and len(drawn) > 1
    assert env.reset(seed=0, options={"split": "eval"})[1]["instance"] in envs.EVAL_SEEDS
    assert env.reset(options={"instance": 12345})[1]["instance"] == 12345
    with pytest.raises(UserError, match="overlap"):
        env_cls(train_seeds=(1, 2), eval_seeds=(2, 3), **SHORT)


def test_best_val_reward_telescopes_and_divergence_is_penalised(env_cls):
    env = env_cls(reward_scale=1.0, terminal_weight=1.0, **SHORT)
    obs, info = env.reset(options={"instance": 9000})
    best0 = info["best_val_loss"]
    _, rewards, last = run_episode(env, [-1.0] * 4, options={"instance": 9000})
    assert (rewards >= 0).all()
    assert math.isclose(rewards.sum(), 2 * math.log(best0 / last["best_val_loss"]), rel_tol=1e-6)

    from gpt import Diverged
    env.reset(options={"instance": 9000})

    def diverge(n):
        raise Diverged("test")
    env.trainer.advance = diverge
    obs, r, terminated, _, info = env.step(np.zeros(1, np.float32))
    assert terminated and info["diverged"] and r == -env.divergence_penalty
    assert env.observation_space.contains(obs)


def test_action_mapping():
    assert action_to_rates([-1.0], 0.0, 0.5, 2) == (0.0, 0.0)
    assert action_to_rates([3.0], 0.1, 0.5, 2) == (0.5, 0.5)
    assert action_to_rates([0.0, 1.0], 0.0, 0.4, 2) == (0.2, 0.4)
    with pytest.raises(ValueError):
        action_to_rates([0.0, 0.0, 0.0], 0.0, 0.5, 2)


def _stats(it, val, train, best, best_it, rate=0.1, eval_iter=None):
    return TrainingStats(iteration=it, max_iters=100, lr=1e-3, train_loss_smoothed=train * 1.05,
                         eval_train_loss=train, eval_val_loss=val, best_val_loss=best, best_val_iter=best_it,
                         rates=(rate, rate), eval_iter=it if eval_iter is None else eval_iter)


def test_featurizer_values_and_state_roundtrip():
    f = Featurizer()
    first = f.observe(TrainingStats(0, 100, 1e-3, math.nan, 4.0, 4.2, 4.2, 0, (0.0, 0.0)))
    assert first.dtype == np.float32 and first.shape == (len(FEATURES),) and np.isfinite(first).all()
    seq = [_stats(10, 3.0, 2.9, 3.0, 10), _stats(20, 2.5, 2.3, 2.5, 20), _stats(30, 2.6, 2.2, 2.5, 20)]
    obs = [f.observe(s) for s in seq]
    names = [x.name for x in FEATURES]
    last = dict(zip(names, obs[-1]))
    assert last["progress"] == pytest.approx(0.3)
    assert last["train_fall"] == pytest.approx(math.log(4.0 / 2.2), rel=1e-5)  # since the first evaluation
    assert last["rel_gap"] == pytest.approx((2.6 - 2.2) / 2.6, rel=1e-5)
    assert last["since_best"] == pytest.approx(0.1)
    assert last["above_best"] == pytest.approx(math.log(2.6 / 2.5), rel=1e-5)
    # the window goes back to the last evaluation whose train loss was 5 % higher (2.9; 2.3 is only 4.5 % higher)
    trains, vals = np.log([2.9, 2.3, 2.2]), np.log([3.0, 2.5, 2.6])
    assert last["memorised"] == pytest.approx(1 - np.polyfit(trains, vals, 1)[0], rel=1e-5)
    # a control step without a new evaluation adds nothing
    same = f.observe(_stats(35, 2.6, 2.2, 2.5, 20, eval_iter=30))
    assert same[names.index("memorised")] == obs[-1][names.index("memorised")]
    g = Featurizer()
    g.load_state_dict(f.state_dict())
    nxt = _stats(40, 2.7, 2.1, 2.5, 20)
    np.testing.assert_array_equal(f.observe(nxt), g.observe(nxt))
    # non-finite input (a diverged run) still gives a valid observation
    bad = f.observe(_stats(50, math.nan, math.inf, 2.5, 20))
    assert np.isfinite(bad).all() and (bad >= Featurizer.low).all() and (bad <= Featurizer.high).all()


def test_a_finished_episode_steps_again_only_after_reset(env_cls):
    """gymnasium's rule: once terminated, step() raises until reset() (it used to pay the terminal reward again)."""
    env = env_cls(**SHORT)
    run_episode(env, [0.0] * 4, options={"instance": 9000})
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, np.float32))
    env.reset(options={"instance": 9000})
    env.step(np.zeros(1, np.float32))  # fine again


def test_actions_of_the_wrong_shape_are_refused(env_cls):
    env = env_cls(**SHORT)  # one action for all layers
    n_layer = env.base_config.n_layer
    env.reset(options={"instance": 9000})
    for bad in (np.zeros(n_layer, np.float32), np.zeros((1, 1), np.float32), np.float32(0.0)):
        with pytest.raises(ValueError, match="shape"):
            env.step(bad)  # a vector of one rate per layer fits the model, but not this action space
    per_layer = env_cls(per_layer=True, **SHORT)
    per_layer.reset(options={"instance": 9000})
    with pytest.raises(ValueError, match="shape"):
        per_layer.step(np.zeros(1, np.float32))
    per_layer.step(np.zeros(n_layer, np.float32))


@pytest.mark.parametrize("options", [{"instanse": 3}, {"split": "test"}, {"instance": -1}, {"instance": 1.5},
                                     {"instance": True}, {"instance": 3, "split": "eval"}])
def test_reset_refuses_unknown_options(env_cls, options):
    with pytest.raises(ValueError):
        env_cls(**SHORT).reset(options=options)


def test_default_episode_is_data_limited_and_the_old_one_stays_reachable(env_cls):
    import envs
    env = env_cls(**SHORT)
    assert env.episode == envs.DEFAULT_EPISODE == "overfit"
    assert 0 < env.base_config.train_chars <= 10_000  # trains on a small prefix of the split: it can overfit
    tiny = env_cls(episode="tiny")
    assert (tiny.max_iters, tiny.interval, tiny.base_config.train_chars) == (160, 16, 0)
    with pytest.raises(UserError, match="unknown episode"):
        env_cls(episode="nope")


@pytest.mark.slow
def test_a_data_limited_episode_overfits_at_rate_0(env_cls):
    """The overfit episode's model on a cheaper cut (1,500 characters, 300 steps): at rate 0 the val loss
    passes its best well before the end and ends far above it, which is what makes dropout matter."""
    env = env_cls(max_iters=300, interval=50, config={"train_chars": 1500, "eval_iters": 4})
    _, _, info = run_episode(env, [[-1.0]] * 6, seed=0, options={"instance": 1000})
    assert info["iteration"] == 300
    assert info["val_loss"] > info["best_val_loss"] + 0.1


# -- micro-regimes: PPO's family of episodes --------------------------------------------------------------------


def test_micro_regimes_are_reproducible_varied_and_outside_the_suite():
    from envs.micro import EVAL_REGIMES, TRAIN_REGIMES, micro_regime
    from experiments.suite import REGIMES

    assert micro_regime(9003) == micro_regime(9003)
    drawn = [micro_regime(s) for s in TRAIN_REGIMES[:200]]
    for key in ("n_embd", "train_chars", "learning_rate"):
        assert len({d["config"][key] for d in drawn}) > 1, key
    assert len({d["max_iters"] for d in drawn}) > 1
    assert all(d["max_iters"] == 20 * d["interval"] for d in drawn)  # twenty decisions each, as in the suite
    assert set(TRAIN_REGIMES).isdisjoint(EVAL_REGIMES)
    # the suite's held-out regimes are 4-layer models of the cpu preset: no micro-regime is one of them
    held_out = [r.config() for r in REGIMES.values() if r.split == "test" and not r.gpu]
    for d in drawn + [micro_regime(s) for s in EVAL_REGIMES]:
        assert d["preset"] == "tiny" and d["config"]["n_layer"] == 2
        assert all((d["config"]["n_layer"], d["config"]["n_embd"]) != (c.n_layer, c.n_embd) for c in held_out)


def test_a_micro_episode_runs_its_instances_regime(env_cls):
    from envs.micro import micro_regime

    env = env_cls(episode="micro", max_iters=20, interval=10)
    obs, info = env.reset(options={"instance": 9001})
    regime = micro_regime(9001)
    assert env.trainer.cfg.n_embd == regime["config"]["n_embd"]
    assert env.trainer.cfg.train_chars == regime["config"]["train_chars"]
    assert env.trainer.cfg.learning_rate == regime["config"]["learning_rate"] and env.trainer.cfg.max_iters == 20
    assert env.train_seeds[0] == 1000 and env.eval_seeds[0] == 9000  # the family's own instances
    *_, info = run_episode(env, [0.0, 0.0], options={"instance": 9001})
    assert info["instance"] == 9001 and info["iteration"] == 20


def test_the_population_env_draws_one_micro_regime_per_round(chardata):
    from envs.population_env import PopulationVecEnv

    venv = PopulationVecEnv(2, {"episode": "micro", "max_iters": 20, "interval": 10}, threads=1)
    venv.seed(3)
    venv.reset()
    first = venv.instances
    assert first[0] == first[1] and venv.trainer.seeds == [first[0], first[0] + 100_000]
    for _ in range(2):
        _, _, dones, infos = venv.step(np.zeros((2, 1), dtype=np.float32))
    assert dones.all() and all("episode" in i for i in infos)
    assert venv.instances[0] == venv.instances[1] and venv.trainer.iterations == [0, 0]  # the next regime began
