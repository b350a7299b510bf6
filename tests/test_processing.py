"""Weight processing (fold_ln, centring, value-bias folding, refactor_factored_attn_matrices) against TL 3.9."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import load_hf, tl_model_from_hf
from tolerances import tolerance

from hooklens import HookedTransformer, HookedTransformerConfig, loading
from hooklens.components import LayerNormPre

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import HookedTransformer as TLHookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
NO_PROCESSING = dict.fromkeys(FLAGS, False)
TOKENS = torch.randint(0, 50000, (2, 17), generator=torch.Generator().manual_seed(2))


def tl_processed(directory, refactor_factored_attn_matrices=False, **flags):
    """TL 3.9's HookedTransformer with TL's own processing, including refactor_factored_attn_matrices."""
    flags = {**dict.fromkeys(FLAGS, True), **flags}
    raw = tl_model_from_hf(directory, **NO_PROCESSING)  # TL layout, unprocessed (cfg keeps normalization "LN")
    state = {k: v.clone() for k, v in raw.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TLHookedTransformer(raw.cfg, tokenizer=raw.tokenizer)
    model.load_and_process_state_dict(state, refactor_factored_attn_matrices=refactor_factored_attn_matrices, **flags)
    return model.eval()


def params(model):
    return {name: p.detach() for name, p in model.named_parameters()}


SAME_DTYPE = tolerance()  # the default bounds: float32 against a same-dtype reference


def assert_same_parameters(ours, theirs, rtol=SAME_DTYPE["rtol"], atol=SAME_DTYPE["atol"]):
    a, b = params(ours), params(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -- one flag at a time, and combinations -----------------------------------------------------------------------
COMBOS = [dict(zip(FLAGS, bits)) for bits in itertools.product([False, True], repeat=4)]
SELECTED = [NO_PROCESSING] + [{**NO_PROCESSING, f: True} for f in FLAGS] + [
    dict(fold_ln=True, center_writing_weights=True, center_unembed=False, fold_value_biases=False),
    dict(fold_ln=False, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    dict.fromkeys(FLAGS, True),
]


@pytest.mark.parametrize("flags", SELECTED, ids=lambda f: "+".join(k for k, v in f.items() if v) or "none")
def test_each_processing_flag_matches_transformerlens(hf_dirs, flags):
    directory = hf_dirs["odd"]
    ours = HookedTransformer.from_pretrained(directory, **flags)
    theirs = tl_model_from_hf(directory, **flags)
    assert ours.cfg.normalization_type == theirs.cfg.normalization_type
    assert_same_parameters(ours, theirs)
    torch.testing.assert_close(ours(TOKENS), theirs(TOKENS), **tolerance("logits_tl_twin"))


def test_every_flag_combination_keeps_log_probs(tiny_dir):
    # Processing never changes the model's distribution: log-probs equal HF's for all 16 combinations.
    expected = load_hf(tiny_dir)(TOKENS).logits.log_softmax(-1)
    for flags in COMBOS:
        got = HookedTransformer.from_pretrained(tiny_dir, **flags)(TOKENS).log_softmax(-1)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-4, msg=lambda m: f"{flags}: {m}")


# -- refactor_factored_attn_matrices ----------------------------------------------------------------------------
def qk_eff(model):
    """[l, h, d+1, dh] query and key maps on the homogeneous input (x, 1): the bias is the last row."""
    q = torch.cat([model.W_Q, model.b_Q[:, :, None, :]], dim=2)
    k = torch.cat([model.W_K, model.b_K[:, :, None, :]], dim=2)
    return q, k


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_refactor_keeps_logits(hf_dirs, name):
    directory = hf_dirs[name]
    plain = HookedTransformer.from_pretrained(directory)
    refactored = HookedTransformer.from_pretrained(directory, refactor_factored_attn_matrices=True)
    assert not torch.allclose(refactored.W_Q, plain.W_Q, atol=1e-3), "refactor changed nothing"
    torch.testing.assert_close(refactored(TOKENS), plain(TOKENS), **tolerance("logits_cross_impl"))
    # The products (what the heads compute) are preserved; b_V is folded into b_O.
    (q1, k1), (q2, k2) = qk_eff(refactored), qk_eff(plain)
    torch.testing.assert_close(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2), **tolerance("reordered_sum"))
    torch.testing.assert_close(refactored.W_V @ refactored.W_O, plain.W_V @ plain.W_O,
                               **tolerance("reordered_short_sum"))
    assert torch.count_nonzero(refactored.b_V) == 0


def _component_signs(ours, theirs):
    """Per singular component (last dim) the sign that aligns our factor with TL's (SVD's only freedom here)."""
    return torch.sign((ours * theirs).sum(-2, keepdim=True))  # [..., 1, dh]


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_refactor_matches_transformerlens(hf_dirs, name):
    directory = hf_dirs[name]
    ours = HookedTransformer.from_pretrained(directory, refactor_factored_attn_matrices=True)
    theirs = tl_processed(directory, refactor_factored_attn_matrices=True)
    tol = tolerance("reordered_sum")
    # Products and biases: independent of how the SVD picks signs.
    (q, k), (tq, tk) = qk_eff(ours), qk_eff(theirs)
    torch.testing.assert_close(q @ k.transpose(-1, -2), tq @ tk.transpose(-1, -2), **tol)
    torch.testing.assert_close(ours.W_V @ ours.W_O, theirs.W_V @ theirs.W_O, **tol)
    for bias in ("b_O", "b_V", "b_in", "b_out", "b_U"):
        torch.testing.assert_close(getattr(ours, bias), getattr(theirs, bias), **tol, msg=lambda m: f"{bias}: {m}")
    # Individual factors: equal up to one sign per singular component (same sign on both factors).
    s = _component_signs(q, tq)
    torch.testing.assert_close(q * s, tq, **tol)
    torch.testing.assert_close(k * s, tk, **tol)
    s = _component_signs(ours.W_V, theirs.W_V)
    torch.testing.assert_close(ours.W_V * s, theirs.W_V, **tol, msg=lambda m: f"W_V: {m}")
    torch.testing.assert_close(ours.W_O * s.transpose(-1, -2), theirs.W_O, **tol, msg=lambda m: f"W_O: {m}")
    # The rest of the model is untouched by the refactor.
    a, b = params(ours), params(theirs)
    for key in a:
        if ".attn." not in key:
            torch.testing.assert_close(a[key], b[key], **tolerance(), msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(ours(TOKENS), theirs(TOKENS), **tolerance("logits_tl_twin"))


def test_refactor_factors_have_tl_structure(tiny_dir):
    """TL's refactor: W_O has orthonormal rows (W_V = U S, W_O = V^T); W_Q and W_K share singular values."""
    model = HookedTransformer.from_pretrained(tiny_dir, refactor_factored_attn_matrices=True)
    eye = torch.eye(model.cfg.d_head).expand_as(model.W_O @ model.W_O.transpose(-1, -2))
    torch.testing.assert_close(model.W_O @ model.W_O.transpose(-1, -2), eye, **tolerance("same_dtype_abs"))
    q, k = qk_eff(model)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, k.transpose(-1, -2) @ k, **tolerance("reordered_short_sum"))


