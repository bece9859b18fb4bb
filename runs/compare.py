"""Compare dropout controllers: every controller × seed, then a table with confidence intervals and tests.

    python -m runs.compare --preset cpu --controllers constant@0,0.1,0.2,linear,exponential,val_loss,pid --seeds 3
    python -m runs.compare --preset paper --controllers constant@0,0.1,0.2,0.3,pid --seeds 3 --jobs 2
    python -m runs.compare --preset tiny --controllers constant@0,0.1,ppo --policy policies/ppo/policy.safetensors
    python -m runs.compare --preset cpu-overfit --controllers constant@0,0.1,0.2,0.3,0.4,pid,pbt:population=4 --jobs 2

Writes ``--out``/trials/<controller>-s<seed>/ (one training run each) and ``results.{md,csv,json}``;
rerunning the same command skips finished trials, so an interrupted comparison resumes. Then
``python -m runs.report DIR`` draws the figures. Settings (``--max-iters`` ...) override the preset for
every trial; ``--help`` lists them.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from controllers import parse_controllers, spec_name, with_policy
from dyndrop import UserError
from dyndrop.folders import FolderLock, holds_comparison, holds_run
from experiments.comparison import EXECUTORS, Comparison
from experiments.pbt import PBT, check_ray_tune, is_pbt, pbt_settings
from experiments.tables import aggregate, log_table_to_wandb, markdown_table, write_tables
from experiments.trials import check_inputs
from runs.cli import Parser, add_config_args, add_policy_arg, config_from_args, interrupt_status, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.compare", description=__doc__.split("\n")[0])
    p.add_argument("--controllers", nargs="+", required=True,
                   help="comma-separated controller specs; NAME@V1,V2 sweeps the first parameter "
                        "(constant@0,0.1,0.2 = constant:rate=0, constant:rate=0.1, ...); pbt:population=K adds "
                        "Population Based Training of the rate on Ray Tune (K runs of compute) as a row")
    p.add_argument("--seeds", default="3",
                   help="number of seeds (--seed, --seed+1, ...; at most 100) or a comma-separated list of seeds "
                        "(one seed: --seeds 1337,)")
    p.add_argument("--preset", default="auto", help="paper, cpu, cpu-overfit, tiny, or auto (paper on CUDA, else cpu)")
    p.add_argument("--out", default=None, help="the comparison's folder; default results/<preset>")
    p.add_argument("--name", default="", help="comparison name, also the wandb group compare-<name>; "
                                              "default the --out folder's name")
    p.add_argument("--executor", default="local", choices=list(EXECUTORS),
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in EXECUTORS.items()))
    p.add_argument("--population", type=int, default=8, help="with --executor population: trials per population")
    p.add_argument("--address", default=None, help="with --executor ray: the cluster, auto or HOST:PORT; "
                                                   "default a local Ray instance started for the comparison")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="with --executor ray: CPUs per trial's task")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="with --executor ray: GPUs per trial's task; fractions share a GPU (0.25 = four a GPU)")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once, each in a worker process "
                                                       "(several per GPU is faster for small models)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per trial; default all cores / --jobs")
    add_policy_arg(p)
    p.add_argument("--target", type=float, default=None,
                   help="a val loss: adds iterations and seconds to reach it, per seed and paired against the "
                        "baseline; default none (no time-to-target columns)")
    p.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="before its first trial, each process trains an untimed 2-step run, so compile and "
                        "CUDA start-up do not count against the first controller's time")
    p.add_argument("--baseline", default=None, help="controller spec of the baseline row; default the constant rate "
                                                     "with the lowest mean val loss")
    add_config_args(p, skip=("preset", "out"))
    return p.parse_args(argv)


MAX_SEED_COUNT = 100


def parse_seeds(text: str, first: int) -> list[int]:
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise UserError(f"--seeds must be a count or a comma-separated list of integers, not {text!r}") from None
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}")
    if n > MAX_SEED_COUNT:  # almost always a seed meant as a list of one
        raise UserError(f"--seeds {n} asks for {n} seeds (a count); for the one seed {n} write --seeds {n},")
    return [first + i for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = False  # trials restart from scratch when interrupted; checkpoints only cost time
    cfg = config_from_args(args, args.preset)
    specs = parse_controllers(args.controllers, rows=(PBT,))
    if args.policy is not None and not any(spec_name(s) == "ppo" for s in specs):
        raise UserError("--policy is only used with the ppo controller, which is not in --controllers")
    specs = [with_policy(s, args.policy) for s in specs]
    check_inputs(cfg, [s for s in specs if not is_pbt(s)])  # every controller and the data, before any folder is written
    if any(is_pbt(s) for s in specs):
        for spec in filter(is_pbt, specs):
            pbt_settings(spec)
        check_ray_tune()
    comparison = Comparison(cfg=cfg, specs=specs, seeds=parse_seeds(args.seeds, cfg.seed),
                            out=Path(args.out or f"results/{cfg.preset}"), name=args.name,
                            executor=args.executor, jobs=args.jobs, population=args.population, address=args.address,
                            cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, threads=args.threads, target=args.target, baseline=args.baseline, warm_up=args.warm_up)
    comparison.preflight()  # every path, before anything is written
    if holds_run(comparison.out) and not holds_comparison(comparison.out):
        raise UserError(f"{comparison.out} holds a single run (runs.train, runs.pbt), not a comparison; choose "
                        "another --out")
    with ray_preflight(comparison), FolderLock(comparison.out, "comparison"):
        return run_comparison(comparison, cfg.progress)


def ray_preflight(comparison: Comparison):
    """With ``--executor ray``: the cluster reached and its nodes checked against the trials' resource request
    before anything is written (:func:`experiments.ray_executor.ray_cluster`), the connection kept for the run."""
    if comparison.executor != "ray":
        return nullcontext()
    from experiments.ray_executor import ray_cluster

    return ray_cluster(comparison.address, comparison.cpus_per_trial, comparison.gpus_per_trial)


def run_comparison(comparison: Comparison, progress: bool) -> int:
    """Run the pending trials with a progress bar, then write and print the table."""
    pending = comparison.pending()
    total = len(comparison.trials)
    print(f"{comparison.name}: {len(comparison.specs)} controllers × {len(comparison.seeds)} seeds = {total} trials, "
          f"{total - len(pending)} already finished; preset {comparison.cfg.preset}, {comparison.cfg.max_iters} "
          f"iterations, {comparison.runner.describe()}, out {comparison.out}, wandb group {comparison.group}")

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - len(pending), desc="trials", unit="trial", dynamic_ncols=True,
               disable=not progress)

    def on_done(trial, summary):
        best = summary.get("best_val_loss")
        bar.set_postfix_str(f"{trial.run_name}: " + (f"best val {best:.4f}" if best is not None else "diverged"))
        bar.update(1)

    steps = None
    populations = [t for t in pending if is_pbt(t.spec)]
    iters = sum(pbt_settings(t.spec).population for t in populations) * comparison.cfg.max_iters
    iters += comparison.runner.batched_iterations(len(pending) - len(populations))
    if iters:  # a second bar: the iterations of populations (batched, or PBT's)
        steps = tqdm(total=iters, desc="iterations", unit="it", dynamic_ncols=True, disable=not progress)
    try:
        comparison.run(on_done, bar=steps)
    except KeyboardInterrupt as e:
        bar.close()
        print("\ninterrupted; rerun the same command to continue (finished trials are kept)", file=sys.stderr)
        return interrupt_status(e)
    bar.close()
    if steps is not None:
        steps.close()
    table = aggregate(comparison)
    paths = write_tables(table, comparison.out)
    log_table_to_wandb(comparison, table)
    print(markdown_table(table))
    print(f"tables: {', '.join(str(p) for p in paths.values())}; figures: python -m runs.report {comparison.out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
