"""What a learned controller sees, and how its action becomes a rate: shared by the RL env and ``ppo``.

One :class:`Featurizer` turns the sequence of :class:`TrainingStats` into observation vectors, and one
:func:`action_to_rates` maps a policy's action to dropout rates. The env (``envs/``) and the PPO
controller both call these, so a policy sees exactly the same numbers in training and in deployment.

Every feature is scale-free: time is the fraction of the run done, losses enter as logarithms or
ratios, and slopes are per unit of progress. So a policy trained on 200-step episodes of the ``tiny``
preset reads a 5000-step ``paper`` run the same way. Change any feature and bump ``FEATURE_VERSION``:
a saved policy records the version it was trained with and ``ppo`` refuses another one.
Plain Python + numpy: no torch.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from .base import TrainingStats, require_rate_range

FEATURE_VERSION = "dyndrop-features-v1"


class Feature(NamedTuple):
    """One observation entry: its name, its meaning, and the box it is clipped to."""

    name: str
    low: float
    high: float
    doc: str


FEATURES: tuple[Feature, ...] = (
    Feature("progress", 0.0, 1.0, "fraction of the run done, iteration / max_iters"),
    Feature("log_val", -3.0, 3.0, "log of eval_val_loss (nats)"),
    Feature("log_train", -3.0, 3.0, "log of eval_train_loss (nats)"),
    Feature("rel_gap", -1.0, 1.0, "generalization gap relative to the val loss, (val - train) / val"),
    Feature("val_slope", -5.0, 5.0, "symlog of d log(val) / d progress, least squares over the last evaluations"),
    Feature("train_slope", -5.0, 5.0, "symlog of d log(train) / d progress, same window"),
    Feature("rate", 0.0, 1.0, "mean dropout rate of the interval just trained"),
    Feature("since_best", 0.0, 1.0, "fraction of the run since the best val loss, (iteration - best_val_iter) / max_iters"),
    Feature("above_best", 0.0, 3.0, "log(eval_val_loss / best_val_loss): how far val is above its best"),
    Feature("dropout_cost", -3.0, 3.0, "log(train_loss_smoothed / eval_train_loss): training loss with dropout vs without"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
OBS_LOW = np.array([f.low for f in FEATURES], dtype=np.float32)
OBS_HIGH = np.array([f.high for f in FEATURES], dtype=np.float32)


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 and math.isfinite(x) else math.nan


def _symlog(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x)


def slope(t: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` against ``t``; 0 with fewer than two distinct times."""
    if len(t) < 2:
        return 0.0
    tm, ym = sum(t) / len(t), sum(y) / len(y)
    var = sum((a - tm) ** 2 for a in t)
    if var <= 0.0:
        return 0.0
    return sum((a - tm) * (b - ym) for a, b in zip(t, y)) / var


class Featurizer:
    """Turns the stats of successive control steps into observation vectors of :data:`FEATURES`.

    Keeps the (progress, log val, log train) of the last ``window`` evaluations for the slopes; a
    control step without a new evaluation (``stats.eval_iter`` not advanced) adds nothing to it.
    Non-finite values (no evaluation yet, a diverged run) become 0 so the vector is always valid.

    :param window: evaluations in the slope fit, >= 2.
    """

    dim = len(FEATURES)
    low, high = OBS_LOW, OBS_HIGH

    def __init__(self, window: int = 3) -> None:
        if window < 2:
            raise ValueError(f"window={window} must be >= 2")
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.history: list[tuple[float, float, float]] = []  # (progress at the eval, log val, log train)
        self.last_eval_iter = -1

    def observe(self, stats: TrainingStats) -> np.ndarray:
        """The observation for ``stats``: float32, shape ``(dim,)``, inside ``[low, high]``."""
        n = max(stats.max_iters, 1)
        log_val, log_train = _log(stats.eval_val_loss), _log(stats.eval_train_loss)
        if stats.eval_iter > self.last_eval_iter and math.isfinite(log_val) and math.isfinite(log_train):
            self.last_eval_iter = stats.eval_iter
            self.history = (self.history + [(stats.eval_iter / n, log_val, log_train)])[-self.window:]
        ts = [h[0] for h in self.history]
        values = (
            stats.progress,
            log_val,
            log_train,
            (stats.eval_val_loss - stats.eval_train_loss) / stats.eval_val_loss if stats.eval_val_loss else math.nan,
            _symlog(slope(ts, [h[1] for h in self.history])),
            _symlog(slope(ts, [h[2] for h in self.history])),
            stats.rate,
            (stats.iteration - stats.best_val_iter) / n,
            log_val - _log(stats.best_val_loss),
            _log(stats.train_loss_smoothed) - log_train,
        )
        obs = np.nan_to_num(np.array(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return np.clip(obs, OBS_LOW, OBS_HIGH).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "last_eval_iter": int(self.last_eval_iter),
                "history": [[float(v) for v in h] for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.last_eval_iter = int(state["last_eval_iter"])
        self.history = [(float(a), float(b), float(c)) for a, b, c in state["history"]]


def action_to_rates(action: Any, p_min: float, p_max: float, n_layers: int) -> tuple[float, ...]:
    """Map a policy action in [-1, 1] linearly onto [p_min, p_max]: one rate per layer.

    The action has one entry (the same rate for every layer) or ``n_layers`` entries. Out-of-range
    actions (a Gaussian policy's samples, infinities) are clipped first, so -1 and below give ``p_min`` and 1 and
    above give ``p_max``. A NaN has no place in the range to clip to: it raises ``ValueError``.
    """
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if np.isnan(a).any():
        raise ValueError(f"an action holds NaN ({a.tolist()}); actions are numbers, clipped into [-1, 1]")
    a = np.clip(a, -1.0, 1.0)
    if a.size == 1:
        a = np.repeat(a, n_layers)
    if a.size != n_layers:
        raise ValueError(f"an action of {a.size} entries cannot set the rates of {n_layers} layers")
    return tuple(float(r) for r in p_min + (a + 1.0) * 0.5 * (p_max - p_min))


def check_bounds(p_min: float, p_max: float) -> None:
    """Raise ``ValueError`` unless ``0 <= p_min <= p_max < 1`` (the action's rate range)."""
    require_rate_range("p_min", p_min, "p_max", p_max)
