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
from typing import Any, Callable

from controllers import with_policy
from dyndrop import UserError, read_json, write_json
from gpt.config import MAX_SEED, TrainConfig

from .trials import Trial, TrialJob, TrialResult, load_result, run_population, run_trial, trial_status

EXECUTORS = ("local", "population", "ray")
PARENT_POLL_S = 2.0
"""How often a worker process checks that the comparison that started it is still alive (seconds)."""


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
"""How a comparison's trials run (see :class:`Comparison`)."""


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
    :param executor: how trials run: ``local`` — one after another in this process, or ``jobs`` worker processes
        at once; ``population`` — ``population`` trials at a time as one batched model
        (:func:`experiments.trials.run_population`), in this process.
    :param jobs: with ``local``: trials run at once, each in its own worker process (1 = in this process).
    :param population: with ``population``: members per population (trials trained together).
    :param address: with ``ray``: the cluster (``auto``, ``HOST:PORT``); None = a local Ray instance.
    :param cpus_per_trial: with ``ray``: CPUs each trial's task asks for (fractions allowed).
    :param gpus_per_trial: with ``ray``: GPUs each trial's task asks for (fractions allowed: 0.5 = two a GPU).
    :param threads: torch CPU threads per trial; None = all cores divided by ``jobs``.
    :param target: validation loss for "iterations/seconds to target"; None = the default rule
        (:func:`experiments.stats.default_target`).
    :param baseline: spec of the baseline row; None = the best constant rate.
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
        if not (self.cpus_per_trial > 0 and math.isfinite(self.cpus_per_trial)) or not (
                self.gpus_per_trial >= 0 and math.isfinite(self.gpus_per_trial)):
            raise UserError(f"--cpus-per-trial {self.cpus_per_trial} must be > 0 and --gpus-per-trial "
                            f"{self.gpus_per_trial} >= 0")
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

    def pending(self) -> list[Trial]:
        """Trials not finished yet (raises ``UserError`` if a finished one has other settings)."""
        return [t for t in self.trials if trial_status(self.folder(t), self.trial_config(t), t.spec) == "todo"]

    def results(self) -> list[TrialResult]:
        """Every trial that finished (done or diverged), in trial order."""
        found = (load_result(t, self.folder(t), self.trial_config(t)) for t in self.trials)
        return [r for r in found if r is not None]

    def job(self, trial: Trial, progress: bool) -> TrialJob:
        cfg = dataclasses.replace(self.trial_config(trial), progress=progress)
        threads = self.threads
        if threads is None and self.jobs > 1 and self.executor == "local":  # workers must not each take every core
            threads = max(1, (os.cpu_count() or 1) // self.jobs)
        if threads is None and self.executor == "ray":  # as many threads as CPUs the task holds
            threads = max(1, int(self.cpus_per_trial))
        return TrialJob(cfg=cfg, spec=trial.spec, name=trial.run_name, group=self.group, comparison=self.name,
                        concurrent=self.population if self.executor == "population" else
                        0 if self.executor == "ray" else self.jobs, threads=threads,
                        wandb_dir=str(self.out), warm_up=self.warm_up)

    def run(self, on_done: Callable[[Trial, dict[str, Any]], None] | None = None, bar: Any = None) -> list[Trial]:
        """Run every pending trial; ``on_done(trial, summary)`` after each. Returns the trials run.
        ``bar`` (a tqdm bar) counts a population's iterations.

        With ``jobs > 1`` the trials run in that many spawned worker processes (each loads the data
        itself); a worker that raises stops the comparison once the trials already running end. ``pbt``
        rows run last, each as a population on Ray (:mod:`experiments.pbt`): on a local Ray instance with
        ``jobs`` CPUs, or with ``--executor ray`` on the cluster, one member per ``cpus_per_trial``.
        """
        from .pbt import is_pbt

        self.save()
        todo = self.pending()
        pbt = [t for t in todo if is_pbt(t.spec)]
        self._run_controllers([t for t in todo if not is_pbt(t.spec)], on_done, bar)
        for trial in pbt:  # K members at a time on Ray: after the single runs, which would compete for the CPUs
            summary = self._run_pbt(trial, bar)
            if on_done:
                on_done(trial, summary)
        return todo

    def _run_pbt(self, trial: Trial, bar: Any = None) -> dict[str, Any]:
        from .pbt import run_pbt_trial

        job = self.job(trial, progress=False)
        if self.executor == "ray":
            return run_pbt_trial(job, address=self.address, cpus_per_member=self.cpus_per_trial,
                                 gpus_per_member=self.gpus_per_trial, bar=bar)
        # local and population: a local Ray instance with --jobs CPUs, one member per CPU
        return run_pbt_trial(job, cpus=self.jobs, bar=bar)

    def _run_controllers(self, todo: list[Trial], on_done: Callable[[Trial, dict[str, Any]], None] | None,
                         bar: Any) -> None:
        if self.executor == "ray":
            from .ray_executor import run_on_ray

            run_on_ray([(t, self.job(t, progress=False)) for t in todo], self.out, self.address, self.cpus_per_trial,
                       self.gpus_per_trial, self.cfg.data, on_done)
            return
        if self.executor == "population":
            # trials of one comparison share every setting but seed and controller: any of them can share a model
            for start in range(0, len(todo), self.population):
                chunk = todo[start:start + self.population]
                jobs = [self.job(t, progress=False) for t in chunk]
                for trial, summary in zip(chunk, run_population(jobs, bar)):
                    if on_done:
                        on_done(trial, summary)
            return
        if self.jobs == 1:
            for trial in todo:
                summary = run_trial(self.job(trial, progress=self.cfg.progress))
                if on_done:
                    on_done(trial, summary)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
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
