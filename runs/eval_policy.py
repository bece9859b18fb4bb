"""Compare a controller (a PPO policy, PID, ...) with fixed schedules on the env's held-out seeds.

    python -m runs.eval_policy --policy policies/ppo/policy.safetensors
    python -m runs.eval_policy --controller pid --baselines constant@0,0.1,0.2,0.3 --out out/eval_pid.json
    python -m runs.eval_policy --controller ppo:policy=policies/ppo/policy.safetensors --max-iters 480

Every controller trains the same episode config on the same seeds, so the only difference is the dropout
rate it sets: a ppo controller's config is the one its policy was trained on (from its metadata), any
other controller's is the ``--episode`` configuration. Each controller is ranked by its mean
``best_val_loss_full`` (the best weights scored on the whole validation split) with its 95 % t-interval,
and paired with the best fixed schedule by a paired t-test, computed by ``experiments.stats`` as in
``runs.compare``. With ``--out``, every run's result is saved there, and a later call with the same
episode config reuses the runs already in that file (delete it to rerun them).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from controllers import make_controller, parse_controllers, spec_name, spec_policy, with_policy
from controllers.policy_file import read_metadata
from dyndrop import UserError, read_json, write_json
from experiments.stats import CONFIDENCE, TEST, mean_ci, paired_test
from gpt.config import MAX_SEED
from runs.cli import Parser, add_policy_arg, add_threads_arg, run_cli, set_threads

BASELINES = ("constant@0,0.1,0.2,0.3", "linear", "exponential", "val_loss")
LEARNED = ("ppo", "pid")  # controllers that respond to training; every other one is a fixed schedule
METRIC, NOISY = "best_val_loss_full", "best_val_loss"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.eval_policy", description=__doc__.split("\n")[0])
    p.add_argument("--controller", default="ppo", help="the controller under test: a ppo spec (with --policy) "
                                                       "or any other spec, e.g. pid")
    add_policy_arg(p)
    p.add_argument("--baselines", nargs="*", default=list(BASELINES),
                   help="controller specs to compare with (sweeps as in runs.compare: constant@0,0.1)")
    p.add_argument("--episode", default=None, help="named episode configuration for a controller that is not "
                                                   "ppo (envs.EPISODES); default: the env's default")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="training seeds; default: the env's held-out seeds")
    p.add_argument("--max-iters", type=int, default=None, help="run length; default: the episode's length")
    add_threads_arg(p, default=1)
    p.add_argument("--out", default=None, help="write every run's result to this JSON file, and reuse the runs "
                                               "it already holds for the same episode config")
    return p.parse_args(argv)


def episode_setup(spec: str, episode: str | None) -> dict[str, Any]:
    """Preset, length, interval, overrides and seeds of the episodes: a policy's own, else a named one."""
    policy = spec_policy(spec)
    if spec_name(spec) == "ppo":
        if policy is None:
            raise UserError("give the policy to evaluate: --policy PATH or --controller ppo:policy=PATH")
        if episode is not None:
            raise UserError("--episode is for controllers other than ppo: a policy runs the episodes it was "
                            "trained on")
        meta = read_metadata(policy)
        return {k: meta[k] for k in ("preset", "max_iters", "interval", "config", "train_seeds", "eval_seeds")}
    from envs import DEFAULT_EPISODE, EPISODES, EVAL_SEEDS, TRAIN_SEEDS
    name = episode or DEFAULT_EPISODE
    if name not in EPISODES:
        raise UserError(f"--episode {name!r} is unknown; choose one of: {', '.join(EPISODES)}")
    return {**EPISODES[name], "train_seeds": list(TRAIN_SEEDS), "eval_seeds": list(EVAL_SEEDS)}


