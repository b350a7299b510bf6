"""hooklens.attribution: attribution patching against finite differences and exact patching; neuron integrated
gradients against a step-by-step reference and completeness."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from tolerances import tolerance

from hooklens.attribution import attribution_patching, exact_top_entries, neuron_integrated_gradients
from hooklens.utils import get_act_name


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(d_mlp=64).eval().double()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 97, (2, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2:5] = torch.randint(0, 97, (2, 3), generator=g)
    return clean, corrupted


def metric(logits):  # smooth: a log-prob difference at the last position plus a little from everywhere
    logp = logits.log_softmax(-1)
    return logp[:, -1, 5].mean() - logp[:, -1, 7].mean() + 0.1 * logp[:, :, 3].mean()


def metric_last(logits):
    logp = logits[:, -1].log_softmax(-1)
    return logp[:, 5].mean() - logp[:, 7].mean()


def _moved_metric(model, clean, corrupted, name, index, eps, metric_fn):
    """metric with the activation at `index` (pos or (pos, head)) moved eps of the way from corrupted to clean."""
    _, clean_cache = model.run_with_cache(clean)

    def hook(act, hook):
        act = act.clone()
        target = clean_cache[name]
        sl = (slice(None),) + tuple(index)
        act[sl] = act[sl] + eps * (target[sl] - act[sl])
        return act

    return metric_fn(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))


@pytest.mark.parametrize("metric_fn, positions", [(metric, None), (metric_last, [-1])])
def test_matches_finite_differences(model, data, metric_fn, positions):
    clean, corrupted = data
    attr = attribution_patching(model, clean, corrupted, metric_fn, metric_positions=positions)
    assert attr["resid_pre"].shape == (2, 8) and attr["attn_out"].shape == (2, 8)
    assert attr["mlp_out"].shape == (2, 8) and attr["z"].shape == (2, 8, 4)
    eps = 1e-6
    entries = [("resid_pre", 0, (3,)), ("resid_pre", 1, (7,)), ("attn_out", 0, (4,)), ("mlp_out", 1, (7,)),
               ("mlp_out", 0, (2,)), ("z", 0, (5, 1)), ("z", 1, (7, 3)), ("z", 1, (4, 0))]
    with torch.no_grad():
        for short, layer, index in entries:
            name = get_act_name(short, layer)
            plus = _moved_metric(model, clean, corrupted, name, index, eps, metric_fn)
            minus = _moved_metric(model, clean, corrupted, name, index, -eps, metric_fn)
            fd = (plus - minus) / (2 * eps)
            est = attr[short][(layer,) + index]
            assert abs(est - fd) <= 1e-3 * abs(fd) + 1e-8, (short, layer, index, est, fd)
        # the estimate is not trivially zero where the patch matters (layer 0, corrupted positions)
        assert attr["resid_pre"][0, 2:5].abs().min() > 1e-4
        assert torch.allclose(attr["resid_pre"][0, :2], torch.zeros(2, dtype=torch.float64))  # identical tokens


def test_correlates_with_exact_patching(model, data):
    import hooklens.patching as P

    clean, corrupted = data
    attr = attribution_patching(model, clean, corrupted, metric_last, metric_positions=[-1])
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        base = metric_last(model(corrupted))
        exact = {
            "resid_pre": P.get_act_patch_resid_pre(model, corrupted, clean_cache, metric_last, progress=False) - base,
            "z": P.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric_last,
                                                      progress=False) - base,
        }
    for short, ex in exact.items():
        est = attr[short].flatten()
        corr = torch.corrcoef(torch.stack([est, ex.flatten()]))[0, 1]
        assert corr > 0.7, (short, corr)

    checked = exact_top_entries(model, clean, corrupted, metric_last, attr, k=5, metric_positions=[-1])
    for short in ("resid_pre", "z"):
        indices, estimate, ex = checked[short]
        assert indices.shape == (5, attr[short].dim())
        torch.testing.assert_close(estimate, attr[short][tuple(indices.T)])
        torch.testing.assert_close(ex, exact[short][tuple(indices.T)].to(ex.dtype))
        assert (estimate.abs()[:-1] >= estimate.abs()[1:]).all()


def test_leaves_parameter_grads_alone(model, data):
    clean, corrupted = data
    attribution_patching(model, clean, corrupted, metric, activation_names=("resid_pre",))
    assert all(p.grad is None for p in model.parameters())


# -- integrated gradients ----------------------------------------------------------------------------------------
def _prob(model, tokens, target, position, fwd_hooks=()):
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    return logits[:, position].softmax(-1)[:, target].mean()


def reference_ig(model, tokens, target, layer, steps, position):
    """Same right Riemann sum, one full forward + backward per step, with run_with_hooks."""
    name = get_act_name("post", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    x = cache[name][:, position]
    total = torch.zeros_like(x)
    for k in range(1, steps + 1):
        leaf = (k / steps * x).detach().requires_grad_(True)

        def hook(act, hook):
            act = act.clone()
            act[:, position] = leaf
            return act

        with torch.enable_grad():
            prob = _prob(model, tokens, target, position, [(name, hook)])
            (g,) = torch.autograd.grad(prob, [leaf])
        total += g * tokens.shape[0]  # undo the batch mean: per-row gradient
    return (x * total / steps).mean(0)


@pytest.mark.parametrize("batch_alphas", [True, False])
def test_ig_matches_step_by_step_reference(model, batch_alphas):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 97, (2, 7), generator=g)
    target, steps, position = 11, 6, 4
    got = neuron_integrated_gradients(model, tokens, target, layer=None, steps=steps, position=position,
                                      batch_alphas=batch_alphas)
    assert got.shape == (2, 64)
    for layer in range(2):
        want = reference_ig(model, tokens, target, layer, steps, position)
        torch.testing.assert_close(got[layer], want, **tolerance("small_grads", torch.float64))
    one = neuron_integrated_gradients(model, tokens, target, layer=1, steps=steps, position=position)
    assert (one[0] == 0).all()
    torch.testing.assert_close(one[1], got[1])


def test_ig_completeness(model):
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 97, (1, 9), generator=g)
    position = -1
    with torch.no_grad():
        target = int(model(tokens)[0, position].argmax())
    for layer in range(2):
        name = get_act_name("post", layer)

        def zero(act, hook):
            act = act.clone()
            act[:, position] = 0
            return act

        with torch.no_grad():
            gap = _prob(model, tokens, target, position) - _prob(model, tokens, target, position, [(name, zero)])
        ig50 = neuron_integrated_gradients(model, tokens, target, layer=layer, steps=50)[layer].sum()
        ig25 = neuron_integrated_gradients(model, tokens, target, layer=layer, steps=25)[layer].sum()
        # The right Riemann sum's error is ~C/steps for a smooth integrand, so err(25) ~ 2 err(50) and
        # |IG50 - IG25| estimates err(50); allow twice that, plus 2% of the gap as slack for the asymptotics.
        assert abs(gap) > 1e-4
        err = abs(ig50 - gap)
        assert err <= 2 * abs(ig50 - ig25) + 0.02 * abs(gap), (layer, float(ig50), float(gap))
        assert err <= 0.1 * abs(gap)
        # Richardson extrapolation removes the O(1/steps) term: much closer to the exact gap
        assert abs(2 * ig50 - ig25 - gap) <= 0.2 * err + 1e-7


def test_attention_score_attributions_are_finite_and_first_order(model, data):
    """Masked scores are -inf in both runs; their attribution is 0, not NaN (which poisoned any sum)."""
    clean, corrupted = data
    out = attribution_patching(model, clean, corrupted, metric, activation_names=("attn_scores",))
    scores = out["attn_scores"]  # [layer, head, dest, src]
    assert torch.isfinite(scores).all()
    assert (scores.triu(diagonal=1) == 0).all() and scores.abs().sum() > 0
    # Visible entries carry the real first-order estimate: central finite differences of the metric, moving one
    # score entry (all batch rows) from corrupted to clean; entries the corruption changes (positions 2-4 feed
    # them). Same bound as test_matches_finite_differences.
    eps = 1e-6
    with torch.no_grad():
        for layer, head, dest, src in [(0, 1, 4, 2), (0, 3, 7, 3), (1, 0, 5, 5), (1, 2, 7, 1)]:
            name = get_act_name("attn_scores", layer)
            plus = _moved_metric(model, clean, corrupted, name, (head, dest, src), eps, metric)
            minus = _moved_metric(model, clean, corrupted, name, (head, dest, src), -eps, metric)
            fd = (plus - minus) / (2 * eps)
            est = scores[layer, head, dest, src]
            assert abs(fd) > 1e-6, (layer, head, dest, src, "the patch must matter here")
            assert abs(est - fd) <= 1e-3 * abs(fd) + 1e-8, (layer, head, dest, src, est, fd)
