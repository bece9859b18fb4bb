"""The training loop: nanoGPT's recipe, with a controller choosing the dropout rate as it goes.

Read ``Trainer.train`` top to bottom: evaluate -> control -> checkpoint -> train an interval, until
``max_iters``. The pieces (``evaluate``, ``stats``, ``set_dropout``, ``advance``) are public so the RL
environment can drive the same loop one control interval at a time.

Speed rules: batches are sampled on the device, losses and gradient norms accumulate on the device
and are read once per log interval, the dropout rate lives in a buffer (no recompiles), checkpoints
are written by a background thread from a host snapshot.
"""
from __future__ import annotations

import io
import math
import os
import random
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from controllers import Controller, HoldRate, Rate, TrainingStats, check_rate
from dyndrop import UserError

from .config import TrainConfig
from .data import BatchSampler, CharData, EvalBatches, fixed_eval_batches
from .model import GPT, GPTConfig
from integrations import DropoutScheduler

from .tracking import RunLogger, eval_record, train_record

EMA_BETA = 0.9  # smoothing of the per-step training loss seen by controllers
CHECKPOINT_VERSION = 1
NUMERICS_VERSION = 2
"""Bumped by any change that alters the numbers a run produces for the same settings and data (the split, the
evaluation batches, the model's arithmetic, the optimizer). Reference sweeps record it, and ``runs.suite`` refuses a
reference made with another one. 1: validation on the whole last 10 %; 2: val and test halves."""
CHECKPOINT_KEYS = frozenset({"version", "iteration", "config", "model", "optimizer", "scaler", "sampler", "rates",
                             "controller", "controller_name", "history", "meta", "acc", "ema", "ema_steps", "rng"})


class Diverged(Exception):
    """The training loss became NaN or infinite."""


@dataclass
class TrainingHistory:
    """What a :class:`Trainer` has measured so far. Losses in nats per token, times in seconds.

    :param best_val_loss: lowest validation loss of any evaluation so far (inf before the first).
    :param best_val_iter: iteration of that evaluation.
    :param eval_train_loss: loss on the fixed training evaluation batches at the last evaluation, dropout off.
    :param eval_val_loss: loss on the fixed validation batches at the last evaluation, dropout off.
    :param eval_iter: iteration of the last evaluation.
    :param train_loss_smoothed: debiased moving average of the per-step training loss (dropout on).
    :param last_train_loss: mean training loss over the last log interval.
    :param grad_norm: mean gradient norm (before clipping) over the last log interval.
    :param tokens_per_s: training throughput of the last ``advance`` call.
    :param train_time_s: time spent in training steps.
    :param eval_time_s: time spent in evaluations.
    :param wall_time_s: wall-clock time of the run so far (``train`` only; resumes add up).
    :param tokens: training tokens consumed.
    :param best_val_loss_full: loss of the weights that had ``best_val_loss`` on the *whole* validation split
        (:func:`windows_loss`), measured once at the end of :meth:`Trainer.train`; nan before.
    :param full_val_tokens: validation tokens that figure is the mean over.
    :param full_val_time_s: time that measurement took.
    :param test_loss: loss of the same weights on the whole test split, measured once with the figure above and
        read by nothing that steers the run; nan before.
    :param test_tokens: test tokens that figure is the mean over.
    :param test_time_s: time that measurement took.
    """

    best_val_loss: float = math.inf
    best_val_iter: int = 0
    eval_train_loss: float = math.nan
    eval_val_loss: float = math.nan
    eval_iter: int = 0
    train_loss_smoothed: float = math.nan
    last_train_loss: float = math.nan
    grad_norm: float = math.nan
    tokens_per_s: float = math.nan
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    wall_time_s: float = 0.0
    tokens: int = 0
    best_val_loss_full: float = math.nan
    full_val_tokens: int = 0
    full_val_time_s: float = 0.0
    test_loss: float = math.nan
    test_tokens: int = 0
    test_time_s: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingHistory:
        """From a checkpoint's record; raises ``KeyError``/``TypeError`` if it is not one."""
        known = {f.name for f in fields(cls)}
        missing = known - d.keys() - {"wall_time_s", "best_val_loss_full", "full_val_tokens", "full_val_time_s",
                                      "test_loss", "test_tokens", "test_time_s"}
        if missing:
            raise KeyError(f"history lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in d.items() if k in known})


class InferenceSample(NamedTuple):
    """What :meth:`Trainer.measure_inference` measured: the speed, and the text it sampled."""

    tokens_per_s: float
    text: str


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where every call has finished)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or auto") from None


