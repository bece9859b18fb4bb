"""Measure our trainer against a plain reference loop, in one process on this machine.

    python -m runs.bench                                   # cpu preset on CPU, paper preset on a GPU
    python -m runs.bench --preset paper --ref-iters 300 --json out/bench_paper.json
    python -m runs.bench --preset tiny --iters 20 --ref-iters 20 --eval-passes 1

Prints a table (ms per iteration, one evaluation pass, the projected protocol time, tokens/s, recompiles,
ours/reference) and the sampling check (KV cache vs none), and writes the numbers as JSON with ``--json``.
Every training setting (``--batch-size``, ``--compile``, ``--dtype``, ...) overrides the preset, as in
``runs.train``. The logic lives in ``bench/speed.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from bench.speed import BenchSettings, format_table, run_benchmark
from dyndrop import UserError, json_safe
from dyndrop.folders import check_output_file
from runs.cli import Parser, add_config_args, add_threads_arg, config_from_args, run_cli, set_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="auto", help="paper, cpu, cpu-overfit, tiny, or auto (paper on CUDA, else cpu)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed training iterations of ours; default 300 (CPU) or 500 (CUDA)")
    p.add_argument("--ref-iters", type=int, default=None, help="timed training iterations of the reference; default --iters")
    p.add_argument("--eval-passes", type=int, default=2, help="timed evaluation passes of ours")
    p.add_argument("--ref-eval-passes", type=int, default=None, help="timed evaluation passes of the reference; default --eval-passes")
    p.add_argument("--untimed-iters", type=int, default=10, help="untimed iterations of each loop first (ours compiles)")
    p.add_argument("--block-iters", type=int, default=0,
                   help="iterations per timed block of ours and per rate change; 0 = 1 on CPU, 25 on CUDA")
    p.add_argument("--rounds", type=int, default=2, help="training alternates ours/reference this many times")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generation runs per mode (median reported)")
    p.add_argument("--rates", default="0.1,0.2", metavar="LOW,HIGH",
                   help="dropout rates alternated at every control step; 0,0 = no dropout (fused attention)")
    p.add_argument("--profile-iters", type=int, default=0,
                   help="also run this many iterations of ours under torch.profiler and print the top operations")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling measurement (KV cache vs none)")
    p.add_argument("--eval-merge-sweep", default="", metavar="K,K,...",
                   help="also time evaluation passes at each of these batches-per-pass values")
    add_threads_arg(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write the result here")
    g = p.add_argument_group("population", "--population K measures the population trainer instead (bench/population.py)")
    g.add_argument("--population", type=int, default=0, metavar="K",
                   help="env steps/s of K episodes as one batched model vs a DummyVecEnv of K single envs, and "
                        "comparison trials/hour of --executor population vs local; 0 = the trainer benchmark")
    g.add_argument("--episode", default="overfit", help="the episode configuration (envs.EPISODES) the envs run")
    g.add_argument("--episodes", type=int, default=2, help="whole episodes per env on each side")
    g.add_argument("--compare-args", default=POPULATION_COMPARE, metavar="ARGS",
                   help="the small comparison run both ways ('' = skip it)")
    add_config_args(p, skip=("preset", "out", "checkpoint", "progress", "wandb", "wandb_project", "wandb_group"))
    return p.parse_args(argv)


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} must be whole numbers separated by commas; got {text!r}") from None


POPULATION_COMPARE = "--preset tiny --controllers constant@0,0.1,linear,pid --seeds 2 --max-iters 160 --eval-interval 16"


def population_main(args: argparse.Namespace) -> int:
    """``--population K``: the population benchmark (bench/population.py)."""
    import os
    import shlex

    from bench.population import format_population, run_population_benchmark

    if args.population < 1 or args.episodes < 1:
        raise UserError(f"--population {args.population} and --episodes {args.episodes} must be at least 1")
    threads = args.threads or os.cpu_count() or 1
    compare = None
    if args.compare_args.strip():  # the comparison's options, read as runs.compare reads them
        from controllers import parse_controllers
        from runs.compare import parse_args as compare_args, parse_seeds

        c = compare_args(shlex.split(args.compare_args))
        c.progress, c.wandb, c.checkpoint = False, "disabled", False
        cfg = config_from_args(c, c.preset)
        compare = (cfg, parse_controllers(c.controllers), parse_seeds(c.seeds, cfg.seed))
    if args.json:
        check_output_file(args.json, "--json")
    result = run_population_benchmark(args.population, {"episode": args.episode}, args.episodes, threads, compare,
                                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_population(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(json_safe({"population": result}), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.population:
        set_threads(args.threads)
        return population_main(args)
    cfg = config_from_args(args, args.preset)
    cfg.checkpoint, cfg.progress, cfg.wandb = False, False, "disabled"
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    iters = args.iters if args.iters is not None else (500 if on_cuda else 300)
    settings = BenchSettings(
        iters=iters, ref_iters=args.ref_iters if args.ref_iters is not None else iters,
        eval_passes=args.eval_passes,
        ref_eval_passes=args.ref_eval_passes if args.ref_eval_passes is not None else args.eval_passes,
        untimed_iters=args.untimed_iters, block_iters=args.block_iters, rounds=args.rounds,
        gen_tokens=cfg.gen_tokens or 256, gen_repeats=args.gen_repeats, sampling=not args.no_sampling,
        profile_iters=args.profile_iters,
        eval_merge_sweep=parse_ints(args.eval_merge_sweep, "--eval-merge-sweep"))
    set_threads(args.threads)
    try:
        low, high = (float(r) for r in args.rates.split(","))
    except ValueError:
        raise UserError(f"--rates must be two numbers, LOW,HIGH; got {args.rates!r}") from None
    if args.json:  # fail on a path that cannot be written now, not after minutes of measuring
        check_output_file(args.json, "--json")
    result = run_benchmark(cfg, settings, log=lambda msg: print(msg, file=sys.stderr, flush=True), rates=(low, high))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(math.isfinite(v) for v in result["ratio"].values()) else 1


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
