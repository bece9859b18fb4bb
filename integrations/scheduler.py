"""The controller as a scheduler: a :class:`DropoutScheduler` sets a model's dropout from what the training loop
measures, the way ``torch.optim.lr_scheduler`` sets its learning rate.

The loop calls :meth:`DropoutScheduler.step` with what it knows: the iteration, the training loss, and the
validation loss when it evaluated. The scheduler keeps the measurements (:class:`LossTracker`, the one place
that builds a :class:`~controllers.TrainingStats`), asks the controller at each evaluation and applies the rate
through a dropout knob, or any function that sets rates. Its ``state_dict`` is plain Python, so a checkpointed
loop resumes exactly::

    scheduler = DropoutScheduler(model, "pid", max_iters=2000)
    for it in range(2000):
        loss = train_step(model)
        if it % 100 == 0:
            scheduler.step(it, train_loss=loss, val_loss=evaluate(model))
        else:
            scheduler.step(it, train_loss=loss)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import torch.nn as nn

from controllers import Controller, Rate, TrainingStats, make_controller
from dyndrop import UserError

from .knob import DropoutKnob

RateSetter = Callable[[tuple[float, ...]], Sequence[float]]
"""Sets one rate per layer (each in [0, 1)) and returns the rates it set: ``DropoutKnob.set``, ``GPT.set_dropout``."""


@dataclass
class LossTracker:
    """What a training loop has measured, in the form controllers read it. Losses are mean cross-entropy in nats
    per token (any loss works, in its own unit); iterations count optimizer steps.

    :param ema_beta: smoothing of the training loss, in [0, 1): the weight of the old average per step, as the
        project's trainer uses (0.9); 0 keeps the latest value as it is (a loop that smooths it itself).
    :param ema: the running average before debiasing; :attr:`train_loss_smoothed` is what controllers see.
    :param ema_steps: training steps the average has seen.
    :param eval_train_loss: loss on training data with dropout off at the last evaluation; without such an
        evaluation, the smoothed training loss (dropout on) at that time, which is higher by dropout's cost.
    :param eval_val_loss: validation loss at the last evaluation (dropout off).
    :param eval_iter: iteration of the last evaluation; -1 before the first.
    :param best_val_loss: lowest validation loss so far (inf before the first evaluation).
    :param best_val_iter: iteration of that evaluation.
    """

    ema_beta: float = 0.9
    ema: float = 0.0
    ema_steps: int = 0
    eval_train_loss: float = math.nan
    eval_val_loss: float = math.nan
    eval_iter: int = -1
    best_val_loss: float = math.inf
    best_val_iter: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_beta < 1.0:
            raise UserError(f"ema_beta={self.ema_beta} is outside [0, 1)")

    @property
    def train_loss_smoothed(self) -> float:
        """The debiased moving average of the training loss (dropout on); nan before the first."""
        return self.ema / (1.0 - self.ema_beta ** self.ema_steps) if self.ema_steps else math.nan

    def add_train_loss(self, loss: float, steps: int = 1) -> None:
        """Record ``loss``, the mean training loss of the last ``steps`` (>= 1) steps: weighted as ``steps`` steps
        of that loss, so logging every 10 steps smooths like logging every step."""
        if steps < 1:
            raise UserError(f"train_steps={steps} must be at least 1")
        keep = self.ema_beta ** steps
        self.ema = float(loss) if keep == 0.0 else keep * self.ema + (1.0 - keep) * float(loss)  # 0 * nan is nan
        self.ema_steps += steps

    def add_eval(self, iteration: int, val_loss: float, train_loss: float | None = None) -> None:
        """Record an evaluation at ``iteration``: the validation loss and, if measured, the loss on training data."""
        self.eval_val_loss = float(val_loss)
        self.eval_train_loss = self.train_loss_smoothed if train_loss is None else float(train_loss)
        self.eval_iter = iteration
        if self.eval_val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_iter = self.eval_val_loss, iteration

    def stats(self, iteration: int, max_iters: int, rates: Sequence[float], lr: float = math.nan,
              grad_norm: float = math.nan, tokens_per_s: float = math.nan) -> TrainingStats:
        """The controller's view at ``iteration`` of a run of ``max_iters`` steps trained at ``rates``."""
        return TrainingStats(
            iteration=iteration, max_iters=max_iters, lr=lr, train_loss_smoothed=self.train_loss_smoothed,
            eval_train_loss=self.eval_train_loss, eval_val_loss=self.eval_val_loss, best_val_loss=self.best_val_loss,
            best_val_iter=self.best_val_iter, rates=tuple(rates), grad_norm=grad_norm, tokens_per_s=tokens_per_s,
            eval_iter=self.eval_iter)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


