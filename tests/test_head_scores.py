"""`head_scores`: equal to hook-based pattern-diagonal scores, on the torch backend (line sums of the reference
pattern) and the triton backend (in-kernel statistics; Triton's interpreter on CPU-only machines, switched on in
conftest.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import WIDE_TINY_MODEL, make_tiny_model
from tolerances import tolerance

import hooklens.attention as A
from hooklens.attention import attention_backend
from hooklens.head_scores import ALL_KINDS, head_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = A.triton_available() and A._load_kernels().kernels_runnable_on(DEVICE)
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="Triton missing, or no CUDA and the interpreter is off")
SEQ_LEN = 9
# The first query with an entry on each kind's line, in a BOS + x + x prompt with len(x) = SEQ_LEN.
FIRST_QUERY = {"induction": SEQ_LEN - 1, "duplicate_token": SEQ_LEN, "previous_token": 1, "current_token": 0, "bos": 0}


def uniform_attention_score(kind, T):
    """The score of a head attending uniformly (query i to its i + 1 visible keys): the mean of 1 / (i + 1) over
    the queries i that have an entry on the kind's line."""
    return torch.tensor([1.0 / (i + 1) for i in range(FIRST_QUERY[kind], T)], dtype=torch.float64).mean().float()


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(**WIDE_TINY_MODEL).to(DEVICE)


@pytest.fixture(scope="module")
def rep_tokens():
    """BOS + x + x, x random of length SEQ_LEN (T = 2 * SEQ_LEN + 1)."""
    x = torch.randint(1, 97, (5, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.zeros(5, 1, dtype=torch.long), x, x], dim=1).to(DEVICE)


def hook_based_scores(model, tokens, seq_len):
    """The usual definitions, from cached patterns: diagonal means over batch and positions."""
    with attention_backend("torch"), torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    out = {k: torch.zeros(model.cfg.n_layers, model.cfg.n_heads) for k in ALL_KINDS}
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double().cpu()  # [b, h, q, k]
        line = {
            "induction": pattern.diagonal(1 - seq_len, dim1=-2, dim2=-1),
            "duplicate_token": pattern.diagonal(-seq_len, dim1=-2, dim2=-1),
            "previous_token": pattern.diagonal(-1, dim1=-2, dim2=-1),
            "current_token": pattern.diagonal(0, dim1=-2, dim2=-1),
            "bos": pattern[..., :, 0],
        }
        for kind, entries in line.items():
            out[kind][layer] = entries.mean(dim=(0, 2)).float()
    return out


def test_torch_backend_equals_hook_based(model, rep_tokens):
    expected = hook_based_scores(model, rep_tokens, SEQ_LEN)
    with attention_backend("torch"):
        got = head_scores(model, rep_tokens, kinds=ALL_KINDS, progress=False)
    assert set(got) == set(ALL_KINDS)
    for kind in ALL_KINDS:
        assert got[kind].shape == (2, 4) and got[kind].dtype == torch.float32
        torch.testing.assert_close(got[kind], expected[kind], **tolerance("pattern_mean"), msg=kind)


@needs_kernels
def test_triton_backend_uses_in_kernel_stats_and_equals_hook_based(model, rep_tokens, monkeypatch):
    kernels = A._load_kernels()
    calls = []
    original = kernels.attention_stats
    monkeypatch.setattr(kernels, "attention_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(kernels, "pattern_attention", None)  # no pattern may be materialized
    expected = hook_based_scores(model, rep_tokens, SEQ_LEN)
    with attention_backend("triton"):
        got = head_scores(model, rep_tokens, kinds=ALL_KINDS, batch_size=2, progress=False)  # 3 chunks
    assert len(calls) == 3 * model.cfg.n_layers
    for kind in ALL_KINDS:
        torch.testing.assert_close(got[kind], expected[kind], **tolerance("pattern_mean"), msg=kind)


def test_streaming_and_arguments(model, rep_tokens):
    with attention_backend("torch"):
        whole = head_scores(model, rep_tokens, progress=False)
        chunked = head_scores(model, rep_tokens, batch_size=2, progress=True)
        explicit = head_scores(model, rep_tokens, seq_len=SEQ_LEN, progress=False)
        one = head_scores(model, rep_tokens[0], kinds="induction", progress=False)
        one_ref = head_scores(model, rep_tokens[:1], kinds=["induction"], progress=False)
    assert list(whole) == ["induction", "previous_token", "duplicate_token", "bos"]
    expected = hook_based_scores(model, rep_tokens, SEQ_LEN)
    for kind in whole:
        torch.testing.assert_close(whole[kind], expected[kind], **tolerance("pattern_mean"), msg=kind)
        torch.testing.assert_close(chunked[kind], whole[kind], **tolerance("pattern_mean"), msg=kind)
        assert torch.equal(whole[kind], explicit[kind])
    assert list(one) == ["induction"] and torch.equal(one["induction"], one_ref["induction"])
    # A model with induction heads scores several times uniform attention's induction score (an induction head
    # puts most of its weight on one key); this random model scores like uniform attention, within a factor 2.
    for kind in whole:
        ratio = whole[kind] / uniform_attention_score(kind, rep_tokens.shape[1])
        assert ((ratio > 0.5) & (ratio < 2)).all(), (kind, ratio)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_kernels)])
def test_uniform_attention_scores_are_exact(model, rep_tokens, backend):
    """With q = 0 every query attends uniformly to its i + 1 visible keys, so each score is known in closed form:
    the mean of 1 / (i + 1) over the queries i that have an entry on the kind's line."""
    zero_q = [(lambda name: name.endswith("attn.hook_q"), lambda q, hook: torch.zeros_like(q))]
    with attention_backend(backend), model.hooks(fwd_hooks=zero_q):
        got = head_scores(model, rep_tokens, kinds=ALL_KINDS, progress=False)
    for kind in FIRST_QUERY:
        want = uniform_attention_score(kind, rep_tokens.shape[1]).expand(model.cfg.n_layers, model.cfg.n_heads)
        torch.testing.assert_close(got[kind], want, **tolerance("pattern_mean_abs"), msg=kind)


def test_argument_errors(model, rep_tokens):
    with pytest.raises(ValueError, match="Unknown head-score kind"):
        head_scores(model, rep_tokens, kinds=("induction", "copying"), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        head_scores(model, rep_tokens, seq_len=rep_tokens.shape[1], progress=False)
    with pytest.raises(ValueError, match="infer seq_len"):
        head_scores(model, rep_tokens[:, :2], kinds="induction", progress=False)
    with pytest.raises(TypeError, match="integer tensor"):
        head_scores(model, rep_tokens.float(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        head_scores(model, rep_tokens, batch_size=0, progress=False)
    # kinds that need no repeated structure work on any tokens
    with attention_backend("torch"):
        got = head_scores(model, rep_tokens[:, :2], kinds=("previous_token", "bos"), progress=False)
    assert got["bos"].shape == (2, 4)
