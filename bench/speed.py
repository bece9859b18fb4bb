"""Speed benchmark: our ``Trainer`` against a plain reference loop, in one process on the same hardware.

Two loops train the same ``GPT`` class with the same hyperparameters:

- **ours**: the ``Trainer`` exactly as a run configures it (torch.compile on CUDA, bf16 autocast, fused
  AdamW, data resident on the device, losses read once per log interval), with the dropout rate
  changed at every control step by :class:`AlternatingRate` (never 0, so it never switches graphs);
- **reference**: :class:`ReferenceLoop`, a plain nanoGPT-style loop: the eager model, batches sliced from
  a host numpy array and copied to the device every step, ``loss.item()`` every step, PyTorch's default
  (non-fused) AdamW, the same autocast dtype.

Training is measured in alternating rounds (ours, reference, ours, ...) so a change in machine load hits
both loops alike. :func:`run_benchmark` returns one plain dict (the JSON the command line writes);
:func:`format_table` turns it into the printed table.

Timing, and why it does not distort ours: ours is timed per *block* of ``block_iters`` iterations with
``time.perf_counter`` around ``Trainer.control()`` + ``Trainer.advance(block_iters)``. ``advance`` already
synchronises the device at its start and end (and reads its loss accumulators once per log interval, as
in a real run), so the benchmark adds no synchronisation inside a block; a block's time divided by its
iterations is one per-iteration sample. On CPU the default block is 1 iteration (true per-iteration
timings); on CUDA it is 25. The reference syncs every step anyway (``.item()``), so it is timed per
iteration.
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from controllers import Controller, TrainingStats
from dyndrop import UserError
from gpt.config import TrainConfig
from gpt.data import CharData
from gpt.model import GPT
from gpt.trainer import Trainer, make_optimizer, model_config, seed_everything, sync

SPLITS = ("train", "val")


class AlternatingRate(Controller):
    """Alternates between two rates at every control step, so every step changes the rate.

    Both rates are non-zero by default: a switch between zero and non-zero is the one change that rebuilds a
    compiled graph, and the benchmark measures the steady state a controller sees. ``low = high = 0`` is
    allowed (no dropout at all: the fused-attention path, for comparison); one zero and one not is refused.

    :param low: the rate of odd control steps (the first), in [0, 1).
    :param high: the rate of even control steps, in [0, 1).
    """

    name = "alternating"

    def __init__(self, low: float = 0.1, high: float = 0.2) -> None:
        super().__init__()
        if not (0 <= low < 1 and 0 <= high < 1) or (low == 0) != (high == 0):
            raise UserError(f"alternating rates must both be in (0, 1), or both 0; got {low} and {high}")
        self.low, self.high = low, high
        self.steps = 0

    def _reset(self) -> None:
        self.steps = 0

    def _update(self, stats: TrainingStats) -> float:
        self.steps += 1
        return self.low if self.steps % 2 else self.high


@dataclass
class BenchSettings:
    """How much to measure. Iteration counts are rounded up to whole blocks.

    :param iters: timed training iterations of ours.
    :param ref_iters: timed training iterations of the reference.
    :param eval_passes: timed evaluation passes of ours (each: ``eval_iters`` batches per split).
    :param ref_eval_passes: timed evaluation passes of the reference.
    :param untimed_iters: untimed iterations of each loop first (ours: after compiling).
    :param block_iters: iterations per timed block and per rate change; 0 = 1 on CPU, 25 on CUDA.
    :param rounds: training alternates ours/reference this many times.
    :param gen_tokens: tokens sampled per generation run; capped at ``block_size - 1`` so the cached and
        uncached paths see the same context (and must give the same tokens).
    :param gen_repeats: timed generation runs per mode; the median is reported.
    :param sampling: measure sampling with and without the KV cache (off: ``result["sampling"]`` is None).
    :param profile_iters: after the timing, run this many iterations of ours under ``torch.profiler``
        (rounded up to whole blocks) and report the top operations and, on CUDA, how busy the GPU was.
    :param eval_merge_sweep: after the main measurement, time ``eval_passes`` evaluation passes of ours at
        each of these ``eval_merge`` values (each new batch shape compiles once, untimed).
    """

    iters: int = 200
    ref_iters: int = 200
    eval_passes: int = 2
    ref_eval_passes: int = 2
    untimed_iters: int = 10
    block_iters: int = 0
    rounds: int = 2
    gen_tokens: int = 256
    gen_repeats: int = 3
    sampling: bool = True
    profile_iters: int = 0
    eval_merge_sweep: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.profile_iters < 0:
            raise UserError(f"profile_iters must be >= 0 (0 = no profile), got {self.profile_iters}")
        if any(k < 1 for k in self.eval_merge_sweep):
            raise UserError(f"eval merge values must be at least 1, got {list(self.eval_merge_sweep)}")
        for name in ("iters", "ref_iters", "eval_passes", "ref_eval_passes", "rounds", "gen_tokens", "gen_repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.untimed_iters < 1:
            raise UserError(f"untimed_iters must be at least 1 (ours compiles there), got {self.untimed_iters}")
        if self.block_iters < 0:
            raise UserError(f"block_iters must be >= 0 (0 = automatic), got {self.block_iters}")


class ReferenceLoop:
    """A plain training loop over the same model and hyperparameters, written the obvious way.

    Eager model; each batch sliced from a host numpy array (uint16, as nanoGPT stores it), stacked, and
    copied to the device; ``loss.item()`` every step; ``torch.optim.AdamW`` with its defaults (no fused
    kernel); the same autocast dtype, gradient clipping and learning-rate schedule as ours.

    :param cfg: the run's settings (model size, batch, optimiser, evaluation size).
    :param data: the corpus; only its tokens are used, copied to host memory.
    :param device: where the model lives.
    :param dtype: the autocast dtype (float32 = no autocast).
    :param lr_at: learning rate of an iteration (ours' schedule, so both loops follow it).
    :param rates: the two dropout rates alternated at every block (as ours does).
    """

    def __init__(self, cfg: TrainConfig, data: CharData, device: torch.device, dtype: torch.dtype,
                 lr_at: Callable[[int], float], rates: tuple[float, float]) -> None:
        self.cfg, self.device, self.lr_at, self.rates = cfg, device, lr_at, rates
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.host = {split: getattr(data, split).cpu().numpy().astype(np.uint16) for split in SPLITS}
        self.rng = np.random.default_rng(cfg.seed)
        seed_everything(cfg.seed)
        self.model = GPT(model_config(cfg, data.vocab_size)).to(device)
        self.optimizer = make_optimizer(self.model, cfg, fused=False)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.iteration = 0
        self.blocks = 0
        self.last_loss = math.nan

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data, T = self.host[split], self.cfg.block_size
        ix = self.rng.integers(len(data) - T, size=self.cfg.batch_size)
        x = torch.from_numpy(np.stack([data[i:i + T] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in ix]).astype(np.int64))
        return x.to(self.device), y.to(self.device)

    def step(self) -> float:
        """One optimiser step; returns the loss (a host sync, as a plain loop does)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.iteration)
        x, y = self.get_batch("train")
        with self.autocast:
            _, loss = self.model(x, y)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        self.last_loss = loss.item()
        return self.last_loss

    def change_rate(self) -> None:
        self.model.set_dropout(self.rates[self.blocks % 2])
        self.blocks += 1

    def train(self, n_blocks: int, block_iters: int) -> list[float]:
        """Train ``n_blocks * block_iters`` steps, changing the rate every block; ms per iteration."""
        times = []
        for _ in range(n_blocks):
            self.change_rate()
            for _ in range(block_iters):
                t0 = time.perf_counter()
                self.step()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    @torch.no_grad()
    def evaluate(self) -> float:
        """One evaluation pass (``eval_iters`` fresh batches per split, ``.item()`` each); returns ms."""
        t0 = time.perf_counter()
        self.model.eval()
        for split in SPLITS:
            losses = []
            for _ in range(self.cfg.eval_iters):
                x, y = self.get_batch(split)
                with self.autocast:
                    losses.append(self.model(x, y)[1].item())
        self.model.train()
        return (time.perf_counter() - t0) * 1e3


