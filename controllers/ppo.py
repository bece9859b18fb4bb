"""``ppo``: deploy a policy trained in ``DynamicDropout-v0`` (``runs.train_policy``) as a controller.

The policy is a ``.safetensors`` file of weights with its ``.json`` metadata beside it (see
:mod:`controllers.policy_file`: nothing in either is executed when read). The controller sees the run
through the same :class:`~controllers.features.Featurizer` and maps the action with the same
:func:`~controllers.features.action_to_rates`, so it acts in deployment exactly as in training.
stable-baselines3 (and so torch) is imported only when a policy is loaded: ``import controllers``
stays torch-free.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Controller, Rate, TrainingStats, register
from dyndrop import UserError
from .features import FEATURE_VERSION, Featurizer, action_to_rates
from .policy_file import load_policy


@register
class PPOController(Controller):
    """Rates chosen by a trained PPO policy, deterministically (the mean action).

    At each control step the featurizer turns ``stats`` into the observation, the policy returns its
    mean action, and the action is mapped onto ``[p_min, p_max]`` as in the env.

    :param policy: path of the ``.safetensors`` policy saved by ``runs.train_policy``.
    :param p_min: the lowest rate you expect the policy to use; -1 = whatever it was trained with. A value
        that differs from the policy's is refused (a policy cannot be rescaled after training).
    :param p_max: the highest rate you expect; -1 = the policy's; refused if it differs.
    """

    name = "ppo"

    def __init__(self, policy: str = "", p_min: float = -1.0, p_max: float = -1.0) -> None:
        super().__init__()
        if not policy:
            raise UserError("controller 'ppo' needs a policy: --controller ppo --policy PATH.safetensors")
        self.network, meta = load_policy(policy)
        for key, wanted in (("p_min", p_min), ("p_max", p_max)):
            if wanted != -1.0 and not np.isclose(wanted, float(meta[key])):
                raise UserError(f"policy {policy} was trained with {key}={meta[key]}, not {wanted}; "
                                f"drop {key} or retrain with the bounds you want")
        self.policy, self.meta = str(policy), meta
        self.p_min, self.p_max = float(meta["p_min"]), float(meta["p_max"])
        self.n_actions = int(meta["network"]["n_actions"])
        self.featurizer = Featurizer()
        self.last_action = np.zeros(self.n_actions, dtype=np.float32)

    def _reset(self) -> None:
        if hasattr(self, "featurizer"):
            self.featurizer.reset()
        if self.n_actions > 1 and self.n_actions != self.n_layers:
            raise UserError(f"policy {self.policy} sets {self.n_actions} per-layer rates, but this model has "
                            f"{self.n_layers} layers; use a preset with {self.n_actions} layers")

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The policy's deterministic action for one observation."""
        action, _ = self.network.predict(obs, deterministic=True)
        return np.asarray(action, dtype=np.float32).reshape(-1)

    def _update(self, stats: TrainingStats) -> Rate:
        try:  # finite weights can still overflow to a NaN mean, which torch's Normal refuses
            action = self.act(self.featurizer.observe(stats))
        except ValueError:
            action = np.full(self.n_actions, np.nan, dtype=np.float32)
        if np.isnan(action).any():
            raise UserError(f"policy {self.policy} gave no action (NaN) at iteration {stats.iteration}: its network "
                            "overflows there; retrain it with python -m runs.train_policy")
        self.last_action = action
        return action_to_rates(self.last_action, self.p_min, self.p_max, self.n_layers)

    def internals(self) -> dict[str, float]:
        return {f"action_{i}": float(a) for i, a in enumerate(self.last_action)}

    def state_dict(self) -> dict[str, Any]:
        return {"feature_version": FEATURE_VERSION, "featurizer": self.featurizer.state_dict(),
                "last_action": [float(a) for a in self.last_action]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("feature_version") != FEATURE_VERSION:
            raise UserError(f"the checkpoint's ppo state uses features {state.get('feature_version')!r}, "
                            f"not {FEATURE_VERSION!r}; start a new run")
        self.featurizer.load_state_dict(state["featurizer"])
        self.last_action = np.array(state["last_action"], dtype=np.float32)
