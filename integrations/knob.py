"""The dropout knob of any ``nn.Module``: find every dropout in a model and set it as one rate, or one per layer.

A model's dropout lives in two kinds of place, called *sites* here:

- **modules**: ``nn.Dropout`` and its variants (``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``),
  and this package's :class:`TensorRateDropout`; the knob sets their ``p``.
- **attributes**: a Python float with a dropout-probability name (``dropout``, ``attention_dropout``,
  ``attn_drop``, ``hidden_dropout_prob``, ...) that a module passes to ``F.dropout`` or to an attention function
  itself, as Hugging Face's Llama-style attention (``dropout=self.attention_dropout``) and ``nn.MultiheadAttention``
  do; the knob overwrites the float.

A site is marked *attention* when it is the probability applied to attention weights: a float attribute of an
attention module (its class name ends in ``Attention``), or a dropout module named ``attn_dropout`` /
``attention_dropout`` / ``attn_drop`` (any parent), or ``dropout`` (in an attention module). Hugging Face's GPT-2
passes ``self.attn_dropout.p`` to scaled-dot-product attention, so setting that module's ``p`` reaches the kernel.

**Layers.** "Modules under the child ``i`` of a ``ModuleList`` (or ``Sequential``) belong to layer ``i``": the list
whose children hold the most sites is the model's layer list (``transformer.h`` in GPT-2, ``model.layers`` in
Llama, ``layers`` in ``nn.TransformerEncoder``). Sites before it (embedding dropout) follow layer 0's rate, sites
after it (a classifier head's dropout) the last layer's.

**torch.compile.** A compiled graph bakes a Python-float probability in: with plain ``nn.Dropout`` every new rate
is a new graph (measured in docs/integrations.md). :func:`swap_dropout` replaces each ``nn.Dropout`` with a
:class:`TensorRateDropout`, whose compiled path reads the rate from a 0-dim tensor, the way this project's GPT does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from controllers import Rate, check_rate
from dyndrop import UserError

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
"""The dropout modules whose ``p`` the knob sets (torch's ``_DropoutNd`` family)."""

PROBABILITY_NAME = re.compile(r"^(?:\w+_)?(?:dropout|drop)(?:_p|_prob|_rate)?$")
"""Float attributes with these names are dropout probabilities: ``dropout``, ``attention_dropout``, ``attn_drop``,
``dropout_p``, ``hidden_dropout_prob``, ``drop_rate``. Not ``layerdrop`` or ``drop_path_rate`` (they drop layers)."""

ATTENTION_DROPOUT_CHILDREN = ("dyndrop_attention", "attn_dropout", "attention_dropout", "attn_drop", "dropout")
"""Names of an attention module's child that holds its attention-dropout probability, in the order they are tried
(``dyndrop_attention`` is the tensor rate :func:`swap_dropout` adds beside a float attribute)."""


class TensorRateDropout(nn.Module):
    """Inverted dropout whose rate a compiled graph reads from a tensor: ``nn.Dropout`` without the recompiles.

    Outside ``torch.compile`` it is ``F.dropout(x, p)``: the same random numbers as the ``nn.Dropout`` it replaces,
    so a swapped model gives the same outputs at a fixed seed, in train mode too. Under ``torch.compile`` it reads
    the rate from the 0-dim buffer ``rate`` and the Python bool ``active`` (rate > 0), never the float, so a graph
    serves every non-zero rate; ``active`` flipping is the one change that costs a graph (rate 0 draws no random
    numbers).

    :param p: the dropout probability, in [0, 1).
    :param inplace: as ``nn.Dropout``'s (eager path only).
    """

    def __init__(self, p: float = 0.0, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.register_buffer("rate", torch.tensor(0.0), persistent=False)  # not saved: a swapped model saves as before
        self.p = p

    @property
    def p(self) -> float:
        """The rate as a Python float, in [0, 1); setting it updates the buffer in place (no host sync)."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise UserError(f"dropout rate {value} is outside [0, 1)")
        self._p, self.active = value, value > 0.0
        self.rate.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.dropout(x, self._p, self.training, self.inplace)
        if not (self.training and self.active):
            return x
        return tensor_rate_dropout(x, self.rate)

    def extra_repr(self) -> str:
        return f"p={self._p}, inplace={self.inplace}"


def tensor_rate_dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverted dropout at the rate held by the 0-dim tensor ``p`` (in [0, 1)): each element is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``, so the expectation is ``x``."""
    keep = torch.rand_like(x, dtype=torch.float32) >= p
    return x * keep * (1.0 / (1.0 - p)).to(x.dtype)


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` computes attention, by the convention of torch and Hugging Face: its class name ends in
    ``Attention`` (``nn.MultiheadAttention``, ``GPT2Attention``, ``LlamaAttention``, ``BertSelfAttention``)."""
    return type(module).__name__.endswith("Attention")


def attention_rate(module: nn.Module) -> TensorRateDropout | None:
    """The tensor rate of ``module``'s attention dropout, once :func:`swap_dropout` has given it one; else None."""
    for name in ATTENTION_DROPOUT_CHILDREN:
        child = module._modules.get(name)
        if isinstance(child, TensorRateDropout):
            return child
    return None


@dataclass(frozen=True)
class DropoutSite:
    """One place where a model keeps a dropout probability.

    :param name: the module's qualified name, then ``:attribute`` for a float attribute (``layers.0.attn:dropout``).
    :param module: the dropout module, or the module that owns the float attribute.
    :param attribute: the float attribute's name; None for a dropout module.
    :param attention: whether this is the probability applied to attention weights.
    :param layer: the index of the layer whose rate it takes, in [0, n_layers).
    :param placement: ``"layer"`` (under the layer list's child ``layer``), ``"before"`` / ``"after"`` the layer
        list (it follows the first / last layer), or ``"model"`` (no layer list: one rate for all).
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    attribute: str | None
    attention: bool
    layer: int
    placement: str

    @property
    def rate(self) -> float:
        """The probability the site holds now."""
        return float(self.module.p if self.attribute is None else getattr(self.module, self.attribute))

    @property
    def tensor_rate(self) -> bool:
        """Whether a compiled graph reads this rate from a tensor (a changed rate costs no recompile)."""
        return isinstance(self.module, TensorRateDropout)

    def set(self, rate: float) -> None:
        if self.attribute is None:
            self.module.p = rate
        else:
            setattr(self.module, self.attribute, rate)

    def describe(self) -> str:
        what = type(self.module).__name__ if self.attribute is None else "float"
        tags = [what] + (["attention"] * self.attention) + (["tensor rate"] * self.tensor_rate)
        where = {"layer": f"layer {self.layer}", "model": "", "before": f"before the layers, follows layer {self.layer}",
                 "after": f"after the layers, follows layer {self.layer}"}[self.placement]
        return f"{self.name} ({', '.join(tags)}{'; ' + where if where else ''}) p={self.rate:g}"


class DropoutKnob:
    """Every dropout of a model, set together: ``knob.set(0.1)`` or ``knob.set([0.0, 0.1])`` (one rate per layer).

    :param model: any module with at least one dropout site (see the module docstring).
    :param layers: ``"auto"``: find the layer list (one rate per layer); the qualified name of a ``ModuleList`` or
        ``Sequential`` (``"transformer.h"``) to name it; None: one rate for the whole model (``n_layers`` 1).
    :raises UserError: no dropout site in ``model``, or ``layers`` names no module list.
    """

    def __init__(self, model: nn.Module, layers: str | None = "auto") -> None:
        found = list(find_sites(model))
        if not found:
            raise UserError(f"{type(model).__name__} has no dropout: no nn.Dropout module and no float attribute "
                            f"named like a dropout probability (dropout, attention_dropout, attn_drop, ...)")
        self.model = model
        self.layers_name = _layer_list(model, found, layers)
        self.n_layers = len(model.get_submodule(self.layers_name)) if self.layers_name is not None else 1
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        self.sites = tuple(self._place(*site, order) for site in found)

    def _place(self, owner: str, module: nn.Module, attribute: str | None, attention: bool,
               order: dict[str, int]) -> DropoutSite:
        name = f"{owner}:{attribute}" if attribute is not None else owner
        if self.layers_name is None:
            return DropoutSite(name, module, attribute, attention, 0, "model")
        layer = _child_index(_path(owner, attribute), self.model.get_submodule(self.layers_name),
                             _path(self.layers_name))
        if layer is not None:
            return DropoutSite(name, module, attribute, attention, layer, "layer")
        before = order[owner] < order[self.layers_name]
        return DropoutSite(name, module, attribute, attention, 0 if before else self.n_layers - 1,
                           "before" if before else "after")

    @property
    def rates(self) -> tuple[float, ...]:
        """Each layer's rate now: the mean over its sites, exactly the rate where they agree (0 for a layer
        without a site)."""
        per_layer: list[list[float]] = [[] for _ in range(self.n_layers)]
        for site in self.sites:
            per_layer[site.layer].append(site.rate)
        return tuple((r[0] if min(r) == max(r) else sum(r) / len(r)) if r else 0.0 for r in per_layer)

    def set(self, rate: Rate) -> tuple[float, ...]:
        """Set every site: ``rate`` is one float in [0, 1) or one per layer. Returns the rate of each layer.

        :raises UserError: a rate outside [0, 1), or a count other than ``n_layers``.
        """
        rates = check_rate(rate, self.n_layers)
        for site in self.sites:
            site.set(rates[site.layer])
        return rates

    __call__ = set

    def report(self) -> str:
        """What the knob found, one site a line, under a summary line."""
        kinds = sum(s.attribute is None for s in self.sites), sum(s.attribute is not None for s in self.sites)
        where = f"{self.n_layers} layers ({self.layers_name})" if self.layers_name is not None else "one rate for all"
        head = (f"{type(self.model).__name__}: {len(self.sites)} dropout sites ({kinds[0]} modules, {kinds[1]} float "
                f"attributes, {sum(s.attention for s in self.sites)} on attention, "
                f"{sum(s.tensor_rate for s in self.sites)} with tensor rates); {where}")
        return "\n".join([head, *("  " + s.describe() for s in self.sites)])

    def __repr__(self) -> str:
        return self.report().splitlines()[0]


def find_sites(model: nn.Module):
    """Yield ``(owner, module, attribute, attention)`` for each dropout site, in module order: ``owner`` is the
    qualified name of the dropout module, or of the module that holds the float attribute."""
    for name, module in model.named_modules():
        if isinstance(module, (TensorRateDropout, *DROPOUT_MODULES)):
            parent_name, _, child_name = name.rpartition(".")
            attention = child_name in ATTENTION_DROPOUT_CHILDREN[:-1] or (
                child_name == "dropout" and is_attention_module(model.get_submodule(parent_name)))
            yield name, module, None, attention
            continue
        for attribute, value in vars(module).items():
            if type(value) is float and PROBABILITY_NAME.match(attribute) and 0.0 <= value < 1.0:
                yield name, module, attribute, is_attention_module(module)


def _path(name: str, attribute: str | None = None) -> list[str]:
    """A site's place in the module tree: the module path, then the attribute (held one level below its owner)."""
    return (name.split(".") if name else []) + ([":" + attribute] if attribute is not None else [])


def _child_index(site: list[str], layer_list: nn.Module, path: list[str]) -> int | None:
    """The index of the child of ``layer_list`` (at ``path``) that holds ``site`` deeper down; None if the site is
    not under a child (a dropout module that is itself a child of the list does not count: it is a layer of a
    Sequential, not in one)."""
    k = len(path)
    if site[:k] == path and len(site) > k + 1:
        return list(layer_list._modules).index(site[k])
    return None


def _layer_list(model: nn.Module, sites: Sequence[tuple], layers: str | None) -> str | None:
    """The qualified name of the model's layer list: the ModuleList or Sequential with the most children holding a
    site; ties go to the outermost. None when no list has two such children, or when ``layers`` is None."""
    if layers is None:
        return None
    if layers != "auto":
        try:
            chosen = model.get_submodule(layers)
        except AttributeError:
            raise UserError(f"layers={layers!r}: {type(model).__name__} has no submodule of that name") from None
        if not isinstance(chosen, (nn.ModuleList, nn.Sequential)):
            raise UserError(f"layers={layers!r} is a {type(chosen).__name__}, not a ModuleList or Sequential")
        return layers
    paths = [_path(owner, attribute) for owner, _, attribute, _ in sites]
    best, best_count = None, 1
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = {_child_index(p, module, _path(name)) for p in paths} - {None}
            if len(children) > best_count:
                best, best_count = name, len(children)
    return best


def swap_dropout(model: nn.Module) -> list[str]:
    """Replace every ``nn.Dropout`` of ``model`` (in place) by a :class:`TensorRateDropout` of the same ``p``, so a
    compiled model reads the rate from a tensor. Returns the qualified names of the swapped modules.

    In eager mode nothing changes: the same outputs at a fixed seed. Dropout variants (``Dropout2d``,
    ``AlphaDropout``) and float attributes are left as they are. A Hugging Face model also gets the tensor-rate
    attention of :func:`integrations.hf.use_tensor_rate_attention`, so its attention-dropout probability is a tensor
    too; other attention modules that pass a float probability to their kernel still recompile when it changes.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                replacement = TensorRateDropout(child.p, child.inplace).to(_device_of(module))
                replacement.train(child.training)
                setattr(module, child_name, replacement)
                swapped.append(f"{name}.{child_name}" if name else child_name)
    if _is_hugging_face_model(model):
        from .hf import use_tensor_rate_attention  # transformers is imported already: the model is one of its
        use_tensor_rate_attention(model)
    return swapped


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _is_hugging_face_model(model: nn.Module) -> bool:
    return hasattr(model, "set_attn_implementation") and hasattr(model, "config")
