"""Where a run's numbers go: ``metrics.jsonl`` in the run folder, and wandb.

Metric keys are namespaced (``train/``, ``val/``, ``dropout/``, ``controller/``, ``perf/``) and every
record carries ``iter``, which wandb uses as the x-axis. wandb is imported only when enabled, so a
machine without an account (or without wandb) still trains.
"""
from __future__ import annotations

import json
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from dyndrop import UserError, json_safe, write_json


# --------------------------------------------------------------------------------------------------
# The records: one builder per kind, used by every path that trains (the trainer, the population trainer, a
# PBT member), so a record means the same wherever it was written. The rates' record is the dropout scheduler's
# (``integrations.rate_record``, and ``DropoutScheduler.record`` for a control step), which foreign training loops
# use too.


def eval_record(iteration: int, train_loss: float, val_loss: float, history: Any) -> dict[str, Any]:
    """The record of an evaluation at ``iteration``: the fixed-batch losses (dropout off, nats per token), the gap
    between them, the best val loss so far, the last training throughput and the wall time of the run so far, as
    ``history`` (a :class:`gpt.trainer.TrainingHistory`) holds them."""
    return {"iter": iteration, "train/eval_loss": train_loss, "val/loss": val_loss, "val/gap": val_loss - train_loss,
            "val/best_loss": history.best_val_loss, "perf/tokens_per_s": history.tokens_per_s,
            "perf/wall_time_s": history.wall_time_s}


def train_record(iteration: int, loss: float, loss_smoothed: float, grad_norm: float, lr: float) -> dict[str, Any]:
    """The record of a log interval ending at ``iteration``: mean training loss (dropout on), its moving average,
    mean gradient norm before clipping, and the learning rate of the interval's last step."""
    return {"iter": iteration, "train/loss": loss, "train/loss_smoothed": loss_smoothed, "train/grad_norm": grad_norm,
            "train/lr": lr}




def wandb_mode(requested: str) -> str:
    """Resolve ``auto``: online when an API key is configured, offline otherwise."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def read_records(path: Path, drop_torn_last: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it is missing).

    :param drop_torn_last: drop a last line that is not a whole record (a write cut off by a crash or a full
        disk); resuming a run does this.
    :raises UserError: naming the file and line, for any other line that is not a JSON record with ``iter``.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "iter" not in record:
            if drop_torn_last and n == len(lines):
                break
            raise UserError(f"{path} is corrupt at line {n} (not a JSON record with 'iter'); delete the run's "
                            "folder to start again")
        records.append(record)
    return records


class RunLogger:
    """Appends records to ``<out>/metrics.jsonl`` and mirrors them to wandb.

    :param out_dir: the run's folder (created if missing).
    :param mode: wandb mode: online, offline, disabled or auto.
    :param wandb_dir: the folder under which wandb writes the run (``<wandb_dir>/wandb/``); default
        ``out_dir``. A comparison passes its own folder, so all its runs sit under one ``wandb/``.
    :param resume_iter: when resuming, records after this iteration are dropped from metrics.jsonl
        (they were written by the interrupted run after its last checkpoint).
    """

    def __init__(self, out_dir: str | Path, mode: str = "auto", project: str = "dynamic-dropout",
                 group: str = "", name: str = "", config: dict[str, Any] | None = None,
                 resume_iter: int | None = None, wandb_dir: str | Path | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if resume_iter is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_records(self.path, drop_torn_last=True) if r["iter"] <= resume_iter]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self.mode = wandb_mode(mode)
        self.run = None
        if self.mode != "disabled":
            self.run = self._init_wandb(project, group, name, config or {}, resume_iter is not None,
                                        Path(wandb_dir) if wandb_dir is not None else self.out_dir)

    def _init_wandb(self, project: str, group: str, name: str, config: dict[str, Any], resume: bool,
                    wandb_dir: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("wandb is not installed: pip install wandb, or pass --wandb disabled") from None
        id_file = self.out_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, group=group or None, name=name or None, config=config,
                         dir=str(wandb_dir), mode=self.mode, id=run_id, resume="allow",
                         settings=wandb.Settings(silent=True))
        run.define_metric("iter")
        for prefix in ("train", "val", "dropout", "controller", "perf"):
            run.define_metric(f"{prefix}/*", step_metric="iter")
        return run

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it must contain ``iter``."""
        record = json_safe(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if v is not None})

    def finish(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` atomically, copy it into the wandb summary, close everything."""
        write_json(self.out_dir / "summary.json", summary)
        self.close(summary)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if not self._file.closed:
            self._file.close()
        if self.run is not None:
            if summary:
                self.run.summary.update(json_safe(summary))
            self.run.finish()
            self.run = None