def saved_runs(path: Path | None, setup: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The runs an earlier call saved in ``path`` for the same episode config (none if it differs)."""
    if path is None or not path.is_file():
        return {}
    saved = read_json(path, "evaluation results")
    if saved.get("setup") != setup:
        return {}
    # a diverged run is saved as null (JSON has no nan)
    return {spec: {seed: {k: math.nan if v is None else float(v) for k, v in r.items()} for seed, r in done.items()}
            for spec, done in saved.get("runs", {}).items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--max-iters {args.max_iters} is invalid: it must be at least 1")
    bad_seeds = [s for s in args.seeds or [] if not 0 <= s <= MAX_SEED]
    if bad_seeds:
        raise UserError(f"--seeds {bad_seeds[0]} is invalid: seeds must be in [0, {MAX_SEED}]")
    spec = with_policy(args.controller, args.policy)
    if args.policy is not None and spec_name(spec) != "ppo":
        raise UserError(f"--policy is for a ppo controller, and --controller is {args.controller!r}")
    episode = episode_setup(spec, args.episode)
    baselines = [b for b in parse_controllers(args.baselines) if b != spec] if args.baselines else []
    for s in [spec, *baselines]:
        make_controller(s)  # a typo fails before any training

    from envs import episode_config
    from gpt import Diverged, Trainer, shared_data
    from gpt.trainer import resolve_device

    seeds = args.seeds if args.seeds else list(episode["eval_seeds"])
    overlap = set(seeds) & set(episode["train_seeds"])
    if overlap and spec_name(spec) == "ppo":
        print(f"warning: seeds {sorted(overlap)} were training instances of this policy", file=sys.stderr)
    max_iters = args.max_iters or int(episode["max_iters"])
    interval = int(episode["interval"]) * max_iters // int(episode["max_iters"])  # same number of decisions
    setup = {"preset": episode["preset"], "max_iters": max_iters, "interval": interval, "config": episode["config"]}
    out = Path(args.out) if args.out else None
    runs = saved_runs(out, setup)
    labels = {("ppo" if spec_name(spec) == "ppo" else spec): spec, **{s: s for s in baselines}}
    specs = list(labels)
    fixed = [s for s in baselines if spec_name(s) not in LEARNED]
    t0 = time.perf_counter()
    print(f"{setup['preset']} preset, {max_iters} steps, control every {interval}, overrides {setup['config']}, "
          f"seeds {seeds}")
    for seed in seeds:
        cfg = episode_config(setup["preset"], max_iters, interval, seed=seed, **setup["config"])
        data = shared_data(cfg.data, resolve_device(cfg.device))
        for s in specs:
            done = runs.setdefault(labels[s], {})
            if str(seed) not in done:
                try:
                    summary = Trainer(cfg, make_controller(labels[s]), data=data).train()
                    done[str(seed)] = {METRIC: summary[METRIC], NOISY: summary[NOISY]}
                except Diverged:
                    done[str(seed)] = {METRIC: math.nan, NOISY: math.nan}
                if out:
                    write_json(out, {"setup": setup, "runs": runs})
        print(f"  seed {seed}: " + ", ".join(f"{s}={runs[labels[s]][str(seed)][METRIC]:.4f}" for s in specs),
              flush=True)

    results = {key: {s: {seed: runs[labels[s]][str(seed)][key] for seed in seeds} for s in specs}
               for key in (METRIC, NOISY)}
    full = results[METRIC]
    means = {s: mean_ci(list(full[s].values())) for s in specs}
    best_fixed = min(fixed, key=lambda s: means[s][0]) if fixed else None
    width = max(len(s) for s in specs)
    print(f"\n{'controller':<{width}}  {METRIC}: mean [{CONFIDENCE:.0%} t-interval] over {len(seeds)} seeds"
          + (f"; Δ vs {best_fixed} (best fixed), {TEST}" if best_fixed else "") + f"; mean {NOISY}")
    rows = {}
    for s in sorted(specs, key=lambda s: means[s][0]):
        mean, low, high = means[s]
        line = f"{s:<{width}}  {mean:.4f} [{low:.4f}, {high:.4f}]"
        if best_fixed and s != best_fixed:
            test = paired_test(full[s], full[best_fixed])
            wins = sum(full[s][k] < full[best_fixed][k] for k in seeds)
            line += (f"  Δ {test['delta']:+.4f} [{test['delta_low']:+.4f}, {test['delta_high']:+.4f}], "
                     f"p {test['p']:.3f}, better on {wins}/{len(seeds)} seeds")
            rows[s] = test
        print(line + f"  ({NOISY} {mean_ci(list(results[NOISY][s].values()))[0]:.4f})")
    print(f"{time.perf_counter() - t0:.0f} s")
    if out:
        write_json(out, {"setup": setup, "runs": runs, "seeds": seeds, "controller": spec, "best_fixed": best_fixed,
                         **results, "paired_vs_best_fixed": rows})
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
