"""HookedTransformer.generate's TL 3.9 surface against TransformerLens 3.9 itself on identical weights: embeddings
as input and `return_type="embeds"`, `output_logits=True` (Hugging Face's `GenerateDecoderOnlyOutput` with
`sequences` and per-step `logits`), and the Hugging Face generate flags TL accepts or warns about.

The conftest checkpoint is flat enough that greedy decoding repeats one token, so equal sequences alone say little;
every case therefore also compares the per-step logits, which differ from step to step and from row to row.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tl_model_from_hf
from tolerances import tolerance

from hooklens import HookedTransformer
from hooklens.errors import InvalidInputError
from hooklens.utils import get_attention_mask

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

N_NEW = 4
PROMPT = "The quick brown fox"
PROMPTS = ["The quick brown fox jumps over", "Hello", "A short one"]  # different token lengths
GREEDY = dict(max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False)
RETURN_TYPES = ["input", "str", "tokens", "embeds"]
# TL's message for ignored Hugging Face flags; hooklens's warning starts with the same text.
IGNORED_FLAGS_MESSAGE = r"HookedTransformer.generate received unsupported generation kwargs; ignoring: \['{}'\]"


@pytest.fixture(scope="module")
def model(tiny_dir):
    return HookedTransformer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def tl(tiny_dir):
    return tl_model_from_hf(tiny_dir)


def prompt_of(model, kind: str):
    """The prompt of one kind: text ("str", one row), a list of texts ("list", a batch), tokens or token
    embeddings (the left-padded batch)."""
    if kind == "str":
        return PROMPT
    if kind == "list":
        return PROMPTS
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    return tokens if kind == "tokens" else model.embed(tokens)  # [b, p] or [b, p, d]


def tl_generate(tl, input, use_past_kv_cache: bool, **kwargs):
    """TL's generate as the reference. TL 3.9's cached decoding of an embeddings prompt adds positional embeddings
    for positions past the real ones from the second step on (see test_embeddings_prompt_kv_cache_is_exact), so for
    embeddings its uncached decoding is the reference (hooklens's cached and uncached decoding agree)."""
    embeds = isinstance(input, torch.Tensor) and input.dim() == 3
    return tl.generate(input, use_past_kv_cache=use_past_kv_cache and not embeds, **kwargs)


def assert_same_result(ours, theirs):
    assert type(ours) is type(theirs), f"{type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(theirs, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        if theirs.is_floating_point():
            torch.testing.assert_close(ours, theirs, **tolerance("same_dtype", theirs.dtype))
        else:
            assert torch.equal(ours, theirs)
    else:
        assert ours == theirs


def assert_same_logits_output(ours, theirs):
    """Same class (Hugging Face's GenerateDecoderOnlyOutput), fields, sequences and per-step `[b, v]` logits."""
    assert type(ours) is type(theirs)
    assert list(ours.keys()) == list(theirs.keys()) == ["sequences", "logits"]
    assert torch.equal(ours.sequences, theirs.sequences)
    assert isinstance(ours.logits, tuple) and len(ours.logits) == len(theirs.logits)
    for step, (mine, reference) in enumerate(zip(ours.logits, theirs.logits)):
        assert mine.shape == reference.shape == (theirs.sequences.shape[0], reference.shape[-1]), step
        torch.testing.assert_close(mine, reference, **tolerance("same_dtype", reference.dtype), msg=f"step {step}")


# -- embeddings as input, return_type="embeds" -------------------------------------------------------------------
@pytest.mark.parametrize("use_past_kv_cache", [True, False])
@pytest.mark.parametrize("return_type", RETURN_TYPES)
@pytest.mark.parametrize("kind", ["str", "list", "tokens", "embeds"])
def test_return_types_match_transformerlens(model, tl, kind, return_type, use_past_kv_cache):
    input = prompt_of(model, kind)
    ours = model.generate(input, return_type=return_type, use_past_kv_cache=use_past_kv_cache, **GREEDY)
    assert_same_result(ours, tl_generate(tl, input, use_past_kv_cache, return_type=return_type, **GREEDY))


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_embeddings_prompt_shapes(model, batch, use_past_kv_cache):
    tokens = model.to_tokens(PROMPTS if batch else PROMPT, padding_side="left")  # [b, p]
    embeds = model.embed(tokens)  # [b, p, d]
    common = dict(use_past_kv_cache=use_past_kv_cache, **GREEDY)
    out = model.generate(embeds, **common)  # "input" + embeddings -> embeddings of prompt and new tokens
    assert out.shape == (tokens.shape[0], tokens.shape[1] + N_NEW, model.cfg.d_model)
    assert torch.equal(out[:, : tokens.shape[1]], embeds)
    new_tokens = model.generate(embeds, return_type="tokens", **common)  # only the new tokens
    assert new_tokens.shape == (tokens.shape[0], N_NEW) and new_tokens.dtype == torch.long
    assert torch.equal(out[:, tokens.shape[1]:], model.embed(new_tokens))
    # Embeddings of a token prompt are the same prompt: the same new tokens (no padding mask either way here).
    from_tokens = model.generate(tokens, return_type="tokens", **common)
    assert torch.equal(from_tokens[:, tokens.shape[1]:], new_tokens)
    assert torch.equal(model.generate(tokens, return_type="embeds", **common), model.embed(from_tokens))


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_embeddings_prompt_kv_cache_is_exact(model, tl, batch):
    """Cached decoding of an embeddings prompt gives each step the logits of one forward over the whole sequence.

    Deliberate difference: TL 3.9 adds the positional embeddings of positions `past..past + len` to the whole
    sequence and keeps the last, so from the second step its cached logits drift from its own uncached ones."""
    tokens = model.to_tokens(PROMPTS if batch else PROMPT, padding_side="left")
    embeds = model.embed(tokens)
    common = dict(return_type="tokens", output_logits=True, **GREEDY)
    cached = model.generate(embeds, use_past_kv_cache=True, **common)
    uncached = model.generate(embeds, use_past_kv_cache=False, **common)
    full = model(torch.cat([tokens, cached.sequences], dim=1))  # [b, p + new, v]
    for step in range(N_NEW):
        plain = full[:, tokens.shape[1] - 1 + step]  # [b, v]
        torch.testing.assert_close(cached.logits[step], plain, **tolerance("same_dtype_abs", plain.dtype))
        torch.testing.assert_close(uncached.logits[step], plain, **tolerance("same_dtype_abs", plain.dtype))
    tl_cached = tl.generate(embeds, use_past_kv_cache=True, **common)
    assert not torch.allclose(tl_cached.logits[1], cached.logits[1], atol=1e-3), "TL fixed it: drop the workaround"


def test_embeddings_prompt_takes_no_frequency_penalty(model, tl):
    # As TL: there are no prompt tokens to count, so sampling from embeddings ignores freq_penalty.
    embeds = model.embed(model.to_tokens(PROMPTS, padding_side="left"))
    common = dict(max_new_tokens=N_NEW, stop_at_eos=False, verbose=False, return_type="tokens")
    samples = []
    for freq_penalty in (0.0, 2.0):
        torch.manual_seed(3)
        samples.append(model.generate(embeds, freq_penalty=freq_penalty, **common))
    torch.manual_seed(3)
    theirs = tl.generate(embeds, freq_penalty=2.0, use_past_kv_cache=False, **common)
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[1], theirs)


