"""Many training runs of one configuration as one batched model: the population trainer.

K *members* share a :class:`~gpt.config.TrainConfig` and differ in their seed (initial weights, batch order,
evaluation batches, dropout masks) and in their dropout rates (one per member and layer). Their parameters
are stacked along a leading member dimension, so one forward, one backward and one optimizer step train
them all, and K small workloads become one larger one. Each member keeps its own loss, gradient-norm
clipping, AdamW moments and step count, evaluation losses, best weights and
:class:`~gpt.trainer.TrainingHistory`, so each can be driven by its own controller (``train``) or by an RL
env (``set_dropout`` / ``advance`` / ``evaluate`` / ``reset_member``).

A member is the single :class:`~gpt.trainer.Trainer` run with its seed (tests/test_population.py):

- its initial weights are built exactly as a Trainer builds them (:func:`~gpt.trainer.initial_model`);
- its training and evaluation batches come from its own samplers (:func:`~gpt.trainer.data_streams`);
- its dropout masks come from its own generator, which continues where the single run's global generator
  stands after building the model, and is drawn at the same dropout sites in the same order; a member at
  rate 0 draws nothing, as a single run does. On the CPU the masks are the single run's, bit for bit;
- only the arithmetic differs: batched products and layer norms round differently, so losses agree to
  about 1e-6 relative at first and drift apart slowly as training amplifies the differences.

The model runs eagerly (no torch.compile): there is nothing to recompile when rates change. Losses, gradient
norms and the moving average stay on the device and are read once per log interval, as in the Trainer.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from controllers import Controller, HoldRate, TrainingStats, check_rate

from .config import TrainConfig
from .data import CharData
from .model import GPT, random_bits, scaled_keep_mask
from integrations import DropoutScheduler

from .tracking import eval_record, train_record
from .trainer import (EMA_BETA, InferenceSample, TrainingHistory, data_streams, score_weights, windows_loss,
                      initial_model, lr_at, measure_inference, resolve_precision, run_summary)


class PopulationGPT(nn.Module):
    """K GPTs of one :class:`~gpt.model.GPTConfig` as one module: every member's parameters in one row of a
    single ``(K, n_params)`` tensor, ``flat``, trained as one.

    Each GPT parameter is a view of its slice of ``flat`` with a leading member dimension; linear weights are
    kept as ``(in, out)``, so a linear layer is one ``bmm`` over the members with no transpose. One flat tensor
    also makes the optimizer and gradient clipping a handful of operations whatever the number of parameters. ``forward``
    mirrors :class:`~gpt.model.GPT` layer for layer; dropout draws each member's mask from its own generator
    (``generators[k]``) at its own rate (``rates[k][layer]``; the embedding dropout uses layer 0's, as in GPT).
    """

    def __init__(self, models: Sequence[GPT]) -> None:
        super().__init__()
        self.config = models[0].config
        self.n_members = len(models)
        self.layout: dict[str, tuple[int, tuple[int, ...], bool]] = {}  # name -> (offset, stored shape, transposed)
        offset = 0
        for name, p in models[0].named_parameters():  # the tied lm_head.weight is wte.weight, not listed
            transposed = p.dim() == 2 and name not in ("wte.weight", "wpe.weight")
            shape = tuple(p.shape[::-1]) if transposed else tuple(p.shape)
            self.layout[name] = (offset, shape, transposed)
            offset += p.numel()
        self.flat = nn.Parameter(torch.zeros(self.n_members, offset, device=models[0].wte.weight.device))
        with torch.no_grad():
            for k, m in enumerate(models):
                self.load_member(k, dict(m.named_parameters()))
        self.rates: list[tuple[float, ...]] = [(0.0,) * self.config.n_layer for _ in models]
        self.rate_tensor = torch.zeros(self.n_members, self.config.n_layer, device=self.flat.device)
        self.generators: list[torch.Generator] = []

    @property
    def names(self) -> list[str]:
        return list(self.layout)

    def p(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Parameter ``name`` of every member, shape ``(K, *stored shape)``: a view of ``flat`` (or of
        ``tensor``, a tensor laid out like it, e.g. the optimizer's moments)."""
        offset, shape, _ = self.layout[name]
        n = math.prod(shape)
        return (self.flat if tensor is None else tensor)[:, offset:offset + n].view(-1, *shape)

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s parameters under GPT's names and in GPT's layout (views, not copies)."""
        return {name: self.p(name)[k].t() if t else self.p(name)[k] for name, (_, _, t) in self.layout.items()}

    @torch.no_grad()
    def load_member(self, k: int, params: dict[str, torch.Tensor]) -> None:
        """Copy GPT parameters (GPT's names and layout) into member ``k``."""
        for name, target in self.member_state(k).items():
            target.copy_(params[name])

    def matrix_mask(self) -> torch.Tensor:
        """1 where ``flat`` holds a matrix (nanoGPT decays those), 0 for vectors; shape ``(n_params,)``."""
        mask = torch.zeros(self.flat.shape[1], device=self.flat.device)
        for offset, shape, _ in self.layout.values():
            if len(shape) >= 2:
                mask[offset:offset + math.prod(shape)] = 1.0
        return mask

    # -- pieces ----------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x @ W.T (+ b)`` for every member at once: ``x`` is ``(K, ..., in)``."""
        w = self.p(f"{name}.weight")  # (K, in, out)
        y = torch.bmm(x.flatten(1, -2), w).view(*x.shape[:-1], w.shape[2])
        if self.config.bias:
            y = y + self.p(f"{name}.bias").view(w.shape[0], *([1] * (x.dim() - 2)), -1)
        return y

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        shape = (x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        y = F.layer_norm(x, x.shape[-1:]) * self.p(f"{name}.weight").view(shape)
        return y + self.p(f"{name}.bias").view(shape) if self.config.bias else y

    def _dropout(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Each member's inverted dropout at its own rate, its mask drawn from its own generator."""
        rates = [r[layer] for r in self.rates]
        if not (self.training and any(rates)):
            return x
        if x.device.type != "cpu":
            masks = []
            for k, r in enumerate(rates):
                p = self.rate_tensor[k, layer]
                keep = (torch.rand(x.shape[1:], generator=self.generators[k], device=x.device) >= p if r > 0
                        else torch.ones(x.shape[1:], dtype=torch.bool, device=x.device))
                masks.append(keep.to(x.dtype) / (1.0 - p).to(x.dtype))
            return x * torch.stack(masks)
        # gpt.model.cpu_dropout_mask, member by member: each draws its integers in place into its own row
        n = x[0].numel()
        draws = torch.zeros(self.n_members, n // 2 + 1, dtype=torch.int32)
        for k, r in enumerate(rates):
            if r > 0:  # a single run at rate 0 draws no random numbers, so neither does the member
                draws[k].random_(generator=self.generators[k])
        p = self.rate_tensor[:, layer].view(-1, *([1] * (x.dim() - 1)))
        return x * scaled_keep_mask(random_bits(draws, n).view(x.shape), p, x.dtype)

    def _attention(self, x: torch.Tensor, i: int) -> torch.Tensor:
        K, B, T, C = x.shape
        H = self.config.n_head
        q, k, v = self._linear(x, f"h.{i}.attn.c_attn").split(C, dim=-1)
        q, k, v = (t.reshape(K * B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        if self.training and any(r[i] for r in self.rates):  # written out, as GPT does with dropout on
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            att = self._dropout(att.view(K, B, H, T, T), i).view(K * B, H, T, T)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(K, B, T, C)
        return self._dropout(self._linear(y, f"h.{i}.attn.c_proj"), i)

    def _mlp(self, x: torch.Tensor, i: int) -> torch.Tensor:
        h = F.gelu(self._linear(x, f"h.{i}.mlp.c_fc"))
        return self._dropout(self._linear(h, f"h.{i}.mlp.c_proj"), i)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each member's mean cross-entropy, shape ``(K,)``, for its tokens ``idx[k]`` (B, T) and targets."""
        K, B, T = idx.shape
        wte = self.p("wte.weight")  # (K, vocab, C): member k's rows start at k * vocab
        V = wte.shape[1]
        offsets = (torch.arange(K, device=idx.device) * V).view(K, 1, 1)
        x = F.embedding(idx + offsets, wte.flatten(0, 1)) + self.p("wpe.weight")[:, None, :T]
        x = self._dropout(x, 0)
        for i in range(self.config.n_layer):
            x = x + self._attention(self._norm(x, f"h.{i}.ln_1"), i)
            x = x + self._mlp(self._norm(x, f"h.{i}.ln_2"), i)
        x = self._norm(x, "ln_f")
        logits = torch.bmm(x.flatten(1, 2), wte.transpose(1, 2))  # the head is tied to the embedding
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return loss.view(K, B * T).mean(1)


class PopulationAdamW:
    """AdamW over the population's flat parameters, with a step count and a learning rate per member.

    The same update as ``torch.optim.AdamW`` (decoupled weight decay, bias correction), element by element;
    only the step count and learning rate are per member, so a member can start again (``reset``) while the
    others continue. nanoGPT's groups: weight decay on the matrices only.
    """

    def __init__(self, model: PopulationGPT, cfg: TrainConfig) -> None:
        self.param = model.flat
        self.decay = model.matrix_mask() * cfg.weight_decay  # (n_params,)
        self.beta1, self.beta2, self.eps = cfg.beta1, cfg.beta2, 1e-8
        self.exp_avg = torch.zeros_like(self.param)
        self.exp_avg_sq = torch.zeros_like(self.param)
        self.steps = torch.zeros(model.n_members, 1, device=self.param.device)

    def reset(self, k: int) -> None:
        """Member ``k`` starts again: no moments, step 0."""
        self.exp_avg[k].zero_()
        self.exp_avg_sq[k].zero_()
        self.steps[k] = 0

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update of every member; ``lr`` is each member's learning rate, shape ``(K,)``."""
        p, g, lr = self.param, self.param.grad, lr.view(-1, 1)
        self.steps += 1
        p.mul_(1 - lr * self.decay)
        self.exp_avg.lerp_(g, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        denom = (self.exp_avg_sq.sqrt() / (1 - self.beta2 ** self.steps).sqrt()).add_(self.eps)
        p.addcdiv_(self.exp_avg * (lr / (1 - self.beta1 ** self.steps)), denom, value=-1.0)


class PopulationTrainer:
    """Trains K members of one config in lockstep (see the module's docstring).

    :param cfg: the shared settings (``cfg.seed`` is ignored: each member has its own).
    :param seeds: one seed per member.
    :param controllers: one controller per member; None (for all, or for a member) =
        :class:`controllers.HoldRate`, which keeps the rates the caller sets (:meth:`set_dropout`, the RL env).
    :param data: the dataset on ``cfg``'s device; loaded from ``cfg.data`` if omitted.
    """

    def __init__(self, cfg: TrainConfig, seeds: Sequence[int], controllers: Sequence[Controller | None] | None = None,
                 data: CharData | None = None) -> None:
        if not seeds:
            raise ValueError("a population needs at least one member")
        self.cfg, self.K = cfg, len(seeds)
        given = list(controllers) if controllers is not None else [None] * self.K
        if len(given) != self.K:
            raise ValueError(f"{len(given)} controllers for {self.K} members")
        self.controllers: list[Controller] = [c if c is not None else HoldRate() for c in given]
        self.device, self.dtype, self.autocast = resolve_precision(cfg)
        self.data = data if data is not None else CharData.load(cfg.data, device=self.device)
        self.seeds = list(seeds)
        members = [self._new_member(seed) for seed in self.seeds]
        self.model = PopulationGPT([m for m, _ in members])
        self.model.generators = [g for _, g in members]
        self.optimizer = PopulationAdamW(self.model, cfg)
        self.samplers, self.eval_batches = [], []
        for seed in self.seeds:
            sampler, batches = data_streams(cfg, self.data, seed)
            self.samplers.append(sampler)
            self.eval_batches.append(batches)
        self.iterations = [0] * self.K
        self.histories = [TrainingHistory() for _ in range(self.K)]
        self.best_weights: list[dict[str, torch.Tensor] | None] = [None] * self.K
        self.inference: list[InferenceSample | None] = [None] * self.K
        self.diverged = [False] * self.K
        self._acc = torch.zeros(self.K, 3, device=self.device)  # loss sum, grad-norm sum, steps since last read
        self._ema = torch.zeros(self.K, device=self.device)
        self._ema_steps = [0] * self.K
        # each member's control goes through its own dropout scheduler, as a single trainer's does
        self.dropout = [DropoutScheduler(lambda rates, k=k: self.set_dropout(k, rates), c, max(cfg.max_iters, 1),
                                         n_layers=cfg.n_layer, ask_now=False) for k, c in enumerate(self.controllers)]
        for k in range(self.K):
            self.set_dropout(k, 0.0)  # until the first control step

    def _new_member(self, seed: int) -> tuple[GPT, torch.Generator]:
        """The single run's initial model for ``seed``, and a generator where its global one stands after it."""
        model = initial_model(self.cfg, self.data.vocab_size, seed, self.device)
        gen = torch.Generator(device=self.device)
        gen.set_state(torch.get_rng_state() if self.device.type == "cpu" else torch.cuda.get_rng_state(self.device))
        return model, gen

    # -- what the env and the controllers drive --------------------------------------------------
    def set_dropout(self, k: int, rate: float | Sequence[float]) -> tuple[float, ...]:
        """Member ``k``'s rate for the next steps: one float in [0, 1) or one per layer (checked here)."""
        rates = check_rate(rate, self.cfg.n_layer)
        self.model.rates[k] = rates
        self.model.rate_tensor[k].copy_(torch.tensor(rates), non_blocking=True)
        return rates

    def reset_member(self, k: int, seed: int) -> None:
        """Member ``k`` starts a new run with ``seed``: fresh weights, optimizer state, batches and history."""
        model, gen = self._new_member(seed)
        self.model.load_member(k, dict(model.named_parameters()))
        self.model.generators[k] = gen
        self.optimizer.reset(k)
        self.seeds[k] = seed
        self.samplers[k], self.eval_batches[k] = data_streams(self.cfg, self.data, seed)
        self.iterations[k], self.histories[k], self.best_weights[k] = 0, TrainingHistory(), None
        self.diverged[k] = False
        self._acc[k].zero_()
        self._ema[k].zero_()
        self._ema_steps[k] = 0
        self.controllers[k].reset(self.cfg.n_layer)
        self.dropout[k].changes = []
        self.set_dropout(k, 0.0)

    def stats(self, k: int) -> TrainingStats:
        """Member ``k``'s run as its controller sees it."""
        h, it = self.histories[k], self.iterations[k]
        return TrainingStats(
            iteration=it, max_iters=self.cfg.max_iters, lr=lr_at(self.cfg, it),
            train_loss_smoothed=h.train_loss_smoothed, eval_train_loss=h.eval_train_loss,
            eval_val_loss=h.eval_val_loss, best_val_loss=h.best_val_loss, best_val_iter=h.best_val_iter,
            rates=self.model.rates[k], grad_norm=h.grad_norm, tokens_per_s=h.tokens_per_s, eval_iter=h.eval_iter)

    def control(self) -> list[tuple[float, ...]]:
        """Ask each member's controller for its next rate and apply it; returns every member's rates."""
        for k, scheduler in enumerate(self.dropout):
            if not self.diverged[k]:
                scheduler.control(self.stats(k))
        return list(self.model.rates)

    # -- training ----------------------------------------------------------------------------------
    def _train_step(self) -> None:
        cfg, K = self.cfg, self.K
        lr = torch.tensor([lr_at(cfg, it) for it in self.iterations], device=self.device)
        batches = [s.next() for s in self.samplers]
        x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        with self.autocast:
            loss = self.model(x, y)
        loss.sum().backward()  # members share no parameter: each gets its own loss's gradient
        grad = self.model.flat.grad
        norm = grad.pow(2).sum(1).sqrt()  # each member's global gradient norm, (K,)
        if cfg.grad_clip:  # torch's clip_grad_norm_, member by member
            grad.mul_((cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0).view(-1, 1))
        self.optimizer.step(lr)
        self.model.flat.grad = None
        loss = loss.detach().float()
        self._acc += torch.stack((loss, norm, torch.ones_like(loss)), dim=1)
        self._ema.mul_(EMA_BETA).add_(loss, alpha=1 - EMA_BETA)
        for k in range(K):
            self._ema_steps[k] += 1
            self.iterations[k] += 1

    def _read_log(self) -> list[dict[str, float] | None]:
        """Read (one host sync) and reset the accumulators: each member's log record (None without a step
        since the last read). A member whose loss is not finite is marked diverged."""
        acc, ema = self._acc.tolist(), self._ema.tolist()
        self._acc.zero_()
        records: list[dict[str, float] | None] = []
        for k, ((loss_sum, gn_sum, n), e) in enumerate(zip(acc, ema)):
            if n == 0 or self.diverged[k]:
                records.append(None)
                continue
            h = self.histories[k]
            h.train_loss_smoothed = e / (1 - EMA_BETA ** self._ema_steps[k])
            h.last_train_loss, h.grad_norm = loss_sum / n, gn_sum / n
            if not math.isfinite(loss_sum):
                self.diverged[k] = True
            records.append(train_record(self.iterations[k], loss_sum / n, h.train_loss_smoothed, gn_sum / n,
                                        lr_at(self.cfg, self.iterations[k] - 1)))
        return records

    def advance(self, n_iters: int) -> list[list[dict[str, float]]]:
        """Train every member ``n_iters`` steps at its current rate. Returns each member's log records (one
        per ``log_interval`` steps); a member whose loss turns non-finite is marked in ``diverged``."""
        cfg = self.cfg
        logs: list[list[dict[str, float]]] = [[] for _ in range(self.K)]
        t0 = time.perf_counter()
        for step in range(n_iters):
            self._train_step()
            if (step + 1) % cfg.log_interval == 0 or step + 1 == n_iters:
                for k, record in enumerate(self._read_log()):
                    if record is not None:
                        logs[k].append(record)
        if n_iters:
            dt = time.perf_counter() - t0  # _read_log's host read ends it: the work is done
            tokens = n_iters * cfg.batch_size * cfg.block_size
            for h in self.histories:
                h.train_time_s, h.tokens, h.tokens_per_s = h.train_time_s + dt, h.tokens + tokens, tokens / dt
        return logs

    @torch.no_grad()
    def evaluate(self, members: Sequence[int] | None = None) -> list[dict[str, Any] | None]:
        """Every member's mean loss on its fixed evaluation batches, dropout off, in one batched pass per
        ``eval_merge`` batches; one host sync. Only ``members`` (default all) record the result; a member
        whose loss is not finite is marked diverged. Returns one result per member (None if not recorded)."""
        t0 = time.perf_counter()
        k_merge = self.cfg.eval_merge
        self.model.eval()
        means = []
        for split in ("train", "val"):
            xs = torch.stack([b[split].x for b in self.eval_batches])  # (K, n, B, T)
            ys = torch.stack([b[split].y for b in self.eval_batches])
            total = torch.zeros(self.K, device=self.device)
            for i in range(0, xs.shape[1], k_merge):
                x, y = xs[:, i:i + k_merge].flatten(1, 2), ys[:, i:i + k_merge].flatten(1, 2)
                with self.autocast:
                    total += self.model(x, y) * (x.shape[1] / xs.shape[2])
            means.append(total / xs.shape[1])
        self.model.train()
        losses = torch.stack(means, dim=1).tolist()
        dt = time.perf_counter() - t0
        chosen = set(range(self.K)) if members is None else set(members)
        results: list[dict[str, Any] | None] = []
        for k, (train_loss, val_loss) in enumerate(losses):
            if k not in chosen or self.diverged[k]:
                results.append(None)
                continue
            h = self.histories[k]
            h.eval_time_s += dt
            h.eval_train_loss, h.eval_val_loss, h.eval_iter = train_loss, val_loss, self.iterations[k]
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                self.diverged[k] = True
                results.append(None)
                continue
            improved = val_loss < h.best_val_loss
            if improved:
                h.best_val_loss, h.best_val_iter = val_loss, self.iterations[k]
                self.best_weights[k] = {n: t.detach().clone() for n, t in self.model.member_state(k).items()}
            results.append({"train_loss": train_loss, "val_loss": val_loss, "improved": improved})
        return results

    def member_model(self, k: int, weights: dict[str, torch.Tensor] | None = None) -> GPT:
        """A single GPT holding member ``k``'s weights (or ``weights``), for sampling or scoring."""
        model = GPT(self.model.config).to(self.device)
        model.load_state_dict({**model.state_dict(), **(weights or self.model.member_state(k))}, strict=True)
        return model

    # -- a whole run of every member -------------------------------------------------------------
    def train(self, loggers: Sequence[Any] | None = None, bar: Any = None) -> list[dict[str, Any] | None]:
        """Train every member to ``max_iters`` under its controller, as :meth:`gpt.trainer.Trainer.train` trains
        one run: evaluate, control, train an interval, with each member's records going to its logger
        (``loggers[k]``, a :class:`~gpt.tracking.RunLogger` or None). At the end each member's best weights
        are scored on the whole validation split and, with ``gen_tokens``, sampled from.

        :returns: each member's summary (``Trainer.summary``'s keys; times are the population's, shared by its
            members), or None for a member that diverged.
        """
        cfg = self.cfg
        if len(set(self.iterations)) > 1:
            raise RuntimeError("train() needs every member at the same iteration")
        loggers = list(loggers) if loggers is not None else [None] * self.K
        t_start = time.perf_counter()
        while True:
            it = self.iterations[0]
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                results = self.evaluate()
                for k, r in enumerate(results):
                    self.histories[k].wall_time_s = time.perf_counter() - t_start
                    if r is not None and loggers[k] is not None:
                        loggers[k].log(eval_record(it, r["train_loss"], r["val_loss"], self.histories[k]))
            if it < cfg.max_iters and it % cfg.control_every == 0:
                self.control()
                for k, logger in enumerate(loggers):
                    if logger is not None and not self.diverged[k]:
                        logger.log(self.dropout[k].record())
            for h in self.histories:
                h.wall_time_s = time.perf_counter() - t_start
            if it >= cfg.max_iters or all(self.diverged):
                break
            next_stop = min(cfg.max_iters, (it // cfg.eval_interval + 1) * cfg.eval_interval,
                            (it // cfg.control_every + 1) * cfg.control_every)
            for k, records in enumerate(self.advance(next_stop - it)):
                for record in records:
                    if loggers[k] is not None and not self.diverged[k]:
                        loggers[k].log(record)
            if bar is not None:
                bar.update(next_stop - it)
        return [None if self.diverged[k] else self._finish(k) for k in range(self.K)]

    def _finish(self, k: int) -> dict[str, Any]:
        """Member ``k``'s best weights scored on the whole val and test splits, its sample, and its summary."""
        cfg, h = self.cfg, self.histories[k]
        if self.best_weights[k] is None:  # no evaluation yet: the weights as they are
            self.best_weights[k] = self.model.member_state(k)
        best = self.member_model(k, self.best_weights[k])
        score_weights(h, lambda split: windows_loss(best, cfg, getattr(self.data, split), self.autocast))
        member_cfg = dataclasses.replace(cfg, seed=self.seeds[k])
        inference = measure_inference(self.member_model(k), member_cfg, self.data) if cfg.gen_tokens else None
        self.inference[k] = inference
        summary = run_summary(member_cfg, h, self.iterations[k], self.controllers[k], inference, self.device,
                              self.data, list(self.model.rates[k]), compile=False, recompiles=0)
        summary["controller_explanation"] = self.dropout[k].explain()
        summary["batched_members"] = self.K  # K runs trained as one batched model (PBT's own is pbt_population)
        return summary
