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
from runs.cli import Parser, add_config_args, add_threads_arg, config_from_args, run_cli, set_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="auto", help="paper, cpu, tiny, or auto (paper on CUDA, else cpu)")
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
    add_config_args(p, skip=("preset", "out", "checkpoint", "progress", "wandb", "wandb_project", "wandb_group"))
    return p.parse_args(argv)


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} must be whole numbers separated by commas; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    if args.json:  # fail on an unwritable path now, not after minutes of measuring
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder for --json {args.json}: {e}") from None
    try:
        low, high = (float(r) for r in args.rates.split(","))
    except ValueError:
        raise UserError(f"--rates must be two numbers, LOW,HIGH; got {args.rates!r}") from None
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
