"""The population trainer against K separate runs, measured side by side in one process.

- **env**: env steps per second of :class:`~envs.population_env.PopulationVecEnv` (K episodes as one batched
  model) against SB3's ``DummyVecEnv`` of K single :class:`~envs.dropout_env.DropoutEnv` (how PPO trained
  before), on the same episode configuration, with the same fixed random actions. Each side runs whole
  episodes; construction and the first reset are not timed.
- **arithmetic**: what an env step computes (FLOPs of its training steps and its evaluation, counted from the
  model's shape), so each side's achieved FLOP/s can be set against the machine's measured matmul peak at the
  same thread count: a single run that is already near the peak leaves a population little to gain on a CPU.
- **compare**: comparison trials per hour of ``runs.compare --executor population`` against today's
  ``--executor local`` (one trial after another), on the same small comparison.

:func:`run_population_benchmark` returns one plain dict (``runs.bench --population K --json PATH`` writes it
under ``population``).
"""
from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gpt.config import TrainConfig


def train_flops_per_token(cfg: TrainConfig, vocab_size: int) -> float:
    """Forward + backward FLOPs per token: 6 per weight (two for the forward's multiply-add, four for the
    backward's), and attention's scores and weighted sum, 12 * layers * context * width (Kaplan et al. 2020's
    count with the head tied to the embedding)."""
    weights = 12 * cfg.n_layer * cfg.n_embd ** 2 + vocab_size * cfg.n_embd  # blocks, and the tied head
    return 6 * weights + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def env_step_flops(cfg: TrainConfig, vocab_size: int, interval: int) -> float:
    """FLOPs of one env step: ``interval`` training steps and one evaluation (a forward over ``eval_iters``
    batches of each split, a third of a training step's work per token)."""
    per_token = train_flops_per_token(cfg, vocab_size)
    tokens = cfg.batch_size * cfg.block_size
    return interval * tokens * per_token + 2 * cfg.eval_iters * tokens * per_token / 3


