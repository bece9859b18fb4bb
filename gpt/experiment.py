"""Comparing controllers: one training run per controller × seed, and the table a reviewer reads.

Read top to bottom:

- :func:`parse_controllers` turns ``"constant@0,0.1,linear"`` into controller specs
  (``constant:rate=0``, ``constant:rate=0.1``, ``linear``).
- :func:`make_trainer` and :func:`train_and_save` run one training run into a folder (``metrics.jsonl``,
  ``summary.json``, ``sample.txt``, wandb); ``runs/train.py`` and comparisons share them.
- :class:`Comparison` plans the trials, skips the finished ones and runs the rest, one after the other
  or in worker processes (several trials per GPU when that is faster).
- :func:`aggregate` reads the trial folders back and builds the table: mean and 95 % t-interval over
  seeds, iterations and seconds to a target validation loss, and a paired t-test of each controller's
  best validation loss against the baseline, the best constant rate. :func:`write_tables` writes it
  as Markdown, CSV and JSON.

A comparison folder holds ``comparison.json`` (what was asked), ``trials/<controller>-s<seed>/`` (one
training run each), and ``results.{md,csv,json}``; ``gpt.report`` adds ``report.html`` and ``figures/``.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import stats as sps

from controllers import CONTROLLERS, Controller, UserError, make_controller

from .config import TrainConfig
from .tracking import RunLogger

CONFIDENCE = 0.95
"""Level of every confidence interval in the table."""

UNCOMPARED_SETTINGS = ("out", "progress", "wandb", "wandb_project", "wandb_group", "checkpoint", "device")
"""Settings that may differ between a finished trial and a rerun without making the trial stale."""

METRICS: dict[str, str] = {
    "best_val_loss": "best val loss",
    "final_train_loss": "final train loss",
    "iters_to_target": "iters to target",
    "secs_to_target": "s to target",
    "total_train_time_s": "train time (s)",
    "train_tokens_per_s": "train tok/s",
    "inference_tokens_per_s": "infer tok/s",
}
"""Per-trial figures in the table (mean and CI over seeds), with their column titles."""


# --------------------------------------------------------------------------------------------------
# Controller specs


_NAME = re.compile(r"^([A-Za-z_]\w*)(?=$|[:@])")


def parse_controllers(text: str | Sequence[str]) -> list[str]:
    """Expand a comma-separated list of controller specs, with sweeps, into one spec per controller.

    - ``linear`` or ``linear:start=0.3,end=0`` is one controller (its parameters may contain commas).
    - ``NAME@V1,V2,...`` sweeps the controller's first parameter: ``constant@0,0.1`` gives
      ``constant:rate=0`` and ``constant:rate=0.1``.
    - ``NAME:FIXED@KEY=V1,V2`` sweeps ``KEY`` with the other parameters fixed:
      ``linear:end=0@start=0.1,0.3`` gives ``linear:end=0,start=0.1`` and ``linear:end=0,start=0.3``.

    A comma-separated item starts a new controller when it begins with a name (``pid``, ``val_loss:...``);
    items like ``0.2`` or ``end=0`` continue the one before. Duplicates are dropped. Specs are not built
    here (see :func:`check_specs`). Raises ``UserError`` for an empty list or a stray value.
    """
    items = [s.strip() for s in ([text] if isinstance(text, str) else text) for s in s.split(",")]
    groups: list[str] = []
    for item in filter(None, items):
        m = _NAME.match(item)
        in_sweep = bool(groups) and "@" in groups[-1]
        if m and (not in_sweep or m.group(1) in CONTROLLERS):
            groups.append(item)
        elif groups:
            groups[-1] += "," + item
        else:
            raise UserError(f"--controllers must start with a controller name, not {item!r}")
    if not groups:
        raise UserError("--controllers is empty; name at least one controller, e.g. constant@0,0.1,linear")
    specs: list[str] = []
    for group in groups:
        for spec in _expand_sweep(group):
            if spec not in specs:
                specs.append(spec)
    return specs


def _expand_sweep(group: str) -> list[str]:
    head, at, sweep = group.partition("@")
    if not at:
        return [head]
    name, _, fixed = head.partition(":")
    values = [v.strip() for v in sweep.split(",")]
    key, eq, first = values[0].partition("=")
    if eq:
        values[0] = first.strip()
        key = key.strip()
    else:
        key = _first_parameter(name)
    if not all(values):
        raise UserError(f"sweep {group!r} has an empty value; write e.g. constant@0,0.1,0.2")
    prefix = f"{name}:{fixed}," if fixed else f"{name}:"
    return [f"{prefix}{key}={v}" for v in values]


def _first_parameter(name: str) -> str:
    if name not in CONTROLLERS:
        raise UserError(f"unknown controller {name!r}; choose one of: {', '.join(sorted(CONTROLLERS))}")
    params = [p for p in inspect.signature(CONTROLLERS[name].__init__).parameters if p != "self"]
    if not params:
        raise UserError(f"controller {name!r} has no parameter to sweep")
    return params[0]


def build_controller(spec: str, policy: str | None = None) -> Controller:
    """The controller of ``spec``; ``policy`` (a trained policy file) is passed to ``ppo`` only."""
    if policy is not None and spec.partition(":")[0] == "ppo":
        return make_controller(spec, policy=policy)
    return make_controller(spec)


def check_specs(specs: Iterable[str], policy: str | None = None) -> None:
    """Build every controller once, so a typo fails before any training. Raises ``UserError``."""
    if policy is not None and not any(s.partition(":")[0] == "ppo" for s in specs):
        raise UserError("--policy is only used with the ppo controller, which is not in --controllers")
    for spec in specs:
        build_controller(spec, policy)


def slug(spec: str) -> str:
    """A file-name-safe form of a controller spec: ``constant:rate=0.1`` -> ``constant_rate0.1``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", spec.replace(":", "_").replace(",", "_").replace("=", ""))


