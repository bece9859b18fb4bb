"""integrations: the dropout knob of any model, the tensor-rate swap and torch.compile, the scheduler in a plain loop.

Helpers at the top are shared with tests/test_integrations_hf.py and tests/test_integrations_lightning.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from controllers import make_controller
from dyndrop import UserError
from integrations import DropoutKnob, DropoutScheduler, LossTracker, TensorRateDropout, swap_dropout

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The cores are shared: one thread each (tests/conftest.py gives the module's setting back afterwards)."""
    torch.set_num_threads(1)


PID = "pid:signal=gap,setpoint=-1,kp=0.2,ki=0,start=0,max_rate=0.5"
"""A PID whose rate is 0.2 * (gap + 1): non-zero from the first evaluation, and new at each one (the gap moves)."""


def tiny_gpt2(seed: int = 0, n_embd: int = 32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=65, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # unset, transformers warns at every call (a graph break under compile)
    return model


def train_mode_logits(model: nn.Module, x: torch.Tensor, seed: int = 123) -> torch.Tensor:
    was_training = model.training
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x).logits
    model.train(was_training)
    return out


def assert_rates_reach_the_model(model: nn.Module, rates: tuple[float, ...]) -> None:
    """Every dropout site holds its layer's rate, GPT-2's attention probability (``attn_dropout.p``, what it passes to
    scaled-dot-product attention) included; and the outputs show it: in train mode at a fixed seed another rate gives
    another mask pattern, and so does the attention probability alone."""
    knob = DropoutKnob(model)
    assert knob.rates == pytest.approx(rates)
    assert all(site.rate == pytest.approx(rates[site.layer]) for site in knob.sites)
    gpt2 = getattr(model, "model", model).transformer  # a LightningModule holds the GPT-2 in .model
    assert [block.attn.attn_dropout.p for block in gpt2.h] == pytest.approx(list(rates))
    assert any(site.attention for site in knob.sites)
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    at_rates = train_mode_logits(model, x)
    assert torch.equal(at_rates, train_mode_logits(model, x)), "same seed, same masks"
    knob.set(tuple(r / 2 for r in rates))
    assert not torch.allclose(at_rates, train_mode_logits(model, x)), "another rate, another mask pattern"
    knob.set(rates)
    for site in knob.sites:
        if site.attention:
            site.set(0.0)
    assert not torch.allclose(at_rates, train_mode_logits(model, x)), "the attention probability reaches the kernel"
    knob.set(rates)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# -- the knob ----------------------------------------------------------------------------------------------------

