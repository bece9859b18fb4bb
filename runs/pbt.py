"""Population Based Training of the dropout rate (Ray Tune), alone: the ``pbt`` row of a comparison as one run.

    python -m runs.pbt --preset cpu-overfit --population 4 --jobs 2      # a local Ray instance, 2 members at a time
    python -m runs.pbt --preset paper --population 8 --address auto --gpus-per-member 0.25

Writes ``--out`` (default ``out/<preset>-pbt-s<seed>``) as a comparison writes a trial folder: the best
member's lineage in ``metrics.jsonl`` (its ``dropout/rate`` series is the schedule PBT found),
``summary.json`` with ``best_val_loss_full`` and ``compute_iters`` (iterations over all members), and
``pbt_members.json`` (every member's schedule). See :mod:`experiments.pbt` and docs/ray.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from dyndrop import UserError
from dyndrop.folders import FolderLock, check_output_path, holds_comparison, holds_run
from experiments.pbt import PBTSettings, check_ray_tune, pbt_settings, run_pbt_trial
from experiments.ray_executor import check_request, ray_cluster
from experiments.trials import TrialJob, check_inputs
from runs.cli import Parser, add_config_args, config_from_args, interrupt_status, run_cli

DEFAULTS = PBTSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.pbt", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="paper, cpu, cpu-overfit, tiny, or auto (paper on CUDA, else cpu)")
    p.add_argument("--population", type=int, default=DEFAULTS.population, help="members trained at once (2 to 64)")
    p.add_argument("--max-rate", type=float, default=DEFAULTS.max_rate, help="rates are explored in [0, this]; in (0, 1)")
    p.add_argument("--quantile", type=float, default=DEFAULTS.quantile,
                   help="fraction of members that copy a better one at every control interval, (0, 0.5]")
    p.add_argument("--resample", type=float, default=DEFAULTS.resample,
                   help="probability that a copying member draws a fresh rate instead of perturbing its donor's, [0, 1]")
    p.add_argument("--per-layer", action="store_true",
                   help="one rate per layer, each perturbed on its own (default: one rate for every layer)")
    p.add_argument("--jobs", type=int, default=1, help="members trained at the same time on a local Ray instance")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per member; default all cores / --jobs")
    p.add_argument("--address", default=None, help="a Ray cluster (auto or HOST:PORT); default a local instance")
    p.add_argument("--cpus-per-member", type=float, default=1.0, help="with --address: CPUs each member holds, > 0")
    p.add_argument("--gpus-per-member", type=float, default=None,
                   help="GPUs each member holds, >= 0 (fractions share one); default 1/--jobs on CUDA, else 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    add_config_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    options = ("--cpus-per-member", "--gpus-per-member")
    gpus = args.gpus_per_member if args.gpus_per_member is not None else 0.0  # None: 1/--jobs of a GPU on CUDA
    check_request(args.cpus_per_member, gpus, options)
    spec = (f"pbt:population={args.population},max_rate={args.max_rate},quantile={args.quantile},"
            f"resample={args.resample}" + (",per_layer=1" if args.per_layer else ""))
    try:
        pbt_settings(spec)
    except UserError as e:  # name the option, not the spec's key: "pbt: max_rate must..." -> "--max-rate must..."
        key, _, rest = str(e).removeprefix("pbt: ").partition(" ")
        raise UserError(f"--{key.replace('_', '-')} {rest}") from None
    check_ray_tune()
    cfg = config_from_args(args, args.preset)
    out = check_output_path(cfg.out or f"out/{cfg.preset}-pbt-s{cfg.seed}")
    cfg = dataclasses.replace(cfg, out=str(out))
    if holds_comparison(out):
        raise UserError(f"{out} holds a comparison (comparison.json and trials/), not a run; choose another --out")
    check_inputs(cfg, [])
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    job = TrialJob(cfg=cfg, spec=spec, name=out.name, group=cfg.wandb_group or cfg.preset, comparison="",
                   concurrent=args.jobs, threads=threads)
    from tqdm.auto import tqdm

    # the cluster reached and the members' request checked before anything is written (a local instance: this
    # machine's CPUs and GPUs)
    with ray_cluster(args.address, args.cpus_per_member if args.address else 1.0, gpus, options), FolderLock(out, "run"):
        if holds_run(out) and not args.overwrite:
            raise UserError(f"{out} already holds a run; pass --overwrite to replace it, or --out to choose another")
        print(f"PBT of the dropout rate: {args.population} members, {cfg.preset} preset, {cfg.max_iters} iterations "
              f"each, out {out}")
        bar = tqdm(total=args.population * cfg.max_iters, desc="pbt", unit="it", dynamic_ncols=True,
                   disable=not cfg.progress)
        try:
            if args.address:
                summary = run_pbt_trial(job, address=args.address, cpus_per_member=args.cpus_per_member,
                                        gpus_per_member=args.gpus_per_member, bar=bar)
            else:
                summary = run_pbt_trial(job, cpus=args.jobs, gpus_per_member=args.gpus_per_member, bar=bar)
        except KeyboardInterrupt as e:
            print("\ninterrupted; a PBT run cannot resume: rerun it with --overwrite", file=sys.stderr)
            return interrupt_status(e)
        finally:
            bar.close()
    keys = ("best_val_loss", "best_val_loss_full", "best_val_iter", "compute_iters", "exploits", "total_train_time_s")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
