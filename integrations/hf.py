"""Hugging Face ``transformers``: a tensor-rate attention, so that a compiled model does not recompile when the
attention-dropout rate changes.

Needs the ``hf`` extra (``pip install -e '.[hf]'``: transformers and accelerate); importing this module imports
transformers, ``import integrations`` does not.

"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from dyndrop import UserError

from .knob import TensorRateDropout, find_sites, attention_rate, swap_dropout, tensor_rate_dropout

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
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scores = (query @ key.transpose(-1, -2)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if kwargs.get("position_bias") is not None:
        scores = scores + kwargs["position_bias"]
    if attention_mask is None and causal and q_length > 1:
        # sdpa's is_causal: query i sees keys 0..i (transformers crops longer keys to the queries first)
        attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril()
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
