"""hooklens.utils / hooklens.evals against TransformerLens 3.9 (the reference)."""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hooklens import evals as hl_evals
from hooklens import utils as hl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.evals as tl_evals
    import transformer_lens.utilities as tl
    from transformer_lens.utilities.exploratory_utils import test_prompt as tl_test_prompt

ASSETS = Path(__file__).resolve().parents[1] / "hooklens" / "assets" / "gpt2-tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import GPT2TokenizerFast

    # NB: transformers 5 silently ignores GPT2TokenizerFast(vocab_file=..., merges_file=...) and builds an
    # empty tokenizer; loading the local folder works on both transformers 4 and 5.
    tok = GPT2TokenizerFast.from_pretrained(str(ASSETS), local_files_only=True)
    assert len(tok) == 50257 and tok.bos_token_id == 50256
    tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------
# get_act_name
# ---------------------------------------------------------------------------

ACT_NAMES = [
    # plain / residual / block-level
    "embed", "pos_embed", "tokens", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
    "attn_in", "q_input", "k_input", "v_input", "mlp_in",
    # attention (+ aliases)
    "k", "q", "v", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores",
    "attn", "attn_logits", "key", "query", "value",
    # mlp (+ aliases)
    "pre", "post", "mid", "pre_linear", "mlp_pre", "mlp_mid", "mlp_post",
    # layer norm
    "scale", "normalized",
    # already-full names
    "hook_embed", "hook_pos_embed", "blocks.0.attn.hook_pattern", "ln_final.hook_scale",
    "blocks.11.hook_resid_post", "hook_tokens",
]
LAYERS = [None, 0, 1, 6, 11, 47, "3"]
LAYER_TYPES = [None, "a", "m", "b", "block", "blocks", "attention", "attn", "mlp", "ln1", "ln2",
               "ln_final", "", "hook"]
SHORTHANDS = [
    "k6", "q0", "v11", "z3", "pattern0", "attn5", "key2", "query2", "value2", "result7",
    "scale4ln1", "scale4ln2", "normalized27ln2", "scale0", "pre5", "post3", "mid1", "post3b",
    "k6a", "resid_pre5", "resid5", "embed0", "scale10ln_final", "z12attention", "pre0m",
    "rot_k3", "attn_scores4", "normalized3ln1", "resid_post", "hook_z", "x1y2z3",
]


@pytest.mark.parametrize("name", ACT_NAMES)
def test_get_act_name_grid(name):
    mismatches = [
        (layer, layer_type, hl.get_act_name(name, layer, layer_type), tl.get_act_name(name, layer, layer_type))
        for layer, layer_type in itertools.product(LAYERS, LAYER_TYPES)
        if hl.get_act_name(name, layer, layer_type) != tl.get_act_name(name, layer, layer_type)
    ]
    assert not mismatches


@pytest.mark.parametrize("name", SHORTHANDS)
def test_get_act_name_shorthand(name):
    assert hl.get_act_name(name) == tl.get_act_name(name)


@pytest.mark.parametrize(
    "args,expected",
    [
        (("k", 6, "a"), "blocks.6.attn.hook_k"),
        (("pre", 2), "blocks.2.mlp.hook_pre"),
        (("embed",), "hook_embed"),
        (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"),
        (("k6",), "blocks.6.attn.hook_k"),
        (("scale4ln1",), "blocks.4.ln1.hook_scale"),
        (("pre5",), "blocks.5.mlp.hook_pre"),
        (("pattern", 0), "blocks.0.attn.hook_pattern"),
        (("attn", 3), "blocks.3.attn.hook_pattern"),
        (("attn_logits", 3), "blocks.3.attn.hook_attn_scores"),
        (("mlp_post", 1), "blocks.1.mlp.hook_post"),
        (("resid_pre", 4, "b"), "blocks.4.hook_resid_pre"),
        (("scale",), "ln_final.hook_scale"),
        # TL quirks, kept on purpose:
        (("scale", None, "ln_final"), "ln_final.ln_final.hook_scale"),
        (("resid_pre5",), "hook_resid_pre5"),
        (("hook_embed", 3), "blocks.3.hook_hook_embed"),
    ],
)
def test_get_act_name_documented(args, expected):
    assert hl.get_act_name(*args) == expected == tl.get_act_name(*args)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(ACT_NAMES),
    layer=st.one_of(st.none(), st.integers(0, 10_000)),
    layer_type=st.sampled_from(LAYER_TYPES),
)
def test_get_act_name_hypothesis(name, layer, layer_type):
    assert hl.get_act_name(name, layer, layer_type) == tl.get_act_name(name, layer, layer_type)