class Net(nn.Module):
    """Embedding dropout before a 3-layer encoder (nn.Dropout modules and MultiheadAttention's float), a head after."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.drop = nn.Dropout(0.1)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Dropout1d(0.1), nn.Linear(16, 11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.drop(self.embed(x))))


def test_knob_finds_modules_attributes_and_layers():
    model = Net()
    knob = DropoutKnob(model)
    assert (knob.layers_name, knob.n_layers) == ("encoder.layers", 3)
    by_name = {site.name: site for site in knob.sites}
    assert set(by_name) == {"drop", "head.0", *(f"encoder.layers.{i}.{d}" for i in range(3)
                                                 for d in ("self_attn:dropout", "dropout", "dropout1", "dropout2"))}
    assert (by_name["drop"].placement, by_name["drop"].layer) == ("before", 0)
    assert (by_name["head.0"].placement, by_name["head.0"].layer) == ("after", 2)
    assert [s.name for s in knob.sites if s.attention] == [f"encoder.layers.{i}.self_attn:dropout" for i in range(3)]
    assert knob.set([0.1, 0.2, 0.3]) == (0.1, 0.2, 0.3)
    assert model.encoder.layers[1].self_attn.dropout == 0.2 and model.encoder.layers[2].dropout1.p == 0.3
    assert model.drop.p == 0.1 and model.head[0].p == 0.3
    assert knob.rates == (0.1, 0.2, 0.3)
    report = knob.report()
    assert report.splitlines()[0].startswith("Net: 14 dropout sites (11 modules, 3 float attributes, 3 on attention")
    assert len(report.splitlines()) == 15
    assert DropoutKnob(model, layers=None).n_layers == 1
    assert DropoutKnob(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Dropout(0.1))).n_layers == 1


def test_knob_errors_are_one_line():
    with pytest.raises(UserError) as e:
        DropoutKnob(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert "Sequential has no dropout" in one_line(e)
    with pytest.raises(UserError) as e:
        DropoutScheduler(nn.Linear(3, 3), "pid", max_iters=10)
    assert "Linear has no dropout" in one_line(e)
    knob = DropoutKnob(Net())
    for bad in (1.0, -0.1, float("nan"), [0.1, 0.2]):
        with pytest.raises(UserError) as e:
            knob.set(bad)
        one_line(e)
    with pytest.raises(UserError) as e:
        DropoutKnob(Net(), layers="encoder")
    assert "not a ModuleList" in one_line(e)
    with pytest.raises(UserError) as e:
        DropoutKnob(Net(), layers="nope")
    one_line(e)


def test_swap_leaves_outputs_unchanged():
    """At a fixed seed: the same outputs in eval mode, and in train mode at rate 0 and at any rate outside compile
    (the swapped dropout draws the same masks as nn.Dropout)."""
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, swapped = tiny_gpt2(seed=3), tiny_gpt2(seed=3)
    names = swap_dropout(swapped)
    assert len(names) == 7 and all(isinstance(swapped.get_submodule(n), TensorRateDropout) for n in names)
    assert swapped.config._attn_implementation == "dyndrop_sdpa"
    assert set(swapped.state_dict()) == set(plain.state_dict()), "a swapped model saves as before"
    plain.eval(), swapped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, swapped(x).logits)
    for rate in (0.0, 0.2):
        DropoutKnob(plain).set(rate), DropoutKnob(swapped).set(rate)
        assert torch.equal(train_mode_logits(plain, x), train_mode_logits(swapped, x)), rate
    report = DropoutKnob(swapped).report()
    assert "7 with tensor rates" in report.splitlines()[0]


def test_swap_gives_float_attention_probabilities_a_tensor_rate():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=65, attention_dropout=0.1)
    plain = transformers.LlamaForCausalLM(config)
    swapped = transformers.LlamaForCausalLM(config)
    swapped.load_state_dict(plain.state_dict())
    assert [s.name for s in DropoutKnob(plain).sites] == [f"model.layers.{i}.self_attn:attention_dropout"
                                                          for i in range(2)]
    swap_dropout(swapped)
    knob = DropoutKnob(swapped)
    assert sum(s.attention and s.tensor_rate for s in knob.sites) == 2
    knob.set([0.2, 0.3])
    assert swapped.model.layers[1].self_attn.attention_dropout == 0.3
    assert swapped.model.layers[1].self_attn.dyndrop_attention.rate.item() == pytest.approx(0.3)
    DropoutKnob(plain).set([0.2, 0.3])
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(train_mode_logits(plain, x), train_mode_logits(swapped, x))


# -- torch.compile -----------------------------------------------------------------------------------------------

def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_tensor_rate_dropout_compiled_drops_at_its_rate():
    torch._dynamo.reset()
    drop = TensorRateDropout(0.3)
    compiled = torch.compile(drop, backend="aot_eager")
    x = torch.ones(200_000)
    y = compiled(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert y[y != 0].unique().tolist() == pytest.approx([1 / 0.7])
    drop.p = 0.1
    assert (compiled(x) == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    drop.p = 0.0
    assert torch.equal(compiled(x), x)
    drop.eval()
    drop.p = 0.5
    assert torch.equal(compiled(x), x)


def test_compiled_tensor_rate_attention_is_sdpa_attention():
    """Spelled out under compile (attention dropout on, at a rate that drops nothing in practice), attention gives
    the fused kernel's outputs, with the causal mask and with a padding mask."""
    model = tiny_gpt2(seed=5)
    swap_dropout(model)
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding in the second row
    model.eval()
    with torch.no_grad():
        expected = [model(x).logits, model(x, attention_mask=mask).logits]
    torch._dynamo.reset()
    DropoutKnob(model).set(1e-9)
    compiled = torch.compile(model, backend="aot_eager")
    model.train()
    with torch.no_grad():
        got = [compiled(x).logits, compiled(x, attention_mask=mask).logits]
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1][0], expected[1][0])
    torch.testing.assert_close(got[1][1, 5:], expected[1][1, 5:])  # padded query rows are garbage either way
    for site in DropoutKnob(model).sites:  # attention dropout alone, compiled: it acts
        site.set(0.5 if site.attention else 0.0)
    with torch.no_grad():
        assert not torch.allclose(compiled(x).logits, expected[0])


