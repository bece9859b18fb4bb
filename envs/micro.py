"""Micro-regimes: a family of tiny training runs, one drawn per episode, short enough for PPO to see thousands.

Each micro-regime is a 2-layer ``tiny``-preset GPT trained for 300 or 400 steps on the first 3,000-6,000
characters of the training split, with its width (64 or 96) and learning rate (3e-3 to 5e-3, log-uniform) drawn
too, and ten decisions per episode (an evaluation every tenth of the run). So little data makes most of them
overfit within the episode (measured, with the best constants' gain over rate 0, in docs/rl.md). Smaller models,
less data or shorter runs were tried first: there rate 0 was best everywhere (the model learned too little before
memorising for dropout to help), and larger ones cost too much for PPO's budget. Every
setting a micro-regime draws lies outside the suite's regimes (``experiments.suite``: 4-layer models of the cpu
preset, 96 wide or more), so a policy trained here is scored on the suite's held-out regimes without having seen
them. A regime is a pure function of its seed: :data:`TRAIN_REGIMES` for training, :data:`EVAL_REGIMES` held out
(the learning curve's fixed set).
"""
from __future__ import annotations

from typing import Any

import numpy as np

MICRO = "micro"
"""The episode name of the family (``DropoutEnv(episode="micro")``, ``runs.train_policy --episode micro``)."""
TRAIN_REGIMES = tuple(range(1000, 9000))
EVAL_REGIMES = tuple(range(9000, 9032))
WIDTHS = (64, 96)
TRAIN_CHARS = (3000, 4500, 6000)
LENGTHS = (300, 400)
LR_RANGE = (3e-3, 5e-3)
DECISIONS = 10


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

