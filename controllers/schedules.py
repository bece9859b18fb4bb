"""Open-loop dropout schedules, and the one closed-loop rule that only needs the validation loss.

Every schedule here except ``val_loss`` is a pure function of ``stats.progress`` (the fraction of the
run done), so it keeps no state and a resumed run picks up exactly where it left off. Rates are
fractions of units dropped, in [0, 1). Plain Python: no torch.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

from .base import Controller, Rate, TrainingStats, register, require_fraction, require_rate, require_rate_range


class Schedule(Controller):
    """A rate that depends only on the fraction of the run done. Subclasses implement :meth:`rate_at`."""

    def _update(self, stats: TrainingStats) -> Rate:
        return self.rate_at(min(max(stats.progress, 0.0), 1.0))

    @abstractmethod
    def rate_at(self, progress: float) -> float:
        """The rate at ``progress`` in [0, 1] (fraction of the run's optimizer steps done)."""


@register
class ConstantDropout(Schedule):
    """The same rate for the whole run (the usual baseline).

    :param rate: dropout rate in [0, 1).
    """

    name = "constant"

    def __init__(self, rate: float = 0.2) -> None:
        super().__init__()
        require_rate("rate", rate)
        self.rate = rate

    def rate_at(self, progress: float) -> float:
        return self.rate


@register
class LinearDecay(Schedule):
    """Linear interpolation from ``start`` to ``end``: ``rate = start + (end - start) * progress``.

    :param start: rate at the first step, in [0, 1).
    :param end: rate at the last step, in [0, 1); may exceed ``start`` for a linear increase.
    """

    name = "linear"

    def __init__(self, start: float = 0.3, end: float = 0.0) -> None:
        super().__init__()
        require_rate("start", start)
        require_rate("end", end)
        self.start = start
        self.end = end

    def rate_at(self, progress: float) -> float:
        return self.start + (self.end - self.start) * progress


@register
class ExponentialDecay(Schedule):
    """Geometric interpolation from ``start`` to ``end``: ``rate = start * (end / start) ** progress``.

    The rate falls by the same factor in every equal slice of the run (its logarithm is linear in
    progress), so it drops quickly while large and slowly near ``end``. Both ends must be positive
    because a geometric path cannot reach 0; use ``linear`` for that.

    :param start: rate at the first step, in (0, 1).
    :param end: rate at the last step, in (0, 1).
    """

    name = "exponential"

    def __init__(self, start: float = 0.3, end: float = 0.01) -> None:
        super().__init__()
        require_rate("start", start)
        require_rate("end", end)
        if start == 0.0 or end == 0.0:
            raise ValueError(f"start={start} and end={end} must both be > 0 for an exponential schedule")
        self.start = start
        self.end = end

    def rate_at(self, progress: float) -> float:
        return self.start * (self.end / self.start) ** progress


@register
class EarlyDropout(Schedule):
    """Early dropout (Liu et al. 2023, "Dropout Reduces Underfitting"): ``rate`` before ``cutoff``, then 0.

    Dropout early in training lowers the variance of mini-batch gradients and helps an underfitting
    model; afterwards it is switched off.

    :param rate: dropout rate in [0, 1) while ``progress < cutoff``.
    :param cutoff: fraction of the run, in [0, 1], at which dropout switches off.
    """

    name = "early"

    def __init__(self, rate: float = 0.1, cutoff: float = 0.2) -> None:
        super().__init__()
        require_rate("rate", rate)
        require_fraction("cutoff", cutoff)
        self.rate = rate
        self.cutoff = cutoff

    def rate_at(self, progress: float) -> float:
        return self.rate if progress < self.cutoff else 0.0


@register
class LateDropout(Schedule):
    """Late dropout: no dropout before ``cutoff``, then ``rate`` (regularize only once overfitting can start).

    :param rate: dropout rate in [0, 1) once ``progress >= cutoff``.
    :param cutoff: fraction of the run, in [0, 1], at which dropout switches on.
    """

    name = "late"

    def __init__(self, rate: float = 0.1, cutoff: float = 0.5) -> None:
        super().__init__()
        require_rate("rate", rate)
        require_fraction("cutoff", cutoff)
        self.rate = rate
        self.cutoff = cutoff

    def rate_at(self, progress: float) -> float:
        return self.rate if progress >= self.cutoff else 0.0


@register
class CurriculumDropout(Schedule):
    """Curriculum dropout (Morerio et al. 2017): ``rate * (1 - exp(-gamma * progress))``.

    Morerio et al. let the retain probability fall from 1 towards its final value as
    ``(1 - p) exp(-gamma t) + p``; for the dropout rate that is the form above, rising from 0 at the
    start towards ``rate``. We measure time in fractions of the run, so ``gamma`` does not depend on the
    run length: the rate reaches ``1 - exp(-gamma)`` of ``rate`` at the end (99.995% for ``gamma=10``)
    and ``1 - 1/e`` (63%) of it at ``progress = 1 / gamma``. It is not renormalized to hit ``rate``
    exactly.

    :param rate: final (asymptotic) dropout rate, in [0, 1).
    :param gamma: growth speed per unit of progress, > 0.
    """

    name = "curriculum"

    def __init__(self, rate: float = 0.2, gamma: float = 10.0) -> None:
        super().__init__()
        require_rate("rate", rate)
        if not (gamma > 0.0 and math.isfinite(gamma)):
            raise ValueError(f"gamma={gamma} must be a finite number > 0")
        self.rate = rate
        self.gamma = gamma

    def rate_at(self, progress: float) -> float:
        return self.rate * (1.0 - math.exp(-self.gamma * progress))


@register
class ValLossRule(Controller):
    """Step the rate down while the validation loss improves, up when it stalls.

    At each control step that brings a new evaluation (``stats.eval_iter`` advanced), compare
    ``eval_val_loss`` with the previous evaluation's. If it fell by more than ``tol``, lower the rate by
    ``step`` (the model is still learning; less noise helps) and clear the stall count. Otherwise add
    one to the stall count; when it reaches ``patience``, raise the rate by ``step`` (the model has
    stopped generalizing better; regularize more) and clear the count. The rate is clamped to
    ``[min_rate, max_rate]``. The first evaluation, and any non-finite loss, only set the reference.
    Between evaluations the rate is held.

    :param start: rate before the first decision, in ``[min_rate, max_rate]``.
    :param step: change of rate per decision, >= 0.
    :param min_rate: lowest rate, in [0, 1).
    :param max_rate: highest rate, in ``[min_rate, 1)``.
    :param patience: evaluations without improvement before the rate rises, >= 1.
    :param tol: smallest drop of validation loss (nats) that counts as an improvement, >= 0.
    """

    name = "val_loss"

    def __init__(
        self,
        start: float = 0.2,
        step: float = 0.02,
        min_rate: float = 0.0,
        max_rate: float = 0.5,
        patience: int = 1,
        tol: float = 0.0,
    ) -> None:
        super().__init__()
        require_rate_range("min_rate", min_rate, "max_rate", max_rate)
        if not (min_rate <= start <= max_rate):
            raise ValueError(f"start={start} is outside [min_rate, max_rate] = [{min_rate}, {max_rate}]")
        if not (0.0 <= step < 1.0):
            raise ValueError(f"step={step} must be in [0, 1)")
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1")
        if not (0.0 <= tol < math.inf):
            raise ValueError(f"tol={tol} must be a finite number >= 0")
        self.start, self.step, self.min_rate, self.max_rate = start, step, min_rate, max_rate
        self.patience, self.tol = patience, tol
        self._reset()

    def _reset(self) -> None:
        self.current = self.start
        self.prev_val: float | None = None
        self.bad_evals = 0
        self.last_eval_iter = -1

    def _update(self, stats: TrainingStats) -> Rate:
        if stats.eval_iter <= self.last_eval_iter:
            return self.current
        self.last_eval_iter = stats.eval_iter
        val = float(stats.eval_val_loss)
        if not math.isfinite(val):
            return self.current
        if self.prev_val is not None:
            if val < self.prev_val - self.tol:
                self.current -= self.step
                self.bad_evals = 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= self.patience:
                    self.current += self.step
                    self.bad_evals = 0
            self.current = min(max(self.current, self.min_rate), self.max_rate)
        self.prev_val = val
        return self.current

    def internals(self) -> dict[str, float]:
        return {"bad_evals": float(self.bad_evals)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": float(self.current),
            "prev_val": self.prev_val,
            "bad_evals": int(self.bad_evals),
            "last_eval_iter": int(self.last_eval_iter),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state["current"])
        self.prev_val = None if state["prev_val"] is None else float(state["prev_val"])
        self.bad_evals = int(state["bad_evals"])
        self.last_eval_iter = int(state["last_eval_iter"])