def time_ours_blocks(trainer: Trainer, n_blocks: int, block_iters: int) -> list[float]:
    """Run ``n_blocks`` control steps of ``block_iters`` iterations each; ms per iteration of each block.

    ``advance`` synchronises the device at its start and end, so a block's wall time is exact without
    any synchronisation added here.
    """
    times = []
    for _ in range(n_blocks):
        t0 = time.perf_counter()
        trainer.control()
        trainer.advance(block_iters)
        times.append((time.perf_counter() - t0) * 1e3 / block_iters)
    return times


def profile_ours(trainer: Trainer, n_blocks: int, block_iters: int, rows: int = 25) -> dict[str, Any]:
    """``n_blocks`` control steps of ``block_iters`` iterations under ``torch.profiler``.

    Returns the top ``rows`` operations by self time on the device (CUDA) or the CPU, as the profiler's
    text table, and on CUDA the share of the wall time some kernel ran (``device_busy_share``; well below
    1 means the loop waits on the host: Python, launches, syncs). The profiler adds host overhead, so the
    share is a lower bound.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trainer.sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        time_ours_blocks(trainer, n_blocks, block_iters)
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    busy_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)) / 1e3
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {"iters": n_blocks * block_iters, "wall_ms": wall_ms,
            "device_busy_share": busy_ms / wall_ms if cuda else None,
            "table": events.table(sort_by=sort, row_limit=rows, max_name_column_width=60)}


def time_ours_eval(trainer: Trainer, merge: int | None = None) -> float:
    """One ``Trainer.evaluate`` (``merge`` batches per pass) in ms (it ends with a host read, so the time is
    complete)."""
    t0 = time.perf_counter()
    trainer.evaluate(merge)
    return (time.perf_counter() - t0) * 1e3


def summarize(ms: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles and mean of per-iteration times (ms)."""
    q = np.percentile(np.asarray(ms), [10, 50, 90])
    return {"ms_per_iter_median": float(q[1]), "ms_per_iter_p10": float(q[0]),
            "ms_per_iter_p90": float(q[2]), "ms_per_iter_mean": float(statistics.fmean(ms))}


