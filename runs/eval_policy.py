"""Compare a controller (a PPO policy, PID, ...) with fixed schedules on the env's held-out episode seeds.

    python -m runs.eval_policy --policy policies/ppo/policy.safetensors
    python -m runs.eval_policy --controller pid --baselines constant@0,0.1,0.2,0.3 --out out/eval-pid
    python -m runs.eval_policy --controller ppo:policy=policies/ppo/policy.safetensors --max-iters 480

Every controller trains the same episode config on the same seeds, so the only difference is the dropout
rate it sets: a ppo controller's config is the one its policy was trained on (from its metadata), any
other controller's is the ``--episode`` configuration. The episodes run as a comparison (``runs.compare``'s
engine) in ``--out``: the same table (test loss of the best weights against the constant with the lowest val
loss, Holm-adjusted p-values, verdicts), and a rerun reuses the finished trials unless their settings, data or
policy file changed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from controllers import make_controller, parse_controllers, spec_name, spec_policy, with_policy
from controllers.policy_file import read_metadata
from controllers.specs import canonical_spec
from dyndrop import UserError
from dyndrop.folders import FolderLock
from gpt.config import MAX_SEED
from runs.cli import Parser, add_policy_arg, interrupt_status, run_cli

BASELINES = ("constant@0,0.1,0.2,0.3", "linear", "exponential", "val_loss")


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
    p.add_argument("--jobs", type=int, default=1, help="episodes trained at once, each in a worker process")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per episode")
    p.add_argument("--out", default=None, help="the comparison's folder; default out/eval-<controller>")
    return p.parse_args(argv)


def episode_setup(spec: str, episode: str | None) -> dict[str, Any]:
    """Preset, length, interval, overrides and seeds of the episodes: a policy's own, else a named one."""
    if spec_name(spec) == "ppo":
        if spec_policy(spec) is None:
            raise UserError("give the policy to evaluate: --policy PATH or --controller ppo:policy=PATH")
        if episode is not None:
            raise UserError("--episode is for controllers other than ppo: a policy runs the episodes it was "
                            "trained on")
        meta = read_metadata(spec_policy(spec))
        from envs import EPISODES

        if EPISODES.get(meta.get("episode"), {}).get("family"):
            raise UserError(f"policy {spec_policy(spec)} was trained on the {meta['episode']} family, whose episodes "
                            "differ per instance: see its learning curve (python -m runs.report on its folder), or "
                            "score it on the suite: python -m runs.suite --controllers ppo:policy=PATH")
        return {k: meta[k] for k in ("preset", "max_iters", "interval", "config", "train_seeds", "eval_seeds")}
    from envs import DEFAULT_EPISODE, EPISODES, EVAL_SEEDS, TRAIN_SEEDS
    name = episode or DEFAULT_EPISODE
    if name not in EPISODES:
        raise UserError(f"--episode {name!r} is unknown; choose one of: {', '.join(EPISODES)}")
    return {**EPISODES[name], "train_seeds": list(TRAIN_SEEDS), "eval_seeds": list(EVAL_SEEDS)}


def check_args(args: argparse.Namespace) -> str:
    """Every option checked before anything is written; returns the controller's spec."""
    for name, low in (("max_iters", 1), ("jobs", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} {value} is invalid: it must be at least {low}")
    bad_seeds = [s for s in args.seeds or [] if not 0 <= s <= MAX_SEED]
    if bad_seeds:
        raise UserError(f"--seeds {bad_seeds[0]} is invalid: seeds must be in [0, {MAX_SEED}]")
    spec = canonical_spec(with_policy(args.controller, args.policy))  # as the baselines' specs: one row each
    if args.policy is not None and spec_name(spec) != "ppo":
        raise UserError(f"--policy is for a ppo controller, and --controller is {args.controller!r}")
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = check_args(args)
    episode = episode_setup(spec, args.episode)
    baselines = [b for b in parse_controllers(args.baselines) if b != spec] if args.baselines else []
    for s in [spec, *baselines]:
        make_controller(s)  # a typo fails before any training

    from envs import episode_config
    from experiments.comparison import Comparison
    from experiments.tables import aggregate, markdown_table, write_tables
    from experiments.trials import check_inputs

    seeds = args.seeds if args.seeds else list(episode["eval_seeds"])
    overlap = set(seeds) & set(episode["train_seeds"])
    if overlap and spec_name(spec) == "ppo":
        print(f"warning: seeds {sorted(overlap)} were training instances of this policy", file=sys.stderr)
    max_iters = args.max_iters or int(episode["max_iters"])
    interval = int(episode["interval"]) * max_iters // int(episode["max_iters"])  # same number of decisions
    cfg = episode_config(episode["preset"], max_iters, interval, seed=seeds[0], **episode["config"])
    check_inputs(cfg, [spec, *baselines])
    out = Path(args.out or f"out/eval-{spec_name(spec)}")
    comparison = Comparison(cfg=cfg, specs=[spec, *baselines], seeds=seeds, out=out, jobs=args.jobs,
                            threads=args.threads, warm_up=False)
    print(f"{cfg.preset} preset, {max_iters} steps, control every {interval}, overrides {episode['config']}, "
          f"seeds {seeds}, out {out}")
    with FolderLock(out, "comparison"):
        try:
            comparison.run()
        except KeyboardInterrupt as e:
            print("\ninterrupted; rerun the same command to continue (finished episodes are kept)", file=sys.stderr)
            return interrupt_status(e)
        table = aggregate(comparison)
        write_tables(table, out)
    print(markdown_table(table))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
