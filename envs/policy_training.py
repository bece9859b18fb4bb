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


def score_controllers(specs: list[str], instances: list[int], seeds_per_instance: int,
                      env_kwargs: dict[str, Any]) -> dict[int, dict[str, list[dict[str, float]]]]:
    """Train every controller spec on the run a ``DropoutEnv(**env_kwargs)`` gives each instance (a micro-regime's
    for the ``micro`` family), ``seeds_per_instance`` training seeds each (the instance, then + 100,000 per seed),
    as one batched population per instance. Returns ``{instance: {spec: [figures per seed]}}`` with ``test_loss``,
    ``best_val_loss_full``, ``best_val_loss`` and ``best_val_iter``."""
    from controllers import make_controller
    from gpt.population import PopulationTrainer

    env = DropoutEnv(**{**env_kwargs, "torch_threads": None})
    out: dict[int, dict[str, list[dict[str, float]]]] = {}
    for instance in instances:
        seeds = [instance + 100_000 * k for k in range(seeds_per_instance)]
        members = [(spec, seed) for spec in specs for seed in seeds]
        pop = PopulationTrainer(env.config_for(instance), [seed for _, seed in members],
                                [make_controller(s) for s, _ in members], data=env.data)
        figures = out.setdefault(instance, {spec: [] for spec in specs})
        for (spec, _), summary in zip(members, pop.train()):
            keys = ("test_loss", "best_val_loss_full", "best_val_loss", "best_val_iter")
            figures[spec].append({k: (summary or {}).get(k, float("nan")) for k in keys})
    return out


CURVE_CONSTANTS = ("constant:rate=0", "constant:rate=0.1", "constant:rate=0.2", "constant:rate=0.3", "constant:rate=0.4")
"""The constants a micro-regime's regret is measured against (the best by val on each regime)."""


def constants_digest(instances: list[int], seeds_per_instance: int, env_kwargs: dict[str, Any]) -> str:
    """sha256 of what decides :data:`CURVE_CONSTANTS`' figures on ``instances``: every run's settings (seed
    included), the data's sha256, the numerics version, torch's version and its thread count."""
    import dataclasses
    import hashlib
    import json

    import torch

    from gpt.config import canonical_settings
    from gpt.trainer import NUMERICS_VERSION

    env = DropoutEnv(**{**env_kwargs, "torch_threads": None})
    runs = [canonical_settings(dataclasses.asdict(env.config_for(i, i + 100_000 * k)))
            for i in instances for k in range(seeds_per_instance)]
    parts = {"runs": runs, "specs": CURVE_CONSTANTS, "data_sha256": env.data.sha256, "numerics": NUMERICS_VERSION,
             "torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def score_constants(instances: list[int], seeds_per_instance: int, env_kwargs: dict[str, Any],
                    cache_dir: Path | None = None) -> dict[int, dict[str, list[dict[str, float]]]]:
    """:func:`score_controllers` for :data:`CURVE_CONSTANTS`, kept in ``cache_dir`` (default: the user cache,
    ``curve-references/<digest>.json``) under :func:`constants_digest`: the constants do not depend on the policy,
    and on the default curve (8 micro-regimes x 2 seeds) they cost 80 episodes, more than the demo budget's
    curve points (48). Another setting, data, numerics version, torch or thread count is another file."""
    from dyndrop import read_json, write_json
    from gpt.data import default_cache_dir

    path = (cache_dir or default_cache_dir() / "curve-references") / (
        constants_digest(instances, seeds_per_instance, env_kwargs) + ".json")
    if path.exists():  # JSON holds a diverged run's nan as null, and instances as strings
        return {int(i): {spec: [{k: math.nan if v is None else v for k, v in run.items()} for run in runs]
                         for spec, runs in by_spec.items()}
                for i, by_spec in read_json(path, "learning-curve reference")["figures"].items()}
    figures = score_controllers(list(CURVE_CONSTANTS), instances, seeds_per_instance, env_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"instances": instances, "seeds_per_instance": seeds_per_instance, "figures": figures})
    return figures


def regrets(policy: dict[int, dict[str, list[dict[str, float]]]], reference: dict[int, dict[str, list[dict[str, float]]]],
            spec: str) -> dict[str, float]:
    """Per (regime, seed): the policy's test loss minus that of the regime's best constant, chosen by its mean val
    loss over the regime's seeds (``"regime/seed index"`` keys)."""
    out = {}
    for regime, by_spec in reference.items():
        val = {s: sum(r["best_val_loss_full"] for r in runs) / len(runs) for s, runs in by_spec.items()}
        best = min(val, key=val.get)
        for k, run in enumerate(policy[regime][spec]):
            out[f"{regime}/{k}"] = run["test_loss"] - by_spec[best][k]["test_loss"]
    return out


class LearningCurveCallback(BaseCallback):
    """The policy's held-out regret against env steps: before training, every ``every`` rollouts, and at the end.

    The policy is saved (``<folder>/curve/policy_<steps>``) and deployed as the ``ppo`` controller on a fixed set of
    held-out instances (``regimes``: micro-regimes for the ``micro`` family; ``seeds`` training seeds each,
    :func:`score_controllers`); its
    regret is its test loss minus the best constant's (:data:`CURVE_CONSTANTS`, chosen by val). The constants run
    once, at the start, or are read from the cache where the same runs were scored before (:func:`score_constants`).
    Points go to the sb3 logger (``curve/regret``, hence wandb and progress.csv) and to ``<folder>/learning_curve.json``, with each point's per-(regime, seed) regrets so that the last point can be
    paired against the first (the untrained policy).
    """

    def __init__(self, every: int, folder: str | Path, env_meta: dict[str, Any], regimes: list[int], seeds: int,
                 env_kwargs: dict[str, Any], cache_dir: Path | None = None) -> None:
        super().__init__()
        self.every, self.folder, self.env_meta, self.cache_dir = every, Path(folder), env_meta, cache_dir
        self.regimes, self.seeds, self.env_kwargs = regimes, seeds, env_kwargs
        self.rollouts, self.points, self.reference = 0, [], {}

    def _on_training_start(self) -> None:
        self.reference = score_constants(self.regimes, self.seeds, self.env_kwargs, self.cache_dir)
        self.evaluate()

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.every and self.rollouts % self.every == 0:
            self.evaluate()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if not self.points or self.points[-1]["env_steps"] != self.num_timesteps:
            self.evaluate()

    def evaluate(self) -> None:
        """One point of the curve: deploy the policy as it is on the fixed held-out micro-regimes."""
        from dyndrop import write_json

        path = save_policy(self.model, self.folder / "curve" / f"policy_{self.num_timesteps}", self.env_meta)
        spec = f"ppo:policy={path}"
        per_pair = regrets(score_controllers([spec], self.regimes, self.seeds, self.env_kwargs), self.reference, spec)
        values = np.array(list(per_pair.values()))
        mean, sem = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        self.points.append({"env_steps": int(self.num_timesteps), "regret": mean, "regret_sem": sem,
                            "per_pair": per_pair})
        self.logger.record("curve/regret", mean)
        self.logger.record("curve/env_steps", self.num_timesteps)
        write_json(self.folder / "learning_curve.json", {"regimes": self.regimes, "seeds": self.seeds,
                                                         "constants": list(CURVE_CONSTANTS), "points": self.points})
