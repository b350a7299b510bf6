"""Edits a hook makes without replacing the tensor or moving its version counter — through `.data` or a NumPy
view — are applied on every attention backend, as on TransformerLens's eager path (issue: no way of editing an
activation is silently ignored). The eager backend always recomputes z from the pattern, so it is the reference."""
import pytest
import torch
from conftest import WIDE_TINY_MODEL, make_tiny_model
from tolerances import tolerance

from hooklens import attention_backend

BACKENDS = ["auto", "torch", "triton"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(**WIDE_TINY_MODEL).eval()


def zero_bos_via_data(pattern, hook):
    pattern.data[:, :, :, 0] = 0


def zero_bos_via_numpy(pattern, hook):
    pattern.detach().numpy()[:, :, :, 0] = 0


def mask_first_key_via_data(scores, hook):
    scores.data[:, :, 1:, 0] = float("-inf")


EDITS = {
    "pattern.data": ("hook_pattern", zero_bos_via_data),
    "pattern numpy view": ("hook_pattern", zero_bos_via_numpy),
    "attn_scores.data": ("hook_attn_scores", mask_first_key_via_data),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_untracked_edits_change_the_output(model, backend, edit):
    point, fn = EDITS[edit]
    tokens = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    hooks = [(f"blocks.0.attn.{point}", fn)]
    with torch.no_grad():
        plain = model(tokens)
        with attention_backend("eager"):
            want = model.run_with_hooks(tokens, fwd_hooks=hooks)
        with attention_backend(backend):
            got = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert not torch.allclose(want, plain)  # the edit matters
    torch.testing.assert_close(got, want, **tolerance("fused_vs_eager", torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_user_hooks_keep_the_fused_result(model, backend):
    """A user hook that only reads costs a comparison, not a recomputation: z stays the fused op's."""
    tokens = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = []
    with torch.no_grad(), attention_backend(backend):
        plain = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                                          lambda p, hook: seen.append(p.sum()))])
    assert len(seen) == model.cfg.n_layers
    if backend == "triton":  # un-hooked attention runs the flash kernel there, hooked the pattern kernel
        torch.testing.assert_close(hooked, plain, **tolerance("fused_vs_eager", torch.float32))
    else:  # one SDPA call gives z on both paths
        assert torch.equal(hooked, plain)