def matmul_peak_gflops(threads: int, size: int = 1024, repeats: int = 10) -> float:
    """The machine's float32 matmul rate at ``threads`` torch threads (best of ``repeats``), GFLOP/s."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = min(_time(lambda: a @ b) for _ in range(repeats))
    finally:
        torch.set_num_threads(old)
    return 2 * size ** 3 / best / 1e9


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_env_steps(venv: Any, actions: np.ndarray) -> float:
    """Seconds to take every step of ``actions`` ((steps, K, n_actions)) after an untimed reset."""
    venv.reset()
    t0 = time.perf_counter()
    for a in actions:
        venv.step(a)
    return time.perf_counter() - t0


def env_speed(k: int, env_kwargs: dict[str, Any], episodes: int, threads: int, seed: int = 0) -> dict[str, Any]:
    """Env steps per second of the population env (at ``threads`` torch threads) and of a DummyVecEnv of ``k``
    single envs (one thread, as the env sets it), each over ``episodes`` whole episodes per env."""
    from envs import DropoutEnv
    from envs.policy_training import make_vec_env

    template = DropoutEnv(**env_kwargs)
    steps = episodes * -(-template.max_iters // template.interval)
    actions = np.random.default_rng(seed).uniform(-1, 1, (steps, k, *template.action_space.shape)).astype(np.float32)
    single = make_vec_env(k, env_kwargs, seed, kind="dummy")
    single_s = time_env_steps(single, actions)
    population = make_vec_env(k, env_kwargs, seed, kind="population", threads=threads)
    population_s = time_env_steps(population, actions)
    torch.set_num_threads(threads)  # the single envs set one thread for this process
    cfg = template.base_config
    flops = env_step_flops(cfg, template.data.vocab_size, template.interval) * steps * k
    return {"k": k, "env_steps": steps * k, "episodes_per_env": episodes,
            "single": {"kind": "DummyVecEnv", "threads": 1, "seconds": single_s, "steps_per_s": steps * k / single_s,
                       "gflops_per_s": flops / single_s / 1e9},
            "population": {"kind": "PopulationVecEnv", "threads": threads, "seconds": population_s,
                           "steps_per_s": steps * k / population_s, "gflops_per_s": flops / population_s / 1e9},
            "speedup": single_s / population_s,
            "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
                      "batch_size": cfg.batch_size, "interval": template.interval, "eval_iters": cfg.eval_iters,
                      "train_flops_per_token": train_flops_per_token(cfg, template.data.vocab_size)}}


def compare_speed(k: int, cfg: TrainConfig, specs: list[str], seeds: list[int], threads: int) -> dict[str, Any]:
    """Trials per hour of one small comparison run twice into scratch folders: ``local`` (one trial after
    another) and ``population`` (``k`` trials at a time as one batched model)."""
    from experiments.comparison import Comparison

    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        for executor in ("local", "population"):
            comparison = Comparison(cfg=cfg, specs=specs, seeds=seeds, out=Path(tmp, executor), executor=executor,
                                    population=k, threads=threads, warm_up=False)
            seconds = _time(comparison.run)
            trials = len(comparison.trials)
            sides[executor] = {"seconds": seconds, "trials": trials, "trials_per_hour": trials / seconds * 3600}
    return {**sides, "preset": cfg.preset, "max_iters": cfg.max_iters, "specs": specs, "seeds": seeds,
            "speedup": sides["local"]["seconds"] / sides["population"]["seconds"]}


def run_population_benchmark(k: int, env_kwargs: dict[str, Any], episodes: int, threads: int,
                             compare: tuple[TrainConfig, list[str], list[int]] | None = None,
                             log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Everything above, as the JSON ``runs.bench --population`` writes."""
    log(f"env steps: PopulationVecEnv vs DummyVecEnv of {k} single envs, {episodes} episodes each")
    env = env_speed(k, env_kwargs, episodes, threads)
    log(f"matmul peak at 1 and {threads} thread(s)")
    peaks = {str(t): matmul_peak_gflops(t) for t in sorted({1, threads})}
    result: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": "cpu", "torch": torch.__version__, "threads": threads, "env": env,
        "matmul_peak_gflops": peaks, "env_speedup": env["speedup"],
        "peak_share": {"single": env["single"]["gflops_per_s"] / peaks["1"],
                       "population": env["population"]["gflops_per_s"] / peaks[str(threads)]},
    }
    if compare is not None:
        cfg, specs, seeds = compare
        log(f"comparison trials per hour: local vs population ({cfg.preset}, {len(specs)} controllers x {len(seeds)} seeds)")
        result["compare"] = compare_speed(k, cfg, specs, seeds, threads)
        result["compare_speedup"] = result["compare"]["speedup"]
    return result


def format_population(result: dict[str, Any]) -> str:
    env, peak = result["env"], result["matmul_peak_gflops"]
    m = env["model"]
    lines = [f"population of {env['k']} on CPU, torch {result['torch']}, {result['date_utc']} UTC; episode model "
             f"{m['n_layer']}x{m['n_embd']}, block {m['block_size']}, batch {m['batch_size']}, {m['interval']} steps "
             f"per env step, {m['eval_iters']} eval batches",
             f"{'':<34}{'env steps/s':>12}{'GFLOP/s':>10}{'of peak':>9}"]
    for name in ("single", "population"):
        side = env[name]
        share = result["peak_share"][name]
        lines.append(f"{side['kind'] + ' (' + str(side['threads']) + ' thread(s))':<34}{side['steps_per_s']:>12.2f}"
                     f"{side['gflops_per_s']:>10.1f}{share:>9.0%}")
    lines.append(f"env speed-up: {result['env_speedup']:.2f}x; matmul peak " +
                 ", ".join(f"{v:.0f} GFLOP/s at {t} thread(s)" for t, v in peak.items()))
    if "compare" in result:
        c = result["compare"]
        lines.append(f"comparison: local {c['local']['trials_per_hour']:.0f} trials/h, population "
                     f"{c['population']['trials_per_hour']:.0f} trials/h: {result['compare_speedup']:.2f}x")
    return "\n".join(lines)

