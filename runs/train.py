"""Train a GPT on shakespeare_char while a controller sets the dropout rate.

    python -m runs.train --controller pid                  # cpu preset on CPU, paper preset on a GPU
    python -m runs.train --controller constant:rate=0.2 --preset paper
    python -m runs.train --controller ppo --policy policies/ppo_tiny/policy.zip
    python -m runs.train --resume --out out/cpu-pid-s1337  # continue an interrupted run

Settings: ``--help`` lists every one (each overrides the preset). Writes ``metrics.jsonl``,
``summary.json``, ``ckpt_last.pt``/``ckpt_best.pt`` and ``sample.txt`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from controllers import spec_name, with_policy
from dyndrop import UserError
from experiments.trials import make_trainer, run_name, train_and_save
from gpt import Diverged, load_checkpoint
from gpt.config import TrainConfig
from runs.cli import add_config_args, add_policy_arg, config_from_args, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runs.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--controller", default="pid",
                   help="controller name, optionally with parameters: name:key=value,key=value "
                        "(constant, linear, exponential, val_loss, early, late, curriculum, pid, ppo)")
    add_policy_arg(p)
    p.add_argument("--preset", default="auto", help="paper, cpu, tiny, or auto (paper on CUDA, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    add_config_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args, args.preset)
    ckpt = None
    if args.resume:
        out = Path(cfg.out or f"out/{run_name(cfg, args.controller)}")
        ckpt = load_checkpoint(out / "ckpt_last.pt")
        saved = ckpt["config"]
        saved.update(out=str(out), progress=cfg.progress, wandb=cfg.wandb)
        cfg = TrainConfig(**saved)
        # checkpoints of older code kept the policy beside the spec
        spec = with_policy(ckpt["meta"]["controller"], ckpt["meta"].get("policy"))
        print(f"resuming {out} at iteration {ckpt['iteration']}/{cfg.max_iters} with the checkpoint's settings")
    else:
        if args.policy is not None and spec_name(args.controller) != "ppo":
            raise UserError("--policy is only used with --controller ppo")
        spec = with_policy(args.controller, args.policy)
        cfg.out = cfg.out or f"out/{run_name(cfg, spec)}"
        if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()) and not args.overwrite:
            raise UserError(f"{cfg.out} already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or --out to choose another folder")
    trainer = make_trainer(cfg, spec, ckpt=ckpt)  # loads data: may raise
    print(f"{cfg.preset} preset, {trainer.model.num_params() / 1e6:.2f}M parameters, {trainer.device}, "
          f"compile={trainer.use_compile}, controller {trainer.controller!r}, out {cfg.out}, wandb {trainer.logger.mode}")
    try:
        summary = train_and_save(trainer)
    except Diverged as e:
        last = Path(cfg.out) / "ckpt_last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
        print(f"stopped: {e}; {kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted at iteration {trainer.iteration}; continue with: "
              f"python -m runs.train --resume --out {cfg.out}", file=sys.stderr)
        return 130
    keys = ("best_val_loss", "best_val_iter", "final_train_loss", "final_val_loss", "total_train_time_s",
            "train_tokens_per_s", "inference_tokens_per_s", "recompiles")
    print(json.dumps({k: summary[k] for k in keys}, indent=None))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
