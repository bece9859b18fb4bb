"""Trials: one training run into a folder, run in this process or a worker, and read back.

- :func:`open_logger` and :func:`write_result` open a run's records and write its result (``metrics.jsonl``,
  ``summary.json``, ``sample.txt``, wandb); :func:`make_trainer` and :func:`train_and_save` use them for
  ``runs.train``, and :class:`TrialFolder` for every trial of a comparison.
- :class:`Trial`, :class:`TrialJob`, :class:`TrialFolder` and :func:`run_trial` / :func:`run_population`: one
  run of a comparison, with its settings written first (``trial.json``) and its result last, so a half-run trial
  is recognised and redone. PBT rows (:mod:`experiments.pbt`) write their folder through :class:`TrialFolder` too.
- :func:`trial_status` and :class:`TrialResult`: reading finished trials back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controllers import make_controller, spec_policy
from controllers.specs import slug
from dyndrop import UserError, read_json, write_json
from dyndrop.folders import clear_run_folder
from gpt.config import TrainConfig, canonical_settings
from gpt.tracking import read_records, read_summary

UNCOMPARED_SETTINGS = ("out", "progress", "wandb", "wandb_project", "wandb_group", "checkpoint", "device")
"""Settings that may differ between a finished trial and a rerun without making the trial stale."""


def run_name(cfg: TrainConfig, spec: str) -> str:
    """The default name of a single run: ``<preset>-<controller>-s<seed>``."""
    return f"{cfg.preset}-{slug(spec)}-s{cfg.seed}"


# --------------------------------------------------------------------------------------------------
# One training run into a folder


def check_inputs(cfg: TrainConfig, specs: list[str]) -> Any:
    """Build every controller for the config's model (a per-layer policy must fit its layers) and load the data on
    the config's device, checking the settings that depend on the data, so a bad input fails before any folder is
    written. Returns the data (``gpt.shared_data``)."""
    from gpt.data import shared_data
    from gpt.trainer import check_memory, resolve_device

    for spec in specs:
        make_controller(spec).reset(cfg.n_layer)
    data = shared_data(cfg.data, resolve_device(cfg.device))
    data.train_split(cfg.train_chars)
    for split in ("val", "test"):
        if len(getattr(data, split)) <= cfg.block_size:
            raise UserError(f"--block-size {cfg.block_size} needs more than {cfg.block_size} characters of {split} "
                            f"text (each is half of the last 10 % of the file), but {data.source} gives "
                            f"{len(getattr(data, split))}; use a smaller --block-size or a longer file")
    check_memory(cfg, data.vocab_size)
    return data


def open_logger(cfg: TrainConfig, spec: str, controller: Any, *, name: str = "", group: str = "",
                wandb_dir: str | Path | None = None, extra_config: dict[str, Any] | None = None,
                resume_iter: int | None = None) -> Any:
    """The run's logger (``metrics.jsonl`` in ``cfg.out``, and a wandb run): named ``name`` (default
    :func:`run_name`) in group ``group`` (default ``cfg.wandb_group`` or the preset), written under ``wandb_dir``
    (default ``cfg.out``); its config is ``cfg``, the controller's name, spec and parameters, and ``extra_config``.
    ``resume_iter``: keep the records up to this iteration (a resumed run)."""
    from gpt.tracking import RunLogger

    config = {**asdict(cfg), "controller": controller.name, "controller_spec": spec,
              **{f"controller.{k}": v for k, v in controller.params().items()}, **(extra_config or {})}
    return RunLogger(cfg.out, mode=cfg.wandb, project=cfg.wandb_project, group=group or cfg.wandb_group or cfg.preset,
                     name=name or run_name(cfg, spec), config=config, resume_iter=resume_iter, wandb_dir=wandb_dir)


def write_result(out: str | Path, logger: Any, summary: dict[str, Any], sample: str | None) -> dict[str, Any]:
    """A finished run's last files: ``sample.txt`` (empty without a sample), then ``summary.json`` and the wandb
    summary (:meth:`gpt.tracking.RunLogger.finish`). Returns ``summary``."""
    (Path(out) / "sample.txt").write_text(sample or "")
    logger.finish(summary)
    return summary


def make_trainer(cfg: TrainConfig, spec: str, *, data: Any = None, ckpt: dict[str, Any] | None = None,
                 name: str = "", group: str = "", extra_config: dict[str, Any] | None = None,
                 wandb_dir: str | Path | None = None) -> Any:
    """A ``Trainer`` for the controller ``spec`` writing into ``cfg.out``, with its logger open
    (:func:`open_logger`), ready to ``train()``.

    A fresh run (``ckpt`` None) expects ``cfg.out`` to hold no run (the caller clears it); a resumed one loads
    ``ckpt`` and keeps the records up to the checkpoint.

    :param data: a ``CharData`` on the config's device to share between runs; loaded if None.
    """
    from gpt.data import shared_data
    from gpt.trainer import Trainer, resolve_device  # torch is imported only by code that trains

    controller = make_controller(spec)
    data = data if data is not None else shared_data(cfg.data, resolve_device(cfg.device))  # may fail: nothing written yet
    logger = open_logger(cfg, spec, controller, name=name, group=group, wandb_dir=wandb_dir, extra_config=extra_config,
                         resume_iter=ckpt["iteration"] if ckpt is not None else None)
    try:
        # the checkpoints record the inputs, so that --resume can refuse a replaced policy or data file
        trainer = Trainer(cfg, controller, data=data, logger=logger,
                          meta={"controller": spec, **inputs_identity(cfg, spec)})
        if ckpt is not None:
            trainer.load_state_dict(ckpt, source=f"checkpoint {Path(cfg.out) / 'ckpt_last.pt'}")
    except BaseException:
        logger.close()
        if ckpt is None:  # a fresh run that could not start leaves no files behind
            clear_run_folder(cfg.out)
        raise
    return trainer


def train_and_save(trainer: Any, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train to the end, then write ``sample.txt`` and ``summary.json`` (:func:`write_result`).

    On any exception (``Diverged``, ``KeyboardInterrupt``) the logger is closed without a summary and
    the exception propagates.
    """
    try:
        summary = trainer.train()
    except BaseException:
        trainer.logger.close()
        raise
    summary.update(extra_summary or {})
    return write_result(trainer.cfg.out, trainer.logger, summary, trainer.inference.text if trainer.inference else None)


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
    d = canonical_settings(asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg))
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
    # a trial recorded before the numerics version existed was version 1; one without a policy digest is not known
    # to have used this policy file
    changes += identity_changes({"numerics": 1, "policy_sha256": None, **saved}, cfg, spec)
    if changes:
        raise UserError(f"{folder} holds a finished trial with other settings ({', '.join(changes)}); "
                        "use another --out, or delete that folder to retrain it")
    return "diverged" if (folder / "diverged.json").exists() else "done"


