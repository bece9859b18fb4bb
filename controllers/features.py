"""What a learned controller sees, and how its action becomes a rate: shared by the RL env and ``ppo``.

One :class:`Featurizer` turns the sequence of :class:`TrainingStats` into observation vectors, and one
:func:`action_to_rates` maps a policy's action to dropout rates. The env (``envs/``) and the PPO
controller both call these, so a policy sees exactly the same numbers in training and in deployment.

Every feature is scale-free: no loss level (a policy trained on tiny runs would read a larger model's lower
losses as another world), time both as the fraction of the run and as the run's own clock (how far the training
loss has fallen, in log units), and the memorised share of the training loss's improvement (:func:`memorised`,
PID v2's measurement). So a policy trained on micro-regimes of a few hundred steps reads a 5000-step run the same
way. Change any feature and bump ``FEATURE_VERSION``: a saved policy records the version it was trained with and
``ppo`` refuses another one. Plain Python + numpy: no torch.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from .base import TrainingStats, require_rate_range

FEATURE_VERSION = "dyndrop-features-v2"
SPAN = 0.05
"""The memorised share's window: the evaluations since the training loss was this much higher, in log units."""


class Feature(NamedTuple):
    """One observation entry: its name, its meaning, and the box it is clipped to."""

    name: str
    low: float
    high: float
    doc: str


FEATURES: tuple[Feature, ...] = (
    Feature("progress", 0.0, 1.0, "fraction of the run done, iteration / max_iters"),
    Feature("train_fall", 0.0, 5.0, "how far log(eval_train_loss) has fallen since the first evaluation"),
    Feature("memorised", -1.0, 3.0, "share of the training loss's improvement that did not reach val, over the "
                                    "evaluations since the training loss was 5 % higher (memorised)"),
    Feature("rel_gap", -1.0, 1.0, "generalization gap relative to the val loss, (val - train) / val"),
    Feature("above_best", 0.0, 3.0, "log(eval_val_loss / best_val_loss): how far val is above its best"),
    Feature("since_best", 0.0, 1.0, "fraction of the run since the best val loss, (iteration - best_val_iter) / max_iters"),
    Feature("rate", 0.0, 1.0, "mean dropout rate of the interval just trained"),
    Feature("dropout_cost", -3.0, 3.0, "log(train_loss_smoothed / eval_train_loss): training loss with dropout vs without"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
OBS_LOW = np.array([f.low for f in FEATURES], dtype=np.float32)
OBS_HIGH = np.array([f.high for f in FEATURES], dtype=np.float32)


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 and math.isfinite(x) else math.nan


def slope(t: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` against ``t``; 0 with fewer than two distinct times."""
    if len(t) < 2:
        return 0.0
    tm, ym = sum(t) / len(t), sum(y) / len(y)
    var = sum((a - tm) ** 2 for a in t)
    if var <= 0.0:
        return 0.0
    return sum((a - tm) * (b - ym) for a, b in zip(t, y)) / var


def memorised(points: list[tuple[float, float]], span: float = SPAN) -> tuple[float, list[tuple[float, float]]]:
    """The share of the training loss's improvement that did not reach the validation loss.

    ``points`` are the (log train, log val) of the evaluations so far, newest last. Over those since log train was
    ``span`` higher than now (at least the last two), the least-squares slope of log val against log train is the
    share that transfers: 1 while val improves as fast as train (in relative terms), 0 when val stalls, below 0 when
    it worsens. Returns ``1 - slope`` (nan with fewer than two points, or while log train has not moved) and the
    points still in the window, to keep for the next call.
    """
    latest = points[-1][0]
    first = max((i for i, (lt, _) in enumerate(points) if lt >= latest + span), default=0)
    window = points[first:]
    trains = [lt for lt, _ in window]
    if len(window) < 2 or max(trains) - min(trains) < 1e-6:
        return math.nan, window
    return 1.0 - slope(trains, [lv for _, lv in window]), window


class Featurizer:
    """Turns the stats of successive control steps into observation vectors of :data:`FEATURES`.

    Keeps the (log train, log val) of the evaluations in the memorised share's window and the first evaluation's
    log train (the clock's origin); a control step without a new evaluation (``stats.eval_iter`` not advanced) adds
    nothing. Non-finite values (no evaluation yet, a diverged run) become 0 so the vector is always valid.

    :param span: the memorised share's window, in log units of the training loss, > 0.
    """

    dim = len(FEATURES)
    low, high = OBS_LOW, OBS_HIGH

    def __init__(self, span: float = SPAN) -> None:
        if not span > 0:
            raise ValueError(f"span={span} must be > 0")
        self.span = span
        self.reset()

    def reset(self) -> None:
        self.points: list[tuple[float, float]] = []  # (log train, log val) in the window
        self.first_log_train = math.nan
        self.memorised = math.nan
        self.last_eval_iter = -1

    def observe(self, stats: TrainingStats) -> np.ndarray:
        """The observation for ``stats``: float32, shape ``(dim,)``, inside ``[low, high]``."""
        n = max(stats.max_iters, 1)
        log_val, log_train = _log(stats.eval_val_loss), _log(stats.eval_train_loss)
        if stats.eval_iter > self.last_eval_iter and math.isfinite(log_val) and math.isfinite(log_train):
            self.last_eval_iter = stats.eval_iter
            if not math.isfinite(self.first_log_train):
                self.first_log_train = log_train
            self.memorised, self.points = memorised(self.points + [(log_train, log_val)], self.span)
        values = (
            stats.progress,
            self.first_log_train - log_train,
            self.memorised,
            (stats.eval_val_loss - stats.eval_train_loss) / stats.eval_val_loss if stats.eval_val_loss else math.nan,
            log_val - _log(stats.best_val_loss),
            (stats.iteration - stats.best_val_iter) / n,
            stats.rate,
            _log(stats.train_loss_smoothed) - log_train,
        )
        obs = np.nan_to_num(np.array(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return np.clip(obs, OBS_LOW, OBS_HIGH).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"span": self.span, "last_eval_iter": int(self.last_eval_iter),
                "points": [[float(a), float(b)] for a, b in self.points],
                "first_log_train": None if math.isnan(self.first_log_train) else float(self.first_log_train),
                "memorised": None if math.isnan(self.memorised) else float(self.memorised)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.span = float(state["span"])
        self.last_eval_iter = int(state["last_eval_iter"])
        self.points = [(float(a), float(b)) for a, b in state["points"]]
        self.first_log_train = math.nan if state["first_log_train"] is None else float(state["first_log_train"])
        self.memorised = math.nan if state["memorised"] is None else float(state["memorised"])


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
