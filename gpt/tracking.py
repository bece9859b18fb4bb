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
import sys
from pathlib import Path
from typing import Any

from dyndrop import UserError, json_safe, read_json, write_json


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


NUMERIC_PREFIXES = ("train/", "val/", "dropout/", "controller/", "perf/")
"""Record keys whose values are numbers (or null, for a non-finite one); ``pbt/member`` is a name."""


def _is_number(value: Any) -> bool:
    """An int or float (not a bool) that a float can hold: JSON has integers too long for one (``1e400`` as digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def as_record(line: bytes) -> dict[str, Any] | None:
    """The record one line of ``metrics.jsonl`` holds, or None if it holds none: not UTF-8, not JSON, not an
    object, no whole-number ``iter`` >= 0, or a figure (:data:`NUMERIC_PREFIXES`) that is not a number or null."""
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return None
    if not isinstance(record, dict) or not (isinstance(record.get("iter"), int) and _is_number(record["iter"])
                                            and record["iter"] >= 0):
        return None
    if any(k.startswith(NUMERIC_PREFIXES) and v is not None and not _is_number(v) for k, v in record.items()):
        return None
    return record


def read_records(path: Path, drop_torn_last: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it is missing): the one reader of the file, for every command.

    A line that holds no record (:func:`as_record`: a stray byte, a hand edit, a disk error) is skipped with one
    warning on stderr naming the file and the lines; the run's figures are in ``summary.json``, so the records
    still draw its curves.

    :param drop_torn_last: drop a last line that is not a whole record silently: a write cut off by a kill or a
        full disk, which a resumed run (this) expects.
    :raises UserError: the file cannot be read.
    """
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"metrics file {path} cannot be read: {e.strerror or e}") from None
    records, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = as_record(line)
        if record is None:
            if not (drop_torn_last and n == len(lines)):
                bad.append(n)
            continue
        records.append(record)
    if bad:
        print(f"warning: {path}: line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}"
              f"{', ...' if len(bad) > 5 else ''} hold{'' if len(bad) > 1 else 's'} no metrics record; skipped",
              file=sys.stderr)
    return records


SUMMARY_NUMBERS = ("best_val_loss", "best_val_iter", "test_loss", "best_val_loss_full", "final_train_loss",
                   "final_val_loss", "total_train_time_s", "train_tokens_per_s", "inference_tokens_per_s", "iterations",
                   "compute_iters", "concurrent_trials", "seed", "numerics", "exploits")
"""Figures of ``summary.json`` that the tables and reports read: each a number, or null for a non-finite one."""
SUMMARY_TEXTS = ("controller", "controller_spec", "preset", "device", "device_name")
"""Entries of ``summary.json`` that are text (or null)."""


def read_summary(path: Path, what: str = "summary") -> dict[str, Any]:
    """A finished run's ``summary.json``, checked: a JSON object with ``best_val_loss``, each of
    :data:`SUMMARY_NUMBERS` a number or null and each of :data:`SUMMARY_TEXTS` text or null. The one reader of the
    file, for every command.

    :raises UserError: one line naming the file and what is wrong with it.
    """
    summary = read_json(path, what)
    fix = "delete the run's folder to run it again, or restore the file"
    if "best_val_loss" not in summary:
        raise UserError(f"{what} {path} is corrupt: it has no best_val_loss ({len(summary)} entries); {fix}")
    for key in SUMMARY_NUMBERS:
        value = summary.get(key)
        if value is not None and not _is_number(value):
            raise UserError(f"{what} {path} is corrupt: {key} is {str(value)[:40]!r}, not a number; {fix}")
    for key in SUMMARY_TEXTS:
        if summary.get(key) is not None and not isinstance(summary[key], str):
            raise UserError(f"{what} {path} is corrupt: {key} is {str(summary[key])[:40]!r}, not text; {fix}")
    return summary


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
