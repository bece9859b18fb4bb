"""Lightning: the same small GPT-2 and text as gpt2_dropout.py in a LightningModule, with the
DynamicDropoutCallback setting the dropout at the end of every validation.

Two validation dataloaders, so the controller sees the generalization gap with dropout off on both sides: the val
split (logged as ``val_loss``) and as many windows of the training characters (``train_eval_loss``).

    python docs/examples/lightning_gpt2.py --controller pid
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import CharSplits, gpt2, parser, random_windows, windows  # noqa: E402

import lightning as L  # noqa: E402

from integrations.lightning import DynamicDropoutCallback  # noqa: E402


class RandomWindows(IterableDataset):
    """An endless stream of batches of random training windows (``batch_size`` x ``block_size + 1``)."""

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int) -> None:
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield random_windows(self.data, self.block_size, self.batch_size, generator)


class CharGPT2(L.LightningModule):
    def __init__(self, vocab_size: int, block_size: int, learning_rate: float, max_steps: int, seed: int) -> None:
        super().__init__()
        self.model = gpt2(vocab_size, block_size, seed=seed)
        self.learning_rate, self.max_steps = learning_rate, max_steps

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(rows[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())

    def training_step(self, rows: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.loss(rows)

    def validation_step(self, rows: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = ("val_loss", "train_eval_loss")[dataloader_idx]
        self.log(name, self.loss(rows), add_dataloader_idx=False, batch_size=len(rows))

    def on_validation_end(self) -> None:  # runs after the callbacks' on_validation_end, so the new rate is set
        if not self.trainer.sanity_checking:
            dropout = next(c for c in self.trainer.callbacks if isinstance(c, DynamicDropoutCallback))
            metrics, rates = self.trainer.callback_metrics, dropout.scheduler.rates
            print(f"step {self.trainer.global_step:5d}  val {metrics['val_loss']:.4f}  "
                  f"train {metrics['train_eval_loss']:.4f}  dropout {rates[0]:.3f}", flush=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=0.1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.max_steps, self.learning_rate / 10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main(argv: list[str] | None = None) -> L.Trainer:
    p = parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    data = CharSplits.load(args.data, args.train_chars)
    module = CharGPT2(len(data.vocab), args.block_size, 2e-3, args.max_iters, args.seed)
    val = windows(data.val, args.block_size, args.eval_iters)
    train_sample = windows(data.train, args.block_size, len(val))
    trainer = L.Trainer(
        max_steps=args.max_iters, val_check_interval=args.eval_interval, check_val_every_n_epoch=None,
        gradient_clip_val=1.0, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[DynamicDropoutCallback(args.controller, val_metric="val_loss", train_metric="train_eval_loss")])
    trainer.fit(module, DataLoader(RandomWindows(data.train, args.block_size, args.batch_size, args.seed),
                                   batch_size=None),
                [DataLoader(val, batch_size=128), DataLoader(train_sample, batch_size=128)])
    return trainer


if __name__ == "__main__":
    main()
