import pytest
import torch

from gpt import GPT, GPTConfig
from gpt.model import dropout_cpu, fused_attention_with_dropout, sample_token


def small(n_layer: int = 3, fused: bool = False) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=n_layer, n_head=2, n_embd=16,
                         fused_attention_dropout=fused))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (4, 16), generator=g), torch.randint(0, 11, (4, 16), generator=g)


def test_rate_zero_is_exact_noop_and_draws_no_random_numbers():
    model, (x, y) = small(), batch()
    model.train()
    model.set_dropout(0.0)
    state = torch.get_rng_state()
    a = model(x, y)[1]
    assert torch.equal(torch.get_rng_state(), state), "rate 0 drew random numbers"
    b = model(x, y)[1]
    model.eval()
    c = model(x, y)[1]
    assert torch.equal(a, b) and torch.equal(a, c)


def test_positive_rate_drops_in_training_only():
    model, (x, y) = small(), batch()
    model.set_dropout(0.3)
    model.train()
    assert not torch.equal(model(x, y)[1], model(x, y)[1])
    model.eval()
    assert torch.equal(model(x, y)[1], model(x, y)[1])


def test_dropout_keeps_expected_activation_scale():
    from gpt.model import RateDropout
    d = RateDropout().train()
    d.active = True
    x = torch.ones(200_000)
    out = d(x, torch.tensor(0.4))
    assert abs((out == 0).float().mean().item() - 0.4) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.02


def test_per_layer_rates_go_to_their_layers():
    model, (x, y) = small(3), batch()
    rates = model.set_dropout([0.0, 0.2, 0.0])
    assert rates == (0.0, 0.2, 0.0)
    assert torch.allclose(model.dropout_rates, torch.tensor([0.0, 0.2, 0.0]))
    assert not model.drop.active and not model.h[0].mlp.dropout.active
    assert model.h[1].mlp.dropout.active and model.h[1].attn.attn_dropout.active
    assert not model.h[2].attn.resid_dropout.active
    model.train()
    assert not torch.equal(model(x, y)[1], model(x, y)[1])


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.9, 0.99999])
def test_cpu_dropout_drops_at_the_rate_and_keeps_the_mean(rate):
    torch.manual_seed(0)
    x = torch.ones(400_001)  # odd size: the last 32-bit draw is half used
    y = dropout_cpu(x, torch.tensor(rate))
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - rate) < 0.004
    assert abs(y.mean().item() - 1) < 5 * (rate / (1 - rate) / len(x)) ** 0.5  # 5 standard deviations
    assert len(y.unique()) == 2  # 0 and the one scale
    x2 = torch.randn(3, 5, 7).transpose(0, 2)  # non-contiguous input keeps its shape and values where kept
    y2 = dropout_cpu(x2, torch.tensor(0.5))
    kept = y2 != 0
    assert y2.shape == x2.shape and torch.allclose(y2[kept], x2[kept] * 2)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), [0.1, 0.2]])
def test_bad_rates_are_rejected(bad):
    """The model refuses bad rates outright (callers from outside, the trainer, turn them into a UserError)."""
    with pytest.raises(ValueError):
        small(3).set_dropout(bad)


def test_kv_cache_generates_the_same_tokens():
    model = small().train()
    model.set_dropout(0.3)  # generate() samples in eval mode whatever the caller's mode, then restores it
    idx = torch.zeros((2, 1), dtype=torch.long)
    a = model.generate(idx, 15, generator=torch.Generator().manual_seed(3), use_kv_cache=True)
    b = model.generate(idx, 15, generator=torch.Generator().manual_seed(3), use_kv_cache=False)
    assert torch.equal(a, b) and model.training
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and in float32 under autocast
        assert torch.equal(model.generate(idx, 15, generator=torch.Generator().manual_seed(3)), a)
    # past the block size the cache is rebuilt from the last block_size-1 tokens: still valid tokens
    c = model.generate(idx, 40, generator=torch.Generator().manual_seed(3), use_kv_cache=True)
    assert c.shape == (2, 41) and int(c.max()) < 11


def test_compiled_decode_step_gives_the_same_tokens_and_compiles_once():
    """The fixed-shape cache and the position tensor make one graph serve every step and every call."""
    from gpt.trainer import compiled_graphs
    torch._dynamo.reset()
    model = small().eval()
    model.set_dropout(0.1)  # eval mode: no dropout whatever the rate
    idx = torch.zeros((2, 1), dtype=torch.long)
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    uncached = model.generate(idx, 15, generator=seeded(), use_kv_cache=False)
    assert torch.equal(model.generate(idx, 15, generator=seeded(), compile=True), uncached)
    graphs = compiled_graphs()
    longer = model.generate(idx, 40, generator=seeded(), compile=True)  # new call, past the block size
    assert torch.equal(longer, model.generate(idx, 40, generator=seeded()))
    assert compiled_graphs() == graphs


def test_top_k_and_temperature_restrict_the_choice():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    noise = torch.empty(1000, 1, 4).exponential_(generator=torch.Generator().manual_seed(0))
    picks = torch.stack([sample_token(logits, n, top_k=2) for n in noise])
    assert set(picks.unique().tolist()) == {1, 2}
    cold = torch.stack([sample_token(logits, n, temperature=1e-3) for n in noise])
    assert set(cold.unique().tolist()) == {1}
    hot = torch.stack([sample_token(logits, n) for n in noise]).flatten()
    expected = torch.softmax(logits[0], 0)[1].item()  # about 0.73
    assert abs((hot == 1).float().mean().item() - expected) < 0.05


@pytest.mark.parametrize("fused", [False, True])
def test_rate_change_does_not_recompile(fused):
    """Changing a non-zero rate only rewrites a buffer (and, fused, a float read outside the graph)."""
    from gpt.trainer import compiled_graphs
    torch._dynamo.reset()
    model, (x, y) = small(2, fused=fused), batch()
    model.train()
    fwd = torch.compile(model, backend="aot_eager")
    model.set_dropout(0.1)
    fwd(x, y)[1].backward()
    graphs = compiled_graphs()
    for p in (0.2, 0.05, 0.4, [0.1, 0.3]):
        model.set_dropout(p)
        fwd(x, y)[1].backward()
    assert compiled_graphs() == graphs


def test_fused_attention_dropout_drops_at_the_set_rate():
    """At rate p the fused path keeps about 1 - p of each query's attention mass (rescaled by 1/(1-p))."""
    model = small(1, fused=True).train()
    q = k = torch.zeros(1, 1, 400, 8)  # equal attention weights over the visible keys
    v = torch.ones(1, 1, 400, 8)
    for p in (0.1, 0.5):
        model.set_dropout(p)
        y = fused_attention_with_dropout(q, k, v, model.h[0].attn.attn_dropout)
        kept = (y[0, 0, 200:, 0] * (1 - p)).mean().item()  # queries seeing >= 200 keys: little noise
        assert abs(kept - (1 - p)) < 0.02, (p, kept)