IDENTITY_KEYS = ("data_sha256", "policy_sha256", "numerics")
"""What :func:`inputs_identity` records."""


def inputs_identity(cfg: TrainConfig, spec: str) -> dict[str, Any]:
    """What decides a run's numbers beyond its settings and controller spec: the data's sha256, the policy
    file's (ppo specs), and the code's numerics version (``gpt.trainer.NUMERICS_VERSION``). ``trial.json`` and every
    checkpoint record it, and :func:`identity_changes` is the one check against it: a finished trial
    (:func:`trial_status`: comparisons, ``runs.eval_policy``, ``runs.suite``) or a ``--resume`` whose inputs changed
    is refused."""
    from gpt.data import shared_data
    from gpt.trainer import NUMERICS_VERSION, resolve_device

    return {"data_sha256": shared_data(cfg.data, resolve_device(cfg.device)).sha256,
            "policy_sha256": policy_digest(spec), "numerics": NUMERICS_VERSION}


def identity_changes(recorded: dict[str, Any], cfg: TrainConfig, spec: str) -> list[str]:
    """How the inputs that ``cfg`` and ``spec`` name today differ from those ``recorded`` (what :func:`inputs_identity`
    returned when the run started): one phrase per difference, none if they are the same. An entry ``recorded``
    lacks (an older record) is not compared."""
    now = inputs_identity(cfg, spec)
    changes = []
    if "data_sha256" in recorded and recorded["data_sha256"] != now["data_sha256"]:
        changes.append(f"the --data text is different now (sha256 {str(recorded['data_sha256'])[:12]}... when the run "
                       f"started, {now['data_sha256'][:12]}... now)")
    if "policy_sha256" in recorded and recorded["policy_sha256"] != now["policy_sha256"]:
        changes.append(f"the policy file differs ({spec_policy(spec) or 'none now'} has other bytes than when the "
                       "run started)")
    if "numerics" in recorded and recorded["numerics"] != now["numerics"]:
        changes.append(f"the code's numbers changed (numerics version {recorded['numerics']} -> {now['numerics']})")
    return changes


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
    executor: str = "local"


