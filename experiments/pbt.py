"""Population Based Training of the dropout rate: a comparison row (``pbt:population=K``) that spends K runs.

PBT (Jaderberg et al., 2017) trains K members at once, here through Ray Tune's ``PopulationBasedTraining``.
Every member is the project's own :class:`gpt.trainer.Trainer` at one constant rate. After every control
interval each member evaluates on the fixed validation batches and reports; the scheduler (synchronous:
it waits for the whole population) makes the bottom ``quantile`` of members copy a top member's checkpoint
(model, optimizer, sampler, RNG states, history, the best weights so far) and perturb its rate (×1.2 or
×0.8, or, with probability ``resample``, a fresh draw from [0, ``max_rate``]). The members start at rates
spread evenly over that range (the midpoints of K equal bins), so none starts at 0. With ``per_layer=1`` each
layer's rate is a hyperparameter of its own, perturbed independently (a member starts with every layer at
its starting rate).

The row is the member with the lowest best fixed-batch validation loss at the end (the signal PBT itself
selects by); its **lineage** is written as a trial folder like any other: ``metrics.jsonl`` holds the
records of every member it descends from, so its ``dropout/rate`` series is the schedule PBT found, and
``summary.json`` scores its best weights on the whole validation split (``best_val_loss_full``) and adds
``compute_iters``, the training iterations summed over all members (K × ``max_iters``). ``pbt_members.json``
holds every member's rate schedule and the members it copied (``pbt/member`` changes where it exploited).

Members run as Ray Tune trials: on a local Ray instance started here (``cpus`` CPUs: members at a time),
or on the cluster at ``address``. Checkpoints pass through a temporary folder on the driver, so on a
multi-node cluster that folder must be reachable from every node (Ray Tune's ``storage_path`` rule).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from controllers import spec_name
from controllers.base import describe_schedule
from controllers.specs import spec_params
from dyndrop import UserError, read_json, write_json
from gpt.config import TrainConfig

from .trials import TrialFolder, TrialJob

PBT = "pbt"
"""The spec name of the PBT row: ``pbt`` or ``pbt:population=K,max_rate=R,quantile=Q,resample=P``."""


def is_pbt(spec: str) -> bool:
    """Whether ``spec`` names the PBT row rather than a controller."""
    return spec_name(spec) == PBT


@dataclass(frozen=True)
class PBTSettings:
    """What a ``pbt:...`` spec sets.

    :param population: members trained at once (K >= 2); the row costs K runs of compute.
    :param max_rate: rates are explored in [0, max_rate], max_rate in (0, 1).
    :param quantile: the fraction of members (bottom) that copy one of the top fraction, in (0, 0.5].
    :param resample: probability that an exploiting member draws a fresh rate instead of perturbing, [0, 1].
    :param per_layer: 1 = one rate per layer, each mutated on its own; 0 = one rate for every layer.
    """

    population: int = 4
    max_rate: float = 0.4
    quantile: float = 0.25
    resample: float = 0.25
    per_layer: int = 0

    def rate_keys(self, n_layer: int) -> list[str]:
        """The hyperparameters PBT mutates: ``rate``, or ``rate_0`` ... ``rate_{n_layer-1}``."""
        return [f"rate_{i}" for i in range(n_layer)] if self.per_layer else ["rate"]

    def initial_rates(self) -> list[float]:
        """The members' starting rates: the midpoints of ``population`` equal bins of [0, max_rate]."""
        return [round(self.max_rate * (i + 0.5) / self.population, 6) for i in range(self.population)]


def pbt_settings(spec: str) -> PBTSettings:
    """Parse a ``pbt`` spec. Raises ``UserError`` naming the bad parameter."""
    kinds = {f.name: f.type for f in dataclasses.fields(PBTSettings)}
    values: dict[str, Any] = {}
    for key, text in spec_params(spec).items():
        if key not in kinds:
            raise UserError(f"pbt: bad parameter {key!r}; expected one of: {', '.join(kinds)}")
        try:
            values[key] = int(text) if kinds[key] in (int, "int") else float(text)
        except ValueError:
            raise UserError(f"pbt: parameter {key}={text!r} is not a valid {kinds[key]}") from None
    s = PBTSettings(**values)
    if not 2 <= s.population <= 64:
        raise UserError(f"pbt: population must be 2 to 64 members, got {s.population}")
    if not 0 < s.max_rate < 1:
        raise UserError(f"pbt: max_rate must be in (0, 1), got {s.max_rate}")
    if not 0 < s.quantile <= 0.5:
        raise UserError(f"pbt: quantile must be in (0, 0.5], got {s.quantile}")
    if not 0 <= s.resample <= 1:
        raise UserError(f"pbt: resample must be in [0, 1], got {s.resample}")
    if s.per_layer not in (0, 1):
        raise UserError(f"pbt: per_layer must be 0 or 1, got {s.per_layer}")
    return s


