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
import time
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


RUN = ["--preset", "tiny", "--eval-iters", "2", "--gen-tokens", "0", "--threads", "1", "--no-progress", "--wandb",
       "disabled"]


def in_a_small_disk(size_kb: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run the shell ``script`` (``$1`` is a folder) with a tmpfs of ``size_kb`` KiB mounted on that folder, in a
    user and mount namespace of its own: a real full disk for this one process tree. Skips where unshare or
    tmpfs mounts are not allowed."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with tmpfs mounts here ({probe.stderr.strip()})")
    mount = f'mount -t tmpfs -o size={size_kb}k tmpfs "$1" && cd {ROOT} && ' + script
    return subprocess.run(["unshare", "-rm", "sh", "-c", mount, "sh", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_a_real_full_disk_mid_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path):
    """#22 item 10: a 2.2 MB tmpfs filling up part-way through the second checkpoint (1.3 MB each) gave a
    RuntimeError traceback ("unexpected pos") that hid the ENOSPC; the old test only mocked atomic_save."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = " ".join([*RUN, "--max-iters", "20", "--eval-interval", "10"])
    res = in_a_small_disk(2200, f'{sys.executable} -m runs.train {args} --out "$1/run"; echo "rc=$?"; '
                                f'{sys.executable} -c "import torch, sys; print(\'kept\', torch.load(sys.argv[1], '
                                f'weights_only=True)[\'iteration\'])" "$1/run/ckpt_last.pt"; ls "$1/run"', str(disk))
    lines = res.stderr.strip().splitlines()
    assert "rc=2" in res.stdout, (res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "No space left on device" in lines[0], lines
    assert "last good checkpoint" in lines[0] and "Traceback" not in res.stderr
    assert ("kept 0" in res.stdout or "kept 10" in res.stdout) and ".tmp" not in res.stdout  # whole; no temp file


def test_a_folder_made_read_only_mid_run_is_one_line_and_the_run_resumes(tmp_path):
    """#22 item 11: a folder made read-only under a run gave a traceback in FolderLock.__exit__."""
    from hostile import read_only

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "runs.train", *RUN, "--max-iters", "100000", "--eval-interval", "50",
                             "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt_last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        with read_only(out, recursive=False):
            _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "last good checkpoint" in lines[0], err
    done = torch.load(out / "ckpt_last.pt", weights_only=True)["iteration"]
    res = subprocess.run([sys.executable, "-m", "runs.train", "--resume", "--out", str(out), "--max-iters",
                          str(done + 10), "--no-progress", "--wandb", "disabled"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


SAVE_AND_DIE = """
import os, sys
sys.path.insert(0, {tests!r})
from hostile import make_policy
kill_at, calls, real = int(sys.argv[2]), [], os.replace
def replace(src, dst):  # each file of a policy is renamed into place once written: die at the N-th rename
    calls.append(dst)
    if len(calls) == kill_at:
        os._exit(137)
    real(src, dst)
os.replace = replace
make_policy(__import__("pathlib").Path(sys.argv[1]), seed=7)
"""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_kill_while_a_policy_is_saved_leaves_the_old_one_or_a_refusal(tmp_path, kill_at):
    """A policy is two files; a kill between them (a train_policy checkpoint, a --trust conversion) must not make a
    pair that loads as something neither was: the old policy loads, or the new weights are refused against the
    old metadata, in one line."""
    from controllers import make_controller
    from dyndrop import UserError
    from hostile import make_policy

    policy = make_policy(tmp_path / "policy", seed=0)
    before = policy.read_bytes()
    res = subprocess.run([sys.executable, "-c", SAVE_AND_DIE.format(tests=str(ROOT / "tests")), str(tmp_path / "policy"),
                          str(kill_at)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 137, res.stderr
    if kill_at == 1:  # before the weights' rename: the old policy, whole
        assert policy.read_bytes() == before
        make_controller(f"ppo:policy={policy}")
    else:  # the new weights, the old metadata
        assert policy.read_bytes() != before
        with pytest.raises(UserError, match="does not match its metadata"):
            make_controller(f"ppo:policy={policy}")
