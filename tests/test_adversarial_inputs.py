"""Adversarial model inputs: text longer than the context, token tensors of every dtype and shape, broken attention
masks, layer bounds outside the model. Each is either handled correctly or refused with an error that names the
problem and the fix, before the model does any work; none is silently cut, wrapped or misread."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_model, tolerance

from hooklens import HookedTransformer, HookedTransformerConfig
from hooklens import tokenizer as tok
from hooklens.errors import InvalidInputError
from hooklens.kv_cache import HookedTransformerKeyValueCache

pytestmark = pytest.mark.usefixtures("no_grad")

N_CTX = 16
LONG_TEXT = "hello world " * 20  # 41 tokens, 42 with BOS
SHORT_TEXT = "hello world"


@pytest.fixture(scope="module")
def text_model():
    """A tiny random model with GPT-2's tokenizer and a 16-token context, so ordinary text overflows it."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_ctx=N_CTX, d_vocab=50257, act_fn="gelu_new",
                                  seed=0)
    return HookedTransformer(cfg, tokenizer=tok.load_tokenizer()).eval()


@pytest.fixture(scope="module")
def model():
    """The shared tiny model (97-token vocabulary, no tokenizer)."""
    return make_tiny_model().eval()


@pytest.fixture
def tokens():
    return torch.tensor([[5, 6, 7, 8, 90], [1, 2, 3, 4, 96]])


def _one_truncation_warning(record) -> warnings.WarningMessage:
    truncations = [w for w in record if "n_ctx" in str(w.message)]
    assert len(truncations) == 1, [str(w.message) for w in record]
    return truncations[0]


# -- item 4: text longer than n_ctx -----------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda m, text: m(text),
    lambda m, text: m(text, return_type="loss"),
    lambda m, text: m.to_tokens(text),
    lambda m, text: m.run_with_cache(text)[0],
    lambda m, text: m.run_with_hooks(text, fwd_hooks=[("hook_embed", lambda a, hook: None)]),
], ids=["forward", "loss", "to_tokens", "run_with_cache", "run_with_hooks"])
def test_text_longer_than_context_warns_at_the_callers_line(text_model, call):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call(text_model, LONG_TEXT)
    warning = _one_truncation_warning(record)
    message = str(warning.message)
    assert warning.category is UserWarning
    assert "42 tokens" in message and "n_ctx=16" in message and "last 26 are dropped" in message
    assert "truncate=True" in message and "Shorten" in message
    assert warning.filename == __file__  # the user's line, not hooklens's or torch's


def test_truncated_result_is_the_explicitly_truncated_one(text_model):
    kept = text_model.to_tokens(LONG_TEXT, truncate=True)
    assert kept.shape == (1, N_CTX)
    with pytest.warns(UserWarning, match="n_ctx=16"):
        logits = text_model(LONG_TEXT)
    torch.testing.assert_close(logits, text_model(kept), **tolerance("same_dtype", torch.float32))
    with pytest.warns(UserWarning, match="n_ctx=16"):
        loss = text_model(LONG_TEXT, return_type="loss")
    torch.testing.assert_close(loss, text_model(kept, return_type="loss"), **tolerance("same_dtype", torch.float32))


def test_explicit_truncation_and_short_text_are_silent(text_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert text_model.to_tokens(LONG_TEXT, truncate=True).shape == (1, N_CTX)
        assert text_model.to_tokens(SHORT_TEXT).shape == (1, 3)
        assert text_model.to_tokens("a" + " a" * (N_CTX - 2)).shape == (1, N_CTX)  # exactly n_ctx with BOS: nothing cut
        text_model(SHORT_TEXT)


def test_batch_warning_counts_the_long_prompts(text_model):
    with pytest.warns(UserWarning, match=r"1 of 2 inputs are too long \(the longest tokenizes to 42 tokens"):
        tokens = text_model.to_tokens([LONG_TEXT, SHORT_TEXT])
    assert tokens.shape == (2, N_CTX)
    torch.testing.assert_close(tokens[0], text_model.to_tokens(LONG_TEXT, truncate=True)[0], rtol=0, atol=0)


def test_untruncated_tokens_longer_than_context_raise_with_the_fix(text_model):
    full = text_model.to_tokens(LONG_TEXT, truncate=False)
    assert full.shape == (1, 42)
    with pytest.raises(InvalidInputError, match=r"42 exceeds .*n_ctx=16.*tokens\[:, :16\].*truncate=True"):
        text_model(full)


def test_kv_cache_counts_cached_positions_against_the_context(model):
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, "cpu", 1)
    ones = torch.ones(1, 30, dtype=torch.long)
    model(ones, past_kv_cache=cache, attention_mask=ones)
    with pytest.raises(InvalidInputError, match=r"33 exceeds .*n_ctx=32 \(30 of them in past_kv_cache\)"):
        model(ones[:, :3], past_kv_cache=cache, attention_mask=ones[:, :3])