def protocol_evaluations(cfg: TrainConfig) -> int:
    """Evaluations in a full run: every ``eval_interval`` steps from step 0, and at the last step."""
    return cfg.max_iters // cfg.eval_interval + 1 + (1 if cfg.max_iters % cfg.eval_interval else 0)


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def rate_zero_draws_no_random(model: GPT, x: torch.Tensor, y: torch.Tensor) -> bool:
    """One training forward+backward at rate 0 leaves the device's global RNG untouched (eager model).

    Also checks the converse (a non-zero rate does draw), so a broken check cannot pass vacuously.
    """
    saved = model.rates
    model.train()
    model.set_dropout(0.0)
    before = rng_state(x.device)
    model(x, y)[1].backward()
    untouched = torch.equal(before, rng_state(x.device))
    model.set_dropout(0.1)
    model(x, y)[1].backward()
    drew = not torch.equal(before, rng_state(x.device))
    model.zero_grad(set_to_none=True)
    model.set_dropout(saved)
    return untouched and drew


def measure_sampling(model: GPT, device: torch.device, n_tokens: int, seed: int, repeats: int,
                     compile: bool = False) -> dict[str, Any]:
    """Tokens/s of ``generate`` with and without the KV cache (batch 1), and whether the tokens agree.

    Three ways: no cache (the whole context every step), the KV cache stepped eagerly, and, with
    ``compile``, the KV cache through the compiled decode step (CUDA graphs on a GPU). The reported
    KV-cache speed is the compiled one when ``compile`` (if compiling fails, the error is recorded and the
    eager cache is reported). Each run starts from the same
    one-token prompt with a generator seeded alike, so all draw the same random numbers; ``n_tokens``
    must keep the sequence within ``block_size``.
    """
    assert n_tokens + 1 <= model.config.block_size
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    ways = {"no_cache": dict(use_kv_cache=False), "kv_cache_eager": dict(use_kv_cache=True)}
    if compile:
        ways["kv_cache_compiled"] = dict(use_kv_cache=True, compile=True)
    out: dict[str, torch.Tensor] = {}
    rate: dict[str, float] = {}
    compile_error = None
    for name, kwargs in ways.items():
        try:
            # warm-up at the timed length: compiles, records CUDA graphs, grows the allocator
            model.generate(prompt, n_tokens, **kwargs)
        except Exception as e:  # a failing compile must not cost the rest of a GPU session's results
            if name != "kv_cache_compiled":
                raise
            compile_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            continue
        times = []
        for _ in range(repeats):
            gen = torch.Generator(device=device).manual_seed(seed)
            sync(device)
            t0 = time.perf_counter()
            out[name] = model.generate(prompt, n_tokens, generator=gen, **kwargs)
            sync(device)
            times.append(time.perf_counter() - t0)
        rate[name] = n_tokens / statistics.median(times)
    cached = "kv_cache_compiled" if "kv_cache_compiled" in rate else "kv_cache_eager"
    differ = torch.stack([out[name] != out["no_cache"] for name in out]).any(0).flatten().nonzero()
    return {"tokens": n_tokens, "repeats": repeats, "kv_cache_tokens_per_s": rate[cached],
            "no_cache_tokens_per_s": rate["no_cache"], "ratio": rate[cached] / rate["no_cache"],
            "kv_cache_eager_tokens_per_s": rate["kv_cache_eager"], "kv_cache_compiled": cached == "kv_cache_compiled",
            "compile_error": compile_error, "dtype": "float32", "identical": bool(len(differ) == 0),
            "first_mismatch": int(differ[0]) - prompt.size(1) if len(differ) else None}


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): context for CPU timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal non-negative integers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class Timings(NamedTuple):
    """What one side measured: per-iteration times (ms), evaluation passes (ms) and its warm-up (s)."""

    iter_ms: list[float]
    eval_ms: list[float]
    warmup_s: float