def resolve_precision(cfg: TrainConfig) -> tuple[torch.device, torch.dtype, Any]:
    """The device, the compute dtype (``auto``: bfloat16 on CUDA, else float32) and the autocast context for
    it (a no-op context in float32)."""
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return device, dtype, autocast


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (none where dynamo was never imported: importing
    it only to read 0 would cost ~1.5 s per process)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model a run's settings describe."""
    return GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, bias=cfg.bias, fused_attention_dropout=cfg.attention_dropout == "fused")


def training_bytes(cfg: TrainConfig, vocab_size: int) -> int:
    """A lower bound on the memory a run of ``cfg`` takes, in bytes: its parameters (token and position embeddings,
    each layer's attention and MLP matrices; nanoGPT's count) held four times in float32, as weights, gradients and
    AdamW's two moments, and the largest batch's input and output activations (an evaluation's merged batches:
    embeddings and logits, float32). Every other activation comes on top."""
    d = cfg.n_embd
    params = d * (vocab_size + cfg.block_size) + cfg.n_layer * 12 * d * d
    rows = cfg.batch_size * max(1, min(cfg.eval_merge, cfg.eval_iters)) * cfg.block_size
    return 16 * params + 4 * rows * (d + vocab_size)


def available_bytes(device: torch.device) -> int | None:
    """Memory a run could take on ``device`` now, in bytes (on a CPU, Linux's MemAvailable: free memory and the
    caches it may reclaim); None where this cannot be known."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (ValueError, OSError, RuntimeError, IndexError):
        pass
    return None


def check_memory(cfg: TrainConfig, vocab_size: int) -> None:
    """Refuse, with a ``UserError``, a model that cannot fit where it would train (:func:`training_bytes` against
    :func:`available_bytes`): allocating it would die with a traceback, or take the machine's memory with it."""
    device = resolve_device(cfg.device)
    need, free = training_bytes(cfg, vocab_size), available_bytes(device)
    if free is not None and need > free:
        raise UserError(f"--n-layer {cfg.n_layer}, --n-embd {cfg.n_embd}, --block-size {cfg.block_size} and "
                        f"--batch-size {cfg.batch_size} make a run that needs at least {need / 2**30:.1f} GiB to train, "
                        f"and {device} has {free / 2**30:.1f} GiB free; make it smaller")


def make_optimizer(model: GPT, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on matrices (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename, a new link) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside ``path``, flushed to disk, then renamed: a reader (or a resume after a
    crash or power loss) sees the old file or the new one, never half of one.

    The bytes are made in memory first and written by Python: torch's own file writer reports a failed write (a
    full disk) as a ``RuntimeError`` ("unexpected pos"), which hides the cause. Raises ``OSError`` naming ``path``.
    """
    tmp = path.with_name(path.name + ".tmp")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically: a hard link (no bytes written) where the filesystem
    has them, else a copy. Replacing ``src`` later (``atomic_save`` renames) leaves ``dst`` as it was."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory (nested dicts, lists and tuples): a snapshot that
    training can no longer change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, each atomically.

    ``save`` copies the state to host memory (the only part the training loop waits for, a fraction of the write:
    docs/results.md, "Where the speed figures come from") and returns; the file then holds the state of the
    moment ``save`` was called. ``wait`` blocks until the last file is complete and re-raises a failed
    write, so a run never ends with a checkpoint still in flight.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], path: Path, also: Path | None = None) -> None:
        """Write ``state`` to ``path`` and, if given, make ``also`` the same file (``link_or_copy``)."""
        self.wait()
        snapshot = host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, path, also),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot: dict[str, Any], path: Path, also: Path | None) -> None:
        try:
            atomic_save(snapshot, path)
            if also is not None:
                link_or_copy(path, also)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``Trainer.save_checkpoint``; UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or start a new run") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} is not a dynamic-dropout checkpoint (version {CHECKPOINT_VERSION})")
    missing = sorted(CHECKPOINT_KEYS - ckpt.keys())
    if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["meta"], dict):
        raise UserError(f"checkpoint {path} is damaged or foreign (missing: {', '.join(missing) or 'a valid config'}); "
                        "delete it or start a new run")
    return ckpt


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``cfg.decay_iters`` (nanoGPT)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(cfg.decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def initial_model(cfg: TrainConfig, vocab_size: int, seed: int, device: torch.device) -> GPT:
    """The model a run with ``seed`` starts from: every RNG seeded, then nanoGPT's initialisation (on the CPU,
    then moved). Afterwards the global generators continue from there: a run's dropout masks."""
    seed_everything(seed)
    return GPT(model_config(cfg, vocab_size)).to(device)


