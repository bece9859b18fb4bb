"""Trials: one training run into a folder, run in this process or a worker, and read back.

- :func:`make_trainer` and :func:`train_and_save` run one training run into a folder (``metrics.jsonl``,
  ``summary.json``, ``sample.txt``, wandb); ``runs.train`` and every trial of a comparison use them.
- :class:`Trial`, :class:`TrialJob` and :func:`run_trial`: one run of a comparison, with its settings
  written first (``trial.json``) and its result last, so a half-run trial is recognised and redone.
- :func:`trial_status` and :class:`TrialResult`: reading finished trials back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controllers import make_controller, spec_policy
from controllers.specs import slug
from dyndrop import UserError, read_json, write_json
from dyndrop.folders import clear_run_folder
from gpt.config import TrainConfig
from gpt.tracking import read_records

UNCOMPARED_SETTINGS = ("out", "progress", "wandb", "wandb_project", "wandb_group", "checkpoint", "device")
"""Settings that may differ between a finished trial and a rerun without making the trial stale."""


def run_name(cfg: TrainConfig, spec: str) -> str:
    """The default name of a single run: ``<preset>-<controller>-s<seed>``."""
    return f"{cfg.preset}-{slug(spec)}-s{cfg.seed}"


# --------------------------------------------------------------------------------------------------
# One training run into a folder


def check_inputs(cfg: TrainConfig, specs: list[str]) -> Any:
    """Build every controller and load the data on the config's device, checking the settings that depend on
    the data, so a bad input fails before any folder is written. Returns the data (``gpt.shared_data``)."""
    from gpt.data import shared_data
    from gpt.trainer import resolve_device

    for spec in specs:
        make_controller(spec)
    data = shared_data(cfg.data, resolve_device(cfg.device))
    data.train_split(cfg.train_chars)
    if len(data.val) <= cfg.block_size:
        raise UserError(f"--block-size {cfg.block_size} needs more than {cfg.block_size} characters of validation "
                        f"text, but {data.source} gives {len(data.val)}; use a smaller --block-size or a longer file")
    return data


def make_trainer(cfg: TrainConfig, spec: str, *, data: Any = None, ckpt: dict[str, Any] | None = None,
                 name: str = "", group: str = "", extra_config: dict[str, Any] | None = None,
                 wandb_dir: str | Path | None = None) -> Any:
    """A ``Trainer`` for the controller ``spec`` writing into ``cfg.out``, with its logger open, ready to
    ``train()``.

    A fresh run (``ckpt`` None) expects ``cfg.out`` to hold no run (the caller clears it); a resumed one loads
    ``ckpt`` and keeps the records up to the checkpoint. The wandb run is named ``name`` (default :func:`run_name`) in group
    ``group`` (default ``cfg.wandb_group`` or the preset), written under ``wandb_dir`` (default
    ``cfg.out``); its config is ``cfg``, the controller's parameters and ``extra_config``.

    :param data: a ``CharData`` on the config's device to share between runs; loaded if None.
    """
    from gpt.data import shared_data
    from gpt.tracking import RunLogger
    from gpt.trainer import Trainer, resolve_device  # torch is imported only by code that trains

    controller = make_controller(spec)
    data = data if data is not None else shared_data(cfg.data, resolve_device(cfg.device))  # may fail: nothing written yet
    config = {**asdict(cfg), "controller": controller.name, "controller_spec": spec,
              **{f"controller.{k}": v for k, v in controller.params().items()}, **(extra_config or {})}
    logger = RunLogger(cfg.out, mode=cfg.wandb, project=cfg.wandb_project,
                       group=group or cfg.wandb_group or cfg.preset, name=name or run_name(cfg, spec),
                       config=config, resume_iter=ckpt["iteration"] if ckpt is not None else None,
                       wandb_dir=wandb_dir)
    try:
        trainer = Trainer(cfg, controller, data=data, logger=logger, meta={"controller": spec})
        if ckpt is not None:
            trainer.load_state_dict(ckpt, source=f"checkpoint {Path(cfg.out) / 'ckpt_last.pt'}")
    except BaseException:
        logger.close()
        if ckpt is None:  # a fresh run that could not start leaves no files behind
            clear_run_folder(cfg.out)
        raise
    return trainer


def train_and_save(trainer: Any, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train to the end, then write ``sample.txt`` and ``summary.json`` (also the wandb summary).

    On any exception (``Diverged``, ``KeyboardInterrupt``) the logger is closed without a summary and
    the exception propagates.
    """
    try:
        summary = trainer.train()
    except BaseException:
        trainer.logger.close()
        raise
    (Path(trainer.cfg.out) / "sample.txt").write_text(trainer.inference.text if trainer.inference else "")
    summary.update(extra_summary or {})
    trainer.logger.finish(summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Trials


@dataclass(frozen=True)
class Trial:
    """One training run of a comparison.

    :param spec: controller spec, also the table's row label (``constant:rate=0.1``).
    :param seed: seeds model init, data order, evaluation batches and dropout masks; trials with the
        same seed see the same batches.
    """

    spec: str
    seed: int

    @property
    def folder_name(self) -> str:
        return f"{slug(self.spec)}-s{self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.spec}-s{self.seed}"


def _comparable(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    d = asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    return {k: v for k, v in d.items() if k not in UNCOMPARED_SETTINGS}


def trial_status(folder: Path, cfg: TrainConfig, spec: str) -> str:
    """``"done"``, ``"diverged"`` (both finished: skipped on reruns) or ``"todo"``.

    Raises ``UserError`` when the folder holds a finished trial trained with other settings, since
    rerunning it silently would mix settings within one table.
    """
    finished = (folder / "summary.json").exists() or (folder / "diverged.json").exists()
    if not finished or not (folder / "trial.json").exists():
        return "todo"
    saved = read_json(folder / "trial.json", "trial record")
    # a setting added to TrainConfig after the trial ran counts as its default
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    want, got = _comparable(cfg), {**_comparable(defaults), **_comparable(saved.get("config", {}))}
    changes = [f"{k}: {got.get(k)} -> {want.get(k)}" for k in sorted(want.keys() | got.keys())
               if want.get(k) != got.get(k)]
    if saved.get("controller") != spec:
        changes.append(f"controller: {saved.get('controller')} -> {spec}")
    if saved.get("policy_sha256") != policy_digest(spec):
        changes.append("the policy file differs")
    if changes:
        raise UserError(f"{folder} holds a finished trial with other settings ({', '.join(changes)}); "
                        "use another --out, or delete that folder to retrain it")
    return "diverged" if (folder / "diverged.json").exists() else "done"


def policy_digest(spec: str) -> str | None:
    """sha256 of the policy file a ``ppo`` spec names (None for other specs): a retrained policy at the
    same path makes the ppo trials stale."""
    policy = spec_policy(spec)
    if policy is None or not Path(policy).is_file():
        return None
    return hashlib.sha256(Path(policy).read_bytes()).hexdigest()


@dataclass
class TrialJob:
    """Everything a worker process needs to run one trial (plain, picklable values)."""

    cfg: TrainConfig
    spec: str
    name: str
    group: str
    comparison: str
    concurrent: int
    threads: int | None
    wandb_dir: str | None = None
    warm_up: bool = True


_WARMED: set[tuple[Any, ...]] = set()


def warm_up(cfg: TrainConfig) -> None:
    """Train a throwaway 2-step run once per process and config shape, untimed and unlogged.

    The first training run in a process pays one-time costs inside its timed loop: torch.compile
    (tens of seconds for the paper preset on a GPU), CUDA context and kernel loading, allocator
    growth. Without this the first trial of every worker looks slower than the rest (seen on an H200:
    22.7 s vs 16.4 s of train time for two 300-step paper runs), which would bias the time columns
    against whichever controller happens to come first. Compiled graphs are reused by later models of
    the same shape, so the real trials start warm. The model compiles one graph with dropout on and
    one with it off (rate 0), so the warm-up runs one step of each; graphs for per-layer mixes of zero
    and non-zero rates are still compiled by the trial that first uses them.
    """
    from gpt.data import shared_data
    from gpt.trainer import Diverged, Trainer, resolve_device

    key = (cfg.device, cfg.dtype, cfg.compile, cfg.compile_mode, cfg.n_layer, cfg.n_head,
           cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.bias)
    if key in _WARMED:
        return
    with tempfile.TemporaryDirectory() as tmp:
        short = dataclasses.replace(cfg, max_iters=2, lr_decay_iters=2, eval_interval=1, control_interval=1,
                                    eval_iters=1, gen_tokens=min(cfg.gen_tokens, 8), out=tmp, checkpoint=False,
                                    progress=False, wandb="disabled")
        # dropout on for the first step and off for the second: the model compiles a graph for each
        try:
            Trainer(short, make_controller("early:rate=0.1,cutoff=0.5"),
                    data=shared_data(cfg.data, resolve_device(cfg.device))).train()
        except Diverged:
            pass  # the settings diverge: the trials will diverge too, and are recorded as such
    _WARMED.add(key)


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Train one trial into ``job.cfg.out``; returns its summary (``{"diverged": msg}`` if it diverged).

    Writes ``trial.json`` (settings) first and ``summary.json`` or ``diverged.json`` last, so a folder
    with neither is an interrupted trial, retrained from scratch on the next run.
    """
    import torch

    from gpt.data import shared_data
    from gpt.trainer import Diverged, resolve_device

    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = job.cfg
    if job.warm_up:
        warm_up(cfg)
    clear_run_folder(cfg.out)  # an interrupted attempt starts again from scratch
    trainer = make_trainer(cfg, job.spec, data=shared_data(cfg.data, resolve_device(cfg.device)), name=job.name,
                           group=job.group, wandb_dir=job.wandb_dir,
                           extra_config={"comparison": job.comparison, "concurrent_trials": job.concurrent})
    out = Path(cfg.out)
    write_json(out / "trial.json", {"config": asdict(cfg), "controller": job.spec,
                                    "policy_sha256": policy_digest(job.spec)})
    try:
        return train_and_save(trainer, {"controller_spec": job.spec, "comparison": job.comparison,
                                        "concurrent_trials": job.concurrent, "torch_threads": torch.get_num_threads()})
    except Diverged as e:
        write_json(out / "diverged.json", {"error": str(e), "iteration": trainer.iteration})
        return {"diverged": str(e)}
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_population(jobs: list[TrialJob], bar: Any = None) -> list[dict[str, Any]]:
    """Train trials that share every setting but the seed and the controller as one population
    (:class:`gpt.population.PopulationTrainer`): one batched model, each member with its own controller,
    writing its trial folder as :func:`run_trial` does. Returns each trial's summary (``{"diverged": msg}`` for
    a member that diverged). Times are the population's, shared by its members.
    """
    import torch

    from gpt.data import shared_data
    from gpt.population import PopulationTrainer
    from gpt.tracking import RunLogger
    from gpt.trainer import resolve_device

    cfg = jobs[0].cfg
    if any(_comparable(j.cfg) != _comparable(dataclasses.replace(cfg, seed=j.cfg.seed)) for j in jobs):
        raise ValueError("a population's trials must share every setting but the seed")
    if jobs[0].threads:
        torch.set_num_threads(jobs[0].threads)
    data = shared_data(cfg.data, resolve_device(cfg.device))
    controllers = [make_controller(j.spec) for j in jobs]
    loggers = []
    for job, controller in zip(jobs, controllers):
        clear_run_folder(job.cfg.out)  # an interrupted attempt starts again from scratch
        config = {**asdict(job.cfg), "controller": controller.name, "controller_spec": job.spec,
                  **{f"controller.{k}": v for k, v in controller.params().items()},
                  "comparison": job.comparison, "concurrent_trials": len(jobs), "executor": "population"}
        loggers.append(RunLogger(job.cfg.out, mode=job.cfg.wandb, project=job.cfg.wandb_project, group=job.group,
                                 name=job.name, config=config, wandb_dir=job.wandb_dir))
        write_json(Path(job.cfg.out) / "trial.json", {"config": asdict(job.cfg), "controller": job.spec,
                                                      "policy_sha256": policy_digest(job.spec)})
    try:
        pop = PopulationTrainer(cfg, [j.cfg.seed for j in jobs], controllers, data=data)
        summaries = pop.train(loggers, bar)
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    results = []
    for k, (job, logger, summary) in enumerate(zip(jobs, loggers, summaries)):
        out = Path(job.cfg.out)
        if summary is None:
            logger.close()
            write_json(out / "diverged.json", {"error": "the loss became NaN or infinite",
                                               "iteration": pop.iterations[k]})
            results.append({"diverged": "the loss became NaN or infinite"})
            continue
        inference = pop.inference[k]
        (out / "sample.txt").write_text(inference.text if inference else "")
        summary.update(controller_spec=job.spec, comparison=job.comparison, concurrent_trials=len(jobs),
                       torch_threads=torch.get_num_threads(), executor="population")
        logger.finish(summary)
        results.append(summary)
    return results


# --------------------------------------------------------------------------------------------------
# Reading trials back


@dataclass
class TrialResult:
    """A finished trial as read from its folder.

    :param summary: ``summary.json``; None if the trial diverged or has not finished.
    :param records: ``metrics.jsonl``, one dict per line.
    """

    trial: Trial
    folder: Path
    summary: dict[str, Any] | None
    diverged: bool
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(iters, values)`` of every record holding ``key`` (non-finite values dropped)."""
        pts = [(r["iter"], r[key]) for r in self.records if r.get(key) is not None]
        if not pts:
            return np.zeros(0), np.zeros(0)
        iters, values = map(np.asarray, zip(*pts))
        return iters.astype(float), values.astype(float)

    def to_target(self, target: float) -> tuple[float, float]:
        """Iteration and wall-clock seconds of the first evaluation with ``val/loss <= target``; nan if none."""
        for r in self.records:
            if r.get("val/loss") is not None and r["val/loss"] <= target:
                return float(r["iter"]), float(r.get("perf/wall_time_s") or math.nan)
        return math.nan, math.nan


def load_result(trial: Trial, folder: Path, cfg: TrainConfig) -> TrialResult | None:
    """The trial in ``folder`` if it finished (done or diverged), else None."""
    status = trial_status(folder, cfg, trial.spec)
    if status == "todo":
        return None
    summary = read_json(folder / "summary.json", "trial summary") if status == "done" else None
    return TrialResult(trial, folder, summary, status == "diverged", read_records(folder / "metrics.jsonl"))
