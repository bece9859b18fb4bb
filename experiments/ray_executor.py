"""A comparison's trials as Ray tasks, on a local Ray instance or an existing cluster.

Each trial runs in a task on whichever node has the resources it asks for (``--cpus-per-trial``,
``--gpus-per-trial``, fractions allowed), into a temporary folder there; its files (the trial folder and its
wandb run) come back to the driver as bytes and are written into ``--out`` exactly as ``--executor local``
writes them, so no filesystem is shared. The dataset travels the same way: the driver ships its bytes and
each task writes them where the trial reads them (``$DYNDROP_DATA_DIR``), unless ``--data`` names a file, which
must then exist at that path on every node.

A node that dies mid-trial costs that trial a rerun elsewhere (Ray retries a task whose worker died,
``max_retries`` times); a trial that fails for another reason stops the comparison, as with ``local``. Ctrl-C
cancels every task not yet finished. Without an address, a local Ray instance is started and stopped.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dyndrop import UserError, read_json, write_json

from .trials import Trial, TrialJob, run_trial

MAX_RETRIES = 3
"""Reruns of a trial whose node or worker process died."""


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """``ray`` connected to ``address`` (``auto``, ``HOST:PORT``), or to a local instance started here (and
    stopped at the end) when ``address`` is None or empty, with ``num_cpus`` CPUs (default all)."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install -e '.[ray]'") from None
    started = not ray.is_initialized()
    if started and not address:
        # Ray runs its workers at nice 15 by default: beside any other load (a second comparison, a
        # build) a local instance's trials would crawl, and their times would not compare with --jobs
        os.environ.setdefault("RAY_worker_niceness", "0")
    if started:
        try:
            # "local": a new instance even where one runs already (Ray's default would join the machine's newest
            # cluster, someone else's or another comparison's, and find it busy or refuse num_cpus)
            ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with ray start --head, "
                            "or leave --address out for a local one") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_remote_trial(job: TrialJob, dataset: bytes | None) -> dict[str, Any]:
    """Run one trial into a temporary folder on this node; its files (relative to the comparison's folder)
    as bytes, its summary, and the node it ran on."""
    import ray

    with tempfile.TemporaryDirectory(prefix="dyndrop-trial-") as tmp:
        root = Path(tmp)
        if dataset is not None:
            data_dir = root / ".data"
            (data_dir / "shakespeare_char").mkdir(parents=True)
            (data_dir / "shakespeare_char" / "input.txt").write_bytes(dataset)
            os.environ["DYNDROP_DATA_DIR"] = str(data_dir)
        folder = Path("trials") / Path(job.cfg.out).name
        local = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, out=str(root / folder)), wandb_dir=tmp)
        summary = run_trial(local)
        node = ray.get_runtime_context().get_node_id()
        record = root / folder / "trial.json"  # where the trial lives for the driver, not here; where it ran
        saved = read_json(record)
        write_json(record, {**saved, "config": {**saved["config"], "out": job.cfg.out}, "ray_node": node})
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                 if p.is_file() and p.relative_to(root).parts[0] != ".data" and not p.name.startswith(".dyndrop")}
    return {"summary": summary, "files": files, "node": node}


def write_files(out: Path, files: dict[str, bytes]) -> None:
    """Write a finished trial's files under ``out``, each atomically (temp file, then rename)."""
    for rel, data in files.items():
        path = out / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise RuntimeError(f"a trial returned a path outside its folder: {rel}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def run_on_ray(jobs: list[tuple[Trial, TrialJob]], out: Path, address: str | None, cpus_per_trial: float,
               gpus_per_trial: float, data_path: str | None,
               on_done: Callable[[Trial, dict[str, Any]], None] | None = None) -> None:
    """Run every job as a Ray task and write each trial's files into ``out`` as it finishes."""
    from gpt.data import resolve_dataset

    dataset = None if data_path else resolve_dataset(None).read_bytes()
    with ray_session(address) as ray:
        task = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=MAX_RETRIES)(run_remote_trial)
        data_ref = ray.put(dataset)
        refs = {task.remote(job, data_ref): trial for trial, job in jobs}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                trial = refs.pop(done[0])
                try:
                    result = ray.get(done[0])
                except (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError) as e:
                    raise UserError(f"trial {trial.folder_name}: lost with its node or worker ({type(e).__name__}), "
                                    f"also in {MAX_RETRIES} reruns; the finished trials are kept, rerun the command "
                                    "to run the rest") from None
                write_files(out, result["files"])
                if on_done:
                    on_done(trial, {**result["summary"], "ray_node": result["node"]})
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
