"""``DynamicDropout-v0``, K episodes at a time, trained as one batched model: a stable-baselines3 ``VecEnv``.

Env ``i`` behaves as a :class:`~envs.dropout_env.DropoutEnv` built with the same arguments and seeded
``seed + i`` (what ``venv.seed(seed)`` does to a ``DummyVecEnv``): the same instances, observations, rewards
and infos for the same actions, up to the arithmetic of the batched model (tests/test_population.py). Its
run is member ``i`` of one :class:`~gpt.population.PopulationTrainer`, so one batched step trains all K.

SB3's conventions: ``step`` resets a finished episode at once and returns the new episode's first
observation, with the last one in ``info["terminal_observation"]``; a finished episode's info also holds
``"episode"`` (return ``r``, length ``l``, seconds ``t``), as SB3's ``Monitor`` writes it, so PPO logs episode
returns without a wrapper. Episodes are in lockstep until one diverges and starts again early; every env
step is ``interval`` iterations for every member, so ``max_iters`` must be a multiple of ``interval``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from controllers.features import action_to_rates
from dyndrop import UserError
from gpt.population import PopulationTrainer

from .dropout_env import DropoutEnv, EpisodeScore, draw_instance, episode_info


class PopulationVecEnv(VecEnv):
    """``n_envs`` ``DynamicDropout-v0`` episodes on one :class:`~gpt.population.PopulationTrainer`.

    :param n_envs: episodes at a time (members of the population), K.
    :param env_kwargs: :class:`~envs.dropout_env.DropoutEnv`'s arguments, the same for every env.
    :param threads: ``torch.set_num_threads`` (None = leave it): unlike K single envs, one batched model
        has large enough operations to use more than one core.
    """

    def __init__(self, n_envs: int, env_kwargs: dict[str, Any] | None = None, threads: int | None = None) -> None:
        env_kwargs = {**(env_kwargs or {}), "torch_threads": threads}
        self.template = DropoutEnv(**env_kwargs)  # checks the arguments, holds the spaces and the metadata
        t = self.template
        if not t.family and t.max_iters % t.interval:
            raise UserError(f"the population env needs max_iters ({t.max_iters}) to be a multiple of interval "
                            f"({t.interval}), so every member trains whole intervals")
        super().__init__(n_envs, t.observation_space, t.action_space)
        self.rngs = [seeding.np_random()[0] for _ in range(n_envs)]
        self.scores = [EpisodeScore(t.reward_kind, t.reward_scale, t.terminal_weight, t.divergence_penalty)
                       for _ in range(n_envs)]
        self.instances = [-1] * n_envs
        self.trainer: PopulationTrainer | None = None
        self.actions: np.ndarray | None = None
        self.returns = np.zeros(n_envs)
        self.lengths = np.zeros(n_envs, dtype=int)
        self.started = [0.0] * n_envs

    def metadata_dict(self) -> dict[str, Any]:
        return self.template.metadata_dict()

    # -- episodes -----------------------------------------------------------------------------------
    def _draw(self, i: int) -> int:
        if self._seeds[i] is not None:  # as gymnasium's Env.reset(seed=...) seeds np_random
            self.rngs[i] = seeding.np_random(self._seeds[i])[0]
        t = self.template
        return draw_instance(self.rngs[i], self._options[i], t.split, t.train_seeds, t.eval_seeds)

    def _new_regime(self) -> None:
        """A family's episodes share one model shape: every member runs the micro-regime of member 0's instance,
        each with its own training seed (the instance, then instance + 100,000 * i)."""
        regime = self.instances[0]
        self.instances = [regime] * self.num_envs
        seeds = [regime + 100_000 * i for i in range(self.num_envs)]
        self.trainer = PopulationTrainer(self.template.config_for(regime), seeds, data=self.template.data)

    def _start(self, members: Sequence[int]) -> dict[int, np.ndarray]:
        """Evaluate the members that just began an episode; their first observations."""
        self.trainer.evaluate(members)
        obs = {}
        for i in members:
            stats = self.trainer.stats(i)
            obs[i] = self.scores[i].start(stats)
            self.reset_infos[i] = episode_info(self.instances[i], stats)
            self.returns[i], self.lengths[i], self.started[i] = 0.0, 0, time.perf_counter()
        return obs

    def reset(self) -> np.ndarray:
        t = self.template
        self.instances = [self._draw(i) for i in range(self.num_envs)]
        if t.family:
            self._new_regime()
        elif self.trainer is None:
            self.trainer = PopulationTrainer(t.config_for(0), self.instances, data=t.data)
        else:
            for i, seed in enumerate(self.instances):
                self.trainer.reset_member(i, seed)
        obs = self._start(range(self.num_envs))
        self._reset_seeds()
        self._reset_options()
        return np.stack([obs[i] for i in range(self.num_envs)])

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self.trainer is None or self.actions is None:
            raise RuntimeError("call reset() and step_async() before step_wait()")
        t, trainer, K = self.template, self.trainer, self.num_envs
        expected = (K, *self.action_space.shape)
        if self.actions.shape != expected:
            raise ValueError(f"actions of shape {self.actions.shape} do not fit {K} envs of {self.action_space}")
        rates = [trainer.set_dropout(i, action_to_rates(a, t.p_min, t.p_max, t.base_config.n_layer))
                 for i, a in enumerate(self.actions)]
        trainer.advance(trainer.cfg.eval_interval)
        trainer.evaluate()
        obs = np.zeros((K, *self.observation_space.shape), dtype=np.float32)
        rewards, dones, infos = np.zeros(K, dtype=np.float32), np.zeros(K, dtype=bool), []
        for i in range(K):
            stats = trainer.stats(i)
            info: dict[str, Any] = episode_info(self.instances[i], stats)
            if trainer.diverged[i]:
                obs[i], rewards[i] = self.scores[i].diverged(stats)
                dones[i], info["diverged"] = True, True
            else:
                dones[i] = stats.iteration >= trainer.cfg.max_iters
                obs[i], rewards[i] = self.scores[i].step(stats, bool(dones[i]))
                info["rates"] = rates[i]
            self.returns[i] += rewards[i]
            self.lengths[i] += 1
            infos.append(info)
        finished = [i for i in range(K) if dones[i]]
        for i in finished:  # SB3's auto-reset: the next episode starts now
            infos[i]["terminal_observation"] = obs[i].copy()
            infos[i]["TimeLimit.truncated"] = False
            infos[i]["episode"] = {"r": float(self.returns[i]), "l": int(self.lengths[i]),
                                   "t": round(time.perf_counter() - self.started[i], 6)}
        if t.family and len(finished) == K:  # every episode ended together: the next micro-regime
            self.instances[0] = self._draw(0)
            self._new_regime()
        else:
            for i in finished:
                if t.family:  # a member that diverged starts again in the same micro-regime, with another seed
                    trainer.reset_member(i, self._draw(i) + 100_000 * i)
                else:
                    self.instances[i] = self._draw(i)
                    trainer.reset_member(i, self.instances[i])
        for i, first in self._start(finished).items() if finished else ():
            obs[i] = first
        self._reset_seeds()
        self._reset_options()
        return obs, rewards, dones, infos

    # -- the rest of SB3's VecEnv interface ----------------------------------------------------------
    def close(self) -> None:
        self.trainer = None

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The template env's attribute, once per index (every env has the same arguments)."""
        return [getattr(self.template, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"the population env's {self.num_envs} episodes share one set of arguments; "
                             f"build a new env to change {attr_name!r}")

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        method = getattr(self.template, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]