# -- token dtypes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_narrow_integer_tokens_that_hold_the_vocabulary_are_read_as_ids(model, tokens, dtype):
    """d_vocab=97 fits every one of these dtypes; uint8 must not be read as a boolean mask by indexing."""
    want = model(tokens)
    torch.testing.assert_close(model(tokens.to(dtype)), want, rtol=0, atol=0)
    _, cache = model.run_with_cache(tokens.to(dtype))
    torch.testing.assert_close(cache["hook_embed"], model.W_E[tokens], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_integer_tokens_too_narrow_for_the_vocabulary_raise(text_model, dtype):
    """A uint8 id of a 50257-token vocabulary may already have wrapped round to a valid-looking id."""
    with pytest.raises(TypeError, match=rf"{dtype}.*d_vocab=50257.*wrapped.*torch.long"):
        text_model(torch.tensor([[1, 2, 3]], dtype=dtype))


def test_signed_tokens_that_overflowed_are_caught_by_the_range_check(text_model):
    """int16 holds 65536 values >= d_vocab, so a GPT-2 id that overflowed it is negative, never a wrong valid id."""
    fits = torch.tensor([[30000, 3]])
    torch.testing.assert_close(text_model(fits.to(torch.int16)), text_model(fits), rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match=r"\[0, 50257\)"):
        text_model(torch.tensor([[50000, 3]]).to(torch.int16))  # wraps to -15536


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_tokens_raise_type_error(model, tokens, dtype):
    with pytest.raises(TypeError, match=rf"integer tensor, got dtype {dtype}.*tokens.long\(\)"):
        model(tokens.to(dtype))


def test_float_3d_input_without_start_at_layer_points_at_it(model):
    with pytest.raises(TypeError, match="start_at_layer=0"):
        model(torch.zeros(1, 4, model.cfg.d_model))


def test_non_tensor_input_raises_type_error(model):
    with pytest.raises(TypeError, match="torch.tensor"):
        model(((1, 2, 3),))


@pytest.mark.parametrize("bad", [[[1, 2, 97]], [[-1, 2]], [[0, 10**6]]])
def test_tokens_outside_the_vocabulary_raise(model, bad):
    with pytest.raises(InvalidInputError, match=r"\[0, 97\).*tokenizer"):
        model(torch.tensor(bad))


# -- token shapes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, match", [
    ((0, 4), r"empty batch \(shape \(0, 4\)\).*at least one prompt"),
    ((1, 0), r"at least one position.*shape \(1, 0\).*prepend_bos=True"),
    ((0,), r"at least one position.*shape \(1, 0\)"),
    ((2, 3, 4), r"\[batch, pos\].*shape \(2, 3, 4\).*flatten"),
    ((), r"\[batch, pos\].*shape \(\)"),
])
def test_token_shapes_the_model_cannot_run_raise(model, shape, match):
    with pytest.raises(InvalidInputError, match=match):
        model(torch.zeros(shape, dtype=torch.long))


def test_empty_list_of_prompts_raises(text_model):
    with pytest.raises(InvalidInputError, match="empty list.*at least one prompt"):
        text_model([])
    with pytest.raises(InvalidInputError, match="empty list"):
        text_model.to_tokens([])
    with pytest.raises(TypeError, match="string or a list of strings"):
        text_model.to_tokens([1, 2])


