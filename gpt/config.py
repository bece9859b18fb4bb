"""Run configuration: one dataclass and the named presets.

Every field carries its help text (:func:`option`), from which ``runs.cli`` builds the command line, so
``python -m runs.train --help`` documents the config and the config documents the command line
(CleanRL's ``Args`` pattern, without a dependency).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dyndrop import UserError


def option(default: Any, help: str) -> Any:
    """A dataclass field that is also a command-line option (see ``runs.cli.add_dataclass_args``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = option("cpu", "named starting point: paper (GPU), cpu (minutes on 2 cores), tiny (tests, RL)")
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
    max_iters: int = option(2000, "optimizer steps in the run")
    learning_rate: float = option(1e-3, "peak learning rate after warmup")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "linear warmup steps")
    lr_decay_iters: int = option(0, "cosine decay length in steps; 0 = max_iters")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices")
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
    data: str | None = option(None, "tinyshakespeare input.txt or a folder holding shakespeare_char/input.txt")
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
        if self.lr_decay_iters == 0:
            self.lr_decay_iters = self.max_iters
        if self.control_interval == 0:
            self.control_interval = self.eval_interval
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                     "eval_iters", "control_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.attention_dropout not in ("manual", "fused"):
            raise UserError(f"--attention-dropout must be manual or fused, not {self.attention_dropout!r}")
        if self.eval_merge < 1:
            raise UserError(f"eval_merge must be at least 1, got {self.eval_merge}")
        if self.train_chars < 0:
            raise UserError(f"--train-chars must be >= 0 (0 = the whole training split), got {self.train_chars}")
        if 0 < self.train_chars <= self.block_size:
            raise UserError(f"--train-chars {self.train_chars} is too small for one window of block_size "
                            f"{self.block_size} + 1 characters; use at least {self.block_size + 1}")
        if self.max_iters < 0:
            raise UserError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise UserError(f"--wandb must be online, offline, disabled or auto, not {self.wandb!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise UserError(f"--dtype must be bfloat16, float16, float32 or auto, not {self.dtype!r}")


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
