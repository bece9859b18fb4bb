"""Micro-regimes: a family of tiny training runs, one drawn per episode, short enough for PPO to see thousands.

Each micro-regime is a 2-layer ``tiny``-preset GPT (block 32, batch 16) trained for 240, 300 or 360 steps on the
first 2,500-4,000 characters of the training split, with its width (48, 64 or 80) and a high learning rate
(5e-3 to 9e-3, log-uniform) drawn too, and twenty decisions per episode (an evaluation every twentieth of the
run, as in the suite's regimes). Little data and a high learning rate make most of them overfit early in the
episode, so dropout can pay (measured, with the best constants' gain over rate 0, in docs/results.md). The first
family (3,000-6,000 characters, lr 3e-3 to 5e-3, ten decisions) was still learning at the end in most instances,
with rate 0 best; wider models gain more but cost what PPO's budget cannot pay. Every setting a micro-regime
draws lies outside the suite's regimes (``experiments.suite``: 4-layer models of the cpu preset, 96 wide or
more), so a policy trained here is scored on the suite's held-out regimes without having seen them. A regime is
a pure function of its seed: :data:`TRAIN_REGIMES` for training, :data:`EVAL_REGIMES` held out (the learning
curve's fixed set).
"""
from __future__ import annotations

from typing import Any

import numpy as np

MICRO = "micro"
"""The episode name of the family (``DropoutEnv(episode="micro")``, ``runs.train_policy --episode micro``)."""
TRAIN_REGIMES = tuple(range(1000, 9000))
EVAL_REGIMES = tuple(range(9000, 9032))
WIDTHS = (48, 64, 80)
TRAIN_CHARS = (2500, 3000, 4000)
LENGTHS = (240, 300, 360)
LR_RANGE = (5e-3, 9e-3)
DECISIONS = 20


def micro_regime(seed: int) -> dict[str, Any]:
    """The micro-regime of ``seed``: ``preset``, ``max_iters``, ``interval`` and ``config`` (TrainConfig
    overrides), as a named episode configuration holds them. The same seed always gives the same regime."""
    rng = np.random.default_rng([int(seed), 20261202])
    lr = float(np.exp(rng.uniform(np.log(LR_RANGE[0]), np.log(LR_RANGE[1]))))
    max_iters = int(rng.choice(LENGTHS))
    config = {"n_layer": 2, "n_head": 2, "n_embd": int(rng.choice(WIDTHS)), "block_size": 32, "batch_size": 16,
              "train_chars": int(rng.choice(TRAIN_CHARS)), "learning_rate": round(lr, 6),
              "min_lr": round(lr / 10, 7), "warmup_iters": max_iters // 10, "eval_iters": 4}
    return {"preset": "tiny", "max_iters": max_iters, "interval": max_iters // DECISIONS, "config": config}

