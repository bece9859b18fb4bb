"""The population trainer and its VecEnv: a member is the single run with its seed.

Tolerance (float32, CPU): batched products and layer norms round differently from the single model's, so
losses differ from the start by ~1e-7 relative. How far that grows depends on the training dynamics, not on
the population: at the tiny preset's peak learning rate (2e-3 with Adam) training amplifies any rounding
about fivefold per step, so that the *same* single run computed with 2 torch threads instead of 1 differs from
itself by up to 5e-4 relative in val loss after 30-40 steps. These tests train at 5e-4 instead, where the
dynamics are stable and a member agrees with its single run to ~1e-7 over 60 steps (rate changes included):
the tolerance is 1e-5 relative. Dropout masks are the single run's bit for bit (same generator stream, same
sites, same order; checked mask by mask below).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from controllers import make_controller
from gpt import Trainer, make_config
from gpt.population import PopulationTrainer

RTOL = 1e-5
KW = dict(max_iters=60, learning_rate=5e-4, min_lr=5e-5, eval_interval=20, eval_iters=2, log_interval=5, gen_tokens=0, wandb="disabled",
          progress=False, checkpoint=False)


def single_curve(chardata, seed: int, rate: float, steps: int = 60) -> tuple[list[float], list[float]]:
    """A single Trainer run of ``steps`` at ``rate``: its logged training losses and its eval losses every 20."""
    trainer = Trainer(make_config("tiny", seed=seed, **KW), data=chardata)
    trainer.set_dropout(rate)
    evals = [trainer.evaluate()["val_loss"]]
    train = []
    for _ in range(steps // 20):
        for _ in range(4):
            trainer.advance(5)
            train.append(trainer.history.last_train_loss)
        evals.append(trainer.evaluate()["val_loss"])
    return train, evals


def population_curves(chardata, seeds: list[int], rates: list[float], steps: int = 60):
    pop = PopulationTrainer(make_config("tiny", **KW), seeds, data=chardata)
    for k, r in enumerate(rates):
        pop.set_dropout(k, r)
    evals = [[r["val_loss"]] for r in pop.evaluate()]
    train: list[list[float]] = [[] for _ in seeds]
    for _ in range(steps // 20):
        for k, records in enumerate(pop.advance(20)):
            train[k] += [r["train/loss"] for r in records]
        for k, r in enumerate(pop.evaluate()):
            evals[k].append(r["val_loss"])
    return train, evals


def test_a_member_is_the_single_run_with_its_seed(chardata):
    """At rate 0 and with dropout (members at different rates in one population), over 60 steps."""
    seeds, rates = [3, 4, 5], [0.0, 0.1, 0.3]
    train, evals = population_curves(chardata, seeds, rates)
    for k, (seed, rate) in enumerate(zip(seeds, rates)):
        want_train, want_evals = single_curve(chardata, seed, rate)
        np.testing.assert_allclose(train[k], want_train, rtol=RTOL, err_msg=f"member {k}")
        np.testing.assert_allclose(evals[k], want_evals, rtol=RTOL, err_msg=f"member {k}")


def test_a_member_does_not_depend_on_its_neighbours(chardata):
    alone = population_curves(chardata, [7], [0.2])
    crowded = population_curves(chardata, [3, 7, 11, 12], [0.0, 0.2, 0.4, 0.1])
    np.testing.assert_allclose(crowded[0][1], alone[0][0], rtol=RTOL)
    np.testing.assert_allclose(crowded[1][1], alone[1][0], rtol=RTOL)


def test_masks_are_the_single_runs(chardata, monkeypatch):
    import gpt.model
    import gpt.population

    pop = PopulationTrainer(make_config("tiny", **KW), [5, 6], data=chardata)
    single = Trainer(make_config("tiny", seed=6, **KW), data=chardata)
    pop.set_dropout(1, 0.2)
    single.set_dropout(0.2)
    seen: dict[str, list[torch.Tensor]] = {"pop": [], "single": []}
    for module, key, row in ((gpt.population, "pop", 1), (gpt.model, "single", None)):
        real = module.scaled_keep_mask
        monkeypatch.setattr(module, "scaled_keep_mask", lambda b, p, d, real=real, key=key, row=row: (
            lambda m: seen[key].append(m if row is None else m[row]) or m)(real(b, p, d)))
    x, y = single.sampler.next()
    single.model(x, y)
    pop.model(torch.stack([pop.samplers[0].next()[0], x]), torch.stack([y, y]))
    assert len(seen["pop"]) == len(seen["single"]) == 1 + 3 * 2  # embedding, then 3 sites per layer
    assert all(torch.equal(a, b) for a, b in zip(seen["pop"], seen["single"]))


def test_each_member_keeps_its_own_share(chardata):
    pop = PopulationTrainer(make_config("tiny", **KW), [1, 2, 3], data=chardata)
    rates = [0.0, 0.25, 0.6]
    for k, r in enumerate(rates):
        pop.set_dropout(k, r)
    x = torch.ones(3, 200_000)
    y = pop.model._dropout(x, 0)
    for k, r in enumerate(rates):
        kept = (y[k] != 0).float().mean().item()
        assert abs(kept - (1 - r)) < 0.005, (k, kept)
        assert torch.allclose(y[k].mean(), torch.tensor(1.0), atol=0.01)  # inverted dropout keeps the mean
    before = [g.get_state() for g in pop.model.generators]
    pop.set_dropout(1, 0.0)
    pop.set_dropout(2, 0.0)
    pop.model._dropout(x, 0)
    assert all(torch.equal(b, g.get_state()) for b, g in zip(before, pop.model.generators))  # rate 0 draws nothing


def test_train_gives_each_member_its_controller_and_summary(chardata, tmp_path):
    cfg = make_config("tiny", **{**KW, "gen_tokens": 8})
    specs = ["constant:rate=0", "linear:start=0.3,end=0"]
    pop = PopulationTrainer(cfg, [5, 6], [make_controller(s) for s in specs], data=chardata)
    summaries = pop.train()
    for k, (seed, spec) in enumerate(zip([5, 6], specs)):
        single = Trainer(make_config("tiny", seed=seed, **{**KW, "gen_tokens": 8}), make_controller(spec),
                         data=chardata).train()
        s = summaries[k]
        assert s["seed"] == seed and s["controller"] == spec.split(":")[0] and s["iterations"] == 60
        for key in ("best_val_loss", "best_val_loss_full", "final_val_loss"):
            assert s[key] == pytest.approx(single[key], rel=RTOL), key
        assert s["best_val_iter"] == single["best_val_iter"]
    # each member's last control step set its own schedule's rate: 0 for the constant, linear's at that point
    last_control = (cfg.max_iters - 1) // cfg.control_every * cfg.control_every
    linear = make_controller(specs[1]).rate_at(last_control / cfg.max_iters)
    assert 0 < linear < 0.3 and pop.model.rates == [(0.0, 0.0), (linear, linear)]
    assert [s["final_rates"] for s in summaries] == [[0.0, 0.0], [linear, linear]]


def test_a_diverged_member_leaves_the_others_alone(chardata):
    pop = PopulationTrainer(make_config("tiny", **KW), [1, 2], data=chardata)
    with torch.no_grad():
        pop.model.p("lm_head.weight" if "lm_head.weight" in pop.model.layout else "wte.weight")[0].fill_(float("nan"))
    pop.advance(5)
    results = pop.evaluate()
    assert pop.diverged == [True, False] and results[0] is None and np.isfinite(results[1]["val_loss"])
    pop.reset_member(0, 9)
    assert pop.diverged == [False, False] and np.isfinite(pop.evaluate()[0]["val_loss"])


# -- the vectorized env --------------------------------------------------------------------------------

ENV = dict(max_iters=40, interval=10, config={"eval_iters": 2, "learning_rate": 5e-4, "min_lr": 5e-5})


def test_the_vec_env_is_k_single_envs(chardata):
    """Same seeds and actions: the same instances, observations, rewards and infos as single envs run on their
    own (each episode alone, as its own process would: single envs in one process share torch's global
    generator for dropout masks, so a DummyVecEnv's episodes depend on how they interleave)."""
    from envs import DropoutEnv
    from envs.population_env import PopulationVecEnv

    K, steps = 3, 6  # crosses an episode boundary (4 steps an episode)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, K, 1)).astype(np.float32)
    venv = PopulationVecEnv(K, ENV, threads=1)
    venv.seed(5)
    obs, rewards, dones, infos = [venv.reset()], [], [], []
    first_infos = list(venv.reset_infos)
    for a in actions:
        o, r, d, i = venv.step(a)
        obs.append(o), rewards.append(r), dones.append(d), infos.append(i)
    for k in range(K):
        env = DropoutEnv(**ENV)
        o, info = env.reset(seed=5 + k)
        assert info["instance"] == first_infos[k]["instance"]
        np.testing.assert_allclose(o, obs[0][k], atol=1e-5)
        for s in range(steps):
            o, r, term, trunc, info = env.step(actions[s, k])
            assert term == dones[s][k] and not trunc
            assert abs(r - rewards[s][k]) < 1e-4, (k, s)  # reward units: 10 x nats
            assert info["instance"] == infos[s][k]["instance"] and info["iteration"] == infos[s][k]["iteration"]
            assert info["val_loss"] == pytest.approx(infos[s][k]["val_loss"], rel=RTOL)
            if term:
                np.testing.assert_allclose(o, infos[s][k]["terminal_observation"], atol=1e-5)
                assert infos[s][k]["episode"]["l"] == 4
                o, info = env.reset()
            np.testing.assert_allclose(o, obs[s + 1][k], atol=1e-5)


def test_the_vec_env_follows_sb3s_conventions_and_trains_ppo(chardata, tmp_path):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecCheckNan, VecMonitor

    from envs.policy_training import make_vec_env, save_policy

    venv = make_vec_env(2, ENV, seed=0, kind="population", threads=1)
    assert venv.num_envs == 2 and venv.get_attr("max_iters") == [40, 40] and venv.env_is_wrapped(object) == [False] * 2
    checked = VecCheckNan(VecMonitor(venv), raise_exception=True)  # SB3's wrappers: NaN/inf checks, episode stats
    model = PPO("MlpPolicy", checked, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu")
    model.learn(16)
    assert len(model.ep_info_buffer) == 4  # 2 envs x 2 episodes of 4 steps, seen through the "episode" infos
    path = save_policy(model, tmp_path / "policy", venv.metadata_dict())
    controller = make_controller(f"ppo:policy={path}")
    trainer = Trainer(make_config("tiny", max_iters=20, eval_interval=10, eval_iters=2, gen_tokens=0,
                                  wandb="disabled", progress=False, checkpoint=False), controller, data=chardata)
    assert trainer.train()["iterations"] == 20
    with pytest.raises(ValueError, match="actions"):
        venv.step(np.zeros((3, 1), np.float32))


def test_a_diverged_episode_ends_alone_and_starts_again(chardata):
    from envs.population_env import PopulationVecEnv

    venv = PopulationVecEnv(2, ENV, threads=1)
    venv.seed(1)
    venv.reset()
    with torch.no_grad():
        venv.trainer.model.p("wte.weight")[0].fill_(float("nan"))
    obs, rewards, dones, infos = venv.step(np.zeros((2, 1), np.float32))
    assert dones.tolist() == [True, False] and infos[0]["diverged"] and rewards[0] == -10.0
    assert np.isfinite(obs).all() and "terminal_observation" in infos[0]
    obs, rewards, dones, infos = venv.step(np.zeros((2, 1), np.float32))
    assert infos[0]["iteration"] == 10 and infos[1]["iteration"] == 20  # member 0 restarted, out of phase now


# -- comparisons on it ----------------------------------------------------------------------------------

def test_a_population_comparison_reproduces_the_local_table(tmp_path):
    import json

    from runs.compare import cli

    args = ["--preset", "tiny", "--max-iters", "40", "--eval-interval", "10", "--eval-iters", "2", "--gen-tokens", "8",
            "--threads", "1", "--no-progress", "--wandb", "disabled", "--controllers", "constant@0,0.1,linear",
            "--learning-rate", "5e-4", "--min-lr", "5e-5",
            "--seeds", "2", "--no-warm-up"]
    assert cli([*args, "--out", str(tmp_path / "local")]) == 0
    assert cli([*args, "--out", str(tmp_path / "pop"), "--executor", "population", "--population", "4"]) == 0
    tables = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("local", "pop")]
    local, pop = ({(t["controller"], t["seed"]): t for t in table["trials"]} for table in tables)
    assert local.keys() == pop.keys() and len(local) == 6
    for key in local:
        for metric in ("best_val_loss", "best_val_loss_full", "final_train_loss"):
            assert pop[key][metric] == pytest.approx(local[key][metric], rel=RTOL), (key, metric)
    assert [r["controller"] for r in tables[0]["rows"]] == [r["controller"] for r in tables[1]["rows"]]
    assert tables[0]["meta"]["baseline"] == tables[1]["meta"]["baseline"]
    assert sorted(p.name for p in (tmp_path / "pop" / "trials").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "trials").iterdir())
