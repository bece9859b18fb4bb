"""Run configuration: one dataclass and the named presets.

Every field carries its help text (:func:`option`), from which ``runs.cli`` builds the command line, so
``python -m runs.train --help`` documents the config and the config documents the command line
(CleanRL's ``Args`` pattern, without a dependency).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from dyndrop import UserError


def option(default: Any, help: str) -> Any:
    """A dataclass field that is also a command-line option (see ``runs.cli.add_dataclass_args``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = option("cpu", "named starting point: paper (GPU), cpu (minutes on 2 cores), cpu-overfit (data-limited, "
                                "overfits on 2 cores), tiny (tests, RL)")
    # model
    n_layer: int = option(4, "transformer layers")
    n_head: int = option(4, "attention heads per layer")
    n_embd: int = option(128, "embedding width")
    block_size: int = option(64, "context length in characters")
    bias: bool = option(False, "biases in Linear and LayerNorm layers")
    attention_dropout: str = option("manual", "how attention-weight dropout runs: manual (attention written out, "
                                          "one compiled graph) or fused (the fused kernel's own dropout, run "
                                          "eagerly: a graph break per layer under torch.compile)")
    # optimisation (nanoGPT's recipe)
    batch_size: int = option(12, "sequences per optimizer step")
    max_iters: int = option(2000, "optimizer steps in the run (at most 10,000,000)")
    learning_rate: float = option(1e-3, "peak learning rate after warmup")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "linear warmup steps")
    lr_decay_iters: int = option(0, "cosine decay length in steps; 0 = max_iters")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices, below 1 / learning_rate")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off")
    # evaluation, control, logging
    eval_interval: int = option(100, "evaluate every this many steps (and at the first and last step)")
    eval_iters: int = option(20, "batches per split in one evaluation (a fixed set per seed)")
    eval_merge: int = option(4, "evaluation batches scored per forward pass (the same batches and the same "
                            "mean loss, in fewer, larger passes)")
    control_interval: int = option(0, "ask the controller for a new rate every this many steps; "
                                      "0 = at every evaluation")
    log_interval: int = option(10, "steps between training-loss logs (each one host sync)")
    gen_tokens: int = option(256, "characters sampled after training to measure inference speed; 0 = skip")
    # system
    seed: int = option(1337, "seeds model init, data order, evaluation batches and dropout masks")
    device: str = option("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: str = option("auto", "autocast dtype: bfloat16, float16, float32, or auto (bf16 on CUDA, fp32 on CPU)")
    compile: bool | None = option(None, "torch.compile the model; default: on for CUDA, off for CPU")
    compile_mode: str = option("default", "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune")
    data: str | None = option(None, "a UTF-8 text file of your own, or a folder holding tinyshakespeare's "
                                    "shakespeare_char/input.txt (checksum-verified); default $DYNDROP_DATA_DIR, "
                                    "the cache, or a download")
    train_chars: int = option(0, "train on the first N characters of the training split only (validation stays "
                                 "the standard last 10 %); 0 = the whole split")
    out: str = option("", "the run's folder; default out/<preset>-<controller>-s<seed>")
    checkpoint: bool = option(True, "write last/best checkpoints at every evaluation")
    progress: bool = option(True, "show a progress bar")
    # tracking
    wandb: str = option("auto", "online, offline, disabled, or auto (online if logged in, else offline)")
    wandb_project: str = option("dynamic-dropout", "wandb project")
    wandb_group: str = option("", "wandb group; default <preset>")

    def __post_init__(self) -> None:
        check_config(self)

    # Derived settings are computed where they are read, never stored: ``dataclasses.replace(cfg, max_iters=...)``
    # then moves the cosine decay with the run, as a fresh config would.
    @property
    def decay_iters(self) -> int:
        """Length of the cosine learning-rate decay, in steps: ``lr_decay_iters``, or ``max_iters`` for 0."""
        return self.lr_decay_iters or self.max_iters

    @property
    def control_every(self) -> int:
        """Steps between control steps: ``control_interval``, or ``eval_interval`` for 0."""
        return self.control_interval or self.eval_interval

    def quiet(self, **changes: Any) -> TrainConfig:
        """This config for a run that leaves nothing behind (an RL episode, a PBT member, a warm-up): no checkpoints,
        progress bar, wandb or sample, and no output folder; ``changes`` on top. The side-effect switches stay in
        the config, so a run is still one value from the command line to the trainer, and callers turn them all
        off in one call."""
        return dataclasses.replace(self, **{**QUIET, **changes})


DERIVED = {"lr_decay_iters": "max_iters", "control_interval": "eval_interval"}
"""Settings whose 0 means "the same as another one" (see ``TrainConfig.decay_iters`` and ``control_every``)."""


def canonical_settings(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a config as a dict, from ``asdict`` or a saved file) with every derived setting that equals
    what it derives from written as 0. Two configs that train the same run compare equal this way, whether they
    were saved before derived settings stopped being stored (which wrote the resolved number) or after."""
    out = dict(values)
    for name, source in DERIVED.items():
        if name in out and source in out and out[name] == out[source]:
            out[name] = 0
    return out


QUIET = {"checkpoint": False, "progress": False, "wandb": "disabled", "gen_tokens": 0, "out": ""}
"""The side-effect switches of :meth:`TrainConfig.quiet`: what a run writes and shows besides its numbers."""

MAX_SEED = 2**63 - 2**20
"""Largest seed: torch takes 64-bit seeds, and a run derives a few more from its own (evaluation batches)."""

_CHOICES = {
    "attention_dropout": ("manual", "fused"),
    "wandb": ("auto", "online", "offline", "disabled"),
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}
_AT_LEAST = {  # integer settings and their smallest value
    "n_layer": 1, "n_head": 1, "n_embd": 1, "block_size": 2, "batch_size": 1, "eval_interval": 1,
    "eval_iters": 1, "eval_merge": 1, "control_interval": 0, "log_interval": 1, "max_iters": 0,
    "warmup_iters": 0, "lr_decay_iters": 0, "gen_tokens": 0, "train_chars": 0, "seed": 0,
}
_AT_MOST = {  # caps on what a run allocates or runs in proportion to a setting (beyond them: an out-of-memory
    # crash, or a run that never ends: 10 million steps of the paper preset take days on a GPU)
    "seed": MAX_SEED, "gen_tokens": 1_000_000, "eval_iters": 100_000, "eval_merge": 100_000,
    "max_iters": 10_000_000,
}
_WHY = {"block_size": " (sampling continues from the last block_size - 1 characters)"}


def check_config(cfg: TrainConfig) -> None:
    """Every setting in its range, checked once, before anything is written. Raises ``UserError`` naming the
    option, its value and what it must be."""
    def bad(name: str, value: Any, must: str) -> UserError:
        return UserError(f"--{name.replace('_', '-')} {value} is invalid: it must be {must}")

    for f in dataclasses.fields(cfg):  # a config built in code (the env's config=, a saved file) has no parser
        value, kinds = getattr(cfg, f.name), str(f.type).replace(" ", "").split("|")
        ok = (value is None and "None" in kinds or isinstance(value, bool) and "bool" in kinds
              or not isinstance(value, bool) and (isinstance(value, numbers.Integral) and "int" in kinds
                                                  or isinstance(value, numbers.Real) and "float" in kinds
                                                  and not (isinstance(value, int) and abs(value) > 2**1023)
                                                  or isinstance(value, str) and "str" in kinds))
        if not ok:
            raise bad(f.name, repr(value)[:40], f"of type {f.type}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise bad(name, getattr(cfg, name), "one of " + ", ".join(choices))
    for name, low in _AT_LEAST.items():
        if getattr(cfg, name) < low:
            raise bad(name, getattr(cfg, name), f"at least {low}{_WHY.get(name, '')}")
    for name, high in _AT_MOST.items():
        if getattr(cfg, name) > high:
            raise bad(name, getattr(cfg, name), f"at most {high}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise bad(name, value, "a finite number >= 0" + (" (0 = off)" if name == "grad_clip" else ""))
    if cfg.learning_rate * cfg.weight_decay >= 1:  # AdamW multiplies each matrix by (1 - lr * wd) per step
        raise bad("weight_decay", cfg.weight_decay, f"below 1 / --learning-rate ({1 / cfg.learning_rate:g}): AdamW "
                                                    "shrinks each matrix by lr * wd per step")
    if cfg.min_lr > cfg.learning_rate:
        raise bad("min_lr", cfg.min_lr, f"at most --learning-rate ({cfg.learning_rate})")
    for name in ("beta1", "beta2"):
        if not (0.0 <= getattr(cfg, name) < 1.0):
            raise bad(name, getattr(cfg, name), "in [0, 1)")
    if cfg.n_embd % cfg.n_head:
        raise bad("n_embd", cfg.n_embd, f"divisible by --n-head ({cfg.n_head})")
    if 0 < cfg.train_chars <= cfg.block_size:
        raise bad("train_chars", cfg.train_chars, f"0 or more than --block-size ({cfg.block_size}): one window "
                                                   f"needs block_size + 1 characters")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise bad("device", cfg.device, "cpu, cuda, cuda:N, mps or auto")


PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT config/train_shakespeare_char.py: the paper's setting, a GPU preset.
    "paper": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000,
                  learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, eval_interval=250,
                  eval_iters=200, log_interval=10),
    # nanoGPT's documented CPU recipe (README, "I only have a macbook"), evaluated every 100 steps so
    # a controller gets 20 decisions.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, eval_interval=100,
                eval_iters=20, log_interval=10),
    # Data-limited, so the model overfits and the dropout rate matters: the cpu recipe 1.5x wider, trained on
    # the first 20,000 characters only (validation stays the standard split). Chosen by measurement to run
    # in under 3 minutes on 2 cores, overfit at rate 0, and do best at a rate inside 0-0.4 (docs/results.md).
    "cpu-overfit": dict(n_layer=4, n_head=4, n_embd=192, block_size=64, batch_size=12, max_iters=1500,
                        learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, eval_interval=75,
                        eval_iters=16, log_interval=10, train_chars=20_000),
    # Small enough for tests and RL episodes (~10 ms per step on 2 cores).
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=16, max_iters=300,
                 learning_rate=2e-3, min_lr=2e-4, warmup_iters=20, beta2=0.99, eval_interval=25,
                 eval_iters=8, log_interval=5, gen_tokens=64),
}


def resolve_preset(preset: str) -> str:
    """``auto`` -> ``paper`` where a CUDA GPU is visible, else ``cpu``; other names unchanged."""
    if preset != "auto":
        return preset
    import torch  # only to look for a GPU

    return "paper" if torch.cuda.is_available() else "cpu"


def make_config(preset: str, **overrides: Any) -> TrainConfig:
    """The preset's config (``auto``: see :func:`resolve_preset`) with ``overrides`` (``None`` values mean
    "keep the preset's")."""
    preset = resolve_preset(preset)
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return TrainConfig(preset=preset, **values)