class TrialFolder:
    """A trial's folder, written in the same order by every kind of trial (a single run, a member of a batched
    population, a PBT row): :meth:`start` writes ``trial.json`` (what was asked) into an emptied folder, the run
    then writes its records and wandb run through :meth:`logger`, and :meth:`finish` (``sample.txt``, then
    ``summary.json``) or :meth:`diverge` (``diverged.json``) comes last. So a folder with ``trial.json`` and
    neither result is an interrupted trial, redone from scratch on the next run (:func:`trial_status`).

    :param job: the trial (``job.cfg.out`` is its folder).
    """

    def __init__(self, job: TrialJob) -> None:
        self.job, self.out = job, Path(job.cfg.out)

    def start(self) -> None:
        """Empty the folder (an interrupted attempt starts again) and write ``trial.json``."""
        clear_run_folder(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "trial.json", {"config": asdict(self.job.cfg), "controller": self.job.spec,
                                             **inputs_identity(self.job.cfg, self.job.spec)})

    def facts(self) -> dict[str, Any]:
        """What every trial's wandb config and summary record about how it ran."""
        return {"comparison": self.job.comparison, "concurrent_trials": self.job.concurrent,
                "executor": self.job.executor}

    def logger(self, controller: Any, extra_config: dict[str, Any] | None = None) -> Any:
        """The trial's logger (:func:`open_logger`), named and grouped as the comparison asks."""
        return open_logger(self.job.cfg, self.job.spec, controller, name=self.job.name, group=self.job.group,
                           wandb_dir=self.job.wandb_dir, extra_config={**self.facts(), **(extra_config or {})})

    def finish(self, logger: Any, summary: dict[str, Any], sample: str | None) -> dict[str, Any]:
        """The trial's result: ``sample.txt`` and ``summary.json`` with the trial's facts (:func:`write_result`)."""
        import torch

        summary.update(controller_spec=self.job.spec, torch_threads=self.job.threads or torch.get_num_threads(),
                       **self.facts())
        return write_result(self.out, logger, summary, sample)

    def diverge(self, logger: Any, error: str, iteration: int | None) -> dict[str, Any]:
        """The trial diverged: close its logger and write ``diverged.json``; returns ``{"diverged": error}``."""
        if logger is not None:
            logger.close()
        write_json(self.out / "diverged.json", {"error": error, "iteration": iteration})
        return {"diverged": error}


_WARMED: set[tuple[Any, ...]] = set()