def test_refused_input_runs_no_hook(model):
    calls = []
    with pytest.raises(TypeError):
        model.run_with_hooks(torch.zeros(1, 4), fwd_hooks=[("hook_embed", lambda a, hook: calls.append(1))])
    with pytest.raises(InvalidInputError):
        model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[
            ("hook_embed", lambda a, hook: calls.append(1))], attention_mask=torch.zeros(1, 4, dtype=torch.long))
    assert calls == []


# -- attention masks --------------------------------------------------------------------------------------------
def test_float_attention_mask_raises_type_error(model, tokens):
    for mask in (torch.ones(tokens.shape), torch.full(tokens.shape, 0.5)):
        with pytest.raises(TypeError, match=r"0/1 integer or bool.*float32.*mask.long\(\)"):
            model(tokens, attention_mask=mask)


@pytest.mark.parametrize("value", [2, -1])
def test_mask_values_other_than_0_and_1_raise(model, tokens, value):
    mask = torch.ones_like(tokens)
    mask[0, 2] = value
    with pytest.raises(InvalidInputError, match=rf"only 0 .* and 1 .*got values .*{value}.*\(mask != 0\).long\(\)"):
        model(tokens, attention_mask=mask)


def test_bool_and_int_masks_give_the_same_result(model, tokens):
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = model(tokens, attention_mask=mask)
    for dtype in (torch.bool, torch.int32, torch.uint8):
        torch.testing.assert_close(model(tokens, attention_mask=mask.to(dtype)), want, rtol=0, atol=0)


def test_padding_only_rows_raise(model, tokens):
    mask = torch.ones_like(tokens)
    mask[1] = 0
    with pytest.raises(InvalidInputError, match=r"rows \[1\] have no real token.*NaN.*drop those rows"):
        model(tokens, attention_mask=mask)
    with pytest.raises(InvalidInputError, match=r"rows \[1\]"):
        model(tokens, attention_mask=mask, return_type="loss")


def test_padding_only_prompt_from_left_padding_names_the_pad_token(text_model):
    with pytest.raises(InvalidInputError, match=r"rows \[0\] have no real token.*pad token id 50256"):
        text_model(["", SHORT_TEXT], prepend_bos=False, padding_side="left")
    text_model(["", SHORT_TEXT], prepend_bos=True, padding_side="left")  # BOS is a real token


def test_mask_shape_mismatch_raises(model, tokens):
    with pytest.raises(InvalidInputError, match=r"attention_mask has shape \(2, 4\) but tokens have shape \(2, 5\)"):
        model(tokens, attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_mask_with_start_at_layer_is_checked(model, tokens):
    resid = model(tokens, stop_at_layer=1)
    with pytest.raises(TypeError, match="0/1 integer or bool"):
        model(resid, start_at_layer=1, attention_mask=torch.ones(tokens.shape))
    with pytest.raises(InvalidInputError, match=r"rows \[0, 1\]"):
        model(resid, start_at_layer=1, attention_mask=torch.zeros_like(tokens))


# -- KV cache ---------------------------------------------------------------------------------------------------
def test_kv_cache_padding_chunk_after_real_tokens_is_fine_and_refusals_leave_the_cache(model, tokens):
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, "cpu", 2)
    model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens))
    model(tokens[:, :1], past_kv_cache=cache, attention_mask=torch.tensor([[1], [0]]))  # row 1 has earlier tokens
    past = cache.past_length, cache.previous_attention_mask.clone()
    with pytest.raises(InvalidInputError, match="only 0"):
        model(tokens[:, :1], past_kv_cache=cache, attention_mask=torch.tensor([[1], [3]]))
    with pytest.raises(InvalidInputError, match=r"holds 2 prompts but the tokens have batch size 1.*init_cache"):
        model(tokens[:1, :1], past_kv_cache=cache, attention_mask=torch.ones(1, 1, dtype=torch.long))
    assert cache.past_length == past[0]
    torch.testing.assert_close(cache.previous_attention_mask, past[1], rtol=0, atol=0)


