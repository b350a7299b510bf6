"""hooklens.path_patching against a straightforward unbatched reference written here."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from tolerances import tolerance

from hooklens.path_patching import path_patch, path_patch_senders


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(n_layers=3).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 97, (2, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, 97, (2, 3), generator=g)
    return clean, corrupted


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


def reference(model, clean, corrupted, senders, receivers, metric):
    """Step by step: per-head loops, per-receiver dicts, no batching."""
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corr_cache = model.run_with_cache(corrupted)
        hooks = []
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_z"

            def set_z(z, hook, layer=layer, name=name):
                z = z.clone()
                for head in range(model.cfg.n_heads):
                    source = clean_cache if (layer, head) in senders else corr_cache
                    z[:, :, head, :] = source[name][:, :, head, :]
                return z

            hooks.append((name, set_z))
        saved = {}
        for name, head in receivers:
            def save(act, hook, name=name):
                saved[name] = act.clone()
            hooks.append((name, save))
        model.run_with_hooks(corrupted, fwd_hooks=hooks)
        patch_hooks = []
        for name, head in receivers:
            def put(act, hook, name=name, head=head):
                act = act.clone()
                if head is None:
                    return saved[name]
                if name.endswith("hook_pattern"):
                    act[:, head] = saved[name][:, head]
                else:
                    act[:, :, head] = saved[name][:, :, head]
                return act
            patch_hooks.append((name, put))
        return metric(model.run_with_hooks(corrupted, fwd_hooks=patch_hooks))


CASES = [
    ([(0, 3)], [("blocks.2.attn.hook_q", 0)]),
    ([(0, 1), (1, 3)], [("blocks.2.attn.hook_k", 0), ("blocks.2.attn.hook_v", 3)]),
    ([(1, 0)], [("blocks.2.hook_resid_post", None)]),  # direct path to the logits
    ([(0, 2)], [("blocks.1.attn.hook_pattern", 1), ("blocks.2.hook_resid_pre", None)]),
]


@pytest.mark.parametrize("senders, receivers", CASES)
def test_path_patch_matches_reference(model, data, senders, receivers):
    clean, corrupted = data
    got = path_patch(model, clean, corrupted, senders, receivers, metric)
    want = reference(model, clean, corrupted, senders, receivers, metric)
    torch.testing.assert_close(got, want, **tolerance())
    with torch.no_grad():
        base = metric(model(corrupted))
    assert abs(got - base) > 1e-4, "the path must matter (else the test is vacuous)"


def test_receiver_before_sender_is_a_noop(model, data):
    clean, corrupted = data
    got = path_patch(model, clean, corrupted, [(2, 0)], [("blocks.1.attn.hook_q", 0)], metric)
    with torch.no_grad():
        torch.testing.assert_close(got, metric(model(corrupted)), **tolerance())


def test_direct_path_of_all_heads_equals_activation_patching_the_last_layer(model, data):
    """Senders = every head of the last layer, receiver = final residual: frozen heads change nothing downstream
    of them, so this is patching that layer's z from clean."""
    clean, corrupted = data
    n = model.cfg.n_heads
    got = path_patch(model, clean, corrupted, [(2, h) for h in range(n)], [("blocks.2.hook_resid_post", None)], metric)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        want = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.2.attn.hook_z",
                                                                  lambda z, hook: cache["blocks.2.attn.hook_z"])]))
    torch.testing.assert_close(got, want, **tolerance())


def test_sender_sweep_matches_loop(model, data):
    clean, corrupted = data
    receivers = [("blocks.2.attn.hook_q", 1), ("blocks.2.hook_resid_pre", None)]
    got = path_patch_senders(model, clean, corrupted, receivers, metric)
    assert got.shape == (3, model.cfg.n_heads)
    for layer in range(3):
        for head in range(model.cfg.n_heads):
            want = path_patch(model, clean, corrupted, [(layer, head)], receivers, metric)
            torch.testing.assert_close(got[layer, head], want, **tolerance())
    some = path_patch_senders(model, clean, corrupted, receivers, metric, senders=[(0, 1)])
    assert torch.isnan(some).sum() == some.numel() - 1
    torch.testing.assert_close(some[0, 1], got[0, 1])


def test_bad_senders_and_receivers_are_refused(model, data):
    clean, corrupted = data
    receivers = [("blocks.2.attn.hook_v", 0)]
    with pytest.raises(ValueError, match=r"Sender head \(5, 0\) is out of range: the model has 3 layers"):
        path_patch(model, clean, corrupted, [(5, 0)], receivers, metric)  # once silently wrapped to layer 2
    with pytest.raises(ValueError, match="out of range"):
        path_patch_senders(model, clean, corrupted, receivers, metric, senders=[(0, 9)])
    with pytest.raises(ValueError, match="list of \\(hook_name, head or None\\) pairs"):
        path_patch(model, clean, corrupted, [(0, 0)], ("blocks.2.attn.hook_v", 0), metric)
    with pytest.raises(ValueError, match="Each receiver is a"):
        path_patch(model, clean, corrupted, [(0, 0)], ["blocks.2.attn.hook_v"], metric)
    with pytest.raises(ValueError, match="head 7 is out of range"):
        path_patch(model, clean, corrupted, [(0, 0)], [("blocks.2.attn.hook_v", 7)], metric)
    with pytest.raises(ValueError, match="has no head axis"):
        path_patch(model, clean, corrupted, [(0, 0)], [("blocks.2.hook_resid_pre", 1)], metric)
    # A metric with one value per batch row cannot be told apart from the senders: refused, not mixed up.
    with pytest.raises(ValueError, match="one number per run"):
        path_patch_senders(model, clean, corrupted, receivers, lambda logits: logits[:, -1, 5])
