"""Hugging Face ``transformers``: a ``TrainerCallback`` that lets a controller set the dropout, and a tensor-rate
attention so that a compiled model does not recompile when the attention-dropout rate changes.

Needs the ``hf`` extra (``pip install -e '.[hf]'``: transformers and accelerate); importing this module imports
transformers, ``import integrations`` does not.

The callback in a ``Trainer``::

    from integrations.hf import DynamicDropoutCallback
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      eval_dataset={"train": train_sample, "val": val},   # metrics eval_train_loss, eval_val_loss
                      callbacks=[DynamicDropoutCallback("pid", val_metric="eval_val_loss",
                                                        train_metric="eval_train_loss")])
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.trainer_callback import ExportableState

from controllers import make_controller
from dyndrop import UserError

from .knob import DropoutKnob, TensorRateDropout, find_sites, attention_rate, swap_dropout, tensor_rate_dropout
from .scheduler import DropoutScheduler

ATTENTION = "dyndrop_sdpa"
"""The name under which :func:`tensor_rate_attention` is registered with transformers' ``AttentionInterface``."""


def tensor_rate_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Scaled-dot-product attention whose dropout rate a compiled graph reads from a tensor.

    Outside ``torch.compile``, and whenever attention dropout is off, it is transformers' own ``sdpa``
    attention with the probability the model passes (the same outputs and random numbers). Under
    ``torch.compile`` with attention dropout on, it ignores that Python float (a graph per value) and spells
    attention out, ``softmax(q k^T * scale + mask)``, dropped at the tensor rate of the module's
    :class:`~integrations.knob.TensorRateDropout`, then ``@ v``: the way this project's GPT does.
    Takes transformers' sdpa masks (bool, True = attend; float, added; or None with ``is_causal``), grouped
    key/value heads and ``position_bias``.
    """
    rate = attention_rate(module)
    if rate is None or not torch.compiler.is_compiling():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if not (module.training and rate.active):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length = query.shape[2]
    causal = attention_mask is None and q_length > 1 and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal:  # sdpa's is_causal: query i sees keys 0..i, after transformers crops longer keys to the queries
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        attention_mask = torch.ones(q_length, q_length, dtype=torch.bool, device=query.device).tril()
    scores = (query @ key.transpose(-1, -2)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if kwargs.get("position_bias") is not None:
        scores = scores + kwargs["position_bias"][..., :key.shape[2]]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = tensor_rate_dropout(scores.softmax(dim=-1).to(value.dtype), rate.rate)
    return (weights @ value).transpose(1, 2).contiguous(), None


def use_tensor_rate_attention(model: PreTrainedModel) -> None:
    """Route ``model``'s attention through :func:`tensor_rate_attention`, and give every attention module whose
    dropout probability is a float attribute (Llama's ``attention_dropout``) a tensor rate beside it
    (``dyndrop_attention``, set together with the float by the knob). :func:`integrations.knob.swap_dropout` calls
    this for a Hugging Face model; call that instead."""
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"use_tensor_rate_attention needs a transformers PreTrainedModel, not {type(model).__name__}")
    for owner, module, attribute, attention in list(find_sites(model)):
        if attribute is not None and attention and attention_rate(module) is None:
            holder = TensorRateDropout(getattr(module, attribute))
            module.dyndrop_attention = holder.to(next(model.parameters()).device).train(module.training)
    AttentionInterface.register(ATTENTION, tensor_rate_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


class DynamicDropoutCallback(TrainerCallback, ExportableState):
    """A controller setting the model's dropout in a transformers ``Trainer``, at every evaluation.

    It reads the training loss the Trainer logs (``loss``, every ``logging_steps``) and the losses of each
    evaluation, asks the controller for the next rate and sets it on every dropout module and attention-dropout
    probability of the model (:class:`~integrations.knob.DropoutKnob`). Training logs gain ``dropout_rate``, the mean
    rate of the interval they cover, for the callbacks after this one (the printer); ``callback.scheduler`` holds
    the rates and the controller. Its state rides in the Trainer's checkpoints
    (``trainer_state.json``) and comes back when training resumes from one.

    :param controller: a controller spec: ``"pid"``, ``"constant:rate=0.1"``, ``"ppo:policy=P"`` (docs/controllers.md).
    :param val_metric: the evaluation metric that is the validation loss: ``eval_loss`` for one eval dataset,
        ``eval_<name>_loss`` for a dict of them.
    :param train_metric: the evaluation metric that is the loss on training data with dropout off (an eval dataset
        drawn from the training set, e.g. ``eval_train_loss``); None: the controller sees the smoothed logged
        training loss (dropout on) in its place.
    :param layers: the knob's ``layers``: ``"auto"`` (one rate per layer where the model has layers), a module list's
        name, or None (one rate for all).
    :param tensor_rates: swap in tensor-rate dropout (:func:`~integrations.knob.swap_dropout`) at the start of
        training, so a compiled model does not recompile at every rate; None: when ``args.torch_compile`` is set.
    :raises UserError: a bad spec or argument, here; at an evaluation, metrics without ``val_metric``.
    """

    def __init__(self, controller: str = "pid", val_metric: str = "eval_loss", train_metric: str | None = None,
                 layers: str | None = "auto", tensor_rates: bool | None = None,
                 scheduler_state: dict[str, Any] | None = None) -> None:
        if not isinstance(controller, str):
            raise UserError(f"controller must be a spec string such as 'pid' or 'constant:rate=0.1', not "
                            f"{type(controller).__name__}")
        make_controller(controller)  # a bad spec fails here, before any training
        for name, metric in (("val_metric", val_metric), ("train_metric", train_metric)):
            if metric is not None and not (isinstance(metric, str) and metric.startswith("eval_")):
                raise UserError(f"{name}={metric!r} is not an evaluation metric: the Trainer names them eval_loss, "
                                f"or eval_<name>_loss for a dict of eval datasets")
        if tensor_rates not in (None, True, False):
            raise UserError(f"tensor_rates={tensor_rates!r} must be True, False or None")
        self.controller, self.val_metric, self.train_metric = controller, val_metric, train_metric
        self.layers, self.tensor_rates = layers, tensor_rates
        self.scheduler_state = scheduler_state  # the state to resume from (set by the Trainer on a restore)
        self.scheduler: DropoutScheduler | None = None
        self._pending: dict[str, float] = {}
        self._pending_step = -1
        self._last_logged_step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tensor_rates or (self.tensor_rates is None and args.torch_compile):
            swap_dropout(model)
        self.scheduler = DropoutScheduler(DropoutKnob(model, self.layers), self.controller, max_iters=state.max_steps)
        if state.global_step > 0:  # resuming: the Trainer loaded the checkpoint's trainer_state.json into `state`
            saved = self.scheduler_state or state.stateful_callbacks.get(type(self).__name__, {}).get(
                "attributes", {}).get("scheduler_state")
            if saved is None:
                raise UserError(f"the checkpoint at step {state.global_step} holds no {type(self).__name__} state; "
                                f"resume with the callback it was trained with")
            self.scheduler.load_state_dict(saved)
        self._last_logged_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step > self._last_logged_step:
            logs["dropout_rate"] = sum(self.scheduler.rates) / self.scheduler.n_layers  # that interval's, for printing
            self.scheduler.step(state.global_step, train_loss=logs["loss"],
                                train_steps=state.global_step - self._last_logged_step)
            self._last_logged_step = state.global_step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.scheduler is None:  # an evaluate() call outside training
            return
        wanted = [m for m in (self.val_metric, self.train_metric) if m is not None]
        if not any(m in metrics for m in wanted):
            raise UserError(f"the evaluation's metrics ({', '.join(sorted(metrics))}) hold none of "
                            f"{', '.join(wanted)}; pass val_metric= (and train_metric=) with the names it logs")
        if state.global_step != self._pending_step:
            self._pending, self._pending_step = {}, state.global_step
        self._pending.update({m: float(metrics[m]) for m in wanted if m in metrics})
        if all(m in self._pending for m in wanted):  # a dict of eval datasets reports one dataset per call
            self.scheduler.step(state.global_step, val_loss=self._pending[self.val_metric],
                                eval_train_loss=self._pending.get(self.train_metric))
            self._pending = {}

    def state(self) -> dict[str, Any]:
        return {"args": {"controller": self.controller, "val_metric": self.val_metric,
                         "train_metric": self.train_metric, "layers": self.layers, "tensor_rates": self.tensor_rates},
                "attributes": {"scheduler_state": self.scheduler.state_dict() if self.scheduler else None}}
