"""A plain PyTorch loop: a small, randomly initialized Hugging Face GPT-2 learns a text character by character,
with a controller setting its dropout through a DropoutScheduler.

Data-limited on purpose: the model trains on the first ``--train-chars`` characters of the training split (the
first 90 % of the text), so it overfits and dropout matters. Every ``--eval-interval`` steps it is scored with
dropout off on every non-overlapping window of the val split (the first half of the last 10 %) and on as many
training windows; the scheduler hands both losses to the controller, which sets the next rate. The weights with
the best val loss are kept and scored once at the end on every non-overlapping window of the test split (the
second half of the last 10 %). ``--out DIR`` receives ``result.json``.

    python docs/examples/gpt2_dropout.py --controller pid --seed 1 --out out/gpt2/pid-1
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import CharSplits, gpt2, parser, random_windows, windows  # noqa: E402

from integrations import DropoutScheduler  # noqa: E402


@torch.no_grad()
def mean_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 128) -> float:
    """Mean cross-entropy (nats per character) over ``rows`` of windows, dropout off."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        logits = model(batch[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / rows[:, 1:].numel()


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for result.json (none: print only)")
    p.add_argument("--n-layer", type=int, default=2, help="GPT-2 layers")
    p.add_argument("--n-embd", type=int, default=64, help="GPT-2 width")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW learning rate (cosine decay to 10 %%)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    data = CharSplits.load(args.data, args.train_chars)
    model = gpt2(len(data.vocab), args.block_size, args.n_layer, args.n_embd, seed=args.seed)
    val_rows = windows(data.val, args.block_size, args.eval_iters)
    train_rows = windows(data.train, args.block_size, len(val_rows))  # dropout-off loss on training data
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(it / args.max_iters, 1.0))))
    dropout = DropoutScheduler(model, args.controller, max_iters=args.max_iters)
    batches = torch.Generator().manual_seed(args.seed)

    best = {"val_loss": math.inf, "iter": 0, "weights": None}
    history = []
    model.train()
    for it in range(args.max_iters + 1):
        if it % args.eval_interval == 0 or it == args.max_iters:
            val_loss, train_loss = mean_loss(model, val_rows), mean_loss(model, train_rows)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "iter": it,
                        "weights": {k: v.clone() for k, v in model.state_dict().items()}}
            rates = dropout.step(it, val_loss=val_loss, eval_train_loss=train_loss)  # the next interval's rate
            history.append({"iter": it, "val_loss": val_loss, "train_loss": train_loss, "rates": list(rates)})
            print(f"iter {it:5d}  val {val_loss:.4f}  train {train_loss:.4f}  dropout {rates[0]:.3f}", flush=True)
        if it == args.max_iters:
            break
        rows = random_windows(data.train, args.block_size, args.batch_size, batches)
        logits = model(rows[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        dropout.step(it + 1, train_loss=loss.item())

    model.load_state_dict(best["weights"])
    test_rows = windows(data.test, args.block_size)
    result = {"controller": args.controller, "seed": args.seed, "best_val_loss": best["val_loss"],
              "best_val_iter": best["iter"], "test_loss": mean_loss(model, test_rows),
              "test_chars": test_rows[:, 1:].numel(), "history": history, "args": vars(args),
              "wall_time_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    print(f"best val {result['best_val_loss']:.4f} at iter {result['best_val_iter']}; "
          f"test {result['test_loss']:.4f}; {result['wall_time_s']} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
