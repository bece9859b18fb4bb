"""How much dropout matters over the ``micro`` family: the constants 0–0.4 on held-out micro-regimes.

``python -m envs.family_gain --regimes 8 --seeds 2 --out docs/data/micro_family.json``

For each regime, the constant with the lowest mean val loss (over its seeds) is what a sweep would choose; its
*gain* is rate 0's mean test loss minus that constant's. A family a policy can learn from needs a positive mean
gain (dropout helps on average) and some regimes where 0 is best (so that "always the same rate" loses somewhere).
A regime *overfits* when rate 0's val minimum comes before its last evaluation on every seed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", type=int, default=8, help="how many of the held-out micro-regimes (first N)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per regime")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    from envs.micro import EVAL_REGIMES

    if not 1 <= args.regimes <= len(EVAL_REGIMES) or args.seeds < 1 or args.out.is_dir():
        p.exit(2, f"error: --regimes must be 1..{len(EVAL_REGIMES)}, --seeds at least 1, --out a file path "
                  f"(got {args.regimes}, {args.seeds}, {args.out})\n")
    import torch

    from envs.micro import micro_regime
    from envs.policy_training import CURVE_CONSTANTS, score_controllers

    torch.set_num_threads(1)
    start = time.time()
    regimes = list(EVAL_REGIMES[:args.regimes])
    res = score_controllers(list(CURVE_CONSTANTS), regimes, args.seeds, {"episode": "micro"})
    rows = []
    for regime, by in res.items():
        val = {s: float(np.mean([x["best_val_loss_full"] for x in v])) for s, v in by.items()}
        test = {s: float(np.mean([x["test_loss"] for x in v])) for s, v in by.items()}
        best = min(val, key=val.get)
        settings = micro_regime(regime)
        each = [x["best_val_iter"] / settings["max_iters"] for x in by[CURVE_CONSTANTS[0]]]
        at = float(np.mean(each))
        rows.append({"regime": regime, "settings": settings, "best_by_val": best,
                     "gain": test[CURVE_CONSTANTS[0]] - test[best], "rate0_min_at": at,
                     "overfits": max(each) < 1, "test_loss": test,
                     "val_loss": val})
        print(f"{regime}: best {best}, gain {rows[-1]['gain']:+.4f}, rate 0's val minimum at {at:.0%} of the run",
              flush=True)
    gains = [r["gain"] for r in rows]
    summary = {"command": "python -m envs.family_gain " + " ".join(sys.argv[1:] if argv is None else argv), "seconds": time.time() - start,
               "mean_gain": float(np.mean(gains)), "regimes_where_dropout_helps": sum(g > 0 for g in gains),
               "regimes_that_overfit": sum(r["overfits"] for r in rows), "regimes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"mean gain {summary['mean_gain']:+.4f}; dropout paid on {summary['regimes_where_dropout_helps']} and rate 0 "
          f"overfit on {summary['regimes_that_overfit']} of {len(rows)} regimes; {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