# -- output_logits=True ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_past_kv_cache", [True, False])
@pytest.mark.parametrize("return_type", RETURN_TYPES)
@pytest.mark.parametrize("kind", ["str", "list", "tokens", "embeds"])
def test_output_logits_matches_transformerlens(model, tl, kind, return_type, use_past_kv_cache):
    input = prompt_of(model, kind)
    common = dict(return_type=return_type, output_logits=True, **GREEDY)
    ours = model.generate(input, use_past_kv_cache=use_past_kv_cache, **common)
    assert_same_logits_output(ours, tl_generate(tl, input, use_past_kv_cache, **common))
    assert len(ours.logits) == N_NEW
    # `sequences` is the "tokens" result whatever return_type asks for.
    plain = model.generate(input, use_past_kv_cache=use_past_kv_cache, return_type="tokens", **GREEDY)
    assert torch.equal(ours.sequences, plain)


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_output_logits_consistent_with_forward(model, batch, use_past_kv_cache):
    """Each step's logits are the last-position logits of a plain forward over prompt + tokens so far (with the
    prompt's left-padding mask for a batch)."""
    out = model.generate(PROMPTS if batch else PROMPT, use_past_kv_cache=use_past_kv_cache, return_type="tokens",
                         output_logits=True, **GREEDY)
    n_prompt = out.sequences.shape[1] - N_NEW
    prompt = out.sequences[:, :n_prompt]
    mask = get_attention_mask(model.tokenizer, prompt, prepend_bos=True, padding_side="left")  # [b, p]
    mask = torch.cat([mask, torch.ones_like(out.sequences[:, n_prompt:])], dim=1)  # [b, p + new]
    full = model(out.sequences, attention_mask=mask)  # [b, p + new, v]
    for step in range(N_NEW):
        plain = full[:, n_prompt - 1 + step]  # [b, v]
        torch.testing.assert_close(out.logits[step], plain, **tolerance("same_dtype_abs", plain.dtype))
        assert torch.equal(out.logits[step].argmax(-1), out.sequences[:, n_prompt + step])