def rate_record(iteration: int, rates: Sequence[float]) -> dict[str, Any]:
    """The metrics record of the rates set at ``iteration``: ``dropout/rate``, the mean over layers, and
    ``dropout/layer_i``, each layer's, when they differ."""
    record: dict[str, Any] = {"iter": iteration, "dropout/rate": sum(rates) / len(rates)}
    if len(set(rates)) > 1:
        record.update({f"dropout/layer_{i}": r for i, r in enumerate(rates)})
    return record


class DropoutScheduler:
    """A controller setting a model's dropout during training, used like a learning-rate scheduler.

    :param target: what to set: a model (a :class:`DropoutKnob` is built on it), a knob, or a function that sets
        one rate per layer (``gpt.GPT.set_dropout``; then ``n_layers`` is required).
    :param controller: a controller spec (``"pid"``, ``"constant:rate=0.1"``, ``"ppo:policy=P"``; see
        docs/controllers.md) or a :class:`~controllers.Controller`.
    :param max_iters: optimizer steps in the whole run (controllers measure time as ``iteration / max_iters``);
        may be set later through the attribute, before the first :meth:`step`.
    :param n_layers: the number of rates ``target`` takes when it is a function.
    :param layers: the knob's ``layers`` argument when ``target`` is a model.
    :param ema_beta: :class:`LossTracker`'s smoothing of the training loss.
    :param tracker: the measurements to read and extend, e.g. a trainer's own; None: a new ``LossTracker(ema_beta)``.
    :param ask_now: at construction the controller is reset and, with this, asked once with no evaluation yet, so
        the model trains from the first step at the controller's starting rate (``constant:rate=0.1``: 0.1;
        ``pid``: its bias, 0). False for a loop whose first control step comes before its first training step
        (the project's trainer: evaluate, control, train): the controller then sees exactly the loop's steps.
    """

    def __init__(self, target: nn.Module | DropoutKnob | RateSetter, controller: str | Controller, max_iters: int,
                 *, n_layers: int | None = None, layers: str | None = "auto", ema_beta: float = 0.9,
                 tracker: LossTracker | None = None, ask_now: bool = True) -> None:
        if isinstance(target, nn.Module):
            target = DropoutKnob(target, layers)
        if isinstance(target, DropoutKnob):
            self.knob: DropoutKnob | None = target
            self.set_rates: RateSetter = target.set
            self.n_layers = target.n_layers
        elif callable(target):
            if not (isinstance(n_layers, int) and n_layers >= 1):
                raise UserError(f"a rate-setting function needs n_layers, the number of rates it takes; got {n_layers}")
            self.knob, self.set_rates, self.n_layers = None, target, n_layers
        else:
            raise UserError(f"target must be a model, a DropoutKnob or a function that sets rates, not "
                            f"{type(target).__name__}")
        if isinstance(controller, str):
            controller = make_controller(controller)
        elif not isinstance(controller, Controller):
            raise UserError(f"controller must be a spec such as 'pid' or a Controller, not {type(controller).__name__}")
        self.controller = controller
        self.max_iters = max_iters
        self.tracker = tracker if tracker is not None else LossTracker(ema_beta)
        self.iteration = 0
        self.rates = self.knob.rates if self.knob is not None else (0.0,) * self.n_layers  # before the first control
        self.changes: list[tuple[int, float]] = []  # (iteration, mean rate) where the rate changed
        controller.reset(self.n_layers)
        if ask_now:
            self.rates = self._apply(controller.update(self.stats()))

    @property
    def max_iters(self) -> int:
        """Optimizer steps in the whole run, >= 1."""
        return self._max_iters

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"max_iters={value!r} must be a whole number of optimizer steps, at least 1")
        self._max_iters = value

    def stats(self, lr: float = math.nan, grad_norm: float = math.nan,
              tokens_per_s: float = math.nan) -> TrainingStats:
        """What the controller sees now."""
        return self.tracker.stats(self.iteration, self.max_iters, self.rates, lr, grad_norm, tokens_per_s)

    def step(self, iteration: int, train_loss: float | None = None, val_loss: float | None = None,
             eval_train_loss: float | None = None, *, train_steps: int = 1, lr: float = math.nan,
             grad_norm: float = math.nan, tokens_per_s: float = math.nan,
             control: bool | None = None) -> tuple[float, ...]:
        """Record what the loop measured at ``iteration`` (optimizer steps done) and, at an evaluation, set the
        next rate. Returns the rate of each layer for the next steps.

        :param train_loss: mean training loss (dropout on) of the last ``train_steps`` steps.
        :param val_loss: validation loss (dropout off) of an evaluation at ``iteration``.
        :param eval_train_loss: loss on training data, dropout off, of the same evaluation; without it the
            controller sees the smoothed training loss in its place (see :class:`LossTracker`).
        :param lr, grad_norm, tokens_per_s: passed on to the controller (nan: unknown).
        :param control: ask the controller now (True), or not (False); None: when ``val_loss`` is given.
        """
        if not (isinstance(iteration, int) and iteration >= 0):
            raise UserError(f"iteration={iteration!r} must be a whole number of optimizer steps, at least 0")
        self.iteration = iteration
        if train_loss is not None:
            self.tracker.add_train_loss(train_loss, train_steps)
        if val_loss is not None:
            self.tracker.add_eval(iteration, val_loss, eval_train_loss)
        elif eval_train_loss is not None:
            raise UserError("eval_train_loss without val_loss: pass both losses of an evaluation together")
        if control or (control is None and val_loss is not None):
            self.control(self.stats(lr, grad_norm, tokens_per_s))
        return self.rates

    def control(self, stats: TrainingStats) -> tuple[float, ...]:
        """One control step from ``stats``: ask the controller, set its rates, return them. :meth:`step` calls it with
        the tracker's view; a loop that keeps its own measurements (the project's trainer) calls it directly."""
        self.iteration = stats.iteration
        self.rates = self._apply(self.controller.update(stats))
        mean = sum(self.rates) / len(self.rates)
        if not self.changes or self.changes[-1][1] != mean:
            self.changes.append((stats.iteration, mean))
        return self.rates

    def explain(self) -> str:
        """What the controller did in this run, in one line (:meth:`controllers.Controller.explain`)."""
        return self.controller.explain(self.changes, self.max_iters)

    def _apply(self, rates: Rate) -> tuple[float, ...]:
        return tuple(float(r) for r in self.set_rates(rates))

    def record(self) -> dict[str, Any]:
        """The metrics record of the last control step: :func:`rate_record` and the controller's internals
        (``controller/*``)."""
        internals = {f"controller/{k}": v for k, v in self.controller.internals().items()}
        return rate_record(self.iteration, self.rates) | internals

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed loop needs, in plain Python (JSON- and ``torch.load(weights_only=True)``-safe)."""
        return {"controller_name": self.controller.name, "controller": self.controller.state_dict(),
                "tracker": self.tracker.state_dict(), "iteration": self.iteration, "rates": list(self.rates),
                "changes": [list(c) for c in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output: the controller's state, the measurements, and the rates,
        set on the model again. Raises ``UserError`` for the state of another controller."""
        if state.get("controller_name") != self.controller.name:
            raise UserError(f"the saved dropout state is from controller {state.get('controller_name')!r}, not "
                            f"{self.controller.name!r}; use the controller it was trained with")
        self.controller.load_state_dict(state["controller"])
        self.tracker.load_state_dict(state["tracker"])
        self.iteration = int(state["iteration"])
        self.rates = self._apply(tuple(float(r) for r in state["rates"]))
        self.changes = [(int(it), float(r)) for it, r in state.get("changes", [])]
