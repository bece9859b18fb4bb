"""What a local Ray instance costs per trial, against ``--jobs`` worker processes: the same comparison run
both ways, alternately, in one session.

    python -m bench.ray_overhead                       # tiny preset, 8 trials, 2 at a time, 2 rounds
    python -m bench.ray_overhead --rounds 3 --out bench_ray.json

Each round runs ``runs.compare`` once with ``--jobs J`` and once with ``--executor ray`` (a local instance with
J CPUs, one per trial), into fresh folders, as separate processes timed from start to exit (Ray's start-up
and shutdown included). It reports the wall seconds of each, the extra seconds per trial and the ratio; the
two tables' losses must agree (the same trials, one thread each), or it exits 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "runs.compare", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"runs.compare failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def losses(out: Path) -> dict[str, float]:
    trials = json.loads((out / "results.json").read_text())["trials"]
    return {f"{t['controller']}-s{t['seed']}": t["best_val_loss_full"] for t in trials}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--controllers", default="constant@0,0.1,0.2,0.3")
    p.add_argument("--seeds", default="2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=150)
    p.add_argument("--out", default=None, help="write the figures here as JSON")
    a = p.parse_args()
    common = ["--preset", "tiny", "--max-iters", str(a.max_iters), "--controllers", a.controllers, "--seeds", a.seeds,
              "--threads", "1", "--no-progress", "--wandb", "disabled", "--gen-tokens", "0"]
    times: dict[str, list[float]] = {"jobs": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        ways = [("jobs", ["--jobs", str(a.jobs)]), ("ray", ["--executor", "ray", "--cpus-per-trial", "1"])]
        for r in range(a.rounds):
            for kind, extra in ways if r % 2 == 0 else ways[::-1]:  # alternate: drift in load falls on both
                out = Path(tmp) / f"{kind}{r}"
                times[kind].append(run([*common, *extra, "--out", str(out)]))
                print(f"round {r + 1} {kind}: {times[kind][-1]:.1f} s", flush=True)
        n = len(losses(Path(tmp) / "jobs0"))
        same = losses(Path(tmp) / "jobs0") == losses(Path(tmp) / "ray0")
    jobs, ray = statistics.median(times["jobs"]), statistics.median(times["ray"])
    result = {"trials": n, "jobs": a.jobs, "rounds": a.rounds, "max_iters": a.max_iters, "seconds": times,
              "median_jobs_s": jobs, "median_ray_s": ray, "ray_over_jobs": ray / jobs,
              "extra_s_per_trial": (ray - jobs) / n, "same_losses": same}
    print(json.dumps(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