@pytest.mark.parametrize("kind", ["str", "list", "embeds"])
def test_output_logits_stop_at_eos(model, tl, kind):
    # The first greedy token of row 0 as EOS: rows stop (and are padded) as in TL, with one logits entry per step run.
    input = prompt_of(model, kind)
    first = model.generate(input, return_type="tokens", **{**GREEDY, "max_new_tokens": 1})[:, -1]
    common = dict(max_new_tokens=N_NEW, do_sample=False, stop_at_eos=True, eos_token_id=int(first[0]),
                  verbose=False, output_logits=True)
    ours = model.generate(input, **common)
    assert_same_logits_output(ours, tl_generate(tl, input, True, **common))
    assert len(ours.logits) < N_NEW  # it did stop early


# -- Hugging Face generate flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["str", "list", "embeds"])
def test_return_dict_in_generate_is_accepted_and_ignored(model, tl, kind):
    input = prompt_of(model, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for this flag
        ours = model.generate(input, return_dict_in_generate=True, **GREEDY)
        with_logits = model.generate(input, return_dict_in_generate=True, output_logits=True, **GREEDY)
    assert_same_result(ours, tl_generate(tl, input, True, return_dict_in_generate=True, **GREEDY))
    assert_same_result(ours, model.generate(input, **GREEDY))
    assert_same_logits_output(with_logits, tl_generate(tl, input, True, output_logits=True, **GREEDY))
    assert isinstance(model.generate(input, output_logits=False, **GREEDY), type(ours))


@pytest.mark.parametrize("flag, value", [("output_scores", True), ("output_attentions", True), ("num_beams", 2)])
def test_other_hugging_face_flags_warn(model, tl, flag, value):
    pattern = IGNORED_FLAGS_MESSAGE.format(flag)
    with pytest.warns(UserWarning, match=pattern):
        theirs = tl.generate(PROMPT, **{flag: value}, **GREEDY)
    with pytest.warns(UserWarning, match=pattern) as record:
        ours = model.generate(PROMPT, **{flag: value}, **GREEDY)
    assert any(entry.filename == __file__ for entry in record), "the warning points at the caller"
    assert_same_result(ours, theirs)
    # With output_logits the other flags are still only warned about.
    with pytest.warns(UserWarning, match=pattern):
        out = model.generate(PROMPT, output_logits=True, return_dict_in_generate=True, **{flag: value}, **GREEDY)
    with pytest.warns(UserWarning, match=pattern):
        assert_same_logits_output(out, tl.generate(PROMPT, output_logits=True, **{flag: value}, **GREEDY))


# -- argument errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input, return_type", [(PROMPT, "logits"), ([PROMPT, 3], "input"), (3, "input")])
def test_bad_arguments_raise_what_tl_users_catch(model, tl, input, return_type):
    with pytest.raises(AssertionError):
        tl.generate(input, return_type=return_type, **GREEDY)
    with pytest.raises(InvalidInputError) as info:
        model.generate(input, return_type=return_type, **GREEDY)
    assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)
    assert "must be" in str(info.value)