def time_both(trainer: Trainer, ref: ReferenceLoop, s: BenchSettings, block: int,
              log: Callable[[str], None]) -> tuple[Timings, Timings]:
    """Warm both loops up, then time training in alternating rounds and evaluation passes in turn."""
    log(f"warm-up: ours (compile={trainer.use_compile}) and reference, {s.untimed_iters} iterations each")
    t0 = time.perf_counter()
    trainer.control()  # a non-zero rate before the first step: the graph that is timed is the one compiled
    trainer.evaluate()
    trainer.advance(s.untimed_iters)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref.train(1, s.untimed_iters)
    ref_warmup_s = time.perf_counter() - t0
    ours_ms: list[float] = []
    ref_ms: list[float] = []
    rounds = zip(_split(math.ceil(s.iters / block), s.rounds), _split(math.ceil(s.ref_iters / block), s.rounds))
    for r, (n_ours, n_ref) in enumerate(rounds):
        log(f"round {r + 1}/{s.rounds}: ours {n_ours * block} iterations, reference {n_ref * block}")
        ours_ms += time_ours_blocks(trainer, n_ours, block)
        ref_ms += ref.train(n_ref, block)
    log(f"evaluation: ours {s.eval_passes} passes, reference {s.ref_eval_passes}")
    ours_eval, ref_eval = [], []
    for i in range(max(s.eval_passes, s.ref_eval_passes)):
        if i < s.eval_passes:
            ours_eval.append(time_ours_eval(trainer))
        if i < s.ref_eval_passes:
            ref_eval.append(ref.evaluate())
    return Timings(ours_ms, ours_eval, warmup_s), Timings(ref_ms, ref_eval, ref_warmup_s)


def eval_merge_sweep(trainer: Trainer, s: BenchSettings, log: Callable[[str], None]) -> dict[str, float]:
    """Median ms of an evaluation pass of ours at each ``eval_merge`` of the sweep (each shape compiles untimed)."""
    by_merge = {}
    for k in s.eval_merge_sweep:
        log(f"evaluation with {k} batch(es) per pass: {s.eval_passes} timed passes")
        trainer.evaluate(k)  # compiles this batch shape
        by_merge[str(k)] = float(statistics.median(time_ours_eval(trainer, k) for _ in range(s.eval_passes)))
    return by_merge


def side_result(cfg: TrainConfig, t: Timings) -> dict[str, Any]:
    """One side's figures: per-iteration statistics, the median evaluation pass, the projected protocol time
    (``max_iters`` at the mean ms/iter plus every evaluation at the mean pass), throughput, and the raw times."""
    d: dict[str, Any] = summarize(t.iter_ms)
    d["eval_pass_ms"] = float(statistics.median(t.eval_ms))
    d["protocol_s"] = (cfg.max_iters * d["ms_per_iter_mean"] + protocol_evaluations(cfg) * statistics.fmean(t.eval_ms)) / 1e3
    d["train_tokens_per_s"] = cfg.batch_size * cfg.block_size * len(t.iter_ms) / (sum(t.iter_ms) / 1e3)
    d["timed_iters"], d["timed_eval_passes"] = len(t.iter_ms), len(t.eval_ms)
    d.update(warmup_s=t.warmup_s, iter_ms=list(t.iter_ms), eval_ms=list(t.eval_ms))
    return d