def check_ray_tune() -> None:
    """Raise ``UserError`` if Ray Tune is not installed."""
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        raise UserError("the pbt row needs Ray Tune: pip install -e '.[ray]'") from None


# --------------------------------------------------------------------------------------------------
# One member (runs in a Ray worker)


class Lineage:
    """The records of a member and of every member it descends from (what ``metrics.jsonl`` will hold)."""

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records = records or []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))


STATE, BEST, LINEAGE = "trainer.pt", "best.pt", "lineage.json"
"""A member's checkpoint folder: the trainer's state_dict, its best weights so far, its lineage's records."""


def restore_member(trainer: Any, checkpoint: Any, source: str) -> list[dict[str, Any]]:
    """Load a member's checkpoint (a Ray Tune ``Checkpoint``) into ``trainer``, best weights included;
    returns the lineage's records."""
    import torch

    with checkpoint.as_directory() as d:
        trainer.load_state_dict(torch.load(Path(d) / STATE, map_location="cpu", weights_only=True), source=source)
        if (Path(d) / BEST).is_file():
            best = torch.load(Path(d) / BEST, map_location="cpu", weights_only=True)
            trainer.best_weights = {k: v.to(trainer.device) for k, v in best.items()}
        return read_json(Path(d) / LINEAGE, "PBT lineage", kind=list)


@dataclass
class MemberJob:
    """What every member needs (plain, picklable values)."""

    cfg: TrainConfig
    threads: int | None
    keys: list[str]


def member(config: dict[str, Any], job: MemberJob) -> None:
    """Train one member from its checkpoint (or from scratch) to ``max_iters``, reporting after every
    control interval. ``config[key]`` for each of ``job.keys`` is its current rate (one, or one per layer).

    The member's run is a :class:`gpt.trainer.Trainer` without a controller (PBT sets the rate); its records are
    the trainer's own (``gpt.tracking``), and its wall time adds up along its lineage (it is in the checkpoint's
    history), so the winner's records carry ``perf/wall_time_s`` as a single run's do."""
    import torch
    from ray import tune

    from gpt.data import shared_data
    from gpt.tracking import eval_record
    from integrations import rate_record
    from gpt.trainer import Diverged, Trainer, resolve_device

    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = job.cfg
    values = [float(config[k]) for k in job.keys]
    rates = values * cfg.n_layer if len(values) == 1 else values
    rate = sum(rates) / len(rates)  # what the member reports
    me = tune.get_context().get_trial_id()
    lineage = Lineage()
    trainer = Trainer(cfg, data=shared_data(cfg.data, resolve_device(cfg.device)), logger=lineage)

    def timed(step: Any) -> Any:  # adds the step's time to the lineage's wall time (a restore replaces history)
        t0 = time.perf_counter()
        result = step()
        trainer.history.wall_time_s += time.perf_counter() - t0
        return result

    def evaluate() -> dict[str, Any]:
        result = timed(trainer.evaluate)
        lineage.log(eval_record(trainer.iteration, result["train_loss"], result["val_loss"], trainer.history))
        return result

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        evaluate()
    else:  # this member's own checkpoint after a restart, or a better member's after an exploit
        lineage.records = restore_member(trainer, checkpoint, "a PBT member's checkpoint")
    while trainer.iteration < cfg.max_iters:
        trainer.set_dropout(rates)
        lineage.log({**rate_record(trainer.iteration, rates), "pbt/member": me})
        n = min(cfg.control_every, cfg.max_iters - trainer.iteration)
        try:
            timed(lambda: trainer.advance(n))
            result = evaluate()
        except Diverged:  # the member is out; the others go on
            tune.report({"val_loss": math.inf, "best_val_loss": trainer.history.best_val_loss,
                         "iteration": trainer.iteration, "step_iters": n, "rate": rate, "diverged": True})
            return
        # inside the driver's temporary folder (cfg.out), which the driver removes however the run ends: a member
        # stopped while it waits in tune.report (a SIGTERM, Ctrl-C) never leaves this block
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=cfg.out) as d:
            torch.save(trainer.state_dict(), Path(d) / STATE)
            if trainer.best_weights is not None:
                torch.save({k: v.cpu() for k, v in trainer.best_weights.items()}, Path(d) / BEST)
            write_json(Path(d) / LINEAGE, lineage.records)
            tune.report({"val_loss": result["val_loss"], "best_val_loss": trainer.history.best_val_loss,
                         "iteration": trainer.iteration, "step_iters": n, "rate": rate, "diverged": False},
                        checkpoint=tune.Checkpoint.from_directory(d))


