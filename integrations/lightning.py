"""Lightning: a ``Callback`` that lets a controller set the dropout of a ``LightningModule`` at every validation.

Needs the ``lightning`` extra (``pip install -e '.[lightning]'``, the ``lightning`` package); importing this
module imports Lightning, ``import integrations`` does not.

::

    from integrations.lightning import DynamicDropoutCallback
    trainer = L.Trainer(max_steps=2000, val_check_interval=100,
                        callbacks=[DynamicDropoutCallback("pid", val_metric="val_loss")])

The module logs its validation loss under ``val_metric`` (``self.log("val_loss", loss)`` in ``validation_step``)
and, for the controllers that watch the generalization gap, its loss on training data with dropout off under
``train_metric`` (a second validation dataloader over a sample of the training set).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from controllers import make_controller
from dyndrop import UserError

from .knob import DropoutKnob, swap_dropout
from .scheduler import DropoutScheduler


class DynamicDropoutCallback(Callback):
    """A controller setting the dropout of the ``LightningModule`` being fitted, from ``on_validation_end``.

    It sums the training loss of every batch on the device (no host sync per step), and at the end of each
    validation (not the sanity check) hands the mean, the validation loss and, if logged, the dropout-off training
    loss to a :class:`~integrations.scheduler.DropoutScheduler`, which asks the controller and sets the rate on
    every dropout of the module. The rates and the controller's internals go to the trainer's loggers. Its state is
    saved in Lightning checkpoints and restored by ``fit(ckpt_path=...)``.

    :param controller: a controller spec: ``"pid"``, ``"constant:rate=0.1"``, ``"ppo:policy=P"`` (docs/controllers.md).
    :param val_metric: the logged metric that is the validation loss (dropout off).
    :param train_metric: the logged metric that is the loss on training data with dropout off; None: the controller
        sees the smoothed training loss (dropout on) in its place.
    :param layers: the knob's ``layers``: ``"auto"``, a module list's name, or None (one rate for all).
    :param tensor_rates: swap in tensor-rate dropout (:func:`~integrations.knob.swap_dropout`) when fitting starts,
        for a module you compile: a changed rate then costs no recompile.
    :raises UserError: a bad spec or argument, here; at a validation, metrics without ``val_metric``.
    """

    def __init__(self, controller: str = "pid", val_metric: str = "val_loss", train_metric: str | None = None,
                 layers: str | None = "auto", tensor_rates: bool = False) -> None:
        if not isinstance(controller, str):
            raise UserError(f"controller must be a spec string such as 'pid' or 'constant:rate=0.1', not "
                            f"{type(controller).__name__}")
        make_controller(controller)  # a bad spec fails here, before any training
        for name, metric in (("val_metric", val_metric), ("train_metric", train_metric)):
            if metric is not None and not (isinstance(metric, str) and metric):
                raise UserError(f"{name}={metric!r} must be the name of a metric the module logs")
        if val_metric is None:
            raise UserError("val_metric=None: name the metric the module logs as its validation loss")
        if not isinstance(tensor_rates, bool):
            raise UserError(f"tensor_rates={tensor_rates!r} must be True or False")
        self.controller, self.val_metric, self.train_metric = controller, val_metric, train_metric
        self.layers, self.tensor_rates = layers, tensor_rates
        self.scheduler: DropoutScheduler | None = None
        self._saved: dict[str, Any] | None = None  # a checkpoint's state, until the scheduler exists
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_batches = 0
        self._restored = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tensor_rates:
            swap_dropout(pl_module)
        max_iters = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if not math.isfinite(max_iters):
            raise UserError("the run's length is unknown: give the Trainer max_steps or max_epochs")
        self.scheduler = DropoutScheduler(DropoutKnob(pl_module, self.layers), self.controller, int(max_iters))
        self._restored = False
        if self._saved is not None:
            self._restore(self._saved)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0 and not self._restored:  # global_step is restored after on_fit_start
            raise UserError(f"the checkpoint at step {trainer.global_step} holds no {type(self).__name__} state; "
                            f"resume with the callback it was trained with")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_sum = self._loss_sum + loss.detach().float()
            self._loss_batches += 1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.scheduler is None:
            return
        metrics = trainer.callback_metrics
        for metric in (self.val_metric, self.train_metric):
            if metric is not None and metric not in metrics:
                raise UserError(f"{metric!r} is not among the logged metrics ({', '.join(sorted(metrics))}); log it "
                                f"in validation_step or pass val_metric= / train_metric= with the names you log")
        steps = trainer.global_step - self.scheduler.iteration
        train_loss = None
        if self._loss_batches and steps > 0:
            train_loss = float(self._loss_sum) / self._loss_batches
            self._loss_sum, self._loss_batches = 0.0, 0
        self.scheduler.step(trainer.global_step, train_loss=train_loss, val_loss=float(metrics[self.val_metric]),
                            eval_train_loss=float(metrics[self.train_metric]) if self.train_metric else None,
                            train_steps=max(steps, 1))
        record = self.scheduler.record()
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in record.items() if k != "iter"}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "train_loss_sum": float(self._loss_sum), "train_batches": self._loss_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scheduler is None:  # Lightning restores callbacks before on_fit_start builds the scheduler
            self._saved = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("scheduler") is None:
            raise UserError(f"the checkpoint holds no {type(self).__name__} state; resume with the callback it "
                            f"was trained with")
        self.scheduler.load_state_dict(state["scheduler"])
        self._loss_sum, self._loss_batches = float(state["train_loss_sum"]), int(state["train_batches"])
        self._saved, self._restored = None, True
