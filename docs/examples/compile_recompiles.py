"""How many graphs torch.compile builds when the dropout rate changes: plain nn.Dropout against the swapped
tensor-rate dropout, on a small randomly initialized Hugging Face GPT-2 (2 layers, 64 wide).

One "evaluation interval" is a training step (forward and backward) and an evaluation forward; the rate changes
after each, as a controller changes it at every evaluation. The figure is the number of graphs compiled after the
first interval (the warm-up), read from torch._dynamo's counters.

    python docs/examples/compile_recompiles.py                 # inductor, the default backend
    python docs/examples/compile_recompiles.py --backend aot_eager
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch._dynamo.utils import counters

RATES = (0.0, 0.1, 0.2, 0.3, 0.0, 0.15, 0.25, 0.05, 0.35, 0.4, 0.12)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def measure(swap: bool, backend: str, rates: tuple[float, ...] = RATES, seed: int = 0) -> dict:
    """Train a fresh compiled GPT-2 one step per rate (plus an eval forward); return graph counts."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from integrations import DropoutKnob, swap_dropout

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=65, n_positions=64))
    model.loss_type = "ForCausalLM"  # unset, transformers warns once per call under dynamo: a graph break
    if swap:
        swap_dropout(model)
    knob = DropoutKnob(model)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (8, 64))
    per_interval, t0 = [], time.perf_counter()
    for rate in rates:
        knob.set(rate)
        model.train()
        compiled(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            compiled(x, labels=x)
        per_interval.append(graphs())
    return {"swapped": swap, "rates": list(rates), "graphs_after_each_interval": per_interval,
            "recompiles_after_warmup": per_interval[-1] - per_interval[0],
            "hit_recompile_limit": hit_recompile_limit(), "recompile_limit": torch._dynamo.config.recompile_limit,
            "seconds": round(time.perf_counter() - t0, 1)}


def hit_recompile_limit() -> bool:
    """Whether dynamo gave up on a function after ``recompile_limit`` graphs: from then on it runs uncompiled."""
    return any("recompile limit exceeded" in reason.lower() for reason in counters["unimplemented"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the recompile-limit warning is part of the figure
    for swap in (False, True):
        print(json.dumps(measure(swap, args.backend) | {"backend": args.backend, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