def warm_up(cfg: TrainConfig) -> None:
    """Train a throwaway 2-step run once per process and config shape, untimed and unlogged.

    The first training run in a process pays one-time costs inside its timed loop: torch.compile, CUDA context
    and kernel loading, allocator growth (docs/results.md has the figure that showed it). Without this the first
    trial of every worker looks slower than the rest, which would bias the time columns against whichever
    controller happens to come first. Compiled graphs are reused by later models of the same shape, so the real
    trials start warm. The model compiles one graph with dropout on and one with it off (rate 0), so the warm-up
    evaluates and trains one step of each; graphs for per-layer mixes of zero and non-zero rates are still
    compiled by the trial that first uses them.
    """
    from gpt.data import shared_data
    from gpt.trainer import Diverged, Trainer, resolve_device

    key = (cfg.device, cfg.dtype, cfg.compile, cfg.compile_mode, cfg.n_layer, cfg.n_head,
           cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.bias)
    if key in _WARMED:
        return
    short = cfg.quiet(max_iters=2, eval_iters=1)
    trainer = Trainer(short, data=shared_data(cfg.data, resolve_device(cfg.device)))
    try:
        trainer.evaluate()
        for rate in (0.1, 0.0):  # a graph with dropout on, and one with it off
            trainer.set_dropout(rate)
            trainer.advance(1)
    except Diverged:
        pass  # the settings diverge: the trials will diverge too, and are recorded as such
    _WARMED.add(key)


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Train one trial into its :class:`TrialFolder` (``job.cfg.out``); returns its summary
    (``{"diverged": msg}`` if it diverged)."""
    import torch

    from gpt.data import shared_data
    from gpt.trainer import Diverged, Trainer, resolve_device

    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = job.cfg
    if job.warm_up:
        warm_up(cfg)
    folder = TrialFolder(job)
    folder.start()
    controller = make_controller(job.spec)
    logger = folder.logger(controller)
    trainer = None
    try:
        trainer = Trainer(cfg, controller, data=shared_data(cfg.data, resolve_device(cfg.device)), logger=logger,
                          meta={"controller": job.spec})
        summary = trainer.train()
        return folder.finish(logger, summary, trainer.inference.text if trainer.inference else None)
    except Diverged as e:
        return folder.diverge(logger, str(e), trainer.iteration)
    finally:
        logger.close()  # a no-op once finished; after Ctrl-C or a bug it closes the files
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_population(jobs: list[TrialJob], bar: Any = None) -> list[dict[str, Any]]:
    """Train trials that share every setting but the seed and the controller as one batched model
    (:class:`gpt.population.PopulationTrainer`), each member with its own controller, writing its
    :class:`TrialFolder` as :func:`run_trial` does. Returns each trial's summary (``{"diverged": msg}`` for a
    member that diverged). Times are the batched run's, shared by its members.
    """
    import torch

    from gpt.data import shared_data
    from gpt.population import PopulationTrainer
    from gpt.trainer import resolve_device

    cfg = jobs[0].cfg
    if any(_comparable(j.cfg) != _comparable(dataclasses.replace(cfg, seed=j.cfg.seed)) for j in jobs):
        raise ValueError("a batched population's trials must share every setting but the seed")
    if jobs[0].threads:
        torch.set_num_threads(jobs[0].threads)
    data = shared_data(cfg.data, resolve_device(cfg.device))
    controllers = [make_controller(j.spec) for j in jobs]
    folders = [TrialFolder(j) for j in jobs]
    loggers = []
    for folder, controller in zip(folders, controllers):
        folder.start()
        loggers.append(folder.logger(controller))
    try:
        pop = PopulationTrainer(cfg, [j.cfg.seed for j in jobs], controllers, data=data)
        summaries = pop.train(loggers, bar)
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return [folder.diverge(logger, "the loss became NaN or infinite", pop.iterations[k]) if summary is None
            else folder.finish(logger, summary, pop.inference[k].text if pop.inference[k] else None)
            for k, (folder, logger, summary) in enumerate(zip(folders, loggers, summaries))]


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
    summary = read_summary(folder / "summary.json", "trial summary") if status == "done" else None
    return TrialResult(trial, folder, summary, status == "diverged", read_records(folder / "metrics.jsonl"))
