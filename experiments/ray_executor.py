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
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dyndrop import UserError, read_json, write_json

from .trials import Trial, TrialJob, run_trial

MAX_RETRIES = 3
"""Reruns of a trial whose node or worker process died."""
CONNECT_TIMEOUT_S = 20.0
"""Longest wait for a cluster at ``--address`` to answer (Ray's own connect retries for minutes)."""
CANCEL_GRACE_S = 10.0
"""After Ctrl-C or SIGTERM: how long cancelled trials get to stop and remove their temp folders."""
TOKEN_HINT = ("set RAY_AUTH_MODE=token for this command, with the head's token (ray get-auth-token, run on the head) "
              "in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
"""What to do when a cluster asks for a token (Ray's token authentication; see docs/comparisons.md)."""


def check_request(cpus: float, gpus: float, options: tuple[str, str] = ("--cpus-per-trial", "--gpus-per-trial")) -> None:
    """A task's resource request: ``cpus`` finite and > 0, ``gpus`` finite and >= 0 (fractions share a GPU).
    Raises ``UserError`` naming the option (``options``: the CPU and the GPU option's names)."""
    if not (isinstance(cpus, (int, float)) and math.isfinite(cpus) and cpus > 0):
        raise UserError(f"{options[0]} {cpus} is invalid: it must be a finite number > 0")
    if not (isinstance(gpus, (int, float)) and math.isfinite(gpus) and gpus >= 0):
        raise UserError(f"{options[1]} {gpus} is invalid: it must be a finite number >= 0")


def check_address(address: str) -> None:
    """Reach the cluster at ``address`` before Ray does, in at most :data:`CONNECT_TIMEOUT_S` seconds: ``auto``
    (Ray looks for a cluster on this machine) passes; ``HOST:PORT`` must answer on that port, as a Ray cluster
    that lets this process in. Raises ``UserError`` in one line: a malformed address, nothing listening, no Ray
    answer in time, or a cluster that asks for a token this process does not give (:data:`TOKEN_HINT`)."""
    if address == "auto":
        return
    m = re.fullmatch(r"\[?([A-Za-z0-9_.:-]+?)\]?:(\d{1,5})", address)
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise UserError(f"--address {address!r} is invalid: give auto or HOST:PORT, the head node's Ray port "
                        "(6379 unless ray start --head was given --port)")
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise UserError(f"nothing answers at --address {address} ({e.strerror or type(e).__name__}); start the "
                        "cluster with ray start --head --port PORT on HOST, or leave --address out for a local "
                        "Ray instance") from None
    probe = ("import sys\nfrom ray._raylet import GcsClient\n"
             "GcsClient(address=sys.argv[1]).internal_kv_get(b'dyndrop-probe', None, timeout=10)\n")
    try:
        res = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True,
                             timeout=CONNECT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"{address} answers, but not as a Ray cluster (no reply in {CONNECT_TIMEOUT_S:g} s); give "
                        "the head node's Ray port (6379 unless ray start --head was given --port)") from None
    if res.returncode != 0 and any(w in res.stderr for w in ("InvalidAuthToken", "AuthenticationError",
                                                             "Unauthenticated")):
        raise UserError(f"the Ray cluster at {address} asks for a token (token authentication): {TOKEN_HINT}")
    # any other failure (an older Ray without this client) is left to ray.init, which says what it found


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """``ray`` connected to ``address`` (``auto``, ``HOST:PORT``), or to a local instance started here (and
    stopped at the end) when ``address`` is None or empty, with ``num_cpus`` CPUs (default all). Already
    connected (:func:`ray_cluster`): that connection. SIGTERM keeps the handler the command installed
    (``runs.cli``), which ``ray.init`` would replace by its own (exit status 1 or 15, no resume hint)."""
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
        if address:
            check_address(address)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            # "local": a new instance even where one runs already (Ray's default would join the machine's newest
            # cluster, someone else's or another comparison's, and find it busy or refuse num_cpus)
            ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else f"; if it asks for a token, {TOKEN_HINT}"
            raise UserError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with ray start --head, "
                            f"or leave --address out for a local one{hint}") from None
        finally:
            if on_sigterm is not None:
                signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def largest_node(ray: Any) -> dict[str, float]:
    """The CPUs and GPUs of the cluster's alive node with the most GPUs, then CPUs."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    best = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    return {"CPU": best.get("CPU", 0.0), "GPU": best.get("GPU", 0.0)}


def fits(ray: Any, cpus: float, gpus: float) -> bool:
    """Whether one alive node of the cluster can give a task ``cpus`` CPUs and ``gpus`` GPUs."""
    return any(n.get("Resources", {}).get("CPU", 0) >= cpus and n.get("Resources", {}).get("GPU", 0) >= gpus
               for n in ray.nodes() if n.get("Alive"))


@contextmanager
def ray_cluster(address: str | None, cpus: float, gpus: float,
                options: tuple[str, str] = ("--cpus-per-trial", "--gpus-per-trial")) -> Iterator[None]:
    """The pre-flight of a run on Ray, before anything is written: the request checked (:func:`check_request`),
    the cluster at ``address`` reached (:func:`check_address`, connect time bounded) and one of its nodes able to
    give a task ``cpus`` CPUs and ``gpus`` GPUs (a request no node can meet would wait forever). Yields with the
    connection open; every :func:`ray_session` inside uses it. Without an address nothing starts here: the request
    is checked against this machine, where the run's own local instance will be."""
    check_request(cpus, gpus, options)
    if not address:
        import torch

        have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        if cpus > have["CPU"] or gpus > have["GPU"]:
            raise UserError(f"{options[0]} {cpus:g} and {options[1]} {gpus:g} ask for more than this machine has "
                            f"({have['CPU']:g} CPUs, {have['GPU']:g} GPUs); lower them, or give a cluster's --address")
        yield
        return
    with ray_session(address) as ray:
        if not fits(ray, cpus, gpus):
            have = largest_node(ray)
            raise UserError(f"no node of the Ray cluster at {address} has {cpus:g} CPUs and {gpus:g} GPUs for one "
                            f"task (the largest has {have['CPU']:g} CPUs, {have['GPU']:g} GPUs); lower {options[0]} "
                            f"or {options[1]}, or add a node that has them")
        yield