def test_refactor_without_fold_ln_matches_transformerlens(tiny_dir):
    # TL allows the refactor on an unfolded model (LN's output is just the heads' input): so must hooklens.
    flags = dict(fold_ln=False, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    ours = HookedTransformer.from_pretrained(tiny_dir, refactor_factored_attn_matrices=True, **flags)
    theirs = tl_processed(tiny_dir, refactor_factored_attn_matrices=True, **flags)
    torch.testing.assert_close(ours(TOKENS), theirs(TOKENS), **tolerance("logits_tl_twin"))
    torch.testing.assert_close(ours(TOKENS), HookedTransformer.from_pretrained(tiny_dir, **flags)(TOKENS),
                               **tolerance("logits_cross_impl"))


# -- load_and_process_state_dict on a model built from a config -------------------------------------------------
def _cfg_for(hf_config, **overrides):
    fields = dict(
        n_layers=hf_config.n_layer, d_model=hf_config.n_embd, n_heads=hf_config.n_head,
        d_head=hf_config.n_embd // hf_config.n_head, d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
        d_vocab=hf_config.vocab_size, n_ctx=hf_config.n_positions, act_fn=hf_config.activation_function,
        normalization_type="LN", device="cpu", seed=0,
    )
    return HookedTransformerConfig(**{**fields, **overrides})


@pytest.mark.parametrize("source", ["convert_gpt2_weights", "tl_state_dict"])
def test_load_and_process_state_dict_on_config_built_model(hf_dirs, source):
    directory = hf_dirs["odd"]
    hf = load_hf(directory)
    tl_raw = tl_model_from_hf(directory, **NO_PROCESSING)
    if source == "convert_gpt2_weights":
        state = convert_gpt2_weights(hf, tl_raw.cfg)
    else:  # includes TL's attention buffers (mask, IGNORE)
        state = dict(tl_raw.state_dict())
    before = {k: v.clone() for k, v in state.items()}

    model = HookedTransformer(_cfg_for(hf.config))
    assert model.cfg.normalization_type == "LN"
    model.load_and_process_state_dict(state)
    assert sorted(state) == sorted(before) and all(torch.equal(state[k], before[k]) for k in state), \
        "the caller's state dict must not be modified"
    assert model.cfg.normalization_type == "LNPre"
    assert isinstance(model.ln_final, LayerNormPre) and all(isinstance(b.ln1, LayerNormPre) for b in model.blocks)
    reference = HookedTransformer.from_pretrained(directory)
    assert_same_parameters(model, reference, atol=1e-6, rtol=1e-6)
    assert_same_parameters(model, tl_model_from_hf(directory))
    torch.testing.assert_close(model(TOKENS), reference(TOKENS), **tolerance("same_dtype_abs"))

    unprocessed = HookedTransformer(_cfg_for(hf.config))
    unprocessed.load_and_process_state_dict(state, **NO_PROCESSING)
    assert unprocessed.cfg.normalization_type == "LN"
    torch.testing.assert_close(unprocessed(TOKENS), hf(TOKENS).logits, **tolerance("logits_cross_impl"))


def test_reloading_an_already_processed_state_dict(tiny_dir):
    # A processed (LNPre) hooklens state dict loads into an LNPre model; processing again is a no-op.
    processed = HookedTransformer.from_pretrained(tiny_dir)
    hf_config = load_hf(tiny_dir).config
    model = HookedTransformer(_cfg_for(hf_config, normalization_type="LNPre"))
    model.load_and_process_state_dict(processed.state_dict())
    assert_same_parameters(model, processed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(TOKENS), processed(TOKENS), **tolerance("same_dtype_abs"))


def test_process_weights_is_pure(tiny_dir):
    """loading.process_weights returns a new dict and leaves its input's tensors untouched."""
    hf = load_hf(tiny_dir)
    cfg = _cfg_for(hf.config)
    state = loading.convert_hf_gpt2_state_dict(dict(hf.state_dict()), cfg)
    before = {k: v.clone() for k, v in state.items()}
    out = loading.process_weights(state, cfg, refactor_factored_attn_matrices_=True)
    assert out is not state and "blocks.0.ln1.w" not in out
    assert sorted(state) == sorted(before) and all(torch.equal(state[k], before[k]) for k in state)


# -- load_checkpoint -> (cfg, state_dict): the model is built once, from the processed config, and loaded strictly --
@pytest.mark.parametrize("flags", [{}, NO_PROCESSING], ids=["processed", "raw"])
def test_load_checkpoint_gives_the_config_the_weights_need(tiny_dir, flags):
    cfg, state = loading.load_checkpoint(tiny_dir, device="cpu", **flags)
    folded = flags.get("fold_ln", True)
    assert cfg.normalization_type == ("LNPre" if folded else "LN")
    has_ln_weights = any(k.endswith(("ln_final.w", ".ln1.w", ".ln2.w")) for k in state)
    assert has_ln_weights is not folded
    model = HookedTransformer(cfg)
    assert (type(model.ln_final) is LayerNormPre) is folded  # built with the right norms: no swap afterwards
    own = params(model)
    assert sorted(state) == sorted(own) and all(state[k].shape == own[k].shape for k in state)
    loading.load_weights(model, state)
    reference = HookedTransformer.from_pretrained(tiny_dir, device="cpu", **flags)
    assert_same_parameters(model, reference, atol=0, rtol=0)
    assert reference.cfg.normalization_type == cfg.normalization_type


def test_load_weights_is_strict(tiny_dir):
    cfg, state = loading.load_checkpoint(tiny_dir, device="cpu")
    model = HookedTransformer(cfg)
    with pytest.raises(loading.CheckpointError, match=r"missing \['blocks.0.attn.W_Q'\]"):
        loading.load_weights(model, {k: v for k, v in state.items() if k != "blocks.0.attn.W_Q"})
    with pytest.raises(loading.CheckpointError, match=r"unexpected \['blocks.0.ln1.w'\]"):
        loading.load_weights(model, {**state, "blocks.0.ln1.w": torch.ones(cfg.d_model)})
    with pytest.raises(loading.CheckpointError, match="unembed.b_U has shape"):
        loading.load_weights(model, {**state, "unembed.b_U": state["unembed.b_U"][:-1]})
