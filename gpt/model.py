"""A character-level GPT in the nanoGPT recipe, with a dropout rate that can change at any step.

Pre-LayerNorm blocks, causal self-attention, a 4x GELU MLP, embeddings tied to the output head and
nanoGPT's initialisation. Dropout sits where nanoGPT puts it (embeddings, attention weights, attention
and MLP residual outputs), but its rate is a *tensor buffer*, not a Python float: a compiled model reads
the new value at the next step instead of recompiling. A rate of exactly 0 skips dropout entirely (no
random numbers are drawn); that switch is the only thing that changes the compiled graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from controllers import check_rate


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    bias: bool = False  # nanoGPT's shakespeare_char config uses no biases


class RateDropout(nn.Module):
    """Inverted dropout whose rate is read from a 0-dim tensor at call time.

    ``active`` is a Python bool: False means the rate is 0 and the input passes through untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.active):
            return x
        keep = torch.rand_like(x, dtype=torch.float32) >= p
        return x * keep / (1.0 - p).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = RateDropout()
        self.resid_dropout = RateDropout()

    def forward(self, x: torch.Tensor, p: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        is_causal = True
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            is_causal = T > 1  # a single new query attends to every cached position
        if self.attn_dropout.training and self.attn_dropout.active:
            # The fused kernel only takes a Python-float dropout_p (a recompile per rate), so with
            # attention dropout on we spell attention out; the compiler fuses mask+softmax+dropout.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att, p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y), p)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = RateDropout()

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))), p)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, p: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), p, kv_cache)
        return x + self.mlp(self.ln_2(x), p)


class KVCache:
    """Keys and values of one layer for incremental decoding, preallocated to ``block_size``."""

    def __init__(self, batch: int, n_head: int, block_size: int, head_dim: int, like: torch.Tensor) -> None:
        shape = (batch, n_head, block_size, head_dim)
        self.k = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = RateDropout()
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: the same matrix reads and writes tokens
        # One rate per transformer layer; the embedding dropout uses layer 0's rate.
        self.register_buffer("dropout_rates", torch.zeros(cfg.n_layer), persistent=True)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters excluding position embeddings (as nanoGPT reports them)."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    # -- dropout -------------------------------------------------------------------------------
    def set_dropout(self, rate: float | Sequence[float]) -> tuple[float, ...]:
        """Set the dropout rate: one float in [0, 1) for all layers, or one per layer.

        Writes the buffer in place with device-side fills (no host sync, no recompile); only a layer
        switching between zero and non-zero flips its Python ``active`` flag.
        """
        rates = check_rate(rate, self.config.n_layer)
        if len(set(rates)) == 1:
            self.dropout_rates.fill_(rates[0])
        else:
            for i, r in enumerate(rates):
                self.dropout_rates[i].fill_(r)
        self.drop.active = rates[0] > 0
        for r, block in zip(rates, self.h):
            for m in (block.attn.attn_dropout, block.attn.resid_dropout, block.mlp.dropout):
                m.active = r > 0
        self._rates = rates
        return rates

    @property
    def rates(self) -> tuple[float, ...]:
        return getattr(self, "_rates", (0.0,) * self.config.n_layer)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block size {self.config.block_size}"
        pos = torch.arange(start, start + T, device=idx.device)
        p = self.dropout_rates
        x = self.drop(self.wte(idx) + self.wpe(pos), p[0])
        for i, block in enumerate(self.h):
            x = block(x, p[i], kv_caches[i] if kv_caches else None)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # inference: only the last position is needed
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_kv_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T). Call in eval mode.

        With ``use_kv_cache`` each step feeds only the newest token; without it, each step re-reads the
        whole context (nanoGPT's way). Both draw the same random numbers, so they give the same tokens
        while the sequence fits in ``block_size``.
        """
        cfg = self.config
        caches = None
        for _ in range(max_new_tokens):
            if use_kv_cache and (caches is None or caches[0].length >= cfg.block_size):
                ctx = idx[:, -cfg.block_size + 1:] if idx.size(1) >= cfg.block_size else idx
                head_dim = cfg.n_embd // cfg.n_head
                caches = [KVCache(idx.size(0), cfg.n_head, cfg.block_size, head_dim, self.wte.weight)
                          for _ in range(cfg.n_layer)]
                logits, _ = self(ctx, kv_caches=caches)
            elif use_kv_cache:
                logits, _ = self(idx[:, -1:], kv_caches=caches)
            else:
                logits, _ = self(idx[:, -cfg.block_size:])
            logits = logits[:, -1, :].float() / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx
