"""A character-level GPT in the nanoGPT recipe, with a dropout rate that can change at any step.

Pre-LayerNorm blocks, causal self-attention, a 4x GELU MLP, embeddings tied to the output head and
nanoGPT's initialisation. Dropout sits where nanoGPT puts it (embeddings, attention weights, attention
and MLP residual outputs), but its rate is a *tensor buffer*, not a Python float: a compiled model reads
the new value at the next step instead of recompiling. A rate of exactly 0 skips dropout entirely (no
random numbers are drawn); that switch is the only thing that changes the compiled graph.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F



@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    bias: bool = False  # nanoGPT's shakespeare_char config uses no biases
    fused_attention_dropout: bool = False  # see CausalSelfAttention: the fused kernel's dropout, run eagerly


class RateDropout(nn.Module):
    """Inverted dropout whose rate is read from a 0-dim tensor at call time.

    ``active`` is a Python bool: False means the rate is 0 and the input passes through untouched. It is
    kept apart from ``rate`` (a float) on purpose: a compiled graph guards on what it reads, so it reads the
    flag (two graphs in all) and the tensor, never the float (a graph per rate).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.rate = 0.0  # the buffer's value as a Python float, for the fused attention kernel only

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.active):
            return x
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return dropout_cpu(x, p)
        keep = torch.rand_like(x, dtype=torch.float32) >= p
        return x * keep / (1.0 - p).to(x.dtype)


def dropout_cpu(x: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eager CPU dropout from 15-bit random integers, two per 32-bit draw of the CPU generator.

    Random numbers are most of dropout's cost on a CPU; this draws half as many 32-bit numbers as
    ``rand_like``, integers are cheaper to make than floats, and one scaled mask means one multiply each
    way (its measured gain is in docs/results.md, "Where the speed figures come from"). The rate is rounded to a multiple of
    2**-15 (error below 1.6e-5) and kept values are scaled by the rounded keep probability, so the
    expectation stays exact.
    """
    return x * cpu_dropout_mask(x.shape, p, x.dtype, generator)  # one scaled mask: one multiply back


def cpu_dropout_mask(shape: torch.Size | tuple[int, ...], p: torch.Tensor, dtype: torch.dtype,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The scaled keep mask of :func:`dropout_cpu`: 0 where dropped, 1 / (1 - p) (rounded p) where kept.

    :param generator: where the random numbers come from; None = the global CPU generator.
    """
    n = math.prod(shape)
    draws = torch.empty(n // 2 + 1, dtype=torch.int32).random_(generator=generator)  # uniform on [0, 2**31)
    return scaled_keep_mask(random_bits(draws, n).view(shape), p, dtype)


def random_bits(draws: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` 15-bit random integers per row of ``draws`` (int32, uniform on [0, 2**31), ``n // 2 + 1`` per
    row): each 32-bit draw gives two halves, each uniform on [0, 2**15)."""
    return draws.view(torch.int16)[..., :n] & 0x7FFF


def scaled_keep_mask(bits: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keep where ``bits >= round(p * 2**15)``, scaled by the kept share: a unit survives with probability
    1 - p (p rounded to a multiple of 2**-15) and the expectation is exact. ``p`` broadcasts against ``bits``
    (one rate per member, say); a rate of 0 keeps everything at scale 1."""
    threshold = (p * 32768).round().clamp(max=32767)
    keep = bits >= threshold.to(torch.int16)
    return keep * (32768 / (32768 - threshold)).to(dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.fused_dropout = cfg.fused_attention_dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = RateDropout()
        self.resid_dropout = RateDropout()

    def forward(self, x: torch.Tensor, p: torch.Tensor, pos: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            # Decoding: attend over the whole fixed-size cache, masking slots after each query's position.
            k, v = kv_cache.update(pos, k, v)
            visible = pos[:, None] >= torch.arange(k.size(2), device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        elif self.attn_dropout.training and self.attn_dropout.active and self.fused_dropout:
            y = fused_attention_with_dropout(q, k, v, self.attn_dropout)
        elif self.attn_dropout.training and self.attn_dropout.active:
            # The fused kernel only takes a Python-float dropout_p (a recompile per rate), so with
            # attention dropout on we spell attention out; the compiler fuses mask+softmax+dropout.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att, p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y), p)


@torch._disable_dynamo  # torch.compiler.disable, but importing dynamo (~1.5 s) only when first called
def fused_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 dropout: RateDropout) -> torch.Tensor:
    """Causal attention with the fused kernel's own dropout at ``dropout.rate``.

    The kernel takes the rate as a Python float, which a compiled graph would bake in (a recompile per
    rate), so this call always runs eagerly: under torch.compile, a graph break per layer is the price of
    never materialising the (T, T) attention weights.
    """
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout.rate, is_causal=True)


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

    def forward(self, x: torch.Tensor, p: torch.Tensor, pos: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), p, pos, kv_cache)
        return x + self.mlp(self.ln_2(x), p)


class KVCache(nn.Module):
    """One layer's keys and values for incremental decoding, preallocated to ``block_size``.

    Shapes never change and the write position is a tensor, so every decoding step is the same graph:
    a compiled step (CUDA graphs on a GPU) serves every position without recompiling. Slots are zeroed
    at creation, so masked-out slots hold finite numbers (garbage there could turn into NaN).
    """

    def __init__(self, batch: int, n_head: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch, n_head, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (B, H, T, D) at positions ``pos`` (T,); return the whole cache."""
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        return self.k, self.v


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
        switching between zero and non-zero flips its Python ``active`` flag. Callers from outside (the
        trainer, a user) check the values; a wrong count or a value outside [0, 1) is a ``ValueError``.
        """
        n = self.config.n_layer
        rates = (float(rate),) * n if isinstance(rate, numbers.Real) else tuple(float(r) for r in rate)
        if len(rates) != n or not all(0.0 <= r < 1.0 for r in rates):
            raise ValueError(f"need {n} dropout rates in [0, 1), got {rates}")
        if len(set(rates)) == 1:
            self.dropout_rates.fill_(rates[0])
        else:
            for i, r in enumerate(rates):
                self.dropout_rates[i].fill_(r)
        self.drop.active, self.drop.rate = rates[0] > 0, rates[0]
        for r, block in zip(rates, self.h):
            for m in (block.attn.attn_dropout, block.attn.resid_dropout, block.mlp.dropout):
                m.active, m.rate = r > 0, r
        self._rates = rates
        return rates

    @property
    def rates(self) -> tuple[float, ...]:
        return getattr(self, "_rates", (0.0,) * self.config.n_layer)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: Sequence[KVCache] | None = None,
                pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (and the mean cross-entropy if ``targets`` are given) for token ids ``idx`` (B, T).

        Decoding passes one ``KVCache`` per layer and ``pos``, the (T,) positions of ``idx``'s tokens.
        """
        B, T = idx.shape
        if pos is None:
            assert T <= self.config.block_size, f"sequence of {T} > block size {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)
        p = self.dropout_rates
        x = self.drop(self.wte(idx) + self.wpe(pos), p[0])
        for i, block in enumerate(self.h):
            x = block(x, p[i], pos, kv_caches[i] if kv_caches else None)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # inference: only the last position is needed
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

    # -- sampling ------------------------------------------------------------------------------
    def new_kv_caches(self, batch: int, dtype: torch.dtype) -> list[KVCache]:
        cfg = self.config
        device = self.wte.weight.device
        return [KVCache(batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, dtype, device)
                for _ in range(cfg.n_layer)]

    def _decode_step(self, token: torch.Tensor, pos: torch.Tensor, caches: list[KVCache], noise: torch.Tensor,
                     temperature: float, top_k: int | None) -> torch.Tensor:
        """Feed ``token`` (B, 1) at position ``pos`` (1,) and pick the next token: one graph when compiled."""
        logits, _ = self(token, kv_caches=caches, pos=pos)
        return sample_token(logits[:, -1, :], noise, temperature, top_k)

    def compiled_decode_step(self) -> Any:
        """``_decode_step`` under torch.compile, built once per model: CUDA graphs on a GPU
        (mode reduce-overhead), inductor's default on CPU. One graph serves every position."""
        if getattr(self, "_compiled_decode", None) is None:
            mode = "reduce-overhead" if self.wte.weight.device.type == "cuda" else "default"
            self._compiled_decode = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False)
        return self._compiled_decode

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_kv_cache: bool = True,
                 generator: torch.Generator | None = None, compile: bool = False) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T), in eval mode and float32.

        With ``use_kv_cache`` each step feeds only the newest token (``compile``: through the compiled
        decode step); without it, each step re-reads the whole context (nanoGPT's way). The random
        numbers are drawn up front from ``generator``, so all ways give the same tokens while the
        sequence fits in ``block_size``; past it the cache is rebuilt from the last ``block_size - 1``
        tokens. Autocast is off in here: decoding a few sequences is bound by kernel launches, not by
        arithmetic, and float32 logits keep the ways in agreement token for token.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(idx.device.type, enabled=False):
                return self._generate(idx, max_new_tokens, temperature, top_k, use_kv_cache, generator, compile)
        finally:
            self.train(was_training)

    def _generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                  use_kv_cache: bool, generator: torch.Generator | None, compile: bool) -> torch.Tensor:
        cfg, device = self.config, idx.device
        B, n = idx.shape
        out = torch.empty((B, n + max_new_tokens), dtype=idx.dtype, device=device)
        out[:, :n] = idx
        noise = torch.empty((max_new_tokens, B, cfg.vocab_size), device=device).exponential_(generator=generator)
        step = self.compiled_decode_step() if compile else self._decode_step
        caches: list[KVCache] | None = None
        filled = 0  # cache positions in use
        for t in range(max_new_tokens):
            if use_kv_cache and caches is not None and filled < cfg.block_size:
                if compile:
                    torch.compiler.cudagraph_mark_step_begin()
                # cloned: under CUDA graphs a step's result lives in the graph's memory, and feeding it back
                # into the next step raises "accessing tensor output of CUDAGraphs that has been overwritten"
                # (torch 2.11 on an H200; pytorch#152887). A slice of `out` would do too, but its stride
                # changes with the call's length and would cost a graph per length.
                nxt = step(nxt.view(B, 1), pos, caches, noise[t], temperature, top_k).clone()
                pos += 1
                filled += 1
            else:
                if use_kv_cache:  # (re)fill the cache from the context
                    ctx = out[:, max(0, n - cfg.block_size + 1):n]
                    if caches is None:
                        caches = self.new_kv_caches(B, self.wte.weight.dtype)
                        for c in caches:  # fixed addresses: CUDA graphs may keep pointing at them
                            torch._dynamo.mark_static_address(c.k)
                            torch._dynamo.mark_static_address(c.v)
                    filled = ctx.size(1)
                    logits, _ = self(ctx, kv_caches=caches, pos=torch.arange(filled, device=device))
                    pos = torch.full((1,), filled, device=device)
                else:
                    logits, _ = self(out[:, max(0, n - cfg.block_size):n])
                nxt = sample_token(logits[:, -1, :], noise[t], temperature, top_k)
            out[:, n] = nxt
            n += 1
        return out


def sample_token(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab), drawn from softmax(logits / temperature).

    ``noise`` (B, vocab) holds Exponential(1) draws: argmax(probs / noise) picks index i with probability
    probs[i] (the exponential race). Unlike ``torch.multinomial`` it never waits for the GPU and can sit
    inside a compiled graph, and the same noise gives the same token whichever way the logits were computed.
    """
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    return (F.softmax(logits, dim=-1) / noise).argmax(dim=-1)
