"""Kill a run at every write of its files, resume it, and compare with a run that was never killed.

The checkpoint sequence of one evaluation is: ``ckpt_last.pt`` (temp file, fsync, rename), then ``ckpt_best.pt``
(a link to it) if the val loss improved; metrics records are appended as they come; ``summary.json`` is
written last. tests/kill_runner.py dies (``os._exit(137)``, no cleanup, like ``kill -9``) at the N-th of
these writes — in the middle of it where that can tear a file — for every N of a short run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "tiny", "--max-iters", "10", "--eval-interval", "5", "--eval-iters", "2", "--log-interval", "5",
        "--gen-tokens", "0", "--controller", "pid:signal=gap,kp=4,ki=4,setpoint=0,start=0", "--no-progress", "--wandb", "disabled",
        "--threads", "1"]
TIMING = ("perf/", "time_s", "tokens_per_s")


def run(args: list[str], kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNDROP_KILL_AT": str(kill_at), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "kill_runner.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in records]


def outcome(out: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return untimed(records), {k: v for k, v in summary.items() if not any(t in k for t in TIMING)}


@pytest.mark.slow
def test_a_kill_at_any_write_resumes_exactly_and_best_agrees_with_the_summary(tmp_path):
    full = tmp_path / "full"
    res = run([*ARGS, "--out", str(full)], kill_at=0)
    assert res.returncode == 0, res.stderr
    writes = int(res.stderr.strip().splitlines()[-1].split()[-1])
    want_records, want_summary = outcome(full)
    assert writes >= 10 and want_summary["best_val_iter"] > 0

    def kill_and_resume(n: int) -> tuple[int, str, Path]:
        out = tmp_path / f"kill{n}"
        killed = run([*ARGS, "--out", str(out)], kill_at=n)
        assert killed.returncode == 137, (n, killed.stderr)
        resumed = run([*ARGS, "--out", str(out), "--resume"], kill_at=0)
        assert resumed.returncode == 0, (n, killed.stderr, resumed.stderr)
        return n, killed.stderr.strip().splitlines()[0], out

    with ThreadPoolExecutor(2) as pool:  # two subprocesses at a time: one per core
        for n, where, out in pool.map(kill_and_resume, range(1, writes + 1)):
            records, summary = outcome(out)
            assert records == want_records, where
            assert summary == want_summary, where
            best = torch.load(out / "ckpt_best.pt", weights_only=True, mmap=True)
            assert best["iteration"] == summary["best_val_iter"], where
            assert not list(out.glob("*.tmp")), where