# --------------------------------------------------------------------------------------------------
# The driver: named pieces, then run_pbt_trial wiring them


def clip_rates(config: dict[str, Any], keys: list[str], max_rate: float) -> dict[str, Any]:
    """PBT's explore step for rates: ``config`` with each of ``keys`` clipped into ``[0, max_rate]`` (Tune's
    perturbation may step outside it). ``clip_rates({"rate": 0.48}, ["rate"], 0.4) == {"rate": 0.4}``."""
    return {**config, **{k: min(max(float(config[k]), 0.0), max_rate) for k in keys}}


class IterationCounter:
    """Counts the training iterations every member reports (the row's compute) and moves a progress bar. Tune's
    ``on_trial_result`` hook; :func:`tune_callback` makes it a ``tune.Callback``."""

    def __init__(self, bar: Any = None) -> None:
        self.iters, self.bar = 0, bar

    def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: dict[str, Any], **info: Any) -> None:
        n = int(result.get("step_iters", 0))
        self.iters += n
        if self.bar is not None:
            self.bar.update(n)


def tune_callback(counter: IterationCounter) -> Any:
    """``counter`` as a ``ray.tune.Callback`` (Tune accepts only those)."""
    from ray import tune

    class Hook(tune.Callback):
        def on_trial_result(self, **info: Any) -> None:
            counter.on_trial_result(**info)

    return Hook()


def search_space(settings: PBTSettings, keys: list[str]) -> dict[str, Any]:
    """Every member starts with each of its rates at its grid point (per layer: all layers alike)."""
    from ray import tune

    starts = tune.grid_search(settings.initial_rates())
    if not settings.per_layer:
        return {"rate": starts}
    return {"start": starts, **{k: tune.sample_from(lambda config: config["start"]) for k in keys}}


def make_tuner(job: TrialJob, settings: PBTSettings, member_cfg: TrainConfig, storage: Path,
               resources: dict[str, float], counter: IterationCounter) -> Any:
    """The Tune experiment: K members of :func:`member` under synchronous ``PopulationBasedTraining``, reporting to
    ``counter``, checkpoints under ``storage``."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    keys = settings.rate_keys(member_cfg.n_layer)
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1, synch=True,
        hyperparam_mutations={k: tune.uniform(0.0, settings.max_rate) for k in keys},
        custom_explore_fn=lambda config: clip_rates(config, keys, settings.max_rate),
        quantile_fraction=settings.quantile, resample_probability=settings.resample, log_config=False)
    trainable = tune.with_resources(tune.with_parameters(member, job=MemberJob(member_cfg, job.threads, keys)),
                                    resources)
    return tune.Tuner(
        trainable, param_space=search_space(settings, keys),
        tune_config=tune.TuneConfig(scheduler=scheduler, metric="val_loss", mode="min", reuse_actors=True),
        # stopped at its last report, so the scheduler does not make a finished member copy another
        run_config=tune.RunConfig(name="pbt", storage_path=str(storage), verbose=0, callbacks=[tune_callback(counter)],
                                  stop={"iteration": member_cfg.max_iters},
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                  failure_config=tune.FailureConfig(max_failures=3)))


@contextmanager
def tune_quietly_and_seeded(seed: int) -> Iterator[None]:
    """Tune without its own tables (the bar is ours), Ctrl-C raising as everywhere else (rather than Tune stopping
    and returning a partial population), and Python's ``random`` seeded with ``seed`` (PBT draws its exploit
    partners and perturbations from it); the caller's ``random`` state comes back afterwards."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def lineage_schedules(finals: list[Any]) -> list[dict[str, Any]]:
    """``pbt_members.json``: each finished member's best val loss and rate schedule (its lineage's rate records;
    ``pbt/member`` changes where it copied another member)."""
    members = []
    for r in finals:
        with r.checkpoint.as_directory() as d:
            records = read_json(Path(d) / LINEAGE, "PBT lineage", kind=list)
        members.append({"trial_id": r.metrics.get("trial_id"), "best_val_loss": r.metrics["best_val_loss"],
                        "schedule": [{k: v for k, v in rec.items() if k == "iter" or k.startswith(("dropout/", "pbt/"))}
                                     for rec in records if "dropout/rate" in rec]})
    return members


