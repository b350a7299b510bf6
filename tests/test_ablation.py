"""hooklens.ablation.head_ablation against the naive loop: one run_with_hooks per head."""
from __future__ import annotations

import pytest
import torch
from tolerances import tolerance

from hooklens.ablation import ablation_values, head_ablation
from hooklens.utils import get_act_name


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 97, (3, 10), generator=g), torch.randint(0, 97, (3, 10), generator=g)


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean() + 0.1 * logits[:, :, 3].mean()


def naive(model, tokens, kind, resample_tokens=None):
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens if resample_tokens is None else resample_tokens)
        out = torch.empty(n_layers, n_heads)
        for layer in range(n_layers):
            z_ref = cache[get_act_name("z", layer)]
            for head in range(n_heads):
                def hook(z, hook):
                    z = z.clone()
                    if kind == "zero":
                        z[:, :, head] = 0
                    elif kind == "mean":
                        z[:, :, head] = z_ref[:, :, head].mean(dim=(0, 1))
                    else:
                        z[:, :, head] = z_ref[:, :, head]
                    return z
                logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("z", layer), hook)])
                out[layer, head] = metric(logits)
    return out


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
@pytest.mark.parametrize("budget", [None, 1])  # 1 byte: one head per chunk
def test_head_ablation_matches_naive_loop(model, data, kind, budget):
    tokens, other = data
    resample = other if kind == "resample" else None
    got = head_ablation(model, tokens, metric, kind=kind, resample_tokens=resample, memory_budget=budget,
                        progress=False)
    want = naive(model, tokens, kind, resample)
    assert got.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(got, want, **tolerance())
    with torch.no_grad():
        base = metric(model(tokens))
    assert (got - base).abs().max() > 1e-4, "ablations must change the metric (test would be vacuous)"


def test_metric_positions_last(model, data):
    tokens, _ = data
    def last(logits):
        return logits[:, -1, 5].mean()
    got = head_ablation(model, tokens, last, kind="mean", metric_positions=[-1], progress=False)
    want = head_ablation(model, tokens, last, kind="mean", progress=False)
    torch.testing.assert_close(got, want, **tolerance())


def test_mean_values_and_errors(model, data):
    tokens, other = data
    values = ablation_values(model, tokens, "mean")
    z = values[get_act_name("z", 1)]
    assert torch.allclose(z[0, 0], z[2, 9])  # one vector per head, at every (row, position)
    with pytest.raises(ValueError, match="resample_tokens"):
        head_ablation(model, tokens, metric, kind="resample", progress=False)
    with pytest.raises(ValueError, match="must match"):
        head_ablation(model, tokens, metric, kind="resample", resample_tokens=other[:, :5], progress=False)
    with pytest.raises(ValueError, match="kind"):
        head_ablation(model, tokens, metric, kind="nope", progress=False)
