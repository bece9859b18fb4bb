"""Dynamic dropout for any PyTorch model: the dropout knob, the controller as a scheduler, and a callback for
Hugging Face ``transformers`` (Lightning's comes next).

``import integrations`` needs only torch: the callback lives in :mod:`integrations.hf`, which imports
transformers (the ``hf`` extra).
Imports ``controllers`` and ``dyndrop``, never ``gpt``, ``envs``, ``experiments`` or ``runs``.
"""
from .knob import DropoutKnob, DropoutSite, TensorRateDropout, swap_dropout
from .scheduler import DropoutScheduler, LossTracker

__all__ = ["DropoutKnob", "DropoutScheduler", "DropoutSite", "LossTracker", "TensorRateDropout", "swap_dropout"]