def run_name(cfg: TrainConfig, spec: str) -> str:
    """The default name of a single run: ``<preset>-<controller>-s<seed>``."""
    return f"{cfg.preset}-{slug(spec)}-s{cfg.seed}"


# --------------------------------------------------------------------------------------------------
# One training run into a folder


def make_trainer(cfg: TrainConfig, spec: str, policy: str | None = None, *, data: Any = None,
                 ckpt: dict[str, Any] | None = None, name: str = "", group: str = "",
                 extra_config: dict[str, Any] | None = None) -> Any:
    """A ``Trainer`` for ``spec`` writing into ``cfg.out``, with its logger open, ready to ``train()``.

    A fresh run (``ckpt`` None) first empties ``cfg.out``; a resumed one loads ``ckpt`` and keeps the
    records up to the checkpoint. The wandb run is named ``name`` (default :func:`run_name`) in group
    ``group`` (default ``cfg.wandb_group`` or the preset); its config is ``cfg``, the controller's
    parameters and ``extra_config``.

    :param data: a ``CharData`` on the config's device to share between runs; loaded if None.
    """
    from .trainer import Trainer  # torch is imported only by code that trains

    controller = build_controller(spec, policy)
    trainer = Trainer(cfg, controller, data=data, meta={"controller": spec, "policy": policy})
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    elif Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    config = {**asdict(cfg), "controller": controller.name, "controller_spec": spec, "policy": policy,
              **{f"controller.{k}": v for k, v in controller.params().items()}, **(extra_config or {})}
    trainer.logger = RunLogger(
        cfg.out, mode=cfg.wandb, project=cfg.wandb_project, group=group or cfg.wandb_group or cfg.preset,
        name=name or run_name(cfg, spec), config=config,
        resume_iter=trainer.iteration if ckpt is not None else None)
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
    (Path(trainer.cfg.out) / "sample.txt").write_text(getattr(trainer, "sample", ""))
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