def recompiles_over(model: nn.Module, rates: tuple[float, ...]) -> int:
    """Graphs compiled after the first interval (a training step and an evaluation forward) of a run whose rate
    changes at every evaluation."""
    torch._dynamo.reset()
    counters.clear()
    knob = DropoutKnob(model)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo's guards, not the backend, decide recompiles
    x = torch.randn(4, 8)
    after_warmup = None
    for rate in rates:
        knob.set(rate)
        model.train()
        compiled(x).sum().backward()
        model.eval()
        with torch.no_grad():
            compiled(x)
        after_warmup = graphs() if after_warmup is None else after_warmup
    return graphs() - after_warmup


def test_tensor_rates_cost_at_most_one_recompile():
    """Plain nn.Dropout: a graph per rate (train and eval both read the float). Swapped: one more graph when the
    rate leaves 0, none after. (A Hugging Face GPT-2 in a compiled Trainer: tests/test_integrations_hf.py.)"""
    def mlp():
        return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 8), nn.Dropout(0.1))

    assert recompiles_over(mlp(), (0.1, 0.2, 0.3)) >= 3  # 4 with torch 2.13
    swapped = mlp()
    swap_dropout(swapped)
    assert recompiles_over(swapped, (0.0, 0.1, 0.2, 0.0, 0.3, 0.05)) == 1


# -- the scheduler -----------------------------------------------------------------------------------------------

def test_scheduler_from_a_spec_sets_the_starting_rate():
    model = Net()
    scheduler = DropoutScheduler(model, "constant:rate=0.15", max_iters=100)
    assert scheduler.rates == (0.15,) * 3 and DropoutKnob(model).rates == (0.15,) * 3
    assert DropoutScheduler(model, "pid", max_iters=100).rates == (0.0,) * 3  # PID starts at its bias
    assert DropoutScheduler(model, "linear", max_iters=100).rates == (0.3,) * 3


@pytest.mark.parametrize("spec", ["pidd", "pid:kp=fast", "constant:rate=2", "pid:gain=1", "ppo"])
def test_scheduler_spec_errors_are_one_line(spec):
    with pytest.raises(UserError) as e:
        DropoutScheduler(Net(), spec, max_iters=10)
    one_line(e)


def test_scheduler_argument_errors_are_one_line():
    for kwargs in ({"max_iters": 0}, {"max_iters": 10, "ema_beta": 1.0}):
        with pytest.raises(UserError) as e:
            DropoutScheduler(Net(), "pid", **kwargs)
        one_line(e)
    with pytest.raises(UserError) as e:
        DropoutScheduler(lambda rates: rates, "pid", max_iters=10)
    assert "n_layers" in one_line(e)
    with pytest.raises(UserError) as e:
        DropoutScheduler("model", "pid", max_iters=10)
    one_line(e)
    scheduler = DropoutScheduler(Net(), "pid", max_iters=10)
    with pytest.raises(UserError) as e:
        scheduler.step(-1)
    one_line(e)
    with pytest.raises(UserError) as e:
        scheduler.load_state_dict(DropoutScheduler(Net(), "linear", max_iters=10).state_dict())
    assert "controller 'linear'" in one_line(e)


def test_scheduler_asks_the_controller_at_evaluations():
    calls = []
    scheduler = DropoutScheduler(lambda rates: calls.append(rates) or rates, make_controller(PID), max_iters=100,
                                 n_layers=2)
    assert calls == [(0.0, 0.0)]
    scheduler.step(1, train_loss=3.0)
    assert len(calls) == 1, "no evaluation: no control"
    rates = scheduler.step(1, val_loss=3.5, eval_train_loss=3.0)
    assert rates == pytest.approx((0.3, 0.3)) and calls[-1] == rates  # 0.2 * (gap 0.5 + 1)
    stats = scheduler.stats()
    assert (stats.iteration, stats.eval_iter, stats.eval_val_loss, stats.best_val_loss) == (1, 1, 3.5, 3.5)
    assert stats.train_loss_smoothed == 3.0 and stats.rates == rates
    scheduler.step(2, train_loss=3.0, control=True)  # a control step without a new evaluation holds PID's rate
    assert calls[-1] == rates and len(calls) == 3
    record = scheduler.record()
    assert record["dropout/rate"] == pytest.approx(0.3) and "controller/p" in record