def test_start_at_layer_with_kv_cache_takes_the_mask_over_cached_and_new_positions(model, tokens):
    """The blocks read the mask of every key (TL passes it through as given), so it spans cached + new positions."""
    ones = torch.ones_like(tokens)
    cache = HookedTransformerKeyValueCache.init_cache(model.cfg, "cpu", 2)
    model(tokens[:, :4], past_kv_cache=cache, attention_mask=ones[:, :4])
    cache.freeze()  # the embedding step must not store the new position's mask: the blocks' step does not
    resid = model(tokens[:, 4:], past_kv_cache=cache, attention_mask=ones[:, 4:], stop_at_layer=0)
    cache.unfreeze()
    with pytest.raises(InvalidInputError, match=r"shape \(2, 1\) but the residual's \[batch, cached \+ new"):
        model(resid, start_at_layer=0, past_kv_cache=cache, attention_mask=ones[:, 4:])
    logits = model(resid, start_at_layer=0, past_kv_cache=cache, attention_mask=ones)
    torch.testing.assert_close(logits, model(tokens)[:, 4:], **tolerance("same_dtype_abs", torch.float32))


# -- layer bounds -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwarg", ["start_at_layer", "stop_at_layer"])
@pytest.mark.parametrize("value", [3, -3, 100])
def test_layer_bounds_outside_the_model_raise(model, tokens, kwarg, value):
    inputs = model(tokens, stop_at_layer=0) if kwarg == "start_at_layer" else tokens
    with pytest.raises(InvalidInputError, match=rf"{kwarg}={value} is outside this model's 2 layers.*\[-2, 2\]"):
        model(inputs, **{kwarg: value})


def test_layer_bounds_must_be_ints(model, tokens):
    with pytest.raises(TypeError, match="stop_at_layer must be an int"):
        model(tokens, stop_at_layer=1.0)
    with pytest.raises(TypeError, match="start_at_layer must be an int"):
        model(model(tokens, stop_at_layer=0), start_at_layer=True)


def test_layer_bounds_inside_the_model_keep_slice_semantics(model, tokens):
    same = tolerance("same_dtype", torch.float32)
    torch.testing.assert_close(model(tokens, stop_at_layer=-1), model(tokens, stop_at_layer=1), **same)
    torch.testing.assert_close(model(tokens, stop_at_layer=-2), model(tokens, stop_at_layer=0), **same)
    resid = model(tokens, stop_at_layer=2)
    torch.testing.assert_close(model(resid, start_at_layer=2), model(tokens), **same)
    torch.testing.assert_close(model(model(tokens, stop_at_layer=1), start_at_layer=-1), model(tokens), **same)


def test_start_at_layer_needs_a_residual_of_the_models_width(model, tokens):
    with pytest.raises(InvalidInputError, match=r"residual stream \[batch, pos, d_model=32\], got \(1, 4, 31\)"):
        model(torch.zeros(1, 4, 31), start_at_layer=0)
    with pytest.raises(InvalidInputError, match="tokens go in without start_at_layer"):
        model(tokens, start_at_layer=0)


# -- generate ---------------------------------------------------------------------------------------------------
def test_generate_reads_narrow_token_prompts_as_ids(model, tokens):
    kwargs = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    want = model.generate(tokens, **kwargs)
    torch.testing.assert_close(model.generate(tokens.to(torch.uint8), **kwargs), want, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="empty batch"):
        model.generate(tokens[:0], **kwargs)
    with pytest.raises(TypeError, match="integer tensor"):
        model.generate(tokens.to(torch.bool), **kwargs)


def test_generate_refuses_bad_lengths_before_decoding(text_model):
    with pytest.warns(UserWarning, match="n_ctx=16"), \
            pytest.raises(InvalidInputError, match=r"Prompt \(16 tokens\) \+ max_new_tokens \(1\) exceeds n_ctx=16"):
        text_model.generate(LONG_TEXT, max_new_tokens=1, verbose=False)
    for bad in (-1, 2.5):
        with pytest.raises(InvalidInputError, match=rf"max_new_tokens must be an int >= 0, got {bad}"):
            text_model.generate(SHORT_TEXT, max_new_tokens=bad, verbose=False)


def test_invalid_input_error_is_what_tl_code_catches():
    assert issubclass(InvalidInputError, ValueError) and issubclass(InvalidInputError, AssertionError)
