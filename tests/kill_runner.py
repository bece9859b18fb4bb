"""Run ``python -m runs.train`` and kill the process (``os._exit(137)``, as ``kill -9`` would) at the N-th
write of a run's files. Used by tests/test_faults.py; not a test module.

    DYNDROP_KILL_AT=N python tests/kill_runner.py ARGS...   # N >= 1: die at that write; 0: count them

Writes, in order as they happen: each ``atomic_save`` of ``ckpt_last.pt`` (dies before the rename, leaving
a temp file), each ``link_or_copy`` to ``ckpt_best.pt``, each metrics record (dies after writing half the
line: a torn line), and ``summary.json`` (dies before it is written). With N = 0 the run completes and the
number of writes is printed to stderr as ``writes: K``.
"""
from __future__ import annotations

import os
import sys

import dyndrop.files
import gpt.tracking
import gpt.trainer

KILL_AT = int(os.environ.get("DYNDROP_KILL_AT", "0"))
count = 0


def event(kind: str) -> None:
    global count
    count += 1
    if count == KILL_AT:
        sys.stderr.write(f"killed at write {count} ({kind})\n")
        sys.stderr.flush()
        os._exit(137)


def wrap(module, name, kind):
    real = getattr(module, name)

    def patched(*args, **kwargs):
        event(kind)
        return real(*args, **kwargs)
    setattr(module, name, patched)


real_save = gpt.trainer.atomic_save


def atomic_save(obj, path):
    global count
    if count + 1 == KILL_AT:  # die mid-write: the temp file exists, the rename has not happened
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"half a checkpoint")
    event("ckpt_last")
    real_save(obj, path)


gpt.trainer.atomic_save = atomic_save
wrap(gpt.trainer, "link_or_copy", "ckpt_best")

real_log = gpt.tracking.RunLogger.log


def log(self, record):
    global count
    if count + 1 == KILL_AT:  # a torn line: half the record, no newline
        import json
        line = json.dumps(dyndrop.files.json_safe(record))
        self._file.write(line[: len(line) // 2])
        self._file.flush()
    event("metrics")
    real_log(self, record)


gpt.tracking.RunLogger.log = log
real_finish = gpt.tracking.RunLogger.finish


def finish(self, summary):
    event("summary")
    real_finish(self, summary)


gpt.tracking.RunLogger.finish = finish

if __name__ == "__main__":
    from runs.train import cli

    code = cli(sys.argv[1:])
    sys.stderr.write(f"writes: {count}\n")
    sys.exit(code)
