"""The pieces ``runs.train_policy`` wires together: vectorised envs, callbacks, and saving a policy.

A saved policy is two files: ``<name>.safetensors`` (the policy network's weights) and ``<name>.json`` (how
to rebuild the network, and the metadata the ``ppo`` controller checks before it deploys the policy): see
:mod:`controllers.policy_file`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from controllers import policy_file

from .dropout_env import DropoutEnv


VEC_KINDS = ("population", "dummy", "subproc")


def make_vec_env(n_envs: int, env_kwargs: dict[str, Any], seed: int, kind: str = "population",
                 threads: int | None = None) -> VecEnv:
    """``n_envs`` :class:`DropoutEnv` episodes at a time; env ``i`` is seeded ``seed + i``.

    :param kind: ``population`` — one :class:`~envs.population_env.PopulationVecEnv`, all episodes trained as
        one batched model; ``dummy`` — SB3's ``DummyVecEnv`` of monitored single envs in this process;
        ``subproc`` — one process per env (one torch thread each): worth it only with spare cores.
    :param threads: torch threads for the population (None = torch's choice); single envs use one each.
    """
    if kind == "population":
        from .population_env import PopulationVecEnv

        venv: VecEnv = PopulationVecEnv(n_envs, env_kwargs, threads=threads)
    else:
        def make() -> gym.Env:
            return Monitor(DropoutEnv(**env_kwargs))

        fns: list[Callable[[], gym.Env]] = [make] * n_envs
        # fork shares the parent's already-read dataset; other platforms re-read it in each worker
        start = "fork" if sys.platform == "linux" else None
        venv = SubprocVecEnv(fns, start_method=start) if kind == "subproc" else DummyVecEnv(fns)
    venv.seed(seed)  # env i's first reset gets seed + i, which fixes its whole sequence of instances
    return venv


def save_policy(model: Any, path: str | Path, env_meta: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s policy network as ``<path>.safetensors`` with its metadata in ``<path>.json``
    (:mod:`controllers.policy_file`); returns the weights' path."""
    import stable_baselines3
    import torch

    meta = {**env_meta, "sb3_version": stable_baselines3.__version__, "gymnasium_version": gym.__version__,
            "torch_version": torch.__version__, "num_timesteps": int(model.num_timesteps), **(extra or {})}
    return policy_file.save_policy(model.policy, path, meta)


class EpisodeStatsCallback(BaseCallback):
    """Records each finished episode's best and final val loss and mean rate into the sb3 logger.

    They appear as ``episode/best_val_loss`` etc. (means over the episodes of a rollout), next to sb3's
    ``rollout/ep_rew_mean`` and ``train/policy_gradient_loss``/``train/value_loss``.
    """

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done:
                for key in ("best_val_loss", "val_loss"):
                    if math.isfinite(info.get(key, math.nan)):
                        self.logger.record_mean(f"episode/{key}", info[key])
                self.logger.record_mean("episode/diverged", float(info.get("diverged", False)))
        return True


class PolicyCheckpointCallback(BaseCallback):
    """Every ``every`` env steps, save the policy (with metadata) as ``<folder>/policy_<steps>.safetensors``."""

    def __init__(self, every: int, folder: str | Path, env_meta: dict[str, Any]) -> None:
        super().__init__()
        self.every, self.folder, self.env_meta = every, Path(folder), env_meta
        self.next_at = every

    def _on_step(self) -> bool:
        if self.every > 0 and self.num_timesteps >= self.next_at:
            save_policy(self.model, self.folder / f"policy_{self.num_timesteps}", self.env_meta)
            self.next_at += self.every
        return True


class TqdmCallback(BaseCallback):
    """A tqdm bar over env steps (sb3's own bar needs ``rich``, which we do not depend on)."""

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.locals["total_timesteps"] - self.model.num_timesteps, unit="step",
                        desc="ppo", dynamic_ncols=True)

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_rollout_end(self) -> None:
        rewards = [ep["r"] for ep in self.model.ep_info_buffer]
        if rewards:
            self.bar.set_postfix(ep_rew=f"{np.mean(rewards):.3f}", refresh=False)

    def _on_training_end(self) -> None:
        self.bar.close()


class WandbWriter(KVWriter):
    """Forwards everything the sb3 logger dumps (losses, rewards, episode stats) to ``wandb.log``."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        record = {k: v for k, v in key_values.items()
                  if isinstance(v, (int, float, np.floating, np.integer)) and "wandb" not in key_excluded.get(k, ())}
        self.run.log({**record, "global_step": step})

    def close(self) -> None:
        pass