@settings(max_examples=200, deadline=None)
@given(
    stem=st.sampled_from(ACT_NAMES + ["x", "ab_c"]),
    layer=st.integers(0, 10_000),
    suffix=st.sampled_from(["", "a", "m", "b", "ln1", "ln2", "block", "blocks", "attention", "z9", "_x"]),
)
def test_get_act_name_hypothesis_shorthand(stem, layer, suffix):
    name = f"{stem}{layer}{suffix}"
    assert hl.get_act_name(name) == tl.get_act_name(name)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.from_regex(r"[a-z_.]{1,8}[0-9]{0,3}[a-z0-9_.]{0,6}", fullmatch=True))
def test_get_act_name_hypothesis_arbitrary(name):
    assert hl.get_act_name(name) == tl.get_act_name(name)


# ---------------------------------------------------------------------------
# Losses and activations
# ---------------------------------------------------------------------------


def _logits_tokens(seed, batch=3, pos=7, vocab=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, pos, vocab, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, vocab, (batch, pos), generator=g)
    return logits, tokens


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token", [False, True])
def test_lm_cross_entropy_loss_no_mask(seed, per_token):
    logits, tokens = _logits_tokens(seed)
    ours = hl.lm_cross_entropy_loss(logits, tokens, per_token=per_token)
    ref = tl.lm_cross_entropy_loss(logits, tokens, per_token=per_token)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    if not per_token:  # independent check against torch's cross entropy
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_lm_cross_entropy_loss_mask(seed, per_token, mask_dtype):
    logits, tokens = _logits_tokens(seed, batch=4, pos=9)
    mask = torch.ones(4, 9, dtype=torch.int64)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    mask[2, 4] = 0  # hole in the middle
    mask = mask.to(mask_dtype)
    ours = hl.lm_cross_entropy_loss(logits, tokens, attention_mask=mask, per_token=per_token)
    ref = tl.lm_cross_entropy_loss(logits, tokens, attention_mask=mask, per_token=per_token)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    if per_token:
        assert (ours[0, :3] == 0).all() and (ours[1, 5:] == 0).all() and ours[2, 3] == 0 and ours[2, 4] == 0
    else:
        unmasked = hl.lm_cross_entropy_loss(logits, tokens)
        assert not torch.allclose(ours, unmasked)


def test_lm_cross_entropy_loss_mask_shape_mismatch():
    logits, tokens = _logits_tokens(0)
    with pytest.raises(AssertionError):
        hl.lm_cross_entropy_loss(logits, tokens, attention_mask=torch.ones(3, 6))


@pytest.mark.parametrize("seed", range(3))
def test_lm_accuracy(seed):
    logits, tokens = _logits_tokens(seed, vocab=4)
    for per_token in (False, True):
        torch.testing.assert_close(
            hl.lm_accuracy(logits, tokens, per_token), tl.lm_accuracy(logits, tokens, per_token), rtol=0, atol=0
        )