def trial_status(folder: Path, cfg: TrainConfig, spec: str, policy: str | None) -> str:
    """``"done"``, ``"diverged"`` (both finished: skipped on reruns) or ``"todo"``.

    Raises ``UserError`` when the folder holds a finished trial trained with other settings, since
    rerunning it silently would mix settings within one table.
    """
    finished = (folder / "summary.json").exists() or (folder / "diverged.json").exists()
    if not finished or not (folder / "trial.json").exists():
        return "todo"
    saved = json.loads((folder / "trial.json").read_text())
    # a setting added to TrainConfig after the trial ran counts as its default
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    want, got = _comparable(cfg), {**_comparable(defaults), **_comparable(saved["config"])}
    changes = [f"{k}: {got.get(k)} -> {want.get(k)}" for k in sorted(want.keys() | got.keys())
               if want.get(k) != got.get(k)]
    if saved["controller"] != spec:
        changes.append(f"controller: {saved['controller']} -> {spec}")
    if saved.get("policy_sha256") != policy_digest(policy):
        changes.append("the policy file differs")
    if changes:
        raise UserError(f"{folder} holds a finished trial with other settings ({', '.join(changes)}); "
                        "use another --out, or delete that folder to retrain it")
    return "diverged" if (folder / "diverged.json").exists() else "done"


def policy_digest(policy: str | None) -> str | None:
    """sha256 of the policy file (None without one): a retrained policy at the same path makes ppo trials stale."""
    if policy is None or not Path(policy).is_file():
        return None
    return hashlib.sha256(Path(policy).read_bytes()).hexdigest()


@dataclass
class TrialJob:
    """Everything a worker process needs to run one trial (plain, picklable values)."""

    cfg: TrainConfig
    spec: str
    policy: str | None
    name: str
    group: str
    comparison: str
    concurrent: int
    threads: int | None
    warm_up: bool = True


_DATA_CACHE: dict[tuple[str, str], Any] = {}


