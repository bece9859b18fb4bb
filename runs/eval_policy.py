"""Compare a PPO policy with fixed schedules on the env's held-out seeds: mean ± std of best val loss.

    python -m runs.eval_policy --policy policies/ppo_tiny/policy.zip
    python -m runs.eval_policy --policy policies/ppo_tiny/policy.zip --max-iters 480   # longer runs than trained on

Every controller trains the same config (the policy's preset, episode length, interval and overrides,
from its metadata) on the same seeds, so the only difference is the dropout rate it sets.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from controllers import UserError, make_controller
from controllers.ppo import read_metadata
from runs.common import run_cli

BASELINES = ("constant:rate=0.0", "constant:rate=0.1", "constant:rate=0.2", "linear", "exponential", "val_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runs.eval_policy", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="policy .zip saved by runs.train_policy")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), help="controller specs to compare with")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="training seeds; default: the env's held-out seeds")
    p.add_argument("--max-iters", type=int, default=None, help="run length; default: the policy's episode length")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared CPUs)")
    p.add_argument("--out", default=None, help="also write the per-run results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = read_metadata(args.policy)
    import numpy as np
    import torch

    from envs import episode_config, shared_data
    from gpt import Diverged, Trainer

    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds else list(meta["eval_seeds"])
    overlap = set(seeds) & set(meta["train_seeds"])
    if overlap:
        print(f"warning: seeds {sorted(overlap)} were training instances of this policy", file=sys.stderr)
    max_iters = args.max_iters or int(meta["max_iters"])
    interval = int(meta["interval"]) * max_iters // int(meta["max_iters"])  # same number of decisions
    data = shared_data()
    specs = ["ppo"] + list(args.baselines)
    results: dict[str, list[float]] = {s: [] for s in specs}
    t0 = time.perf_counter()
    print(f"{meta['preset']} preset, {max_iters} steps, control every {interval}, seeds {seeds}")
    for seed in seeds:
        for spec in specs:
            controller = make_controller(spec, policy=args.policy) if spec == "ppo" else make_controller(spec)
            cfg = episode_config(meta["preset"], max_iters, interval, seed=seed, **meta.get("config", {}))
            try:
                best = Trainer(cfg, controller, data=data).train()["best_val_loss"]
            except Diverged:
                best = math.nan
            results[spec].append(best)
        print(f"  seed {seed}: " + ", ".join(f"{s}={results[s][-1]:.4f}" for s in specs), flush=True)

    def row(spec: str) -> tuple[float, float]:
        v = np.array(results[spec])
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    best_fixed = min(args.baselines, key=lambda s: row(s)[0]) if args.baselines else None
    width = max(len(s) for s in specs)
    print(f"\n{'controller':<{width}}  best val loss (mean ± std over {len(seeds)} seeds)")
    for spec in sorted(specs, key=lambda s: row(s)[0]):
        mean, std = row(spec)
        print(f"{spec:<{width}}  {mean:.4f} ± {std:.4f}")
    if best_fixed:
        diff = np.array(results["ppo"]) - np.array(results[best_fixed])
        se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        print(f"\nppo - {best_fixed} (best fixed): {diff.mean():+.4f} ± {se:.4f} (paired mean ± s.e.); "
              f"ppo better on {int((diff < 0).sum())}/{len(diff)} seeds; {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": seeds, "max_iters": max_iters, "interval": interval,
                                              "policy": args.policy, "best_val_loss": results}, indent=2))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