def run_remote_trial(job: TrialJob, dataset: bytes | None, scratch: str | None = None) -> dict[str, Any]:
    """Run one trial into a temporary folder on this node; its files (relative to the comparison's folder)
    as bytes, its summary, and the node it ran on. The folder lies inside the driver's ``scratch`` folder where this
    node has it (the driver's own machine), so the driver removes it even when this worker is killed."""
    import ray

    base = scratch if scratch and os.path.isdir(scratch) else None
    with tempfile.TemporaryDirectory(prefix="dyndrop-trial-", dir=base) as tmp:
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
    scratch = tempfile.mkdtemp(prefix="dyndrop-ray-")  # the trials' temp folders on this machine, removed below
    with ray_session(address) as ray:
        task = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=MAX_RETRIES)(run_remote_trial)
        data_ref = ray.put(dataset)
        refs = {task.remote(job, data_ref, scratch): trial for trial, job in jobs}
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
            cancel(ray, list(refs))
            raise
        finally:  # a worker killed after the grace period cannot remove its trial's folder: the driver does
            shutil.rmtree(scratch, ignore_errors=True)


def cancel(ray: Any, refs: list[Any]) -> None:
    """Stop the trials of ``refs``: as Ctrl-C would (each task's ``KeyboardInterrupt`` removes its temp folder),
    then, after :data:`CANCEL_GRACE_S` seconds, by killing the workers of those still running. Only those: Ray
    aborts the driver ("Tried to complete task that was not pending") when a task it force-cancels is finishing."""
    for ref in refs:
        ray.cancel(ref)
    try:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    except Exception:  # noqa: BLE001 - a cluster that is going away: the forced cancel below is all that is left
        running = refs
    for ref in running:
        ray.cancel(ref, force=True)
