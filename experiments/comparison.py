"""A comparison: every controller × seed under one base config, in one folder, run in this process or in
worker processes.

Its folder holds ``comparison.json`` (what was asked), ``trials/<controller>-s<seed>/`` (one training run
each, see :mod:`experiments.trials`), ``wandb/`` (every trial's wandb run and the table's), and, once
tabulated, ``results.{md,csv,json}`` (:mod:`experiments.tables`) and ``report.html``
(:mod:`experiments.report`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from controllers import with_policy
from dyndrop import UserError, read_json, write_json
from dyndrop.folders import check_output_path
from gpt.config import MAX_SEED, TrainConfig

from .trials import Trial, TrialJob, TrialResult, load_result, run_population, run_trial, trial_status

PARENT_POLL_S = 2.0
"""How often a worker process checks that the comparison that started it is still alive (seconds)."""


def stop_workers(pool: Any) -> None:
    """Terminate the worker processes of a ``ProcessPoolExecutor`` (their running trials are redone by the next
    run, as after any interruption). Ctrl-C reaches the workers anyway (one process group), SIGTERM only the
    comparison's process: without this, leaving the pool waited for the running trials and then ran every queued
    one. The pool has no public accessor for its processes; ``_processes`` has held them since Python 3.2."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def exit_with_parent(parent: int) -> None:
    """Make this worker process exit once ``parent`` (the comparison's process) is gone.

    A comparison killed with SIGKILL cannot stop its workers, and they would otherwise keep training
    into the folder unseen; a second comparison started on the same folder would then race them. A
    daemon thread polls the parent's pid every ``PARENT_POLL_S`` seconds (portable, unlike Linux's
    ``PR_SET_PDEATHSIG``); the half-written trial is redone by the next run, as after any interruption.
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# --------------------------------------------------------------------------------------------------
# Executors: how a comparison's trials run. A registry of small classes with one interface, so the comparison
# and the command line ask the executor instead of comparing its name.


class Executor(ABC):
    """Runs a comparison's pending trials. Subclasses set ``name`` (what ``--executor`` takes) and ``summary``
    (its line in ``--help``), and implement :meth:`run`.

    :param comparison: the comparison whose trials it runs (its ``jobs``, ``population``, Ray settings).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, comparison: Comparison) -> None:
        self.comparison = comparison

    def threads(self) -> int | None:
        """torch CPU threads per trial when ``--threads`` is not given; None = torch's choice."""
        return None

    def concurrent(self) -> int:
        """Trials that run at once (recorded with each trial: its times depend on it)."""
        return self.comparison.jobs

    def describe(self) -> str:
        """How the trials run, for the comparison's first line."""
        return f"{self.comparison.jobs} at a time"

    def batched_iterations(self, n_trials: int) -> int:
        """Iterations a progress bar should count for ``n_trials`` controller trials (0: count trials only)."""
        return 0

    def shows_trial_progress(self) -> bool:
        """Whether each trial may draw its own progress bar (one trial at a time, in this process)."""
        return False

    @abstractmethod
    def run(self, jobs: list[tuple[Trial, TrialJob]], on_done: OnDone | None, bar: Any) -> None:
        """Run every job; ``on_done(trial, summary)`` after each."""

    def run_pbt(self, job: TrialJob, bar: Any) -> dict[str, Any]:
        """Run a PBT row: its members on a local Ray instance with ``jobs`` CPUs, one member per CPU."""
        from .pbt import run_pbt_trial

        return run_pbt_trial(job, cpus=self.comparison.jobs, bar=bar)


EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(cls: type[Executor]) -> type[Executor]:
    """Class decorator: make ``cls`` the executor called ``cls.name``."""
    assert cls.name and cls.name not in EXECUTORS, cls
    EXECUTORS[cls.name] = cls
    return cls


OnDone = Callable[[Trial, dict[str, Any]], None]


