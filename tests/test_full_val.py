"""The headline metric: the best weights scored on the whole validation split."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from controllers import make_controller
from gpt import CharData, Trainer, make_config


def small_data() -> CharData:
    text = "".join(chr(97 + (i * 7 + i // 13) % 11) for i in range(3000))  # 11 letters, some structure
    return CharData(text)


def test_full_val_loss_is_every_non_overlapping_window():
    data = small_data()
    cfg = make_config("tiny", max_iters=0, block_size=16, batch_size=3, eval_merge=2, wandb="disabled",
                      progress=False, checkpoint=False, gen_tokens=0)
    trainer = Trainer(cfg, data=data)
    loss, tokens = trainer.full_val_loss()
    val, T = data.val, 16
    n = (len(val) - 1) // T
    trainer.model.eval()
    with torch.no_grad():
        logits, _ = trainer.model(val[:n * T].view(n, T), val[1:n * T + 1].view(n, T))
        direct = F.cross_entropy(logits.flatten(0, 1), val[1:n * T + 1]).item()
    assert tokens == n * T == (len(val) - 1) // T * T
    assert math.isclose(loss, direct, rel_tol=1e-5)


def test_the_best_weights_are_scored_not_the_last(tmp_path):
    data = small_data()
    cfg = make_config("tiny", max_iters=30, eval_interval=10, block_size=16, eval_iters=2, wandb="disabled",
                      progress=False, checkpoint=False, gen_tokens=0, out=str(tmp_path / "r"))
    trainer = Trainer(cfg, make_controller("constant:rate=0"), data=data)
    summary = trainer.train()
    h = trainer.history
    assert summary["best_val_loss_full"] == h.best_val_loss_full == trainer.full_val_loss(trainer.best_weights)[0]
    assert summary["full_val_tokens"] > 0
    # scoring other weights gives another number: the best ones are not simply the final ones
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05)
    assert trainer.full_val_loss()[0] != summary["best_val_loss_full"]
    assert trainer.full_val_loss(trainer.best_weights)[0] == summary["best_val_loss_full"]
