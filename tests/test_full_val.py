"""The end-of-run scores: the best weights on every window of the val split, and once on the test split."""
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
    loss, tokens = trainer.split_loss("val")
    val, T = data.val, 16
    n = (len(val) - 1) // T
    trainer.model.eval()
    with torch.no_grad():
        logits, _ = trainer.model(val[:n * T].view(n, T), val[1:n * T + 1].view(n, T))
        direct = F.cross_entropy(logits.flatten(0, 1), val[1:n * T + 1]).item()
    assert tokens == n * T == (len(val) - 1) // T * T
    assert math.isclose(loss, direct, rel_tol=1e-5)


def test_the_best_weights_are_scored_not_the_last_on_val_and_once_on_test(tmp_path):
    data = small_data()
    cfg = make_config("tiny", max_iters=30, eval_interval=10, block_size=16, eval_iters=2, wandb="disabled",
                      progress=False, checkpoint=False, gen_tokens=0, out=str(tmp_path / "r"))
    trainer = Trainer(cfg, make_controller("constant:rate=0.1"), data=data)
    summary = trainer.train()
    h = trainer.history
    assert summary["best_val_loss_full"] == h.best_val_loss_full == trainer.split_loss("val", trainer.best_weights)[0]
    assert summary["full_val_tokens"] > 0
    assert summary["test_loss"] == h.test_loss == trainer.split_loss("test", trainer.best_weights)[0]
    assert summary["test_tokens"] == (len(data.test) - 1) // 16 * 16 > 0
    assert summary["test_loss"] != summary["best_val_loss_full"]
    # scoring other weights gives another number: the best ones are not simply the final ones
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05)
    assert trainer.split_loss("val")[0] != summary["best_val_loss_full"]
    assert trainer.split_loss("val", trainer.best_weights)[0] == summary["best_val_loss_full"]


def test_replacing_the_test_text_changes_nothing_but_the_test_score(tmp_path):
    """Nothing that steers a run reads the test split: a run on a text whose test half is different (over the same
    characters, so the vocabulary is the same) is the same run, record for record, until test_loss."""
    import json

    from experiments.trials import make_trainer, train_and_save

    text = "".join(chr(97 + (i * 7 + i // 13) % 11) for i in range(4000))
    cut = len(CharData(text).train) + len(CharData(text).val)
    other = text[:cut] + text[cut:][::-1]  # the test half reversed: same characters, another text
    assert other != text and sorted(set(other)) == sorted(set(text))
    outs = []
    for i, t in enumerate((text, other)):
        path = tmp_path / f"data{i}.txt"
        path.write_text(t)
        cfg = make_config("tiny", max_iters=40, eval_interval=10, block_size=16, eval_iters=2, wandb="disabled",
                          progress=False, checkpoint=True, gen_tokens=16, data=str(path), out=str(tmp_path / f"r{i}"))
        outs.append(train_and_save(make_trainer(cfg, "pid:start=0,setpoint=0")))
        assert CharData.load(path).val.tolist() == CharData(text).val.tolist()
    a, b = outs
    records = [[json.loads(line) for line in (tmp_path / f"r{i}" / "metrics.jsonl").read_text().splitlines()]
               for i in range(2)]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]  # noqa: E731
    assert strip(records[0]) == strip(records[1]) and len(records[0]) > 10
    timing = {k for k in a if k.endswith(("_time_s", "_per_s"))}
    same = {k for k in a if k not in timing | {"test_loss", "data"}}
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert a["test_loss"] != b["test_loss"]
    assert (tmp_path / "r0" / "sample.txt").read_text() == (tmp_path / "r1" / "sample.txt").read_text()
