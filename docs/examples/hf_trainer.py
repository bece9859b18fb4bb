"""A Hugging Face Trainer: the same small GPT-2 and text as gpt2_dropout.py, with the DynamicDropoutCallback
setting the dropout at every evaluation.

Two eval datasets, so the controller sees the generalization gap with dropout off on both sides: ``val`` (every
non-overlapping window of the val split) and ``train`` (as many windows of the training characters); the Trainer
reports them as ``eval_val_loss`` and ``eval_train_loss``.

    python docs/examples/hf_trainer.py --controller pid --out out/hf
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import CharSplits, gpt2, parser, windows  # noqa: E402

from transformers import Trainer, TrainingArguments  # noqa: E402

from integrations.hf import DynamicDropoutCallback  # noqa: E402


class Windows(Dataset):
    """Windows of ``block_size`` characters as causal-LM examples (the model shifts the labels itself).

    :param stride: characters between window starts: 1 gives every offset (training), ``block_size`` gives the
        non-overlapping windows (evaluation).
    """

    def __init__(self, data: torch.Tensor, block_size: int, stride: int, limit: int = 0) -> None:
        self.rows = data[:len(data) - (len(data) - block_size) % stride].unfold(0, block_size, stride)
        self.rows = self.rows[:limit] if limit > 0 else self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main(argv: list[str] | None = None) -> Trainer:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/hf", help="the Trainer's output_dir")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = CharSplits.load(args.data, args.train_chars)
    model = gpt2(len(data.vocab), args.block_size, seed=args.seed)
    val = Windows(data.val, args.block_size, args.block_size, args.eval_iters)
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.max_iters, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=2e-3, weight_decay=0.1, lr_scheduler_type="cosine",
        max_grad_norm=1.0, eval_strategy="steps", eval_steps=args.eval_interval, logging_steps=args.eval_interval,
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=Windows(data.train, args.block_size, 1),
        eval_dataset={"train": Windows(data.train, args.block_size, args.block_size, len(val)), "val": val},
        callbacks=[DynamicDropoutCallback(args.controller, val_metric="eval_val_loss",
                                          train_metric="eval_train_loss")])
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
