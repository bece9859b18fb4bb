"""Output folders: one writer at a time, and ``--overwrite`` that only ever deletes a run of this project.

:class:`FolderLock` holds an exclusive lock (``filelock``, an OS-level lock the kernel drops when the
process dies, even by ``kill -9``) on ``<folder>/.dyndrop.lock`` for the life of a run or a comparison;
a second process gets one line naming the holder. :func:`check_output_path` and :func:`check_output_file` are
the pre-flight of every output path (names that fit the filesystem, not a file where a folder goes), run before
anything is written; :func:`prepare_output` also creates the folder, and :func:`clear_run_folder` empties a folder
only if everything in it is a file this project writes, and never a comparison.
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


COMPARISON_MARKERS = ("comparison.json", "trials")
"""What shows a folder holds a comparison (``runs.compare``, ``runs.eval_policy``): many runs, not one."""

NAME_MAX = 255
"""Longest file or folder name, in bytes, where the filesystem does not say (ext4, xfs, APFS, NTFS: 255)."""
PATH_MAX = 4096
"""Longest path, in bytes (Linux)."""


def _ours(name: str) -> bool:
    return name in RUN_FILES or name.endswith(".tmp")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run or comparison of this project (one of its marker files)."""
    return folder.is_dir() and any((folder / m).exists() for m in MARKERS)


def holds_comparison(folder: Path) -> bool:
    """Whether ``folder`` holds a comparison (``comparison.json`` or ``trials/``) rather than a single run."""
    return folder.is_dir() and any((folder / m).exists() for m in COMPARISON_MARKERS)


def _name_max(path: Path) -> int:
    """The filesystem's longest name at ``path`` (its nearest existing folder's), else :data:`NAME_MAX`."""
    for parent in (path, *path.parents):
        try:
            if parent.is_dir():
                return os.pathconf(parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return NAME_MAX


def _shown(text: str) -> str:
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]}"


def check_output_path(path: str | Path, option: str = "--out", inside: tuple[str, ...] | list[str] = ()) -> Path:
    """The pre-flight of an output folder, before anything is written: each name in ``path``, and in each path of
    ``inside`` (the longest the command will write under it, e.g. a comparison's trial folders), fits the filesystem
    (at most 255 bytes a name, 4096 a path), and ``path`` is not a file, a FIFO or a broken symlink. Raises
    ``UserError`` naming ``option``; returns ``path``."""
    path = Path(path)
    limit = _name_max(path.absolute())
    for rel in ["", *inside]:
        full = path / rel
        for name in full.parts:
            if len(os.fsencode(name)) > limit:
                where = "" if not rel else f" would hold {_shown(str(rel))!r}, whose"
                raise UserError(f"{option} {_shown(str(path))}{where} name {_shown(name)!r} is "
                                f"{len(os.fsencode(name))} bytes long, and this filesystem allows {limit}; "
                                f"choose a shorter {option}" + (" or shorter names" if rel else ""))
        if len(os.fsencode(str(full.absolute()))) >= PATH_MAX:
            raise UserError(f"{option} {_shown(str(path))} is too deep: a path under it would be longer than "
                            f"{PATH_MAX} bytes; choose a shorter {option}")
    try:
        if path.is_symlink() and not path.exists():
            raise UserError(f"{option} {path} is a broken symlink or a symlink loop; give a real folder")
        if path.exists() and not path.is_dir():
            raise UserError(f"{option} {path} is an existing file, not a folder; choose another {option}")
    except OSError as e:
        raise UserError(f"{option} {_shown(str(path))} cannot be used: {e.strerror or e}") from None
    return path


def check_output_file(path: str | Path, option: str, fix: str = "choose a writable place") -> Path:
    """The pre-flight of an output *file* (``--json PATH``), before the work that fills it: not a folder, a name
    that fits, and a folder it can be written into (created if missing: an empty folder is all this leaves).
    Raises ``UserError`` naming ``option`` and ending in ``fix``; returns ``path``."""
    path = Path(path)
    check_output_path(path.parent, option, inside=(path.name,))
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name, e.g. {path / 'result.json'}")
    if path.is_symlink() and not path.exists():
        raise UserError(f"{option} {path} is a broken symlink or a symlink loop; give another file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".dyndrop-write-test-{os.getpid()}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {e.strerror or e}; {fix}") from None
    return path


def prepare_output(folder: str | Path) -> Path:
    """Check that ``folder`` can be an output folder and create it. Raises ``UserError`` for a path that is an
    existing file, a symlink, a name too long (:func:`check_output_path`), or not creatable (read-only filesystem,
    no permission)."""
    path = Path(folder)
    check_output_path(path)
    if path.is_symlink():
        raise UserError(f"--out {path} is a symlink; give the folder it points to, or another path")
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
    if holds_comparison(path):
        raise UserError(f"{path} holds a comparison (comparison.json and trials/, one folder per trial: what "
                        "runs.compare and runs.eval_policy write), not a single run; --overwrite replaces only a "
                        "run: choose another --out, or delete the comparison yourself")
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

        check_output_path(self.folder)
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
        try:
            (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        except OSError:  # a folder made read-only under the run: the error that stopped it is the one to tell (a
            pass  # holder left behind misleads no one: only a refused process reads it, and each holder rewrites it)
        self._lock.release()
        self._lock = None
        # a run that failed before writing anything leaves no folder behind (it did not exist before)
        try:
            if exc_type is not None and self._created and {p.name for p in self.folder.iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(self.folder, ignore_errors=True)
        except OSError:
            pass