def final_rates(records: list[dict[str, Any]], n_layer: int) -> list[float] | None:
    """The last rates of a lineage, one per layer (None without a rate record)."""
    last = [rec for rec in records if "dropout/rate" in rec][-1:]
    return [last[0].get(f"dropout/layer_{i}", last[0]["dropout/rate"]) for i in range(n_layer)] if last else None


def pbt_summary(trainer: Any, records: list[dict[str, Any]], settings: PBTSettings, compute_iters: int) -> dict[str, Any]:
    """The winner's summary, as a single run's (scored as one is), with PBT's figures beside it."""
    summary = trainer.summary()
    members_of = [rec["pbt/member"] for rec in records if "pbt/member" in rec]
    exploits = sum(a != b for a, b in zip(members_of, members_of[1:]))
    changes = []
    for rec in records:
        if "dropout/rate" in rec and (not changes or changes[-1][1] != rec["dropout/rate"]):
            changes.append((rec["iter"], rec["dropout/rate"]))
    summary.update(controller=PBT, controller_params=asdict(settings), compute_iters=compute_iters,
                   pbt_population=settings.population,
                   exploits=exploits, final_rates=final_rates(records, trainer.cfg.n_layer) or summary["final_rates"],
                   controller_explanation=f"PBT's winning lineage ({exploits} copies of a better member) set "
                                          f"{describe_schedule(changes, trainer.cfg.max_iters)}")
    return summary


def run_pbt_trial(job: TrialJob, *, address: str | None = None, cpus: int = 1, cpus_per_member: float = 1.0,
                  gpus_per_member: float | None = None, bar: Any = None) -> dict[str, Any]:
    """Run the PBT row ``job.spec`` for ``job.cfg.seed`` and write its :class:`~experiments.trials.TrialFolder`
    (``job.cfg.out``). Returns its summary.

    :param address: a Ray cluster (``auto``, ``HOST:PORT``); None = a local instance with ``cpus`` CPUs.
    :param cpus_per_member: CPUs each member holds (members at a time = CPUs / this).
    :param gpus_per_member: GPUs each member holds; default 1/``cpus`` on a CUDA run, else 0.
    :param bar: a tqdm bar counting the population's iterations (``population × max_iters`` in all).
    """
    from gpt.data import resolve_dataset, shared_data
    from gpt.trainer import Trainer, resolve_device

    from .ray_executor import ray_session

    job = dataclasses.replace(job, executor="ray-tune-pbt")  # whatever runs the comparison's other rows
    settings, cfg = pbt_settings(job.spec), job.cfg
    device = resolve_device(cfg.device)
    if gpus_per_member is None:
        gpus_per_member = 1 / max(1, cpus) if device.type == "cuda" else 0.0
    folder = TrialFolder(job)
    folder.start()
    counter = IterationCounter(bar)
    with tempfile.TemporaryDirectory(prefix="dyndrop-pbt-") as tmp:
        storage = Path(tmp)
        member_cfg = cfg.quiet(out=str(storage / "member"), data=str(resolve_dataset(cfg.data)))
        tuner = make_tuner(job, settings, member_cfg, storage, {"cpu": cpus_per_member, "gpu": gpus_per_member}, counter)
        t0 = time.perf_counter()
        with tune_quietly_and_seeded(cfg.seed), ray_session(address, num_cpus=None if address else cpus):
            grid = tuner.fit()
        wall = time.perf_counter() - t0
        if grid.errors:
            raise RuntimeError(f"PBT members failed: {grid.errors[0]}")
        finals = [r for r in grid if r.checkpoint is not None and not r.metrics.get("diverged")]
        if not finals:  # recorded as a single run's divergence is, so the table counts it
            return folder.diverge(None, "every PBT member diverged", None)
        best = min(finals, key=lambda r: r.metrics["best_val_loss"])
        if best.metrics["iteration"] < cfg.max_iters:
            raise RuntimeError(f"PBT stopped at iteration {best.metrics['iteration']} of {cfg.max_iters}")
        write_json(folder.out / "pbt_members.json", lineage_schedules(finals))
        # the winner's lineage becomes the trial folder, scored as a single run is
        trainer = Trainer(cfg, data=shared_data(cfg.data, device))
        records = restore_member(trainer, best.checkpoint, "the best PBT member's checkpoint")
    trainer.history.wall_time_s = wall
    trainer.score_best()
    if cfg.gen_tokens:
        trainer.inference = trainer.measure_inference()
    summary = pbt_summary(trainer, records, settings, counter.iters)
    logger = folder.logger(trainer.controller, {"controller": PBT, **{f"controller.{k}": v for k, v in asdict(settings).items()}})
    for rec in records:
        logger.log(rec)
    return folder.finish(logger, summary, trainer.inference.text if trainer.inference else None)
