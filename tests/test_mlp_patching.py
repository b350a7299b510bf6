"""hooklens.mlp_patching: the seeds' MLP experiment equals the one-forward-per-patch loop; clear errors."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from tolerances import tolerance

from hooklens.errors import InvalidInputError
from hooklens.evals import repeated_random_tokens
from hooklens.mlp_patching import repeated_halves, repeated_token_mlp_patching
from hooklens.utils import get_act_name


def reference_loop(model, tokens: torch.Tensor, prefix: int, seq_len: int) -> torch.Tensor:
    """One forward per (layer, second-half position): a hook copies the MLP output at the same token's first-half
    position over the one at p; loss = mean next-token loss of the second half's predictable tokens."""
    def loss(logits):
        start, end = prefix + seq_len, prefix + 2 * seq_len - 1
        log_probs = logits[:, start:end].float().log_softmax(-1)
        return -log_probs.gather(-1, tokens[:, start + 1:end + 1, None]).mean()

    with torch.no_grad():
        clean = loss(model(tokens))
        result = torch.zeros(model.cfg.n_layers, seq_len)
        for layer in range(model.cfg.n_layers):
            for j in range(seq_len):
                p = prefix + seq_len + j

                def swap(mlp_out, hook, p=p):
                    mlp_out = mlp_out.clone()
                    mlp_out[:, p] = mlp_out[:, p - seq_len]
                    return mlp_out

                logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("mlp_out", layer), swap)])
                result[layer, j] = loss(logits) - clean
    return result


@pytest.mark.parametrize("bos, batch, n_layers", [(True, 3, 2), (False, 1, 3)])
def test_equals_the_one_forward_per_patch_loop(bos, batch, n_layers):
    model = make_tiny_model(n_layers=n_layers).eval()
    seq_len = 7
    tokens = repeated_random_tokens(batch, seq_len, bos_token_id=0 if bos else None, low=1, high=97, seed=1)
    got = repeated_token_mlp_patching(model, tokens, progress=False)
    want = reference_loop(model, tokens, int(bos), seq_len)
    assert got.shape == (n_layers, seq_len) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **tolerance("reordered_sum"))
    assert want.abs().max() > 1e-3  # the patches move the loss: the comparison is not between zeros
    assert torch.equal(got[:, -1], torch.zeros(n_layers))  # the last position's prediction has no target


def test_small_memory_budget_gives_the_same_result():
    """Many chunks (one variant each) against one: the chunking does not change a value."""
    model = make_tiny_model().eval()
    tokens = repeated_random_tokens(2, 6, bos_token_id=0, low=1, high=97, seed=2)
    whole = repeated_token_mlp_patching(model, tokens, progress=False)
    chunked = repeated_token_mlp_patching(model, tokens, progress=False, memory_budget=1)
    torch.testing.assert_close(chunked, whole, **tolerance("reordered_sum"))


def test_repeated_halves():
    tokens = repeated_random_tokens(2, 5, bos_token_id=0, low=1, high=97, seed=0)  # [2, 11]
    assert repeated_halves(tokens) == (1, 5)
    assert repeated_halves(tokens[:, 1:]) == (0, 5)
    assert repeated_halves(tokens, seq_len=5) == (1, 5)
    with pytest.raises(InvalidInputError, match=r"do not repeat.*seq_len=4, prefix=3"):
        repeated_halves(tokens, seq_len=4)
    with pytest.raises(InvalidInputError, match="holds two copies of 1 .. 5 tokens"):
        repeated_halves(tokens, seq_len=6)


def test_clear_errors_before_any_forward():
    model = make_tiny_model().eval()
    tokens = repeated_random_tokens(1, 5, bos_token_id=0, low=1, high=97, seed=0)
    broken = tokens.clone()
    broken[0, -1] = (broken[0, -1] + 1) % 97
    with pytest.raises(InvalidInputError, match=r"tokens rows \[0\] do not repeat"):
        repeated_token_mlp_patching(model, broken, progress=False)
    with pytest.raises(InvalidInputError, match="attention-only"):
        repeated_token_mlp_patching(make_tiny_model(attn_only=True).eval(), tokens, progress=False)
