"""Compare a PPO policy with fixed schedules on the env's held-out seeds: the comparison's statistics.

    python -m runs.eval_policy --policy policies/ppo/policy.safetensors
    python -m runs.eval_policy --controller ppo:policy=policies/ppo/policy.safetensors --max-iters 480

Every controller trains the same config (the policy's preset, episode length, interval and overrides,
from its metadata) on the same seeds, so the only difference is the dropout rate it sets. The table
gives each controller's mean best val loss with its 95 % t-interval, and the paired difference to the
best fixed schedule with a paired t-test, computed by ``experiments.stats`` as in ``runs.compare``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from controllers import make_controller, spec_name, spec_policy, with_policy
from controllers.policy_file import read_metadata
from dyndrop import UserError, write_json
from experiments.stats import CONFIDENCE, TEST, mean_ci, paired_test
from gpt.config import MAX_SEED
from runs.cli import Parser, add_policy_arg, add_threads_arg, run_cli, set_threads

BASELINES = ("constant:rate=0.0", "constant:rate=0.1", "constant:rate=0.2", "linear", "exponential", "val_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.eval_policy", description=__doc__.split("\n")[0])
    p.add_argument("--controller", default="ppo", help="the ppo controller's spec, e.g. ppo:policy=PATH")
    add_policy_arg(p)
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="controller specs to compare with")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="training seeds; default: the env's held-out seeds")
    p.add_argument("--max-iters", type=int, default=None, help="run length; default: the policy's episode length")
    add_threads_arg(p, default=1)
    p.add_argument("--out", default=None, help="also write the per-run results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--max-iters {args.max_iters} is invalid: it must be at least 1")
    bad_seeds = [s for s in args.seeds or [] if not 0 <= s <= MAX_SEED]
    if bad_seeds:
        raise UserError(f"--seeds {bad_seeds[0]} is invalid: seeds must be in [0, {MAX_SEED}]")
    if spec_name(args.controller) != "ppo":
        raise UserError(f"--controller must be a ppo spec, not {args.controller!r}")
    spec = with_policy(args.controller, args.policy)
    policy = spec_policy(spec)
    if policy is None:
        raise UserError("give the policy to evaluate: --policy PATH or --controller ppo:policy=PATH")
    meta = read_metadata(policy)
    for s in [spec, *args.baselines]:
        make_controller(s)  # a typo fails before any training

    from envs import episode_config
    from gpt import Diverged, Trainer, shared_data
    from gpt.trainer import resolve_device

    seeds = args.seeds if args.seeds else list(meta["eval_seeds"])
    overlap = set(seeds) & set(meta["train_seeds"])
    if overlap:
        print(f"warning: seeds {sorted(overlap)} were training instances of this policy", file=sys.stderr)
    max_iters = args.max_iters or int(meta["max_iters"])
    interval = int(meta["interval"]) * max_iters // int(meta["max_iters"])  # same number of decisions
    labels = {"ppo": spec, **{s: s for s in args.baselines}}  # the policy's row is labelled ppo
    specs = list(labels)
    results: dict[str, dict[int, float]] = {s: {} for s in specs}
    t0 = time.perf_counter()
    print(f"{meta['preset']} preset, {max_iters} steps, control every {interval}, seeds {seeds}")
    for seed in seeds:
        cfg = episode_config(meta["preset"], max_iters, interval, seed=seed, **meta.get("config", {}))
        data = shared_data(cfg.data, resolve_device(cfg.device))
        for s in specs:
            try:
                results[s][seed] = Trainer(cfg, make_controller(labels[s]), data=data).train()["best_val_loss"]
            except Diverged:
                results[s][seed] = math.nan
        print(f"  seed {seed}: " + ", ".join(f"{s}={results[s][seed]:.4f}" for s in specs), flush=True)

    means = {s: mean_ci(list(results[s].values())) for s in specs}
    best_fixed = min(args.baselines, key=lambda s: means[s][0]) if args.baselines else None
    width = max(len(s) for s in specs)
    print(f"\n{'controller':<{width}}  best val loss: mean [{CONFIDENCE:.0%} t-interval] over {len(seeds)} seeds"
          + (f"; Δ vs {best_fixed} (best fixed), {TEST}" if best_fixed else ""))
    rows = {}
    for s in sorted(specs, key=lambda s: means[s][0]):
        mean, low, high = means[s]
        line = f"{s:<{width}}  {mean:.4f} [{low:.4f}, {high:.4f}]"
        if best_fixed and s != best_fixed:
            test = paired_test(results[s], results[best_fixed])
            wins = sum(results[s][k] < results[best_fixed][k] for k in seeds)
            line += (f"  Δ {test['delta']:+.4f} [{test['delta_low']:+.4f}, {test['delta_high']:+.4f}], "
                     f"p {test['p']:.3f}, better on {wins}/{len(seeds)} seeds")
            rows[s] = test
        print(line)
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        write_json(Path(args.out), {"seeds": seeds, "max_iters": max_iters, "interval": interval, "controller": spec,
                                    "best_fixed": best_fixed, "best_val_loss": results,
                                    "paired_vs_best_fixed": rows})
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
