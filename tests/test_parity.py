"""hooklens against its references: Hugging Face GPT-2 logits and TransformerLens 3.9 activations."""
from __future__ import annotations

import pytest
import torch
from conftest import load_hf, tl_model_from_hf
from tolerances import tolerance

from hooklens import HookedTransformer

pytestmark = pytest.mark.usefixtures("no_grad")

CONFIG_NAMES = ["tiny", "odd", "gelu"]


SAME_DTYPE = tolerance()  # the default bounds: float32 against a same-dtype reference


def assert_close(actual, expected, rtol=SAME_DTYPE["rtol"], atol=SAME_DTYPE["atol"], what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50257, (3, 37), generator=g)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_match_hf_without_processing(hf_dirs, tokens, name):
    hf = load_hf(hf_dirs[name])
    model = HookedTransformer.from_pretrained_no_processing(hf_dirs[name])
    assert_close(model(tokens), hf(tokens).logits, **tolerance("logits_cross_impl"), what=name)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_processed_logits_match_hf_up_to_per_row_constant(hf_dirs, tokens, name):
    expected = load_hf(hf_dirs[name])(tokens).logits
    logits = HookedTransformer.from_pretrained(hf_dirs[name])(tokens)
    assert_close(logits, expected - expected.mean(-1, keepdim=True), **tolerance("logits_cross_impl"), what=name)


def test_gpt2_small_shape_matches_hf(tmp_path):
    from conftest import save_hf_gpt2

    directory = save_hf_gpt2(tmp_path / "small", seed=5, n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    hf = load_hf(directory)
    tokens = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = hf(tokens).logits
    model = HookedTransformer.from_pretrained(directory)
    assert_close(model(tokens), expected - expected.mean(-1, keepdim=True), **tolerance("logits_cross_impl"))
    raw = HookedTransformer.from_pretrained_no_processing(directory)
    assert_close(raw(tokens), expected, **tolerance("logits_cross_impl"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("processing", [True, False])
def test_every_cache_entry_matches_transformerlens(hf_dirs, tokens, name, processing):
    flags = dict(fold_ln=processing, center_writing_weights=processing, center_unembed=processing,
                 fold_value_biases=processing)
    tl = tl_model_from_hf(hf_dirs[name], **flags)
    model = HookedTransformer.from_pretrained(hf_dirs[name], **flags)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    logits, cache = model.run_with_cache(tokens)
    assert sorted(cache.keys()) == sorted(tl_cache.keys())
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)
    assert_close(logits, tl_logits, what="logits")


def test_optional_hook_points_match_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    for setter in ("set_use_attn_result", "set_use_split_qkv_input", "set_use_hook_mlp_in"):
        getattr(tl, setter)(True)
        getattr(model, setter)(True)
    _, tl_cache = tl.run_with_cache(tokens)
    _, cache = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" in cache and "blocks.1.hook_q_input" in cache and "blocks.0.hook_mlp_in" in cache
    assert sorted(cache.keys()) == sorted(tl_cache.keys())
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_attn_in_matches_transformerlens(tiny_dir, tokens, split_qkv):
    """hook_attn_in alone, and together with the split q/k/v inputs (TL then fires both)."""
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    for m in (tl, model):
        m.set_use_attn_in(True)
        m.set_use_split_qkv_input(split_qkv)
    _, tl_cache = tl.run_with_cache(tokens)
    _, cache = model.run_with_cache(tokens)
    assert "blocks.0.hook_attn_in" in cache
    assert sorted(cache.keys()) == sorted(tl_cache.keys())
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)


def test_hook_tokens_flag(tiny_dir, tokens):
    model = HookedTransformer.from_pretrained(tiny_dir)
    _, cache = model.run_with_cache(tokens)
    assert "hook_tokens" not in cache
    with pytest.raises(KeyError, match="hook_tokens"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", lambda t, hook: None)])
    model.set_use_hook_tokens(True)
    _, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["hook_tokens"], tokens)

    def swap(t, hook):
        return torch.full_like(t, 11)

    assert_close(model.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", swap)]), model(torch.full_like(tokens, 11)))


def test_loss_matches_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    assert_close(model(tokens, return_type="loss"), tl(tokens, return_type="loss"))
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (3, 36)
    assert_close(per_token, tl(tokens, return_type="loss", loss_per_token=True))
    logits, loss = model(tokens, return_type="both")
    assert_close(loss, tl(tokens, return_type="loss"))
    assert model(tokens, return_type=None) is None


def test_run_with_hooks_edits_match_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)

    def ablate_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    def flatten_pattern(pattern, hook):
        return torch.tril(torch.ones_like(pattern)) / torch.arange(1, pattern.shape[-1] + 1)[:, None]

    def scale_mlp(post, hook):
        return post * 0.5

    hooks = [("blocks.0.attn.hook_z", ablate_head), ("blocks.1.attn.hook_pattern", flatten_pattern),
             ("blocks.0.mlp.hook_post", scale_mlp)]
    expected = tl.run_with_hooks(tokens, fwd_hooks=hooks)
    actual = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(actual, expected)
    assert not (actual - model(tokens)).abs().max() < 1e-3, "the hooks must change the output"
    # Filter-function names apply the hook everywhere they match.
    def name_filter(name):
        return name.endswith("hook_mlp_out")

    def zero(x, hook):
        return torch.zeros_like(x)

    assert_close(model.run_with_hooks(tokens, fwd_hooks=[(name_filter, zero)]),
                 tl.run_with_hooks(tokens, fwd_hooks=[(name_filter, zero)]))


def test_stop_and_start_at_layer_match_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    resid = model(tokens, stop_at_layer=1)
    assert_close(resid, tl(tokens, stop_at_layer=1))
    _, cache = model.run_with_cache(tokens, stop_at_layer=1)
    assert "blocks.1.hook_resid_pre" not in cache and "blocks.0.hook_resid_post" in cache
    assert_close(model(resid, start_at_layer=1), tl(resid, start_at_layer=1))
    assert_close(model(resid, start_at_layer=1), model(tokens), **tolerance("logits_tl_twin"))
    loss = model(resid, start_at_layer=1, tokens=tokens, return_type="loss")
    assert_close(loss, model(tokens, return_type="loss"), **tolerance())


def test_remove_batch_dim_matches_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    _, tl_cache = tl.run_with_cache(tokens[:1], remove_batch_dim=True)
    _, cache = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)
    assert cache["blocks.0.attn.hook_pattern"].shape == (4, 37, 37)
    with pytest.raises(ValueError, match="batch of 1"):
        model.run_with_cache(tokens, remove_batch_dim=True)


