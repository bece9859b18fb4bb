"""Reinforcement-learning environments. Importing this package registers ``DynamicDropout-v0``, so
``gymnasium.make("DynamicDropout-v0", max_iters=200)`` works. Imports ``gpt``, ``controllers`` and ``dyndrop``, never ``experiments`` or ``runs``.
"""
import gymnasium as gym

from .dropout_env import DEFAULT_EPISODE, EPISODES, EVAL_SEEDS, REWARDS, TRAIN_SEEDS, DropoutEnv, episode_config

ENV_ID = "DynamicDropout-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.dropout_env:DropoutEnv")

__all__ = ["DEFAULT_EPISODE", "ENV_ID", "EPISODES", "EVAL_SEEDS", "REWARDS", "TRAIN_SEEDS", "DropoutEnv", "episode_config"]