@pytest.mark.parametrize("fn", ["gelu_new", "gelu_fast", "solu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_activation_functions(fn, dtype):
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -30.0, 30.0, 1e-3], dtype=dtype)
    ours, ref = getattr(hl, fn)(x), getattr(tl, fn)(x)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_gelu_new_matches_torch_tanh_gelu():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(hl.gelu_new(x), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(hl.gelu_fast(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------
# Tokenization helpers
# ---------------------------------------------------------------------------

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "a", "<|endoftext|> x <|endoftext|>"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("explicit_side", [False, True])
def test_get_attention_mask(tokenizer, padding_side, prepend_bos, explicit_side):
    inputs = [tokenizer.bos_token + p for p in PROMPTS] if prepend_bos else PROMPTS
    tokenizer.padding_side = padding_side
    tokens = tokenizer(inputs, padding=True, return_tensors="pt")["input_ids"]
    if explicit_side:  # tokenizer default disagrees; the argument must win
        tokenizer.padding_side = "right" if padding_side == "left" else "left"
        kwargs = {"padding_side": padding_side}
    else:
        kwargs = {}
    try:
        ours = hl.get_attention_mask(tokenizer, tokens, prepend_bos, **kwargs)
        ref = tl.get_attention_mask(tokenizer, tokens, prepend_bos, **kwargs)
        ours_removed = hl.get_tokens_with_bos_removed(tokenizer, tokens, **kwargs) if prepend_bos else None
        ref_removed = tl.get_tokens_with_bos_removed(tokenizer, tokens, **kwargs) if prepend_bos else None
    finally:
        tokenizer.padding_side = "right"
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    assert ours.sum() < ours.numel()  # there really is padding
    if prepend_bos:
        assert torch.equal(ours_removed, ref_removed)


def test_get_attention_mask_no_tokenizer():
    tokens = torch.tensor([[50256, 50256, 3]])
    assert torch.equal(hl.get_attention_mask(None, tokens, True), torch.ones_like(tokens))


def test_get_input_with_manually_prepended_bos():
    for inp in ["abc", ["a", "bc"]]:
        for bos in ["<|endoftext|>", None]:
            assert hl.get_input_with_manually_prepended_bos(bos, inp) == tl.get_input_with_manually_prepended_bos(
                bos, inp
            )


# ---------------------------------------------------------------------------
# Small tensor helpers and Slice
# ---------------------------------------------------------------------------


def test_tensor_helpers():
    t = torch.arange(60.0).reshape(1, 3, 4, 5)
    for x in [t, torch.arange(5), [1, 2], (3.0, 4.0), 3, 2.5, True, "s", np.ones(3), t.to(torch.bfloat16),
              torch.nn.Parameter(torch.ones(2))]:
        np.testing.assert_array_equal(hl.to_numpy(x), tl.to_numpy(x))
    with pytest.raises(ValueError):
        hl.to_numpy({"a": 1})
    assert torch.equal(hl.get_corner(t, 2), tl.get_corner(t, 2))
    assert torch.equal(hl.remove_batch_dim(t), tl.remove_batch_dim(t))
    assert hl.remove_batch_dim(t).shape == (3, 4, 5)
    assert torch.equal(hl.remove_batch_dim(t[0]), t[0])
    assert torch.equal(hl.transpose(t), tl.transpose(t))
    assert hl.is_lower_triangular(torch.ones(3, 3).tril()) and not hl.is_lower_triangular(torch.ones(3, 3))
    assert not hl.is_square(torch.ones(2, 3))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for offset in (0, 2):
        assert torch.equal(hl.get_offset_position_ids(offset, mask), tl.get_offset_position_ids(offset, mask))
    for reverse in (False, True):
        assert torch.equal(hl.get_cumsum_along_dim(mask, -1, reverse), tl.get_cumsum_along_dim(mask, -1, reverse))
    assert hl.get_device() == tl.get_device()


@pytest.mark.parametrize(
    "inp", [None, 2, -1, (2,), (1, 3), (0, 4, 2), slice(1, None), [0, 2], torch.tensor([1, 3]), np.array([0, 1])]
)
def test_slice(inp):
    x = torch.arange(120).reshape(4, 5, 6)
    ours, ref = hl.Slice(inp), tl.Slice(inp)
    assert ours.mode == ref.mode and repr(ours) == repr(ref)
    for dim in (0, 1, -1):
        assert torch.equal(ours.apply(x, dim), ref.apply(x, dim))
    np.testing.assert_array_equal(ours.indices(4), ref.indices(4))
    u_ours, u_ref = hl.Slice.unwrap(inp), tl.Slice.unwrap(inp)
    assert torch.equal(u_ours.apply(x, 1), u_ref.apply(x, 1))
    assert hl.Slice.unwrap(ours) is ours


def test_slice_invalid():
    with pytest.raises(ValueError):
        hl.Slice("abc")
    with pytest.raises(ValueError):
        hl.Slice((1, 3)).indices()


# ---------------------------------------------------------------------------
# test_prompt and induction_loss, with a tiny deterministic fake model
# ---------------------------------------------------------------------------


class FakeModel:
    """Just enough of HookedTransformer (TL semantics) for test_prompt / induction_loss."""

    def __init__(self, tokenizer, d_vocab=50257, seed=0):
        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(device="cpu", default_prepend_bos=True)
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(d_vocab, 16, generator=g)
        self.unembed = torch.randn(16, d_vocab, generator=g) * 2
        self.calls = []

    def to_tokens(self, input, prepend_bos=None):
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend_bos:
            input = hl.get_input_with_manually_prepended_bos(self.tokenizer.bos_token, input)
        return self.tokenizer(input, return_tensors="pt", padding=True)["input_ids"]

    def to_str_tokens(self, input, prepend_bos=None):
        return [self.tokenizer.decode(t) for t in self.to_tokens(input, prepend_bos)[0]]

    def to_string(self, tokens):
        return self.tokenizer.decode(tokens)

    def __call__(self, tokens, return_type="logits"):
        self.calls.append(tokens.clone())
        # position-dependent, causal-ish: mix each token with the previous one
        h = self.embed[tokens] + 0.5 * torch.roll(self.embed[tokens], 1, dims=1)
        return h @ self.unembed


@pytest.mark.parametrize(
    "prompt,answer,kwargs",
    [
        ("Why did the elephant cross the", "road", {}),
        ("Why did the elephant cross the", " road to the river", {"top_k": 3}),
        ("Hello", ["world", " there", "sailor"], {}),
        ("Hello", "world", {"prepend_bos": False, "prepend_space_to_answer": False}),
        ("Hello", "world", {"print_details": False}),
    ],
)
def test_test_prompt_matches_tl(tokenizer, capsys, prompt, answer, kwargs):
    model = FakeModel(tokenizer)
    tl_test_prompt(prompt, answer, model, **kwargs)
    ref = capsys.readouterr().out
    hl.test_prompt(prompt, answer, model, **kwargs)
    ours = capsys.readouterr().out
    assert "Ranks of the answer tokens" in ours
    assert ours == ref


@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_induction_loss_matches_tl(tokenizer, prepend_bos):
    model = FakeModel(tokenizer)
    torch.manual_seed(123)
    ref = tl_evals.induction_loss(model, tokenizer, batch_size=2, subseq_len=20, prepend_bos=prepend_bos, device="cpu")
    torch.manual_seed(123)
    ours = hl_evals.induction_loss(model, batch_size=2, subseq_len=20, prepend_bos=prepend_bos)
    ref_tokens, our_tokens = model.calls
    assert torch.equal(ref_tokens, our_tokens)
    assert our_tokens.shape == (2, 40)
    assert torch.equal(our_tokens[:, 1:20], our_tokens[:, 21:40])
    assert (our_tokens[:, 0] == 50256).all() == (prepend_bos is not False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert ours.ndim == 0


def test_make_repeated_tokens():
    toks = hl_evals.make_repeated_tokens(3, 11)
    assert toks.shape == (3, 22) and toks.dtype == torch.int64
    assert torch.equal(toks[:, :11], toks[:, 11:])
    assert toks.min() >= 100 and toks.max() < 20000


def test_repeated_random_tokens_seeded_with_bos():
    """The one repeated-token builder: seeded runs repeat and leave the global RNG alone; without a seed it draws
    from the global RNG exactly as TL's make_repeated_tokens."""
    state = torch.get_rng_state()
    toks = hl_evals.repeated_random_tokens(3, 11, bos_token_id=50256, low=5, high=9, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(toks, hl_evals.repeated_random_tokens(3, 11, bos_token_id=50256, low=5, high=9, seed=7))
    assert toks.shape == (3, 23) and toks.dtype == torch.int64
    assert (toks[:, 0] == 50256).all() and torch.equal(toks[:, 1:12], toks[:, 12:])
    assert toks[:, 1:].min() >= 5 and toks[:, 1:].max() < 9
    assert not torch.equal(toks, hl_evals.repeated_random_tokens(3, 11, bos_token_id=50256, low=5, high=9, seed=8))
    torch.manual_seed(3)
    ours = hl_evals.make_repeated_tokens(2, 5)
    torch.manual_seed(3)
    assert torch.equal(ours, torch.randint(100, 20000, (2, 5)).repeat(1, 2))


def test_tokenize_and_concatenate_matches_transformer_lens():
    """Same rows as TL's (documents joined by EOS, BOS per row, short batches padded), on a local dataset."""
    import warnings

    datasets = pytest.importorskip("datasets")
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok
    from hooklens.utils import tokenize_and_concatenate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens.utils import tokenize_and_concatenate as tl_tokenize_and_concatenate

    texts = ["Hello world, this is a test. " * k for k in range(1, 30)] + ["", "short"]
    dataset = datasets.Dataset.from_dict({"text": texts, "meta": list(range(len(texts)))})
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    tokenizer.pad_token = tokenizer.eos_token
    for kwargs in [dict(max_length=32), dict(max_length=16, add_bos_token=False), dict(max_length=4096)]:
        ours = torch.stack(list(tokenize_and_concatenate(dataset, tokenizer, num_proc=None, **kwargs)["tokens"]))
        theirs = torch.stack(list(tl_tokenize_and_concatenate(dataset, tokenizer, num_proc=None, **kwargs)["tokens"]))
        assert torch.equal(ours, theirs), kwargs
    assert (ours[:, 0] == tokenizer.bos_token_id).all()
    with pytest.raises(KeyError, match="'body' is not in the dataset"):
        tokenize_and_concatenate(dataset, tokenizer, column_name="body", num_proc=None)


def test_small_helpers_match_transformer_lens():
    import warnings

    from hooklens import utils as hl_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import utils as tl_utils

    x = torch.randn(2, 3, 4)
    for clone in (True, False):
        ours = hl_utils.repeat_along_head_dimension(x, 5, clone)
        theirs = tl_utils.repeat_along_head_dimension(x, 5, clone)
        assert torch.equal(ours, theirs) and ours.shape == (2, 3, 5, 4)
    assert hl_utils.repeat_along_head_dimension(x, 5).is_contiguous()
    d = {"blocks.0.attn.W_Q": 1, "blocks.0.mlp.W_in": 2, "blocks.1.attn.W_K": 3, "blocks.01": 4}
    for prefix in ("blocks.0", "blocks.0.", "blocks"):
        assert hl_utils.filter_dict_by_prefix(d, prefix) == tl_utils.filter_dict_by_prefix(d, prefix)
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert hl_utils.get_nested_attr(module, "0.weight") is module[0].weight
    hl_utils.set_nested_attr(module, "0.bias", None)
    assert module[0].bias is None
    hl_utils.set_nested_attr(module, "extra", 7)
    assert module.extra == 7