PROMPTS = ["Hello world, this is a longer prompt than the others", "Short", "A medium length prompt here"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batches_match_transformerlens(tiny_dir, padding_side):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    tl_tokens = tl.to_tokens(PROMPTS, padding_side=padding_side)
    tokens = model.to_tokens(PROMPTS, padding_side=padding_side)
    assert torch.equal(tokens, tl_tokens)
    expected = tl(PROMPTS, padding_side=padding_side)
    assert_close(model(PROMPTS, padding_side=padding_side), expected)
    _, tl_cache = tl.run_with_cache(PROMPTS, padding_side=padding_side)
    _, cache = model.run_with_cache(PROMPTS, padding_side=padding_side)
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)


def test_left_padding_leaves_each_prompt_unchanged(tiny_dir):
    model = HookedTransformer.from_pretrained(tiny_dir)
    padded = model(PROMPTS, padding_side="left")
    for row, prompt in enumerate(PROMPTS):
        alone = model(prompt)
        length = alone.shape[1]
        assert_close(padded[row, -length:], alone[0], atol=1e-4, what=prompt)


def test_explicit_attention_mask_matches_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    mask[2, :11] = 0
    assert_close(model(tokens, attention_mask=mask), tl(tokens, attention_mask=mask))
    # A hook on the pattern switches to the reference attention path; both paths must agree.
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    _, tl_cache = tl.run_with_cache(tokens, attention_mask=mask)
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)