@register_executor
class LocalExecutor(Executor):
    name = "local"
    summary = "trials one after another in this process, or --jobs worker processes at once"

    def threads(self) -> int | None:  # workers must not each take every core
        return max(1, (os.cpu_count() or 1) // self.comparison.jobs) if self.comparison.jobs > 1 else None

    def shows_trial_progress(self) -> bool:
        return self.comparison.jobs == 1

    def run(self, jobs: list[tuple[Trial, TrialJob]], on_done: OnDone | None, bar: Any) -> None:
        if self.comparison.jobs == 1:
            for trial, job in jobs:
                summary = run_trial(job)
                if on_done:
                    on_done(trial, summary)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        pool = ProcessPoolExecutor(max_workers=self.comparison.jobs, mp_context=ctx, initializer=exit_with_parent,
                                   initargs=(os.getpid(),))
        try:
            futures = {pool.submit(run_trial, job): trial for trial, job in jobs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        raise fut.exception()
                    if on_done:
                        on_done(futures[fut], fut.result())
        except BaseException:  # a failed trial, Ctrl-C or SIGTERM: stop now, not after every queued trial has run
            stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@register_executor
class PopulationExecutor(Executor):
    name = "population"
    summary = "--population trials at a time trained as one batched model, in this process"

    def concurrent(self) -> int:
        return self.comparison.population

    def describe(self) -> str:
        return f"batched populations of up to {self.comparison.population} trials (one model each)"

    def batched_iterations(self, n_trials: int) -> int:
        return self.comparison.cfg.max_iters * -(-n_trials // self.comparison.population)

    def run(self, jobs: list[tuple[Trial, TrialJob]], on_done: OnDone | None, bar: Any) -> None:
        # trials of one comparison share every setting but seed and controller: any of them can share a model
        size = self.comparison.population
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            for (trial, _), summary in zip(chunk, run_population([job for _, job in chunk], bar)):
                if on_done:
                    on_done(trial, summary)


@register_executor
class RayExecutor(Executor):
    name = "ray"
    summary = "each trial a Ray task on a local Ray instance or the cluster at --address"

    def threads(self) -> int | None:  # as many threads as CPUs the task holds
        return max(1, int(self.comparison.cpus_per_trial))

    def concurrent(self) -> int:
        return 0  # decided by the cluster

    def describe(self) -> str:
        c = self.comparison
        return (f"Ray tasks of {c.cpus_per_trial:g} CPU + {c.gpus_per_trial:g} GPU "
                f"on {c.address or 'a local Ray instance'}")

    def run(self, jobs: list[tuple[Trial, TrialJob]], on_done: OnDone | None, bar: Any) -> None:
        from .ray_executor import run_on_ray

        c = self.comparison
        run_on_ray(jobs, c.out, c.address, c.cpus_per_trial, c.gpus_per_trial, c.cfg.data, on_done)

    def run_pbt(self, job: TrialJob, bar: Any) -> dict[str, Any]:
        """A PBT row's members as Ray Tune trials on the cluster, one member per ``cpus_per_trial``."""
        from .pbt import run_pbt_trial

        c = self.comparison
        return run_pbt_trial(job, address=c.address, cpus_per_member=c.cpus_per_trial,
                             gpus_per_member=c.gpus_per_trial, bar=bar)


@dataclass
class Comparison:
    """Every controller × seed under one base config, in one folder.

    :param cfg: the base settings; each trial gets its own ``seed`` and ``out``.
    :param specs: controller specs (see :func:`controllers.parse_controllers`), ppo specs with their
        ``policy=PATH``; each is one row of the table.
    :param seeds: one trial per seed and spec.
    :param out: the comparison's folder.
    :param name: the comparison's name (default: the folder's name); the wandb group is ``compare-<name>``
        unless ``cfg.wandb_group`` is set.
    :param executor: how trials run, a name in :data:`EXECUTORS`: ``local`` — one after another in this process,
        or ``jobs`` worker processes at once; ``population`` — ``population`` trials at a time as one batched model
        (:func:`experiments.trials.run_population`), in this process; ``ray`` — Ray tasks.
    :param jobs: with ``local``: trials run at once, each in its own worker process (1 = in this process).
    :param population: with ``population``: members per population (trials trained together).
    :param address: with ``ray``: the cluster (``auto``, ``HOST:PORT``); None = a local Ray instance.
    :param cpus_per_trial: with ``ray``: CPUs each trial's task asks for (fractions allowed).
    :param gpus_per_trial: with ``ray``: GPUs each trial's task asks for (fractions allowed: 0.5 = two a GPU).
    :param threads: torch CPU threads per trial; None = all cores divided by ``jobs``.
    :param target: a validation loss: the table adds iterations and seconds to reach it; None = no such columns.
    :param baseline: spec of the baseline row; None = the constant rate with the lowest mean val loss.
    :param warm_up: before its first trial, each process trains a throwaway 2-step run
        (:func:`experiments.trials.warm_up`).
    """

    cfg: TrainConfig
    specs: list[str]
    seeds: list[int]
    out: Path
    name: str = ""
    executor: str = "local"
    jobs: int = 1
    population: int = 8
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    threads: int | None = None
    target: float | None = None
    baseline: str | None = None
    warm_up: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.name = self.name or self.out.resolve().name
        if self.executor not in EXECUTORS:
            raise UserError(f"--executor {self.executor} is invalid: it must be one of {', '.join(EXECUTORS)}")
        self.runner: Executor = EXECUTORS[self.executor](self)
        from .ray_executor import check_request

        check_request(self.cpus_per_trial, self.gpus_per_trial)
        if self.population < 1:
            raise UserError(f"--population {self.population} is invalid: it must be at least 1")
        if self.jobs < 1:
            raise UserError(f"--jobs {self.jobs} is invalid: it must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads} is invalid: it must be at least 1")
        if self.target is not None and not (math.isfinite(self.target) and self.target > 0):
            raise UserError(f"--target {self.target} is invalid: it must be a finite loss > 0")
        bad = [s for s in self.seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise UserError(f"--seeds {bad[0]} is invalid: seeds must be in [0, {MAX_SEED}]")
        if not self.seeds:
            raise UserError("--seeds must give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds repeats a seed: {self.seeds}")
        if self.baseline is not None and self.baseline not in self.specs:
            raise UserError(f"--baseline {self.baseline!r} is not one of the controllers: {', '.join(self.specs)}")
        folders: dict[str, str] = {}
        for spec in self.specs:  # two specs in one folder: the second trial would delete the first one's
            other = folders.setdefault(Trial(spec, 0).folder_name, spec)
            if other != spec:
                raise UserError(f"controllers {other!r} and {spec!r} would share the trial folders "
                                f"{Trial(spec, 0).folder_name.removesuffix('-s0')}-s<seed>; give only one of them, "
                                "or tell them apart by more than punctuation")

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
        write_json(self.out / "comparison.json", {
            "name": self.name, "group": self.group, "preset": self.cfg.preset, "specs": self.specs,
            "seeds": self.seeds, "executor": self.executor, "jobs": self.jobs, "population": self.population,
            "target": self.target, "baseline": self.baseline,
            "config": asdict(self.cfg)})

    @classmethod
    def load(cls, out: str | Path) -> Comparison:
        """The comparison saved in ``out``. Raises ``UserError`` naming the file if it is missing or corrupt."""
        out = Path(out)
        path = out / "comparison.json"
        if not path.is_file():
            raise UserError(f"{out} is not a comparison folder (no comparison.json); run python -m runs.compare first")
        r = read_json(path, "comparison record")
        try:
            known = {f.name for f in dataclasses.fields(TrainConfig)}  # settings added or dropped since stay readable
            cfg = TrainConfig(**{k: v for k, v in r["config"].items() if k in known})
            # comparisons written before the policy travelled inside the spec kept it apart
            specs = [with_policy(s, r.get("policy")) for s in r["specs"]]
            return cls(cfg=cfg, specs=specs, seeds=[int(s) for s in r["seeds"]], out=out, name=r["name"],
                       executor=r.get("executor", "local"), jobs=int(r.get("jobs", 1)),
                       population=int(r.get("population", 8)), target=r.get("target"), baseline=r.get("baseline"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"comparison record {path} is corrupt ({type(e).__name__}: {e}); "
                            "rerun python -m runs.compare with the same settings to rewrite it") from None

    def preflight(self) -> None:
        """Every path the comparison will write fits the filesystem (:func:`dyndrop.folders.check_output_path`):
        raises ``UserError`` before anything is written."""
        check_output_path(self.out, inside=[Path("trials", self.folder(t).name, "pbt_members.json.tmp")
                                            for t in self.trials])

    def pending(self) -> list[Trial]:
        """Trials not finished yet (raises ``UserError`` if a finished one has other settings or inputs)."""
        return [t for t in self.trials if trial_status(self.folder(t), self.trial_config(t), t.spec) == "todo"]

    def results(self) -> list[TrialResult]:
        """Every trial that finished (done or diverged), in trial order."""
        found = (load_result(t, self.folder(t), self.trial_config(t)) for t in self.trials)
        return [r for r in found if r is not None]

    def job(self, trial: Trial, progress: bool) -> TrialJob:
        cfg = dataclasses.replace(self.trial_config(trial), progress=progress)
        return TrialJob(cfg=cfg, spec=trial.spec, name=trial.run_name, group=self.group, comparison=self.name,
                        concurrent=self.runner.concurrent(),
                        threads=self.threads if self.threads is not None else self.runner.threads(),
                        wandb_dir=str(self.out), warm_up=self.warm_up, executor=self.executor)

    def run(self, on_done: OnDone | None = None, bar: Any = None) -> list[Trial]:
        """Run every pending trial with the comparison's executor; ``on_done(trial, summary)`` after each. Returns
        the trials run. ``bar`` (a tqdm bar) counts the iterations of batched populations and PBT rows.

        ``pbt`` rows run last, each as a population on Ray (:mod:`experiments.pbt`, :meth:`Executor.run_pbt`), after
        the single runs, which would compete for the CPUs.
        """
        from .pbt import is_pbt

        self.preflight()
        todo = self.pending()  # a finished trial with other settings or inputs is refused before anything is written
        self.save()
        progress = self.cfg.progress and self.runner.shows_trial_progress()
        self.runner.run([(t, self.job(t, progress)) for t in todo if not is_pbt(t.spec)], on_done, bar)
        for trial in (t for t in todo if is_pbt(t.spec)):
            summary = self.runner.run_pbt(self.job(trial, progress=False), bar)
            if on_done:
                on_done(trial, summary)
        return todo
