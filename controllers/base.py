"""The ``Controller`` interface, the ``TrainingStats`` record it observes, and the registry.

Plain Python: no torch here, so controllers can be tested and reasoned about on their own.
The trainer calls :meth:`Controller.update` once per control step; a controller implements the
:meth:`Controller._update` hook (the stable-baselines3 ``on_step``/``_on_step`` pattern).
"""
from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Sequence, Union

from dyndrop import UserError

Rate = Union[float, Sequence[float]]
"""A dropout rate in [0, 1): one number for every layer, or one per transformer layer."""


@dataclass(frozen=True)
class TrainingStats:
    """What a controller sees at a control step. Losses are mean cross-entropy in nats per token.

    :param iteration: optimizer steps done so far (0 before the first one).
    :param max_iters: optimizer steps in the whole run.
    :param lr: learning rate used for the next step.
    :param train_loss_smoothed: exponential moving average of the per-step training loss
        (with dropout active); ``nan`` before the first step.
    :param eval_train_loss: loss on the fixed training evaluation batches, dropout off.
    :param eval_val_loss: loss on the fixed validation batches, dropout off.
    :param best_val_loss: lowest ``eval_val_loss`` so far.
    :param best_val_iter: iteration at which ``best_val_loss`` was measured.
    :param rates: the dropout rate of each transformer layer during the interval just trained.
    :param grad_norm: mean global gradient norm (before clipping) over the last log interval; ``nan`` if none.
    :param tokens_per_s: training throughput over the last interval; ``nan`` if none.
    :param eval_iter: iteration at which the eval losses were measured (they may be older than ``iteration``
        when control steps are more frequent than evaluations).
    """

    iteration: int
    max_iters: int
    lr: float
    train_loss_smoothed: float
    eval_train_loss: float
    eval_val_loss: float
    best_val_loss: float
    best_val_iter: int
    rates: tuple[float, ...]
    grad_norm: float = math.nan
    tokens_per_s: float = math.nan
    eval_iter: int = 0

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1]."""
        return self.iteration / max(self.max_iters, 1)

    @property
    def gap(self) -> float:
        """Generalization gap: ``eval_val_loss - eval_train_loss`` (nats); grows as the model overfits."""
        return self.eval_val_loss - self.eval_train_loss

    @property
    def rate(self) -> float:
        """Mean dropout rate over layers."""
        return sum(self.rates) / len(self.rates)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(progress=self.progress, gap=self.gap, rate=self.rate)
        return d


def check_rate(rate: Rate, n_layers: int) -> tuple[float, ...]:
    """Validate a rate (scalar or per layer) and return one float per layer. Raises ``UserError``."""
    if isinstance(rate, numbers.Real):  # also numpy scalars such as float32, which are not float subclasses
        rates = (float(rate),) * n_layers
    else:
        rates = tuple(float(r) for r in rate)
        if len(rates) != n_layers:
            raise UserError(f"got {len(rates)} per-layer dropout rates for a model with {n_layers} layers")
    for r in rates:
        if not (0.0 <= r < 1.0):  # also rejects nan
            raise UserError(f"dropout rate {r} is outside [0, 1)")
    return rates


def require_rate(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a dropout rate in [0, 1) (this also rejects nan)."""
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name}={value} is not a dropout rate in [0, 1)")


def require_rate_range(low_name: str, low: float, high_name: str, high: float) -> None:
    """Raise ``ValueError`` unless both are dropout rates and ``low <= high``."""
    require_rate(low_name, low)
    require_rate(high_name, high)
    if low > high:
        raise ValueError(f"{low_name}={low} is above {high_name}={high}")


def require_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a fraction of the run in [0, 1]."""
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value} is not a fraction of the run in [0, 1]")


class Controller(ABC):
    """Chooses the dropout rate for the next control interval from training statistics.

    Subclasses set ``name``, take their parameters as keyword arguments with type hints (the
    registry builds them from ``key=value`` strings), and implement :meth:`_update`. Stateful
    controllers override :meth:`state_dict` / :meth:`load_state_dict` with plain Python values
    (floats, ints, lists, dicts) so checkpoints load with ``torch.load(weights_only=True)``.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.n_layers = 1

    def reset(self, n_layers: int) -> None:
        """Start of a run with a model of ``n_layers`` transformer layers. Clears all state."""
        self.n_layers = n_layers
        self._reset()

    def _reset(self) -> None:
        """Hook: clear controller state at the start of a run."""

    def update(self, stats: TrainingStats) -> tuple[float, ...]:
        """Observe ``stats`` and return the rate of each layer for the next interval, each in [0, 1)."""
        return check_rate(self._update(stats), self.n_layers)

    @abstractmethod
    def _update(self, stats: TrainingStats) -> Rate:
        """Hook: the next rate, a float or one float per layer."""

    def internals(self) -> dict[str, float]:
        """Values worth logging (e.g. PID terms), logged under ``controller/``."""
        return {}

    def explain(self, changes: Sequence[tuple[int, float]], max_iters: int) -> str:
        """One line saying what the controller did in a run: ``changes`` are the (iteration, mean rate) pairs where
        the rate changed (the first is where it was first set). Controllers that know why override this."""
        return f"{self.name} set {describe_schedule(changes, max_iters)}"

    def params(self) -> dict[str, Any]:
        """The constructor parameters, for run configs and names."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name


def describe_schedule(changes: Sequence[tuple[int, float]], max_iters: int) -> str:
    """A rate schedule in words: ``rate 0 until 240, then 0.08-0.21; mean rate 0.14`` (the mean over the run's
    iterations, each rate weighted by how long it held). ``changes``: (iteration, rate) where the rate changed."""
    if not changes:
        return "no rate"
    ends = [it for it, _ in changes[1:]] + [max(max_iters, changes[-1][0])]
    span = sum(e - it for (it, _), e in zip(changes, ends))
    mean = sum(r * (e - it) for (it, r), e in zip(changes, ends)) / span if span > 0 else changes[-1][1]
    rates = [r for _, r in changes]
    if len(set(rates)) == 1:
        return f"rate {rates[0]:.2g} throughout"
    head = f"rate {rates[0]:.2g} until {changes[1][0]}, then " if len(changes) > 1 else ""
    rest = rates[1:]
    body = f"{min(rest):.2g}" if min(rest) == max(rest) else f"{min(rest):.2g}-{max(rest):.2g}"
    return f"{head}{body}; mean rate {mean:.2g}"


CONTROLLERS: dict[str, type[Controller]] = {}


def register(cls: type[Controller]) -> type[Controller]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    assert cls.name and cls.name not in CONTROLLERS, cls
    CONTROLLERS[cls.name] = cls
    return cls


class HoldRate(Controller):
    """The null controller: it keeps the rates in force, whatever the caller last set (``Trainer.set_dropout``).

    A trainer built without a controller holds one of these, so the training loop never checks for ``None``: the
    RL env and a PBT member set the rate themselves, and their checkpoints and summaries still name a controller.
    It is not in the registry: a user who wants a fixed rate asks for ``constant``.
    """

    name = "hold"

    def _update(self, stats: TrainingStats) -> Rate:
        return stats.rates