def test_loss_tracker_smooths_a_logged_mean_as_its_steps():
    per_step, logged = LossTracker(), LossTracker()
    for loss in (4.0, 3.0):
        for _ in range(10):
            per_step.add_train_loss(loss)
        logged.add_train_loss(loss, steps=10)
    assert logged.train_loss_smoothed == pytest.approx(per_step.train_loss_smoothed)
    unsmoothed = LossTracker(ema_beta=0.0)  # a loop that passes its own smoothed loss
    for loss in (float("nan"), 2.0, 1.5):
        unsmoothed.add_train_loss(loss)
    assert unsmoothed.train_loss_smoothed == 1.5
    no_eval = LossTracker()
    no_eval.add_train_loss(2.5)
    no_eval.add_eval(5, val_loss=3.0)  # no dropout-off train loss: the smoothed training loss stands in
    assert (no_eval.eval_train_loss, no_eval.eval_val_loss) == (2.5, 3.0)


def random_text(n: int = 4000) -> torch.Tensor:
    """Token ids with structure a tiny model picks up in a few steps: a noisy repeated pattern over 65 symbols."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 65, (97,), generator=g)
    data = pattern.repeat(n // 97 + 1)[:n]
    noise = torch.rand(n, generator=g) < 0.2
    return torch.where(noise, torch.randint(0, 65, (n,), generator=g), data)


def plain_loop(model, optimizer, scheduler, generator, start: int, end: int, data: torch.Tensor,
               eval_interval: int = 2) -> list[tuple[float, ...]]:
    """Train steps ``start..end`` with the scheduler; returns the rates set at each evaluation."""
    val = data[3000:].unfold(0, 17, 16)[:8]
    train_sample = data[:3000].unfold(0, 17, 16)[:8]

    def loss_on(rows):
        model.eval()
        with torch.no_grad():
            loss = model(rows[:, :-1], labels=rows[:, :-1]).loss.item()
        model.train()
        return loss

    rates = []
    for it in range(start, end):
        if it % eval_interval == 0:
            rates.append(scheduler.step(it, val_loss=loss_on(val), eval_train_loss=loss_on(train_sample)))
        starts = torch.randint(0, 3000 - 17, (4,), generator=generator)
        rows = torch.stack([data[s:s + 17] for s in starts.tolist()])
        loss = model(rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(it + 1, train_loss=loss.item())
    return rates


def test_plain_loop_with_the_scheduler_drives_pid_and_resumes_exactly(tmp_path):
    data = random_text()

    def fresh():
        model = tiny_gpt2(seed=7)
        return (model, torch.optim.AdamW(model.parameters(), lr=3e-3), DropoutScheduler(model, PID, max_iters=12),
                torch.Generator().manual_seed(1))

    model, optimizer, scheduler, generator = fresh()
    rates = plain_loop(model, optimizer, scheduler, generator, 0, 6, data)
    torch.manual_seed(99)  # the checkpoint: everything a loop saves, the scheduler's plain-Python state included
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "dropout": scheduler.state_dict()}, tmp_path / "ckpt.pt")
    json.dumps(scheduler.state_dict())  # plain Python
    rates += plain_loop(model, optimizer, scheduler, generator, 6, 12, data)
    assert len(set(rates)) == len(rates) == 6, "a new rate at every evaluation"
    assert_rates_reach_the_model(model, scheduler.rates)

    model2, optimizer2, scheduler2, generator2 = fresh()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    optimizer2.load_state_dict(ckpt["optimizer"])
    generator2.set_state(ckpt["generator"])
    scheduler2.load_state_dict(ckpt["dropout"])
    assert DropoutKnob(model2).rates == rates[2]
    torch.manual_seed(99)
    resumed = plain_loop(model2, optimizer2, scheduler2, generator2, 6, 12, data)
    assert resumed == rates[3:]
    assert scheduler2.state_dict() == scheduler.state_dict()


# -- the core stays light -----------------------------------------------------------------------------------------

def test_the_core_imports_neither_transformers_nor_lightning():
    code = ("import sys, controllers, dyndrop, gpt, integrations, integrations.knob, integrations.scheduler; "
            "heavy = [m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