def _data_for(cfg: TrainConfig) -> Any:
    """The dataset on the config's device, loaded once per process."""
    from .data import CharData
    from .trainer import resolve_device

    device = resolve_device(cfg.device)
    key = (str(cfg.data), str(device))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = CharData.load(cfg.data, device=device)
    return _DATA_CACHE[key]


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
    from .trainer import Trainer

    key = (cfg.device, cfg.dtype, cfg.compile, getattr(cfg, "compile_mode", None), cfg.n_layer, cfg.n_head,
           cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.bias)
    if key in _WARMED:
        return
    with tempfile.TemporaryDirectory() as tmp:
        short = dataclasses.replace(cfg, max_iters=2, lr_decay_iters=2, eval_interval=1, control_interval=1,
                                    eval_iters=1, gen_tokens=min(cfg.gen_tokens, 8), out=tmp, checkpoint=False,
                                    progress=False, wandb="disabled")
        # dropout on for the first step and off for the second: the model compiles a graph for each
        Trainer(short, build_controller("early:rate=0.1,cutoff=0.5"), data=_data_for(cfg)).train()
    _WARMED.add(key)


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Train one trial into ``job.cfg.out``; returns its summary (``{"diverged": msg}`` if it diverged).

    Writes ``trial.json`` (settings) first and ``summary.json`` or ``diverged.json`` last, so a folder
    with neither is an interrupted trial, retrained from scratch on the next run.
    """
    import torch

    from .trainer import Diverged

    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = job.cfg
    if job.warm_up:
        warm_up(cfg)
    trainer = make_trainer(cfg, job.spec, job.policy, data=_data_for(cfg), name=job.name, group=job.group,
                           extra_config={"comparison": job.comparison, "concurrent_trials": job.concurrent})
    out = Path(cfg.out)
    (out / "trial.json").write_text(json.dumps(
        {"config": asdict(cfg), "controller": job.spec, "policy": job.policy,
         "policy_sha256": policy_digest(job.policy)}, indent=2) + "\n")
    try:
        return train_and_save(trainer, {"controller_spec": job.spec, "comparison": job.comparison,
                                        "concurrent_trials": job.concurrent, "torch_threads": torch.get_num_threads()})
    except Diverged as e:
        (out / "diverged.json").write_text(json.dumps({"error": str(e), "iteration": trainer.iteration}) + "\n")
        return {"diverged": str(e)}
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# A comparison


@dataclass
class Comparison:
    """Every controller × seed under one base config, in one folder.

    :param cfg: the base settings; each trial gets its own ``seed`` and ``out``.
    :param specs: controller specs (see :func:`parse_controllers`); each is one row of the table.
    :param seeds: one trial per seed and spec.
    :param out: the comparison's folder.
    :param name: the comparison's name (default: the folder's name); the wandb group is ``compare-<name>``
        unless ``cfg.wandb_group`` is set.
    :param policy: trained policy file for the ``ppo`` controller.
    :param jobs: trials run at once, each in its own worker process (1 = in this process).
    :param threads: torch CPU threads per trial; None = all cores divided by ``jobs``.
    :param target: validation loss for "iterations/seconds to target"; None = :func:`default_target`.
    :param baseline: spec of the baseline row; None = the best constant rate (:func:`pick_baseline`).
    :param warm_up: before its first trial, each process trains a throwaway 2-step run (:func:`warm_up`).
    """

    cfg: TrainConfig
    specs: list[str]
    seeds: list[int]
    out: Path
    name: str = ""
    policy: str | None = None
    jobs: int = 1
    threads: int | None = None
    target: float | None = None
    baseline: str | None = None
    warm_up: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.name = self.name or self.out.resolve().name
        if self.jobs < 1:
            raise UserError(f"--jobs must be >= 1, got {self.jobs}")
        if not self.seeds:
            raise UserError("--seeds must give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds repeats a seed: {self.seeds}")
        if self.baseline is not None and self.baseline not in self.specs:
            raise UserError(f"--baseline {self.baseline!r} is not one of the controllers: {', '.join(self.specs)}")

    @property
    def group(self) -> str:
        """The wandb group shared by every run of this comparison."""
        return self.cfg.wandb_group or f"compare-{self.name}"

    @property
    def trials(self) -> list[Trial]:
        """Seed-major order, so an interrupted comparison has whole seeds done.

        Each seed starts the controller list one further along (a Latin-square rotation), so whatever
        the first trial of a process pays once (allocator and kernel warm-up, torch.compile caches)
        does not always fall on the same controller.
        """
        n = len(self.specs)
        return [Trial(self.specs[(i + j) % n], seed) for i, seed in enumerate(self.seeds) for j in range(n)]

    def folder(self, trial: Trial) -> Path:
        return self.out / "trials" / trial.folder_name

    def trial_config(self, trial: Trial) -> TrainConfig:
        return dataclasses.replace(self.cfg, seed=trial.seed, out=str(self.folder(trial)))

    def save(self) -> None:
        """Write ``comparison.json``: what ``runs.report`` needs to rebuild the table."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"name": self.name, "group": self.group, "preset": self.cfg.preset, "specs": self.specs,
                  "seeds": self.seeds, "policy": self.policy, "jobs": self.jobs, "target": self.target,
                  "baseline": self.baseline, "config": asdict(self.cfg)}
        (self.out / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, out: str | Path) -> Comparison:
        out = Path(out)
        path = out / "comparison.json"
        if not path.is_file():
            raise UserError(f"{out} is not a comparison folder (no comparison.json); run python -m runs.compare first")
        r = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(TrainConfig)}  # settings added or dropped since stay readable
        return cls(cfg=TrainConfig(**{k: v for k, v in r["config"].items() if k in known}), specs=r["specs"], seeds=r["seeds"], out=out, name=r["name"],
                   policy=r["policy"], jobs=r["jobs"], target=r["target"], baseline=r["baseline"])

    def policy_for(self, spec: str) -> str | None:
        """The policy file, for ``ppo`` trials only (other trials do not depend on it)."""
        return self.policy if spec.partition(":")[0] == "ppo" else None

    def pending(self) -> list[Trial]:
        """Trials not finished yet (raises ``UserError`` if a finished one has other settings)."""
        return [t for t in self.trials
                if trial_status(self.folder(t), self.trial_config(t), t.spec, self.policy_for(t.spec)) == "todo"]

    def job(self, trial: Trial, progress: bool) -> TrialJob:
        cfg = dataclasses.replace(self.trial_config(trial), progress=progress)
        threads = self.threads
        if threads is None and self.jobs > 1:  # workers on one CPU must not each take every core
            threads = max(1, (os.cpu_count() or 1) // self.jobs)
        return TrialJob(cfg=cfg, spec=trial.spec, policy=self.policy_for(trial.spec), name=trial.run_name, group=self.group,
                        comparison=self.name, concurrent=self.jobs, threads=threads, warm_up=self.warm_up)

    def run(self, on_done: Callable[[Trial, dict[str, Any]], None] | None = None) -> list[Trial]:
        """Run every pending trial; ``on_done(trial, summary)`` after each. Returns the trials run.

        With ``jobs > 1`` the trials run in that many spawned worker processes (each loads the data
        itself); a worker that raises stops the comparison once the trials already running end.
        """
        self.save()
        todo = self.pending()
        if self.jobs == 1:
            for trial in todo:
                summary = run_trial(self.job(trial, progress=self.cfg.progress))
                if on_done:
                    on_done(trial, summary)
            return todo
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(run_trial, self.job(t, progress=False)): t for t in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise fut.exception()
                    if on_done:
                        on_done(futures[fut], fut.result())
        return todo


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


def load_results(comparison: Comparison) -> list[TrialResult]:
    """Every trial of the comparison that finished (done or diverged), in trial order."""
    results = []
    for trial in comparison.trials:
        folder = comparison.folder(trial)
        status = trial_status(folder, comparison.trial_config(trial), trial.spec, comparison.policy_for(trial.spec))
        if status == "todo":
            continue
        summary = json.loads((folder / "summary.json").read_text()) if status == "done" else None
        metrics = folder / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
        results.append(TrialResult(trial, folder, summary, status == "diverged", records))
    return results


# --------------------------------------------------------------------------------------------------
# Statistics


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean; nan bounds below 2 values.

    Non-finite values are ignored.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    sem = float(sps.sem(x))
    if sem == 0.0:
        return mean, mean, mean
    low, high = sps.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def paired_test(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Paired t-test of ``values - baseline`` over the seeds both have (keys are seeds).

    Returns ``n`` (pairs), ``delta`` (mean difference) with its CI, and ``p`` (two-sided; nan with
    fewer than 2 pairs, or when every difference is 0).
    """
    seeds = sorted(s for s in values.keys() & baseline.keys()
                   if math.isfinite(values[s]) and math.isfinite(baseline[s]))
    diffs = np.array([values[s] - baseline[s] for s in seeds], dtype=float)
    delta, low, high = mean_ci(diffs)
    p = math.nan
    if len(diffs) >= 2 and np.any(diffs != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-equal differences: t is infinite
            p = float(sps.ttest_rel([values[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return {"n": len(seeds), "delta": delta, "delta_low": low, "delta_high": high, "p": p}


def pick_baseline(per_spec: dict[str, list[float]]) -> str | None:
    """The ``constant`` spec with the lowest mean best validation loss (None if no constant finished)."""
    constants = {s: float(np.mean(v)) for s, v in per_spec.items()
                 if s.partition(":")[0] == "constant" and v}
    return min(constants, key=constants.get) if constants else None


def default_target(baseline_best: Sequence[float]) -> float:
    """The worst best-validation-loss among the baseline's seeds, rounded up to 0.001.

    Every baseline seed reaches it, so "iterations to target" asks: how soon does each controller get
    as good as the best constant rate got in all of its seeds?
    """
    finite = [v for v in baseline_best if math.isfinite(v)]
    return math.ceil(max(finite) * 1000 - 1e-9) / 1000 if finite else math.nan


# --------------------------------------------------------------------------------------------------
# The table


@dataclass
class Table:
    """The results of a comparison. ``rows`` has one dict per controller, ``trials`` one per run."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    trials: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows, "trials": self.trials}


def aggregate(comparison: Comparison, results: list[TrialResult] | None = None) -> Table:
    """Build the table from the trials' folders (only finished trials count; missing ones lower ``n``)."""
    results = load_results(comparison) if results is None else results
    if not results:
        raise UserError(f"{comparison.out} has no finished trial yet; run python -m runs.compare first")
    if not any(r.summary for r in results):
        raise UserError(f"every finished trial in {comparison.out} diverged; see trials/*/diverged.json")
    by_spec: dict[str, list[TrialResult]] = {s: [] for s in comparison.specs}
    for r in results:
        by_spec[r.trial.spec].append(r)
    best = {s: [r.summary["best_val_loss"] for r in rs if r.summary and r.summary["best_val_loss"] is not None]
            for s, rs in by_spec.items()}

    baseline = comparison.baseline or pick_baseline(best)
    baseline_rule = "given (--baseline)" if comparison.baseline else "best constant rate (lowest mean best val loss)"
    if baseline is None:
        baseline, baseline_rule = comparison.specs[0], "first controller (no constant rate in the comparison)"
    target, target_rule = comparison.target, "given (--target)"
    if target is None:
        target = default_target(best.get(baseline, []))
        target_rule = "worst best val loss among the baseline's seeds, rounded up"

    trials = []
    for r in results:
        row = {"controller": r.trial.spec, "seed": r.trial.seed, "folder": os.path.relpath(r.folder, comparison.out),
               "diverged": r.diverged}
        if r.summary:
            row.update({k: r.summary.get(k) for k in METRICS if k in r.summary})
            row["iters_to_target"], row["secs_to_target"] = r.to_target(target) if math.isfinite(target) \
                else (math.nan, math.nan)
            row.update(concurrent_trials=r.summary.get("concurrent_trials"), device_name=r.summary.get("device_name"),
                       best_val_iter=r.summary.get("best_val_iter"))
        trials.append(row)

    base_best = {t["seed"]: t["best_val_loss"] for t in trials
                 if t["controller"] == baseline and t.get("best_val_loss") is not None}
    rows = []
    for spec in comparison.specs:
        done = [t for t in trials if t["controller"] == spec and not t["diverged"]]
        row: dict[str, Any] = {"controller": spec, "baseline": spec == baseline, "n": len(done),
                               "diverged": sum(t["diverged"] for t in trials if t["controller"] == spec)}
        for key in METRICS:
            mean, low, high = mean_ci([_num(t.get(key)) for t in done])
            row.update({key: mean, f"{key}_low": low, f"{key}_high": high})
        row["reached_target"] = sum(math.isfinite(_num(t.get("iters_to_target"))) for t in done)
        concurrent = sorted({t["concurrent_trials"] for t in done if t.get("concurrent_trials")})
        row["concurrent_trials"] = "/".join(map(str, concurrent)) or None
        if spec == baseline:
            row.update(delta_best_val_loss=math.nan, delta_best_val_loss_low=math.nan,
                       delta_best_val_loss_high=math.nan, p_value=math.nan, pairs=len(done))
        else:
            test = paired_test({t["seed"]: t["best_val_loss"] for t in done}, base_best)
            row.update(delta_best_val_loss=test["delta"], delta_best_val_loss_low=test["delta_low"],
                       delta_best_val_loss_high=test["delta_high"], p_value=test["p"], pairs=test["n"])
        rows.append(row)

    devices = sorted({t["device_name"] for t in trials if t.get("device_name")})
    concurrent_all = sorted({t["concurrent_trials"] for t in trials if t.get("concurrent_trials")})
    meta = {
        "name": comparison.name, "preset": comparison.cfg.preset, "seeds": comparison.seeds,
        "max_iters": comparison.cfg.max_iters, "eval_interval": comparison.cfg.eval_interval,
        "eval_iters": comparison.cfg.eval_iters, "baseline": baseline, "baseline_rule": baseline_rule,
        "target_val_loss": target, "target_rule": target_rule, "confidence": CONFIDENCE,
        "test": "paired t-test (scipy.stats.ttest_rel) of best val loss vs the baseline, paired by seed",
        "concurrent_trials": concurrent_all, "device": devices,
        "trials_finished": sum(1 for t in trials if not t["diverged"]), "trials_planned": len(comparison.trials),
        "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return Table(_clean_row(meta), [_clean_row(r) for r in rows], [_clean_row(t) for t in trials])


def _num(v: Any) -> float:
    return float(v) if v is not None else math.nan


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: non-finite floats become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# --------------------------------------------------------------------------------------------------
# Writing the table


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


_DIGITS = {"best_val_loss": 4, "final_train_loss": 4, "iters_to_target": 0, "secs_to_target": 1,
           "total_train_time_s": 1, "train_tokens_per_s": 0, "inference_tokens_per_s": 0}


def _mean_pm(row: dict[str, Any], key: str) -> str:
    """``mean ± half-width`` of the CI (the t-interval is symmetric), or just the mean."""
    mean, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    d = _DIGITS.get(key, 3)
    if mean is None:
        return "–"
    if low is None or high is None:
        return _fmt(mean, d)
    return f"{_fmt(mean, d)} ± {_fmt((high - low) / 2, d)}"


def format_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(table: Table) -> str:
    """The table as Markdown, with a header saying what was compared, where, and how."""
    m = table.meta
    target = "–" if m["target_val_loss"] is None else f"{m['target_val_loss']:.3f}"
    lines = [
        f"**{m['name']}** — preset `{m['preset']}`, {m['max_iters']} iterations, seeds {m['seeds']}, "
        f"{m['trials_finished']}/{m['trials_planned']} trials finished; device {', '.join(m['device']) or '?'}; "
        f"trials run {', '.join(map(str, m['concurrent_trials'])) or '?'} at a time; {m['written']}.",
        "",
        f"Baseline (**bold**): `{m['baseline']}` — {m['baseline_rule']}. Target val loss {target} "
        f"({m['target_rule']}); evaluations every {m['eval_interval']} iterations. "
        f"Values: mean ± half-width of the {m['confidence']:.0%} t-interval over seeds. "
        f"Δ: paired difference in best val loss vs the baseline (negative = better); p: {m['test']}.",
        "",
    ]
    head = ["controller", "n", *METRICS.values(), "reached", "Δ best val", "p"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        name = f"**{row['controller']}** (baseline)" if row["baseline"] else row["controller"]
        n = f"{row['n']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else "")
        cells = [name, n, *(_mean_pm(row, k) for k in METRICS), f"{row['reached_target']}/{row['n']}",
                 "–" if row["baseline"] else _mean_pm(row, "delta_best_val_loss"),
                 "–" if row["baseline"] else format_p(row["p_value"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Iterations and seconds to target are means over the seeds that reached it (column *reached*)."]
    return "\n".join(lines) + "\n"


def write_tables(table: Table, out: str | Path) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` (one row per controller) and ``results.json`` into ``out``."""
    out = Path(out)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["md"].write_text(markdown_table(table))
    paths["json"].write_text(json.dumps(table.to_json(), indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table.rows[0]))
        writer.writeheader()
        writer.writerows(table.rows)
    return paths


def log_table_to_wandb(comparison: Comparison, table: Table) -> None:
    """One extra run in the comparison's group holding the table (a ``wandb.Table``) and its figures.

    The per-trial runs' summaries hold their own figures; the target and the paired tests need every
    trial, so they live here.
    """
    from .tracking import wandb_mode

    mode = wandb_mode(comparison.cfg.wandb)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=comparison.cfg.wandb_project, group=comparison.group, name=f"{comparison.name}-table",
                     job_type="comparison", config=table.meta, dir=str(comparison.out), mode=mode,
                     settings=wandb.Settings(silent=True))
    columns = list(table.rows[0])
    run.log({"comparison/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table.rows])})
    for row in table.rows:
        run.summary.update({f"{row['controller']}/{k}": v for k, v in row.items() if k != "controller"})
    run.finish()