def data_streams(cfg: TrainConfig, data: CharData, seed: int) -> tuple[BatchSampler, dict[str, EvalBatches]]:
    """A run's training batches (from the first ``train_chars`` characters of the training split) and its fixed
    evaluation batches, both determined by ``seed``."""
    train = data.train_split(cfg.train_chars)
    sampler = BatchSampler(train, cfg.block_size, cfg.batch_size, seed=seed)
    # Evaluation batches come from their own seed stream, so they never depend on training.
    eval_batches = {split: fixed_eval_batches(train if split == "train" else data.val, cfg.block_size,
                                              cfg.batch_size, cfg.eval_iters, seed=seed + 10_000 + i)
                    for i, split in enumerate(("train", "val"))}
    return sampler, eval_batches


class Trainer:
    """Trains one GPT under one controller.

    :param cfg: the run's settings.
    :param controller: chooses the dropout rate at every control step; None = :class:`controllers.HoldRate`, which
        keeps whatever rate the caller sets with :meth:`set_dropout` (the RL env, a PBT member).
    :param data: the dataset on ``cfg``'s device; loaded from ``cfg.data`` if omitted (share it across
        trainers to avoid re-reading).
    :param logger: where records go; None = nowhere (RL episodes).
    :param meta: plain values stored in every checkpoint (the command line uses it for the controller spec).
    """

    def __init__(self, cfg: TrainConfig, controller: Controller | None = None, data: CharData | None = None,
                 logger: RunLogger | None = None, meta: dict[str, Any] | None = None) -> None:
        self.cfg, self.logger = cfg, logger
        self.controller: Controller = controller if controller is not None else HoldRate()
        self.meta = meta or {}  # saved in checkpoints as is (e.g. the controller spec to rebuild it)
        self.device, self.dtype, self.autocast = resolve_precision(cfg)
        self.data = data if data is not None else CharData.load(cfg.data, device=self.device)

        self.model = initial_model(cfg, self.data.vocab_size, cfg.seed, self.device)
        # fused AdamW: one kernel per step on CUDA, and faster on CPU too (docs/results.md)
        self.optimizer = make_optimizer(self.model, cfg, fused=self.device.type in ("cuda", "cpu"))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        # dynamic=False: training and (merged) evaluation batches get graphs specialised to their shapes
        self.fwd = (torch.compile(self.model, mode=cfg.compile_mode, dynamic=False) if self.use_compile
                    else self.model)

        self.sampler, self.eval_batches = data_streams(cfg, self.data, cfg.seed)

        self.iteration = 0
        self.history = TrainingHistory()
        self.inference: InferenceSample | None = None  # set by measure_inference (at the end of train)
        self.best_weights: dict[str, torch.Tensor] | None = None  # a device copy of the parameters at best val
        self._acc = torch.zeros(3, device=self.device)  # sum of loss, sum of grad norm, steps since last log
        self._ema = torch.zeros((), device=self.device)  # debiased on read
        self._ema_steps = 0
        self._graphs_after_warmup: int | None = None
        self._warm: set[str] = set()
        self._resumed = False
        self.checkpoints = CheckpointWriter()
        # control goes through the same scheduler a foreign training loop uses; the trainer builds the stats itself
        self.dropout = DropoutScheduler(self.model.set_dropout, self.controller, max(cfg.max_iters, 1),
                                        n_layers=cfg.n_layer, ask_now=False)
        self.model.set_dropout(0.0)  # until the first control step, after the first evaluation

    # -- the pieces ---------------------------------------------------------------------------
    def lr_at(self, it: int) -> float:
        """The learning rate of iteration ``it`` (:func:`lr_at`)."""
        return lr_at(self.cfg, it)

    def set_dropout(self, rate: Rate) -> tuple[float, ...]:
        """Set the rate for the next steps: one float in [0, 1) or one per layer (checked here, the model's
        one way in from outside). No host sync, no recompile. Returns the rate of each layer."""
        return self.model.set_dropout(check_rate(rate, self.cfg.n_layer))

    def sync(self) -> None:
        """Wait until the device has finished the queued steps (timing needs it; training does not)."""
        sync(self.device)

    @torch.no_grad()
    def evaluate(self, merge: int | None = None) -> dict[str, float]:
        """Mean loss over the fixed evaluation batches of each split, dropout off. One host sync.

        ``merge`` (default ``cfg.eval_merge``) batches go through the model together: the same tokens, the
        same mean, in fewer passes."""
        t0 = time.perf_counter()
        self.model.eval()
        means = []
        k = merge or self.cfg.eval_merge
        for split in ("train", "val"):
            xs, ys = self.eval_batches[split]
            total = torch.zeros((), device=self.device)
            for i in range(0, len(xs), k):  # k batches as one pass: weight its mean by its batch count
                x, y = xs[i:i + k].flatten(0, 1), ys[i:i + k].flatten(0, 1)
                with self.autocast:
                    total += self.fwd(x, y)[1] * (x.size(0) / xs.size(1))
            means.append(total / len(xs))
        self.model.train()
        self._note_warmup("eval")
        train_loss, val_loss = torch.stack(means).tolist()
        h = self.history
        h.eval_time_s += time.perf_counter() - t0
        h.eval_train_loss, h.eval_val_loss, h.eval_iter = train_loss, val_loss, self.iteration
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise Diverged(f"evaluation loss is {val_loss} at iteration {self.iteration}")
        improved = val_loss < h.best_val_loss
        if improved:
            h.best_val_loss, h.best_val_iter = val_loss, self.iteration
            # a device-side copy (no host sync): the weights best_val_loss_full scores at the end
            self.best_weights = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        return {"train_loss": train_loss, "val_loss": val_loss, "improved": improved}

    def split_loss(self, split: str, weights: dict[str, torch.Tensor] | None = None) -> tuple[float, int]:
        """:func:`windows_loss` of the model on the data's ``split`` (``val`` or ``test``); ``weights``: parameters to
        score instead (e.g. ``best_weights``)."""
        return windows_loss(self.model, self.cfg, getattr(self.data, split), self.autocast, weights)

    def stats(self) -> TrainingStats:
        """The controller's view of the run right now."""
        h = self.history
        return TrainingStats(
            iteration=self.iteration, max_iters=self.cfg.max_iters, lr=self.lr_at(self.iteration),
            train_loss_smoothed=h.train_loss_smoothed, eval_train_loss=h.eval_train_loss,
            eval_val_loss=h.eval_val_loss, best_val_loss=h.best_val_loss, best_val_iter=h.best_val_iter,
            rates=self.model.rates, grad_norm=h.grad_norm, tokens_per_s=h.tokens_per_s, eval_iter=h.eval_iter)

    def _train_step(self) -> None:
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.sampler.next()
        with self.autocast:
            _, loss = self.fwd(x, y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        self._acc += torch.stack((loss, grad_norm.float(), torch.ones_like(loss)))
        self._ema.mul_(EMA_BETA).add_(loss, alpha=1 - EMA_BETA)
        self._ema_steps += 1
        self.iteration += 1

    def _read_log(self) -> dict[str, float] | None:
        """Read (one host sync) and reset the on-device accumulators; None if no step since."""
        loss_sum, gn_sum, n, ema = torch.cat((self._acc, self._ema[None])).tolist()
        if n == 0:
            return None
        self._acc.zero_()
        h = self.history
        h.train_loss_smoothed = ema / (1 - EMA_BETA ** self._ema_steps)
        h.last_train_loss = loss_sum / n
        h.grad_norm = gn_sum / n
        if not math.isfinite(loss_sum):
            raise Diverged(f"training loss is {loss_sum / n} at iteration {self.iteration}")
        return train_record(self.iteration, loss_sum / n, h.train_loss_smoothed, gn_sum / n,
                            self.lr_at(self.iteration - 1))

    def advance(self, n_iters: int, bar: Any = None) -> None:
        """Train ``n_iters`` steps at the current rate, logging every ``log_interval`` steps."""
        cfg = self.cfg
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n_iters):
            self._train_step()
            self._note_warmup("train")
            if self.iteration % cfg.log_interval == 0:
                record = self._read_log()
                if record and self.logger:
                    self.logger.log(record)
                if record and bar is not None:
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}", val=f"{self.history.eval_val_loss:.3f}",
                                    p=f"{self.model.rates[0]:.3f}", refresh=False)
            if bar is not None:
                bar.update(1)
        if n_iters:
            self._read_log()
            self.sync()
            dt = time.perf_counter() - t0
            tokens = n_iters * cfg.batch_size * cfg.block_size
            h = self.history
            h.train_time_s, h.tokens, h.tokens_per_s = h.train_time_s + dt, h.tokens + tokens, tokens / dt

    def control(self) -> tuple[float, ...]:
        """Ask the controller for the next rate, apply it, log the rates and the controller's internals."""
        rates = self.dropout.control(self.stats())
        if self.logger:
            self.logger.log(self.dropout.record())
        return rates

    def _note_warmup(self, kind: str) -> None:
        if self._graphs_after_warmup is None:
            self._warm.add(kind)
            if self._warm == {"train", "eval"}:
                self._graphs_after_warmup = compiled_graphs()

    @property
    def recompiles(self) -> int:
        """Graphs compiled after warm-up (the first evaluation and the first training step)."""
        if self._graphs_after_warmup is None:
            return 0
        return compiled_graphs() - self._graphs_after_warmup

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to ``max_iters``; returns the summary. Raises ``Diverged`` after saving nothing new."""
        cfg = self.cfg
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_iters, initial=self.iteration, desc=f"{cfg.preset}/{self.controller.name}",
                       unit="it", dynamic_ncols=True)
        t_start = time.perf_counter() - self.history.wall_time_s
        try:
            while True:
                it = self.iteration
                if self._resumed:  # this step's evaluation and control happened before the checkpoint
                    self._resumed = False
                else:
                    is_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters
                    if is_eval:
                        result = self.evaluate()
                        self.history.wall_time_s = time.perf_counter() - t_start
                        if self.logger:
                            self.logger.log(eval_record(it, result["train_loss"], result["val_loss"], self.history))
                    if it < cfg.max_iters and it % cfg.control_every == 0:
                        self.control()
                    self.history.wall_time_s = time.perf_counter() - t_start
                    if is_eval and cfg.checkpoint:
                        self.save_checkpoint(best=result["improved"])
                if it >= cfg.max_iters:
                    break
                next_stop = min(cfg.max_iters, (it // cfg.eval_interval + 1) * cfg.eval_interval,
                                (it // cfg.control_every + 1) * cfg.control_every)
                self.advance(next_stop - it, bar)
        finally:
            if bar is not None:
                bar.close()
            self.checkpoints.wait()
        self.history.wall_time_s = time.perf_counter() - t_start
        self.score_best()
        if cfg.gen_tokens:
            self.inference = self.measure_inference()
        return self.summary()

    def score_best(self) -> None:
        """Score the best weights (those of ``best_val_iter``) on every window of the validation split
        (``best_val_loss_full``) and, once, of the test split (``test_loss``): :func:`score_weights`. Both stay nan
        if those weights are not at hand."""
        if self.best_weights is None and self.history.best_val_iter != self.iteration:
            return
        score_weights(self.history, lambda split: self.split_loss(split, self.best_weights))

    def summary(self) -> dict[str, Any]:
        """The run's figures (what ``summary.json`` holds)."""
        summary = run_summary(self.cfg, self.history, self.iteration, self.controller, self.inference, self.device,
                              self.data, list(self.model.rates), compile=self.use_compile, recompiles=self.recompiles)
        return {**summary, "controller_explanation": self.dropout.explain()}

    def measure_inference(self) -> InferenceSample:
        """:func:`measure_inference` of the model as it is."""
        return measure_inference(self.model, self.cfg, self.data)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: tensors and plain Python only (weights_only loads)."""
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "version": CHECKPOINT_VERSION, "iteration": self.iteration, "config": asdict(self.cfg),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
            "rates": list(self.model.rates), "controller": self.controller.state_dict(),
            "controller_name": self.controller.name, "rate_changes": [list(c) for c in self.dropout.changes],
            "data": self.data.record(),
            "history": asdict(self.history), "meta": self.meta,
            "acc": self._acc.cpu(), "ema": self._ema.cpu(), "ema_steps": self._ema_steps,
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng, "python": list(random.getstate()[1]),
                    "python_version": random.getstate()[0], "numpy": np.random.get_state()[1].tolist(),
                    "numpy_pos": int(np.random.get_state()[2])},
        }

    def save_checkpoint(self, best: bool = False, wait: bool = False) -> Path:
        """Write ``ckpt_last.pt`` (and ``ckpt_best.pt`` as the same file if ``best``) in the background;
        ``wait``: return only once it is on disk. Returns the path of ``ckpt_last.pt``."""
        out = Path(self.cfg.out)
        path = out / "ckpt_last.pt"
        self.checkpoints.save(self.state_dict(), path, also=out / "ckpt_best.pt" if best else None)
        if wait:
            self.checkpoints.wait()
        return path

    def load_state_dict(self, ckpt: dict[str, Any], source: str = "the checkpoint") -> None:
        """Continue from ``ckpt`` (written by :meth:`state_dict`). Raises ``UserError`` naming ``source`` if it
        does not fit this trainer (another model, optimizer or controller, missing or malformed entries)."""
        try:
            self._load_state_dict(ckpt)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            detail = str(e).splitlines()[0][:200] if str(e) else ""
            raise UserError(f"{source} does not fit this run ({type(e).__name__}: {detail}); it was written by "
                            "other settings or another version of this code: start a new run") from None
        self._repair_best()

    def _load_state_dict(self, ckpt: dict[str, Any]) -> None:
        saved_data, data = ckpt.get("data") or {}, self.data.record()
        if saved_data.get("sha256") not in (None, data["sha256"]):
            raise UserError(f"the checkpoint was trained on {saved_data.get('source')} (sha256 "
                            f"{saved_data['sha256'][:12]}...), but {data['source']} is different now (sha256 "
                            f"{str(data['sha256'])[:12]}...); resume with the same text")
        if ckpt["controller_name"] != self.controller.name:
            raise UserError(f"the checkpoint was trained with controller {ckpt['controller_name']!r}, "
                            f"not {self.controller.name!r}; pass --controller {ckpt['controller_name']}")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError("the checkpoint's model does not match this preset/config; resume with the same settings") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.controller.load_state_dict(ckpt["controller"])
        self.dropout.changes = [(int(it), float(r)) for it, r in ckpt.get("rate_changes", [])]
        self.set_dropout(tuple(ckpt["rates"]))
        self.iteration = ckpt["iteration"]
        self.history = TrainingHistory.from_dict(ckpt["history"])
        self._acc = ckpt["acc"].to(self.device)
        self._ema = ckpt["ema"].to(self.device)
        self._ema_steps = ckpt["ema_steps"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate((rng["python_version"], tuple(rng["python"]), None))
        np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
        self._resumed = True

    def _repair_best(self) -> None:
        """Finish a best checkpoint that a crash cut off: ``last`` is written before ``best`` is linked to it,
        so a kill between the two leaves a ``last`` that is the best without ``best`` pointing at it."""
        out = Path(self.cfg.out)
        last, best = out / "ckpt_last.pt", out / "ckpt_best.pt"
        if self.cfg.checkpoint and last.is_file() and self.history.best_val_iter == self.iteration:
            try:
                done = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["iteration"] == self.iteration
            except Exception:  # missing, torn or foreign: replace it
                done = False
            if not done:
                link_or_copy(last, best)
        self.best_weights = None
        if best.is_file():  # the weights best_val_loss_full will score
            saved = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("iteration") == self.history.best_val_iter:
                names = dict(self.model.named_parameters())
                self.best_weights = {k: v.to(self.device) for k, v in saved["model"].items() if k in names}


@torch.no_grad()
def windows_loss(model: GPT, cfg: TrainConfig, tokens: torch.Tensor, autocast: Any,
                 weights: dict[str, torch.Tensor] | None = None) -> tuple[float, int]:
    """Mean loss over every non-overlapping window of ``block_size`` tokens of ``tokens`` (a whole split; the last
    ``(len(tokens) - 1) % block_size`` tokens, fewer than one window, are left out), dropout off, in passes of
    ``batch_size * eval_merge`` windows.

    :param weights: parameters to score instead of the model's own (through ``torch.func.functional_call``).
    :returns: the loss (nats per token) and the number of tokens it averages.
    """
    T = cfg.block_size
    n = (len(tokens) - 1) // T
    x, y = tokens[:n * T].view(n, T), tokens[1:n * T + 1].view(n, T)
    chunk = cfg.batch_size * cfg.eval_merge
    total = torch.zeros((), device=tokens.device)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, chunk):
            xb, yb = x[i:i + chunk], y[i:i + chunk]
            with autocast:
                loss = (torch.func.functional_call(model, weights, (xb, yb)) if weights is not None
                        else model(xb, yb))[1]
            total += loss.float() * xb.size(0)
    finally:
        model.train(was_training)
    return (total / n).item(), n * T


def score_weights(h: TrainingHistory, loss_on: Any) -> None:
    """The end of a run: the chosen weights' loss on the whole val split, then, once, on the whole test split, into
    ``h`` (``best_val_loss_full``, ``test_loss``, their token counts and times). ``loss_on(split)`` scores them
    and returns ``(loss, tokens)``. The one place that reads the test split."""
    t0 = time.perf_counter()
    h.best_val_loss_full, h.full_val_tokens = loss_on("val")
    t1 = time.perf_counter()
    h.test_loss, h.test_tokens = loss_on("test")
    h.full_val_time_s, h.test_time_s = t1 - t0, time.perf_counter() - t1


def measure_inference(model: GPT, cfg: TrainConfig, data: CharData) -> InferenceSample:
    """Characters per second sampling ``gen_tokens`` with the KV cache (batch 1), after a warm-up, and the text
    sampled (from a generator seeded with ``cfg.seed``).

    The decode step runs eagerly: compiling it (``generate(compile=True)``, measured by the benchmark) would
    add a compile at the end of every run."""
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)
    # Warm-up over the same length: the first call at each new shape pays one-off costs
    # (kernel selection, allocator growth) that are not the model's speed.
    model.generate(idx, cfg.gen_tokens, generator=gen)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(idx, cfg.gen_tokens, generator=gen)
    sync(device)
    dt = time.perf_counter() - t0
    return InferenceSample(cfg.gen_tokens / dt, data.decode(out[0].tolist()))


def run_summary(cfg: TrainConfig, h: TrainingHistory, iterations: int, controller: Controller,
                inference: InferenceSample | None, device: torch.device, data: CharData, final_rates: list[float],
                compile: bool, recompiles: int) -> dict[str, Any]:
    """A run's figures, as ``summary.json`` holds them."""
    return {
        "best_val_loss": h.best_val_loss, "best_val_iter": h.best_val_iter,
        "test_loss": h.test_loss, "test_tokens": h.test_tokens, "test_time_s": h.test_time_s,
        "best_val_loss_full": h.best_val_loss_full, "full_val_tokens": h.full_val_tokens,
        "full_val_time_s": h.full_val_time_s, "numerics": NUMERICS_VERSION,
        "final_train_loss": h.eval_train_loss, "final_val_loss": h.eval_val_loss,
        "final_train_loss_smoothed": h.train_loss_smoothed,
        "total_train_time_s": h.wall_time_s, "train_loop_time_s": h.train_time_s, "eval_time_s": h.eval_time_s,
        "train_tokens_per_s": h.tokens / h.train_time_s if h.train_time_s else math.nan,
        "inference_tokens_per_s": inference.tokens_per_s if inference else math.nan,
        "recompiles": recompiles, "iterations": iterations,
        "controller": controller.name, "controller_params": controller.params(),
        "preset": cfg.preset, "seed": cfg.seed, "device": str(device), "data": data.record(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": compile, "torch": torch.__version__, "final_rates": final_rates,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
