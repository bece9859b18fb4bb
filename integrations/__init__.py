"""Dynamic dropout for any PyTorch model: the dropout knob, the controller as a scheduler, and callbacks for
Hugging Face ``transformers`` and Lightning.

``import integrations`` needs only torch: the callbacks live in :mod:`integrations.hf` and
:mod:`integrations.lightning`, which import their frameworks (the ``hf`` and ``lightning`` extras).
Imports ``controllers`` and ``dyndrop``, never ``gpt``, ``envs``, ``experiments`` or ``runs``.
"""
from .knob import DropoutKnob, DropoutSite, TensorRateDropout, swap_dropout
from .scheduler import DropoutScheduler, LossTracker, rate_record

__all__ = ["DropoutKnob", "DropoutScheduler", "DropoutSite", "LossTracker", "TensorRateDropout", "rate_record", "swap_dropout"]
