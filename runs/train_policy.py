"""Train a PPO policy that sets the dropout rate, on micro-regime ``DynamicDropout-v0`` episodes.

    python -m runs.train_policy                                   # the demo budget (2,560 env steps)
    python -m runs.train_policy --budget full --out policies/ppo-full   # the full budget (10,240 env steps)
    python -m runs.suite --controllers ppo:policy=policies/ppo/policy.safetensors pid --regimes test
    python -m runs.train --controller ppo --policy policies/ppo/policy.safetensors --preset cpu

Each episode is a micro-regime (``envs.micro``: a tiny GPT on a few thousand characters, its width, learning
rate and length drawn per episode), trained as one batched population of ``--n-envs`` episodes. Before training,
every ``--curve-every`` updates and at the end, the policy is deployed on a fixed set of held-out micro-regimes
and its regret (test loss minus the best constant's) logged: the learning curve. Writes into ``--out``:
``policy.safetensors`` + ``policy.json`` (the final policy and its metadata), ``learning_curve.json`` and
``learning_curve.png``, ``curve/policy_<steps>.*`` (the policies the curve deployed), ``checkpoints/``
(``--checkpoint-every``), ``progress.csv`` (sb3's log) and the wandb run.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyndrop import UserError
from dyndrop.folders import FolderLock
from gpt.config import option
from envs.policy_training import VEC_KINDS
from runs.cli import Parser, add_dataclass_args, run_cli


@dataclass
class Args:
    out: str = option("policies/ppo", "folder for the policy, its checkpoints and logs")
    budget: str = option("demo", "demo (2,560 env steps: where learning first shows) or full (10,240 env steps); "
                                 "their measured times are in docs/results.md; --total-timesteps overrides it")
    total_timesteps: int = option(0, "env steps (control intervals) to train for; 0 = the budget's")
    n_envs: int = option(16, "parallel episodes per rollout")
    vec: str = option("population", "population (the episodes trained as one batched model), dummy (single envs in "
                                    "this process) or subproc (one process per env: needs spare cores)")
    threads: int = option(0, "torch CPU threads of the population env; 0 = torch's choice (single envs use 1 each)")
    seed: int = option(0, "seeds PPO and the envs' instance draws")
    # env
    episode: str = option("micro", "named episode configuration (envs.EPISODES): micro (a micro-regime drawn per "
                                   "episode, the default), overfit (one data-limited configuration) or tiny "
                                   "(the first one, which underfits)")
    preset: str = option("", "preset of the model trained in each episode; empty = the episode's")
    max_iters: int = option(0, "optimizer steps per episode; 0 = the episode's")
    interval: int = option(0, "optimizer steps per env step (evaluation and control interval); 0 = the episode's")
    eval_iters: int = option(0, "evaluation batches per split; 0 = the episode's")
    p_min: float = option(0.0, "rate for action -1")
    p_max: float = option(0.5, "rate for action +1")
    per_layer: bool = option(False, "one rate per transformer layer")
    reward: str = option("best_val", "best_val, val or final (see envs.DropoutEnv)")
    reward_scale: float = option(10.0, "multiplies every reward")
    # PPO
    n_steps: int = option(10, "env steps per env per rollout (one PPO update each); 10 = half a micro episode of "
                              "20 decisions (the value function bootstraps the rest)")
    batch_size: int = option(80, "minibatch size")
    n_epochs: int = option(10, "passes over each rollout")
    learning_rate: float = option(1e-3, "Adam learning rate (rl-baselines3-zoo's for Pendulum and CartPole at 1e5 steps)")
    gamma: float = option(0.99, "discount")
    gae_lambda: float = option(0.95, "GAE lambda")
    ent_coef: float = option(0.0, "entropy bonus")
    log_std_init: float = option(-0.5, "initial log std of the Gaussian policy (action units; -0.5 = std 0.6)")
    checkpoint_every: int = option(0, "save the policy every this many env steps; 0 = never")
    curve_every: int = option(8, "a learning-curve point every this many updates (and before and after training); "
                                 "0 = only before and after")
    curve_regimes: int = option(8, "held-out instances of the learning curve: the episode's first held-out seeds "
                                   "(micro-regimes for micro, envs.micro.EVAL_REGIMES)")
    curve_seeds: int = option(2, "training seeds per learning-curve micro-regime")
    # tracking
    wandb: str = option("offline", "online, offline or disabled")
    wandb_project: str = option("dynamic-dropout", "wandb project")
    progress: bool = option(True, "show a progress bar")


def parse_args(argv: list[str] | None = None) -> Args:
    p = Parser(prog="python -m runs.train_policy", description=__doc__.split("\n")[0])
    add_dataclass_args(p, Args)
    args = Args(**vars(p.parse_args(argv)))
    check_args(args)
    return args


BUDGETS = {"demo": 2_560, "full": 10_240}
"""Env steps of each budget: 16 and 64 updates of 16 envs x 10 steps (128 and 512 micro episodes)."""


def check_args(args: Args) -> None:
    """Every PPO setting in its range (the env checks its own: preset, episode, bounds, reward)."""
    def bad(name: str, must: str) -> UserError:
        return UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: it must be {must}")

    if args.vec not in VEC_KINDS:
        raise bad("vec", " or ".join(VEC_KINDS))
    if args.wandb not in ("online", "offline", "disabled"):
        raise bad("wandb", "online, offline or disabled")
    if args.budget not in BUDGETS:
        raise bad("budget", " or ".join(BUDGETS))
    for name in ("n_envs", "n_steps", "batch_size", "n_epochs", "curve_regimes", "curve_seeds"):
        if getattr(args, name) < 1:
            raise bad(name, "at least 1")
    for name in ("total_timesteps", "checkpoint_every", "curve_every", "eval_iters", "seed", "threads"):
        if getattr(args, name) < 0:
            raise bad(name, "at least 0")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise bad("learning_rate", "a finite number > 0")
    for name in ("gamma", "gae_lambda"):
        if not (0.0 <= getattr(args, name) <= 1.0):
            raise bad(name, "in [0, 1]")
    if not (math.isfinite(args.ent_coef) and args.ent_coef >= 0):
        raise bad("ent_coef", "a finite number >= 0")
    if not (math.isfinite(args.log_std_init) and abs(args.log_std_init) <= 10):
        raise bad("log_std_init", "a finite number in [-10, 10]")
    if not (math.isfinite(args.reward_scale) and args.reward_scale > 0):
        raise bad("reward_scale", "a finite number > 0")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with FolderLock(args.out, "policy"):  # one writer: a second train_policy on --out is refused, not interleaved
        return train(args)


def train(args: Args) -> int:
    """PPO on the env into ``args.out``, which the caller holds; the env's options are checked before any work (a
    bad one leaves no folder: the lock removes the one it made)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import CSVOutputFormat, HumanOutputFormat, Logger

    from envs import DropoutEnv
    from envs.policy_training import (EpisodeStatsCallback, LearningCurveCallback, PolicyCheckpointCallback,
                                      TqdmCallback, WandbWriter, make_vec_env, save_policy)
    from experiments.report import write_curve_report

    env_kwargs = dict(episode=args.episode, preset=args.preset or None, max_iters=args.max_iters or None,
                      interval=args.interval or None, p_min=args.p_min,
                      p_max=args.p_max, per_layer=args.per_layer, reward=args.reward, reward_scale=args.reward_scale,
                      config={"eval_iters": args.eval_iters} if args.eval_iters else None)
    template = DropoutEnv(**env_kwargs)  # validates the options before any work
    env_meta = template.metadata_dict()
    out = Path(args.out)
    venv = make_vec_env(args.n_envs, env_kwargs, args.seed, kind=args.vec, threads=args.threads or None)

    formats: list[Any] = [CSVOutputFormat(str(out / "progress.csv"))]
    if not args.progress:
        formats.append(HumanOutputFormat(sys.stdout))
    run = None
    if args.wandb != "disabled":
        import wandb
        run = wandb.init(project=args.wandb_project, group="ppo", dir=str(out), mode=args.wandb,
                         config={**dataclasses.asdict(args), **env_meta}, settings=wandb.Settings(silent=True))
        formats.append(WandbWriter(run))

    model = PPO("MlpPolicy", venv, n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs,
                learning_rate=args.learning_rate, gamma=args.gamma, gae_lambda=args.gae_lambda,
                ent_coef=args.ent_coef, seed=args.seed, device="cpu",
                policy_kwargs=dict(log_std_init=args.log_std_init, net_arch=[64, 64]))
    model.set_logger(Logger(str(out), formats))
    held_out = list(template.eval_seeds[:args.curve_regimes])
    curve = LearningCurveCallback(args.curve_every, out, env_meta, held_out, args.curve_seeds, env_kwargs)
    callbacks = [EpisodeStatsCallback(), PolicyCheckpointCallback(args.checkpoint_every, out / "checkpoints", env_meta),
                 curve]
    if args.progress:
        callbacks.append(TqdmCallback())
    total = args.total_timesteps or BUDGETS[args.budget]
    print(f"PPO on DynamicDropout-v0: {env_meta['episode']} episodes; {total} env steps, {args.n_envs} envs "
          f"({args.vec}); learning curve on {len(held_out)} held-out instances x {args.curve_seeds} seeds "
          f"every {args.curve_every} updates; out {out}; wandb {args.wandb}")
    t0 = time.perf_counter()
    try:
        model.learn(total_timesteps=total, callback=callbacks)
    except KeyboardInterrupt:
        print(f"\ninterrupted at {model.num_timesteps} env steps; saving the policy so far", file=sys.stderr)
    wall_s = time.perf_counter() - t0
    path = save_policy(model, out / "policy", env_meta, {"train_wall_s": wall_s, "seed": args.seed,
                                                         "n_envs": args.n_envs, "vec": args.vec})
    venv.close()
    if run is not None:
        run.summary.update({"train_wall_s": wall_s, "num_timesteps": model.num_timesteps})
        run.finish()
    print(f"saved {path} (+ {path.with_suffix('.json').name}) after {model.num_timesteps} env steps "
          f"in {wall_s:.0f} s")
    if (out / "learning_curve.json").is_file():
        page = write_curve_report(out)
        print(f"learning curve: {out / 'learning_curve.png'} ({page.name}); " + curve_line(out))
    return 0


def curve_line(out: Path) -> str:
    """The curve's first and last points in words, paired over the held-out (regime, seed) pairs."""
    from experiments.report import curve_change

    c = curve_change(out)
    return (f"held-out regret {c['first']:+.4f} before training, {c['last']:+.4f} after ({c['delta']:+.4f}, paired "
            f"p {c['p']:.3g} over {c['n']} runs)")


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
