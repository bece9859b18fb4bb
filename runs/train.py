"""Train a GPT on shakespeare_char while a controller sets the dropout rate.

    python -m runs.train --controller pid                  # cpu preset on CPU, paper preset on a GPU
    python -m runs.train --controller constant:rate=0.2 --preset paper
    python -m runs.train --controller ppo --policy policies/ppo/policy.safetensors
    python -m runs.train --resume --out out/cpu-pid-s1337  # continue an interrupted run

Settings: ``--help`` lists every one (each overrides the preset). Writes ``metrics.jsonl``,
``summary.json``, ``ckpt_last.pt``/``ckpt_best.pt`` and ``sample.txt`` into ``--out``, which one run holds
at a time (a lock).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from controllers import spec_name, with_policy
from controllers.specs import canonical_spec
from dyndrop import UserError
from dyndrop.folders import FolderLock, check_output_path, clear_run_folder, holds_comparison, holds_run
from experiments.trials import check_inputs, identity_changes, make_trainer, run_name, train_and_save
from gpt import Diverged, load_checkpoint
from gpt.config import TrainConfig
from runs.cli import (Parser, add_config_args, add_policy_arg, add_threads_arg, config_from_args, given_settings,
                      interrupt_status, run_cli, set_threads)

DEFAULT_CONTROLLER = "pid"
CHANGEABLE_ON_RESUME = ("out", "progress", "wandb", "wandb_project", "wandb_group", "checkpoint", "max_iters")
"""Settings ``--resume`` may change; ``max_iters`` moves the end of the run (see docs/training.md)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.train", description=__doc__.split("\n")[0])
    p.add_argument("--controller", default=None,
                   help=f"controller name, optionally with parameters: name:key=value,key=value "
                        f"(constant, linear, exponential, val_loss, early, late, curriculum, pid, ppo); "
                        f"default {DEFAULT_CONTROLLER}")
    add_policy_arg(p)
    p.add_argument("--preset", default=None,
                   help="paper, cpu, cpu-overfit, tiny, or auto (paper on CUDA, else cpu); default auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (from the start if it has none yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    add_threads_arg(p)
    add_config_args(p)
    return p.parse_args(argv)


def resumed_settings(ckpt: dict[str, Any], path: Path, args: argparse.Namespace, spec: str | None) -> tuple[TrainConfig, str]:
    """The checkpoint's config and controller, with the settings that may change on resume applied.

    :raises UserError: a given setting that differs from the checkpoint's and may not change, or a
        checkpoint written by code with other settings.
    """
    saved = dict(ckpt["config"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(saved.keys() - fields)
    if unknown:
        raise UserError(f"checkpoint {path} has settings this code does not know ({', '.join(unknown)}); it was "
                        "written by another version of dynamic-dropout: start a new run")
    saved_spec = with_policy(ckpt["meta"].get("controller", ""), ckpt["meta"].get("policy"))  # older: policy apart
    given = given_settings(args)
    if args.preset is not None:
        given["preset"] = args.preset
    differ = [f"--{k.replace('_', '-')} {v} (the checkpoint has {saved.get(k)})" for k, v in given.items()
              if k not in CHANGEABLE_ON_RESUME and v != saved.get(k)]
    if spec is not None and canonical_spec(spec) != canonical_spec(saved_spec):
        differ.append(f"--controller {spec} (the checkpoint has {saved_spec})")
    if differ:
        raise UserError(f"--resume continues the checkpoint's run, but these settings differ from it: "
                        f"{'; '.join(differ)}; drop them, or start a new run in another --out")
    if given.get("max_iters", saved["max_iters"]) < ckpt["iteration"]:
        raise UserError(f"--max-iters {given['max_iters']} is below the checkpoint's iteration {ckpt['iteration']}")
    # the learning-rate schedule keeps the length the run started with, whatever --max-iters says now
    saved["lr_decay_iters"] = saved.get("lr_decay_iters") or saved["max_iters"]
    saved.update({k: given[k] for k in CHANGEABLE_ON_RESUME if k in given})
    try:
        return TrainConfig(**saved), saved_spec
    except TypeError as e:
        raise UserError(f"checkpoint {path} has a malformed config ({e}); start a new run") from None


def recorded_inputs(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The inputs a checkpoint's run started from (:func:`experiments.trials.inputs_identity`): its data's sha256,
    and the policy digest and numerics version where the checkpoint records them (older ones do not)."""
    meta = ckpt["meta"]
    recorded = {k: meta[k] for k in ("policy_sha256", "numerics") if k in meta}
    data = ckpt.get("data")
    if isinstance(data, dict) and data.get("sha256"):
        recorded["data_sha256"] = data["sha256"]
    return recorded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.policy is not None and spec_name(args.controller or "ppo") != "ppo":
        raise UserError("--policy is only used with --controller ppo")
    given_spec = with_policy(args.controller or "ppo", args.policy) if (args.controller or args.policy) else None
    spec = given_spec or DEFAULT_CONTROLLER
    cfg = config_from_args(args, args.preset)  # every setting checked: nothing is written before this
    out = check_output_path(cfg.out or f"out/{run_name(cfg, spec)}")
    cfg = dataclasses.replace(cfg, out=str(out))
    if holds_comparison(out):
        raise UserError(f"{out} holds a comparison (comparison.json and trials/: what runs.compare writes), not a "
                        "run; runs.train never writes into one: choose another --out")
    last = out / "ckpt_last.pt"
    if not args.resume:  # a resumed run's inputs are the checkpoint's: checked once it is read, below
        check_inputs(cfg, [spec])
    with FolderLock(out, "run"):  # before reading a checkpoint another process may be writing
        ckpt = None
        if args.resume and last.is_file():
            ckpt = load_checkpoint(last)
            cfg, spec = resumed_settings(ckpt, last, args, given_spec)
        elif args.resume:
            print(f"{out} has no checkpoint yet: starting the run from the beginning", file=sys.stderr)
        data = check_inputs(cfg, [spec])  # the data and policy the run uses: the checkpoint's on --resume
        if ckpt is not None:
            changes = identity_changes(recorded_inputs(ckpt), cfg, spec)
            if changes:
                raise UserError(f"--resume continues the run in {out}, but its inputs changed: {'; '.join(changes)}; "
                                "restore them, or start a new run in another --out")
            print(f"resuming {out} at iteration {ckpt['iteration']}/{cfg.max_iters} with the checkpoint's settings")
        if ckpt is None:
            if holds_run(out) and not (args.overwrite or args.resume):
                raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                                "replace it, or --out to choose another folder")
            clear_run_folder(out)  # refuses a folder holding anything but a run of ours
        trainer = make_trainer(cfg, spec, data=data, ckpt=ckpt)
        print(f"{cfg.preset} preset, {trainer.model.num_params() / 1e6:.2f}M parameters, {trainer.device}, "
              f"compile={trainer.use_compile}, controller {trainer.controller!r}, out {out}, "
              f"wandb {trainer.logger.mode}")
        try:
            summary = train_and_save(trainer)
        except Diverged as e:
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
            print(f"stopped: {e}; {kept}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            print(f"\ninterrupted at iteration {trainer.iteration}; continue with: "
                  f"python -m runs.train --resume --out {out}", file=sys.stderr)
            return interrupt_status(e)
        except OSError as e:  # a full disk, a folder made read-only under the run
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
            raise UserError(f"cannot write {e.filename or out}: {e.strerror or e}; {kept}") from None
    keys = ("best_val_loss", "best_val_iter", "final_train_loss", "final_val_loss", "total_train_time_s",
            "train_tokens_per_s", "inference_tokens_per_s", "recompiles")
    print(json.dumps({k: summary[k] for k in keys}, indent=None))
    print(summary["controller_explanation"])
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