def test_backward_hooks_and_incl_bwd_match_transformerlens(tiny_dir, tokens):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    with torch.enable_grad():
        _, tl_cache = tl.run_with_cache(tokens[:2], return_type="loss", incl_bwd=True)
        _, cache = model.run_with_cache(tokens[:2], return_type="loss", incl_bwd=True)
    grads = [k for k in tl_cache.keys() if k.endswith("_grad")]
    assert "blocks.0.hook_resid_pre_grad" in grads
    assert sorted(grads) == sorted(k for k in cache.keys() if k.endswith("_grad"))
    # TL calls ln1 three times (for q, k, v), so its cached ln1 gradients hold only the last call's share.
    # hooklens calls ln1 once, so its gradient is the full one: the sum of TL's three shares.
    tl_ln1_total = {}

    def accumulate(grad, hook):
        tl_ln1_total[hook.name] = tl_ln1_total.get(hook.name, 0) + grad

    def ln1_filter(name):
        return ".ln1." in name

    with torch.enable_grad(), tl.hooks(bwd_hooks=[(ln1_filter, accumulate)]):
        tl(tokens[:2], return_type="loss").backward()
    for key in grads:
        expected = tl_ln1_total[key[: -len("_grad")]] if ".ln1." in key else tl_cache[key]
        assert_close(cache[key], expected, rtol=1e-4, atol=1e-6, what=key)


def test_token_helpers_match_transformerlens(tiny_dir):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    text = "The first thing you need to figure out is *how* things are tokenized."
    assert model.to_tokens(text)[0, :6].tolist() == [50256, 464, 717, 1517, 345, 761]
    assert torch.equal(model.to_tokens(text), tl.to_tokens(text))
    assert torch.equal(model.to_tokens(text, prepend_bos=False), tl.to_tokens(text, prepend_bos=False))
    assert model.to_str_tokens(text) == tl.to_str_tokens(text)
    assert model.to_str_tokens(model.to_tokens(text)) == tl.to_str_tokens(tl.to_tokens(text))
    assert model.to_str_tokens([text, "hi"]) == tl.to_str_tokens([text, "hi"])
    assert model.to_string(model.to_tokens(text)) == tl.to_string(tl.to_tokens(text))
    assert model.to_string(model.to_tokens(text)[0]) == tl.to_string(tl.to_tokens(text)[0])
    assert model.to_single_token(" Mary") == tl.to_single_token(" Mary")
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token(" Mary and John")
    for mode in ("first", "last"):
        assert model.get_token_position(" things", text + " things", mode=mode) == tl.get_token_position(
            " things", text + " things", mode=mode)
    assert_close(model.tokens_to_residual_directions(" Mary"), tl.tokens_to_residual_directions(" Mary"))
    toks = model.to_tokens(text)
    assert_close(model.tokens_to_residual_directions(toks), tl.tokens_to_residual_directions(toks))


def test_default_prepend_bos_false(tiny_dir):
    model = HookedTransformer.from_pretrained(tiny_dir, default_prepend_bos=False)
    tl = tl_model_from_hf(tiny_dir, default_prepend_bos=False)
    assert model.to_tokens("Hello there")[0, 0].item() != 50256
    assert torch.equal(model.to_tokens("Hello there"), tl.to_tokens("Hello there"))
    assert model.to_tokens("Hello there", prepend_bos=True)[0, 0].item() == 50256
    assert_close(model("Hello there"), tl("Hello there"))


def test_stacked_weights_match_transformerlens(tiny_dir):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    for name in ["W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
                 "W_in", "W_out", "b_in", "b_out", "W_E_pos"]:
        assert_close(getattr(model, name), getattr(tl, name), what=name)
    for layer in range(model.cfg.n_layers + 1):
        assert_close(model.accumulated_bias(layer), tl.accumulated_bias(layer), what=f"accumulated_bias({layer})")
    assert model.all_head_labels() == tl.all_head_labels()
    assert sorted(model.hook_dict) == sorted(tl.hook_dict)


def test_state_dict_names_match_transformerlens(tiny_dir):
    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    tl_params = dict(tl.named_parameters())
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(tl_params)
    for key in params:
        assert_close(params[key], tl_params[key], what=key)


def test_hf_model_argument_and_dtype(tiny_dir, tokens):
    hf = load_hf(tiny_dir)
    model = HookedTransformer.from_pretrained("my-gpt2", hf_model=hf)
    assert model.cfg.model_name == "my-gpt2"
    expected = hf(tokens).logits
    assert_close(model(tokens), expected - expected.mean(-1, keepdim=True), **tolerance("logits_cross_impl"))
    model64 = HookedTransformer.from_pretrained(tiny_dir, dtype=torch.float64)
    assert model64.W_E.dtype == torch.float64
    assert_close(model64(tokens).float(), model(tokens), **tolerance("logits_cross_impl"))
