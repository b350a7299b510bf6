"""HookedTransformer.generate, sample_logits and the KV cache, against Hugging Face and TransformerLens 3.9.

The conftest checkpoints (initializer_range 0.02) are so flat that greedy decoding repeats one token forever, which
would make "same tokens" checks nearly vacuous. This module therefore saves its own random GPT-2 with larger weights
(initializer_range 0.5), whose greedy continuations change from step to step and from prompt to prompt.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import HF_CONFIGS, load_hf, save_hf_gpt2, tl_model_from_hf
from tolerances import tolerance

from hooklens import HookedTransformer
from hooklens.kv_cache import HookedTransformerKeyValueCache
from hooklens.utils import sample_logits

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens.utilities.logits_utils import sample_logits as tl_sample_logits

EOS = 50256
N_NEW = 8
PROMPT = "The quick brown fox"
PROMPTS = ["The quick brown fox jumps over the lazy", "Hello", "A short one"]  # different token lengths
QUIET = dict(verbose=False)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    return save_hf_gpt2(tmp_path_factory.mktemp("gen") / "gpt2", seed=11, initializer_range=0.5, **HF_CONFIGS["tiny"])


@pytest.fixture(scope="module")
def model(gen_dir):
    return HookedTransformer.from_pretrained(gen_dir)


@pytest.fixture(scope="module")
def raw_model(gen_dir):
    return HookedTransformer.from_pretrained_no_processing(gen_dir)


@pytest.fixture(scope="module")
def tl(gen_dir):
    return tl_model_from_hf(gen_dir)


def greedy(model, input, **kwargs):
    kwargs = {"max_new_tokens": N_NEW, "do_sample": False, "stop_at_eos": False, "return_type": "tokens", **kwargs}
    return model.generate(input, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def free_single(model):
    """Greedy, no EOS stopping: PROMPT -> tokens, with and without the KV cache (computed once per module)."""
    return {use_cache: greedy(model, PROMPT, use_past_kv_cache=use_cache) for use_cache in (True, False)}


@pytest.fixture(scope="module")
def free_batch(model):
    """Greedy, no EOS stopping: the batch PROMPTS -> left-padded tokens, with and without the KV cache."""
    return {use_cache: greedy(model, PROMPTS, use_past_kv_cache=use_cache) for use_cache in (True, False)}


# -- greedy decoding --------------------------------------------------------------------------------------------
def test_greedy_continuation_is_not_degenerate(free_single, free_batch):
    # Guard for the fixture itself: the checks below only mean something if greedy tokens vary.
    for row in free_single[True][:, -N_NEW:].tolist() + free_batch[True][:, -N_NEW:].tolist():
        assert len(set(row)) >= N_NEW // 2, row
    assert len({tuple(row) for row in free_batch[True][:, -N_NEW:].tolist()}) == len(PROMPTS)


def test_greedy_same_with_and_without_kv_cache(model, free_single, free_batch):
    assert free_single[True].shape == (1, model.to_tokens(PROMPT).shape[1] + N_NEW)
    assert torch.equal(free_single[True], free_single[False])
    assert torch.equal(free_batch[True], free_batch[False])
    tokens = model.to_tokens(PROMPT)
    for use_cache in (True, False):
        assert torch.equal(greedy(model, tokens, use_past_kv_cache=use_cache), free_single[True])


def test_greedy_matches_hugging_face_generate(gen_dir, raw_model, free_single):
    hf = load_hf(gen_dir)
    tokens = raw_model.to_tokens(PROMPT)
    expected = hf.generate(
        tokens, attention_mask=torch.ones_like(tokens), do_sample=False, max_new_tokens=N_NEW, pad_token_id=EOS,
    )
    assert expected.shape[1] == tokens.shape[1] + N_NEW, "HF stopped early (EOS); pick another prompt/seed"
    for use_cache in (True, False):
        assert torch.equal(greedy(raw_model, PROMPT, use_past_kv_cache=use_cache), expected)
    # Weight processing shifts logits by a per-row constant only, so greedy tokens do not change.
    assert torch.equal(free_single[True], expected)
    # A left-padded batch, with HF's attention mask (HF derives position ids from it, as hooklens does).
    from hooklens.utils import get_attention_mask

    batch = raw_model.to_tokens(PROMPTS, padding_side="left")
    mask = get_attention_mask(raw_model.tokenizer, batch, prepend_bos=True, padding_side="left")
    expected = hf.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=EOS)
    assert expected.shape[1] == batch.shape[1] + N_NEW
    assert torch.equal(greedy(raw_model, PROMPTS), expected)


def test_greedy_matches_transformerlens(tl, free_single, free_batch):
    common = dict(max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)
    assert torch.equal(free_single[True], tl.generate(PROMPT, **common))
    assert torch.equal(free_batch[True], tl.generate(PROMPTS, **common))


def test_batched_left_padded_rows_match_single_prompts(model, free_batch):
    lengths = [model.to_tokens(p).shape[1] for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS), "prompts must differ in length to exercise padding"
    for use_cache in (True, False):
        assert free_batch[use_cache].shape == (len(PROMPTS), max(lengths) + N_NEW)
    for row, (prompt, length) in enumerate(zip(PROMPTS, lengths)):
        single = greedy(model, prompt)[0]
        pad = max(lengths) - length
        for use_cache in (True, False):
            batched = free_batch[use_cache]
            assert torch.equal(batched[row, :pad], torch.full((pad,), model.tokenizer.pad_token_id)), "left padding"
            assert torch.equal(batched[row, pad:], single), f"row {row} ({prompt!r}), use_past_kv_cache={use_cache}"


def test_left_padded_token_batch_with_padding_side_left(model, free_batch):
    # Token prompts are not re-padded; with padding_side="left" (as in TL) the leading pads are masked.
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    assert (tokens[:, 0] == EOS).all() and (tokens[1:, 1] == EOS).all()
    for use_cache in (True, False):
        assert torch.equal(greedy(model, tokens, padding_side="left", use_past_kv_cache=use_cache), free_batch[True])


def test_generation_through_the_hooked_attention_path(model, free_batch):
    # A hook on hook_pattern switches attention to the pattern-materializing path, KV cache included.
    seen = []

    def record(pattern, hook):
        seen.append(tuple(pattern.shape))
        return pattern

    for use_cache in (True, False):
        seen.clear()
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", record)]):
            out = greedy(model, PROMPTS, use_past_kv_cache=use_cache)
        assert torch.equal(out, free_batch[True])
        n = free_batch[True].shape[1] - N_NEW
        assert seen[0] == (3, 4, n, n)
        assert seen[-1] == ((3, 4, 1, n + N_NEW - 1) if use_cache else (3, 4, n + N_NEW - 1, n + N_NEW - 1))


def test_generate_after_model_to_float64(gen_dir, free_batch):
    """`model.to(dtype)` must keep cfg.dtype in sync (TL's move_to_and_update_config does): LayerNormPre casts
    its output to cfg.dtype and the KV cache is allocated in cfg.dtype."""
    model = HookedTransformer.from_pretrained(gen_dir)
    model.to(torch.float64)
    assert model.W_E.dtype == torch.float64
    assert model.cfg.dtype == torch.float64
    assert model(model.to_tokens(PROMPT)).dtype == torch.float64
    for use_cache in (True, False):
        assert torch.equal(greedy(model, PROMPTS, use_past_kv_cache=use_cache), free_batch[True])


def test_batched_string_output_matches_single_prompts(model):
    batched = model.generate(PROMPTS, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, **QUIET)
    assert isinstance(batched, list) and len(batched) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, batched):
        single = model.generate(prompt, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, **QUIET)
        assert text == single and text.startswith(prompt)


# -- return_type ------------------------------------------------------------------------------------------------
def test_return_type_semantics_match_transformerlens(model, tl):
    common = dict(max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False)
    tokens = model.to_tokens(PROMPT)
    cases = [(PROMPT, "input"), (PROMPTS, "input"), ([PROMPT], "input"), (tokens, "input"), (tokens, "str")]
    for input, return_type in cases:
        ours = model.generate(input, return_type=return_type, **common)
        theirs = tl.generate(input, return_type=return_type, **common)
        what = f"input={type(input).__name__}, return_type={return_type!r}"
        assert type(ours) is type(theirs), f"{what}: {type(ours).__name__} != {type(theirs).__name__}"
        if isinstance(theirs, torch.Tensor):
            assert torch.equal(ours, theirs), what
        else:
            assert ours == theirs, what


def test_return_type_shapes_and_prefixes(model):
    common = dict(max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, **QUIET)
    prompt_tokens = model.to_tokens(PROMPT)
    text = model.generate(PROMPT, **common)  # "input" + str -> str
    assert isinstance(text, str) and text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert "<|endoftext|>" not in text  # TL decodes with skip_special_tokens=True
    tokens = model.generate(PROMPT, return_type="tokens", **common)
    assert tokens.shape == (1, prompt_tokens.shape[1] + N_NEW) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, : prompt_tokens.shape[1]], prompt_tokens)
    assert text == model.tokenizer.decode(tokens[0], skip_special_tokens=True)
    from_tokens = model.generate(prompt_tokens, **common)  # "input" + tensor -> tensor
    assert isinstance(from_tokens, torch.Tensor) and torch.equal(from_tokens, tokens)
    assert model.generate(prompt_tokens[0], **common).shape == tokens.shape  # 1-D tokens are a batch of one
    with pytest.raises(ValueError):
        model.generate(PROMPT, return_type="logits", **common)


# -- stop_at_eos ------------------------------------------------------------------------------------------------
def _first_new_token_index(seq):
    """An index j >= 1 whose token does not occur in seq[:j] (so using it as EOS stops exactly at step j)."""
    for j in range(1, len(seq)):
        if seq[j] not in seq[:j]:
            return j
    raise AssertionError(f"no usable EOS candidate in {seq}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_at_eos_stops_single_prompt(model, free_single, use_cache):
    free = free_single[True][0]
    n_prompt = free.shape[0] - N_NEW
    new = free[n_prompt:].tolist()
    j = _first_new_token_index(new)
    out = greedy(model, PROMPT, stop_at_eos=True, eos_token_id=new[j], use_past_kv_cache=use_cache)
    assert out.shape == (1, n_prompt + j + 1), "generation must stop right after the EOS token"
    assert torch.equal(out[0], free[: n_prompt + j + 1])
    if use_cache:  # stop_at_eos=False ignores eos_token_id
        assert torch.equal(greedy(model, PROMPT, eos_token_id=new[j])[0], free)


def _eos_for_row_0(free_batch):
    """(j, token): a token row 0 first emits at step j >= 1 and no other row ever emits."""
    new = free_batch[True][:, -N_NEW:].tolist()
    others = {t for row in new[1:] for t in row}
    candidates = [(j, t) for j, t in enumerate(new[0]) if j >= 1 and t not in new[0][:j] and t not in others]
    assert candidates, new
    return candidates[0]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_at_eos_pads_finished_rows(model, tl, free_batch, as_list):
    j, eos = _eos_for_row_0(free_batch)
    eos_arg = [eos] if as_list else eos
    out = greedy(model, PROMPTS, stop_at_eos=True, eos_token_id=eos_arg)
    # Row 0 finishes at step j; the others run to max_new_tokens. TL pads finished rows with eos_token_id itself
    # when it is one id, and with the tokenizer's EOS when eos_token_id is a list.
    pad = model.tokenizer.eos_token_id if as_list else eos
    expected = free_batch[True].clone()
    expected[0, -N_NEW + j + 1:] = pad
    assert torch.equal(out, expected)
    if as_list:
        theirs = tl.generate(PROMPTS, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=True,
                             eos_token_id=eos_arg, return_type="tokens", verbose=False)
        assert torch.equal(out, theirs)


def test_stop_at_eos_stops_when_every_row_finished(model, free_batch):
    new = free_batch[True][:, -N_NEW:].tolist()
    stop_ids = sorted({row[_first_new_token_index(row)] for row in new})
    stop_step = [min(i for i, t in enumerate(row) if t in stop_ids) for row in new]
    assert max(stop_step) < N_NEW - 1, "every row must stop before max_new_tokens for this check to mean anything"
    for use_cache in (True, False):
        out = greedy(model, PROMPTS, stop_at_eos=True, eos_token_id=stop_ids, use_past_kv_cache=use_cache)
        assert out.shape[1] == free_batch[True].shape[1] - N_NEW + max(stop_step) + 1
        for row, step in enumerate(stop_step):
            n = free_batch[True].shape[1] - N_NEW + step + 1
            assert torch.equal(out[row, :n], free_batch[True][row, :n])
            assert (out[row, n:] == EOS).all()


def test_stop_at_eos_with_tokenizer_eos_by_default(model, free_single, monkeypatch):
    # Make the tokenizer's EOS the greedy token of some step: the default stop_at_eos=True must stop there.
    free = free_single[True][0]
    new = free[-N_NEW:].tolist()
    j = _first_new_token_index(new)
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(new[j])
    assert tokenizer.eos_token_id == new[j] and tokenizer.bos_token_id == EOS
    monkeypatch.setattr(model, "tokenizer", tokenizer)
    out = model.generate(PROMPT, max_new_tokens=N_NEW, do_sample=False, return_type="tokens", **QUIET)
    assert torch.equal(out[0], free[: free.shape[0] - N_NEW + j + 1])


# -- sampling ---------------------------------------------------------------------------------------------------
SAMPLING = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=40),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.8, freq_penalty=2.0),
]


@pytest.mark.parametrize("kwargs", SAMPLING, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sampling_is_reproducible_with_a_seed(model, kwargs):
    def run(use_cache=True, input=PROMPTS):
        torch.manual_seed(1234)
        return model.generate(input, max_new_tokens=N_NEW, do_sample=True, stop_at_eos=False, return_type="tokens",
                              use_past_kv_cache=use_cache, **kwargs, **QUIET)

    first = run()
    assert torch.equal(first, run())
    assert torch.equal(first, run(use_cache=False))
    torch.manual_seed(99)
    other = model.generate(PROMPTS, max_new_tokens=N_NEW, do_sample=True, stop_at_eos=False, return_type="tokens",
                           **kwargs, **QUIET)
    assert not torch.equal(first, other), "different seeds should give different samples"


def test_sampling_matches_transformerlens_with_same_seed(model, tl):
    for kwargs in SAMPLING:
        torch.manual_seed(7)
        ours = model.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False, return_type="tokens", **kwargs, **QUIET)
        torch.manual_seed(7)
        theirs = tl.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False, return_type="tokens", verbose=False,
                             **kwargs)
        assert torch.equal(ours, theirs), kwargs


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_1_and_temperature_0_equal_greedy(model, use_cache):
    expected = greedy(model, PROMPTS, use_past_kv_cache=use_cache)
    torch.manual_seed(0)
    top1 = greedy(model, PROMPTS, do_sample=True, top_k=1, temperature=1.7, use_past_kv_cache=use_cache)
    assert torch.equal(top1, expected)
    assert torch.equal(greedy(model, PROMPTS, do_sample=True, temperature=0.0, use_past_kv_cache=use_cache), expected)


def test_sample_logits_matches_transformerlens():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 500, generator=g)
    tokens = torch.randint(0, 500, (6, 30), generator=g)
    for kwargs in [dict(), dict(temperature=0.5), dict(top_k=5), dict(top_k=10_000), dict(top_p=0.3),
                   dict(top_p=0.95, temperature=2.0), dict(freq_penalty=1.5), dict(top_k=3, freq_penalty=0.7),
                   dict(temperature=0.0), dict(repetition_penalty=1.3), dict(repetition_penalty=0.7, top_k=20),
                   dict(repetition_penalty=2.0, temperature=0.0), dict(repetition_penalty=1.2, freq_penalty=0.5)]:
        needs_tokens = "freq_penalty" in kwargs or "repetition_penalty" in kwargs
        for seed in range(3):
            torch.manual_seed(seed)
            ours = sample_logits(logits.clone(), tokens=tokens if needs_tokens else None, **kwargs)
            torch.manual_seed(seed)
            theirs = tl_sample_logits(logits.clone(), tokens=tokens if needs_tokens else None, **kwargs)
            assert torch.equal(ours, theirs), kwargs


def _support(logits, n=4000, seed=0, **kwargs):
    torch.manual_seed(seed)
    samples = sample_logits(logits.expand(n, -1), **kwargs)
    return samples, set(samples.tolist())


def test_sample_logits_top_p_keeps_exactly_the_minimal_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: token 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()[None]
    assert _support(logits, top_p=0.45)[1] == {1}
    assert _support(logits, top_p=0.6)[1] == {1, 3}  # 0.5 < 0.6 <= 0.8
    assert _support(logits, top_p=0.9)[1] == {1, 3, 2}  # 0.8 < 0.9 <= 0.95
    assert _support(logits, top_p=0.97)[1] == {0, 1, 2, 3}
    assert _support(logits, top_p=1.0)[1] == {0, 1, 2, 3}
    # The kept tokens are renormalized, not reweighted: 0.5 / 0.8 = 0.625 for token 1.
    samples, _ = _support(logits, n=20000, top_p=0.6)
    assert abs((samples == 1).float().mean().item() - 0.625) < 0.02
    # Temperature applies before the nucleus is chosen: at T=0.5 probs ~ [.007,.676,.061,.243] -> nucleus {1}.
    assert _support(logits, top_p=0.6, temperature=0.5)[1] == {1}
    # Rows are independent.
    two = torch.stack([probs.log(), probs.flip(0).log()])
    torch.manual_seed(0)
    samples = sample_logits(two.repeat(2000, 1), top_p=0.6).view(2000, 2)
    assert set(samples[:, 0].tolist()) == {1, 3} and set(samples[:, 1].tolist()) == {2, 0}


def test_sample_logits_top_k_and_argument_checks():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert _support(logits, top_k=2)[1] == {1, 3}
    assert _support(logits, top_k=1)[1] == {1}
    assert _support(logits, top_k=100)[1] == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError):
        sample_logits(logits, top_k=0)
    with pytest.raises(ValueError):
        sample_logits(logits, top_p=0.0)
    with pytest.raises(ValueError):
        sample_logits(logits, freq_penalty=1.0)  # needs tokens
    # freq_penalty: the most repeated token is pushed down.
    tokens = torch.tensor([[1, 1, 1, 1], [3, 3, 1, 0]])
    out = sample_logits(logits.expand(2, -1), top_k=1, freq_penalty=1.0, tokens=tokens)
    assert out.tolist() == [3, 1]  # row 0: 3.0 - 4 < 2.0; row 1: token 3 drops to 0.0, token 1 to 2.0


# -- limits -----------------------------------------------------------------------------------------------------
def test_prompt_plus_new_tokens_beyond_n_ctx_raises(model):
    n_prompt = model.to_tokens(PROMPT).shape[1]
    room = model.cfg.n_ctx - n_prompt
    with pytest.raises(ValueError, match="n_ctx"):
        model.generate(PROMPT, max_new_tokens=room + 1, **QUIET)
    with pytest.raises(ValueError, match="n_ctx"):
        model.generate(PROMPTS, max_new_tokens=model.cfg.n_ctx, **QUIET)
    long_prompt = torch.randint(0, 50000, (1, model.cfg.n_ctx - 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="n_ctx"):
        model.generate(long_prompt, max_new_tokens=4, **QUIET)
    # Exactly filling the context is fine, with and without the cache.
    for use_cache in (True, False):
        out = greedy(model, long_prompt, max_new_tokens=3, use_past_kv_cache=use_cache)
        assert out.shape == (1, model.cfg.n_ctx)


# -- KV cache ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return HookedTransformer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def kv_tokens():
    return torch.randint(0, 50000, (2, 24), generator=torch.Generator().manual_seed(3))  # no pad/EOS id


@pytest.mark.parametrize("split", [1, 7, 23])
def test_kv_cache_chunks_equal_full_forward(tiny_model, kv_tokens, split):
    full = tiny_model(kv_tokens)
    cache = HookedTransformerKeyValueCache.init_cache(tiny_model.cfg, tiny_model.cfg.device, kv_tokens.shape[0])
    first = tiny_model(kv_tokens[:, :split], past_kv_cache=cache)
    assert cache.past_length == split
    second = tiny_model(kv_tokens[:, split:], past_kv_cache=cache)
    assert cache.past_length == kv_tokens.shape[1]
    torch.testing.assert_close(first, full[:, :split], **tolerance("same_dtype_abs"))
    torch.testing.assert_close(second, full[:, split:], **tolerance("same_dtype_abs"))


def test_kv_cache_token_by_token_and_with_pattern_hooks(tiny_model, kv_tokens):
    full = tiny_model(kv_tokens)
    cache = HookedTransformerKeyValueCache.init_cache(tiny_model.cfg, tiny_model.cfg.device, kv_tokens.shape[0])
    steps = [tiny_model(kv_tokens[:, :5], past_kv_cache=cache)]
    for i in range(5, kv_tokens.shape[1]):
        steps.append(tiny_model(kv_tokens[:, i : i + 1], past_kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **tolerance("same_dtype_abs"))
    # Same through the reference (pattern-materializing) attention path.
    cache = HookedTransformerKeyValueCache.init_cache(tiny_model.cfg, tiny_model.cfg.device, kv_tokens.shape[0])
    _, c1 = tiny_model.run_with_cache(kv_tokens[:, :10], past_kv_cache=cache)
    logits2, c2 = tiny_model.run_with_cache(kv_tokens[:, 10:], past_kv_cache=cache)
    _, c_full = tiny_model.run_with_cache(kv_tokens)
    torch.testing.assert_close(logits2, full[:, 10:], **tolerance("same_dtype_abs"))
    assert c2["blocks.1.attn.hook_pattern"].shape == (2, tiny_model.cfg.n_heads, 14, 24)
    torch.testing.assert_close(c2["blocks.1.attn.hook_pattern"], c_full["blocks.1.attn.hook_pattern"][:, :, 10:],
                               **tolerance("same_dtype_abs"))


def test_frozen_kv_cache_does_not_grow(tiny_model, kv_tokens):
    full = tiny_model(kv_tokens)
    cache = HookedTransformerKeyValueCache.init_cache(tiny_model.cfg, tiny_model.cfg.device, kv_tokens.shape[0])
    tiny_model(kv_tokens[:, :10], past_kv_cache=cache)
    cache.freeze()
    for _ in range(2):  # the same continuation twice: the frozen cache is reused, not extended
        logits = tiny_model(kv_tokens[:, 10:], past_kv_cache=cache)
        torch.testing.assert_close(logits, full[:, 10:], **tolerance("same_dtype_abs"))
        assert cache.past_length == 10 and cache.previous_attention_mask.shape == (2, 10)
    cache.unfreeze()
    tiny_model(kv_tokens[:, 10:], past_kv_cache=cache)
    assert cache.past_length == 24 and cache.previous_attention_mask.shape == (2, 24)


def test_none_means_the_model_default_for_prepend_bos_and_padding_side(model, free_single):
    """TL's USE_DEFAULT_VALUE is None: the public resolvers read cfg.default_prepend_bos and the tokenizer's side."""
    assert model.resolve_prepend_bos(None) is model.cfg.default_prepend_bos
    assert model.resolve_prepend_bos(False) is False and model.resolve_prepend_bos(1) is True
    assert model.resolve_padding_side(None) == model.tokenizer.padding_side
    assert model.resolve_padding_side("left") == "left"
    with pytest.raises(ValueError, match="padding_side"):
        model.resolve_padding_side("middle")
    explicit = greedy(model, PROMPT, prepend_bos=model.cfg.default_prepend_bos, padding_side="right")
    assert torch.equal(greedy(model, PROMPT, prepend_bos=None, padding_side=None), free_single[True])
    assert torch.equal(explicit, free_single[True])
    assert torch.equal(model.to_tokens(PROMPT, None, None), model.to_tokens(PROMPT))