RATIO_KEYS = ("ms_per_iter_median", "ms_per_iter_p10", "ms_per_iter_p90", "ms_per_iter_mean", "eval_pass_ms",
              "protocol_s", "train_tokens_per_s")


def run_benchmark(cfg: TrainConfig, settings: BenchSettings, data: CharData | None = None,
                  log: Callable[[str], None] = lambda _: None,
                  rates: tuple[float, float] = (0.1, 0.2)) -> dict[str, Any]:
    """Measure ours and the reference on ``cfg``'s device; returns the JSON-ready result.

    :param cfg: the preset's settings (``device``, ``dtype``, ``compile`` as a run would resolve them).
    :param settings: how much to measure.
    :param data: the corpus on ``cfg``'s device (loaded from ``cfg.data`` if omitted).
    :param log: progress messages (the command line prints them).
    :param rates: the two dropout rates alternated at every control step (see :class:`AlternatingRate`).
    """
    s = settings
    load_before = _load_average()
    controller = AlternatingRate(*rates)
    trainer = Trainer(cfg, controller, data=data)
    device, dtype = trainer.device, trainer.dtype
    block = s.block_iters or (25 if device.type == "cuda" else 1)
    rates = (controller.low, controller.high)
    ref = ReferenceLoop(cfg, trainer.data, device, dtype, trainer.lr_at, rates)
    ours_t, ref_t = time_both(trainer, ref, s, block, log)
    recompiles = trainer.recompiles
    profiled = None
    if s.profile_iters:
        log(f"profiling {math.ceil(s.profile_iters / block) * block} iterations of ours")
        profiled = profile_ours(trainer, math.ceil(s.profile_iters / block), block)
    by_merge = eval_merge_sweep(trainer, s, log)
    log("checks: rate 0 draws no random numbers" + ("; sampling with and without the KV cache" if s.sampling else ""))
    rate0_ok = rate_zero_draws_no_random(ref.model, *ref.get_batch("train"))
    sampling = (measure_sampling(trainer.model, device, min(s.gen_tokens, cfg.block_size - 1), cfg.seed,
                                 s.gen_repeats, compile=trainer.use_compile) if s.sampling else None)
    ours = side_result(cfg, ours_t)
    ours.update(recompiles=recompiles, compile=trainer.use_compile, eval_merge=cfg.eval_merge,
                eval_pass_ms_by_merge=by_merge, attention_dropout=cfg.attention_dropout,
                fused_adamw=bool(trainer.optimizer.defaults.get("fused")), data_on_device=True,
                timing=f"blocks of {block} iteration(s), wall time / iterations; advance() syncs at block ends")
    reference = side_result(cfg, ref_t)
    reference.update(recompiles=None, compile=False, fused_adamw=False, eval_merge=1, eval_pass_ms_by_merge={},
                     attention_dropout=cfg.attention_dropout, data_on_device=False,
                     timing="per iteration (loss.item() syncs every step)")
    return {
        "preset": cfg.preset, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": _load_average()},  # other processes' load (CPU timings)
        "dtype": str(dtype).removeprefix("torch."), "config": asdict(cfg),
        "settings": {**asdict(s), "block_iters": block, "rates": list(rates)},
        "protocol": {"max_iters": cfg.max_iters, "evaluations": protocol_evaluations(cfg), "projected": True,
                     "formula": "max_iters * mean ms/iter + evaluations * mean eval pass ms (warm-up excluded)"},
        "ours": ours, "reference": reference, "ratio": {k: ours[k] / reference[k] for k in RATIO_KEYS},
        "rate0_draws_no_random": rate0_ok, "sampling": sampling, "profile": profiled,
    }


