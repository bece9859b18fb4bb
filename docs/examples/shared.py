"""What the three examples share: a UTF-8 text cut into train / val / test characters, and a small GPT-2.

The split: train = the first 90 % of the text (of which a run uses the first ``train_chars``), val = the first half
of the last 10 %, test = the second half. Weights are selected on val; test is scored once, at the end.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch


def default_text() -> str | None:
    """tinyshakespeare where the project keeps it (``$DYNDROP_DATA_DIR``, then the cache ``runs.train`` fills)."""
    folders = [os.environ.get("DYNDROP_DATA_DIR"), Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
               / "dynamic-dropout"]
    for folder in filter(None, folders):
        path = Path(folder) / "shakespeare_char" / "input.txt"
        if path.is_file():
            return str(path)
    return None


def parser(description: str) -> argparse.ArgumentParser:
    """The options every example takes: the controller, the seed, the text and the run's size."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--controller", default="pid", help="controller spec: pid, constant:rate=0.1, ppo:policy=P, ...")
    p.add_argument("--seed", type=int, default=1, help="seeds the weights and the batches")
    p.add_argument("--data", default=default_text(), help="any UTF-8 text file (default: tinyshakespeare)")
    p.add_argument("--train-chars", type=int, default=20_000, help="training characters used (0: all)")
    p.add_argument("--max-iters", type=int, default=2000, help="optimizer steps")
    p.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (= control steps)")
    p.add_argument("--eval-iters", type=int, default=0, help="windows per evaluation split (0: the whole val split)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--block-size", type=int, default=64, help="characters per window")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


@dataclass
class CharSplits:
    """A text as character ids (int64, 1-D), split three ways; ``vocab`` lists the text's characters."""

    vocab: list[str]
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    @classmethod
    def load(cls, path: str | None, train_chars: int = 0) -> CharSplits:
        """Read ``path`` (any UTF-8 text) and split it. ``train_chars`` > 0 keeps that many training characters."""
        if path is None:
            raise SystemExit("no text found: pass --data PATH (any UTF-8 text file)")
        text = Path(path).read_text(encoding="utf-8")
        vocab = sorted(set(text))
        lookup = {c: i for i, c in enumerate(vocab)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        n_train, n_val = int(0.9 * len(data)), (len(data) - int(0.9 * len(data))) // 2
        train = data[:n_train][:train_chars] if train_chars > 0 else data[:n_train]
        return cls(vocab, train, data[n_train:n_train + n_val], data[n_train + n_val:])


def windows(data: torch.Tensor, block_size: int, limit: int = 0) -> torch.Tensor:
    """Every non-overlapping window of ``block_size + 1`` characters, (N, block_size + 1); the first ``limit`` if > 0.
    Row ``i`` predicts characters ``1..block_size`` of itself from ``0..block_size - 1``."""
    n = (len(data) - 1) // block_size
    rows = data[:n * block_size + 1].unfold(0, block_size + 1, block_size)
    return rows[:limit] if limit > 0 else rows


def random_windows(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``block_size + 1`` characters at random offsets."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    return torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])


def gpt2(vocab_size: int, block_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, seed: int = 0):
    """A randomly initialized Hugging Face GPT-2 (nothing downloaded); its dropout is the controller's to set."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # unset, transformers warns about it (and breaks a compiled graph) at every call
    return model
