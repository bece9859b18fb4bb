"""Output folders: one writer at a time, and ``--overwrite`` that only ever deletes a run of this project.

:class:`FolderLock` holds an exclusive lock (``filelock``, an OS-level lock the kernel drops when the
process dies, even by ``kill -9``) on ``<folder>/.dyndrop.lock`` for the life of a run or a comparison;
a second process gets one line naming the holder. :func:`prepare_output` checks ``--out`` before
anything is written, and :func:`clear_run_folder` empties a folder only if everything in it is a file
this project writes.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import sys
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".dyndrop.lock"
HOLDER_NAME = ".dyndrop.lock.holder"

RUN_FILES = frozenset({
    # a training run
    "metrics.jsonl", "summary.json", "ckpt_last.pt", "ckpt_best.pt", "sample.txt", "wandb", "wandb_id.txt",
    # a trial of a comparison
    "trial.json", "diverged.json", "pbt_members.json",
    # a comparison
    "comparison.json", "trials", "results.md", "results.csv", "results.json", "report.html", "figures",
    LOCK_NAME, HOLDER_NAME,
})
"""Names this project writes into an output folder; temp files end in ``.tmp``."""

MARKERS = frozenset({"metrics.jsonl", "summary.json", "ckpt_last.pt", "trial.json", "comparison.json"})
"""Files that show a folder holds a run (or a comparison) of this project."""


def _ours(name: str) -> bool:
    return name in RUN_FILES or name.endswith(".tmp")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run or comparison of this project (one of its marker files)."""
    return folder.is_dir() and any((folder / m).exists() for m in MARKERS)


def prepare_output(folder: str | Path) -> Path:
    """Check that ``folder`` can be an output folder and create it. Raises ``UserError`` for a path that is an
    existing file, a symlink, or not creatable (read-only filesystem, no permission)."""
    path = Path(folder)
    if path.is_symlink():
        raise UserError(f"--out {path} is a symlink; give the folder it points to, or another path")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is an existing file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dyndrop-write-test-{os.getpid()}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write into --out {path}: {e.strerror or e}; choose a writable folder") from None
    return path


def clear_run_folder(folder: str | Path) -> None:
    """Delete the run in ``folder`` (every entry this project writes, but the lock), for ``--overwrite``.

    Refuses, with a ``UserError`` and before deleting anything, the current folder or one of its parents, a
    symlink, and a folder holding anything this project does not write. Symlinks inside are unlinked,
    never followed.
    """
    path = Path(folder)
    if path.is_symlink():
        raise UserError(f"--out {path} is a symlink; --overwrite never follows one")
    if not path.exists():
        return
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise UserError(f"--overwrite refuses to empty {path}: it is the current folder or one of its parents")
    foreign = sorted(p.name for p in path.iterdir() if not _ours(p.name))
    if foreign:
        raise UserError(f"--overwrite refuses to empty {path}: it holds files this project did not write "
                        f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose another --out")
    for entry in path.iterdir():
        if entry.name in (LOCK_NAME, HOLDER_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class FolderLock:
    """An exclusive lock on an output folder for as long as the ``with`` block runs.

    The lock lives in ``<folder>/.dyndrop.lock``; who holds it (pid, host, command, start time) is written
    beside it, so the process that is refused can say who has the folder.

    :param folder: the output folder (created if missing).
    :param what: what the folder holds, for the message ("run", "comparison").
    """

    def __init__(self, folder: str | Path, what: str = "run") -> None:
        self.folder, self.what = Path(folder), what
        self._lock = None

    def __enter__(self) -> FolderLock:
        import filelock

        self._created = not self.folder.exists()
        prepare_output(self.folder)
        lock = filelock.FileLock(str(self.folder / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = self.folder / HOLDER_NAME
            who = holder.read_text().strip() if holder.is_file() else "another process"
            raise UserError(f"{self.folder} is in use by {who}; wait for it to finish, or choose another --out") from None
        self._lock = lock
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        (self.folder / HOLDER_NAME).write_text(
            f"pid {os.getpid()} on {socket.gethostname()} ({command}, since {started})\n")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._lock is None:
            return
        (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        # a run that failed before writing anything leaves no folder behind (it did not exist before)
        if exc_type is not None and self._created and {p.name for p in self.folder.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(self.folder, ignore_errors=True)