# -- the table ---------------------------------------------------------------------------------------
_ROWS = (  # key, label, format
    ("ms_per_iter_median", "train ms/iter, median", "{:.2f}"),
    ("ms_per_iter_p10", "train ms/iter, p10", "{:.2f}"),
    ("ms_per_iter_p90", "train ms/iter, p90", "{:.2f}"),
    ("ms_per_iter_mean", "train ms/iter, mean", "{:.2f}"),
    ("eval_pass_ms", "eval pass ms (median)", "{:.1f}"),
    ("protocol_s", "protocol s (projected)", "{:.1f}"),
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
)


def _fmt_load(load: dict[str, float | None]) -> str:
    return "/".join("n/a" if v is None else f"{v:.2f}" for v in (load["before"], load["after"]))


def format_table(result: dict[str, Any]) -> str:
    """The result as a fixed-width text table: one row per metric, ours | reference | ours/ref."""
    o, r, q = result["ours"], result["reference"], result["ratio"]
    lines = [f"{result['preset']} preset on {result['device_name']} ({result['device']}, torch {result['torch']}, "
             f"{result['dtype']}, {result['cpu_threads']} CPU threads), {result['date_utc']} UTC",
             f"protocol: {result['protocol']['max_iters']} iterations + {result['protocol']['evaluations']} "
             f"evaluations of {result['config']['eval_iters']} batches per split (projected, warm-up excluded); "
             f"dropout alternating {'/'.join(str(r) for r in result['settings']['rates'])} every "
             f"{result['settings']['block_iters']} iteration(s); attention dropout {result['config']['attention_dropout']}",
             f"load average (1 min) before/after: {_fmt_load(result['load_average_1min'])} (before = other processes; "
             "well above 0 on a small CPU machine, they distort these timings)",
             f"{'metric':<26}{'ours':>14}{'reference':>14}{'ours/ref':>10}"]
    for key, label, fmt in _ROWS:
        lines.append(f"{label:<26}{fmt.format(o[key]):>14}{fmt.format(r[key]):>14}{q[key]:>10.2f}")
    lines.append(f"{'warm-up s (compile)':<26}{o['warmup_s']:>14.1f}{r['warmup_s']:>14.1f}")
    lines.append(f"{'recompiles after warm-up':<26}{o['recompiles']:>14d}{'-':>14}")
    lines.append(f"{'eval batches per pass':<26}{o['eval_merge']:>14d}{r['eval_merge']:>14d}")
    if o["eval_pass_ms_by_merge"]:
        lines.append("eval pass ms by batches per pass: " + ", ".join(
            f"{k}: {v:.1f}" for k, v in o["eval_pass_ms_by_merge"].items()))
    lines.append(f"{'timed iters / eval passes':<26}{str(o['timed_iters']) + ' / ' + str(o['timed_eval_passes']):>14}"
                 f"{str(r['timed_iters']) + ' / ' + str(r['timed_eval_passes']):>14}")
    sm = result["sampling"]
    if sm is None:
        lines.append("sampling: not measured (--no-sampling)")
    else:
        same = "yes" if sm["identical"] else f"NO (first differs at {sm['first_mismatch']})"
        if sm["compile_error"]:
            lines.append(f"compiled decode step FAILED, eager cache reported instead: {sm['compile_error']}")
        lines.append(f"sampling {sm['tokens']} tokens (batch 1, float32, median of {sm['repeats']}): KV cache "
                     f"{'(compiled decode step) ' if sm['kv_cache_compiled'] else ''}"
                     f"{sm['kv_cache_tokens_per_s']:,.0f} tok/s (eager {sm['kv_cache_eager_tokens_per_s']:,.0f}), "
                     f"no cache {sm['no_cache_tokens_per_s']:,.0f} tok/s, ratio {sm['ratio']:.2f}, identical tokens: {same}")
    prof = result["profile"]
    if prof is not None:
        busy = prof["device_busy_share"]
        lines.append(f"profile of ours, {prof['iters']} iterations in {prof['wall_ms']:.0f} ms under the profiler"
                     + (f"; the GPU was busy {busy:.0%} of that time" if busy is not None else "") + ":")
        lines.append(prof["table"].rstrip())
    lines.append(f"rate 0 draws no random numbers (eager model): {'yes' if result['rate0_draws_no_random'] else 'NO'}")
    lines.append(f"timing: ours {o['timing']}; reference {r['timing']}")
    return "\n".join(lines)
