"""TransformerLens configuration compatibility: the same config and state dict in both libraries give the same
activations, logits, loss, processed weights and n_params, for every GPT-2-family variant."""
from __future__ import annotations

import warnings

import pytest
import torch
from tolerances import tolerance

import hooklens
from hooklens import HookedTransformer, HookedTransformerConfig, attention_backend

pytestmark = pytest.mark.usefixtures("no_grad")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens as tl_lib

BASE = dict(n_layers=2, d_model=32, d_head=8, n_ctx=24, d_vocab=97, act_fn="gelu_new", seed=3)
VARIANTS = {
    "gelu_new": {},
    "gelu": dict(act_fn="gelu"),
    "gelu_fast": dict(act_fn="gelu_fast"),
    "relu": dict(act_fn="relu"),
    "silu": dict(act_fn="silu"),
    "solu_ln": dict(act_fn="solu_ln"),
    "solu_ln_lnpre": dict(act_fn="solu_ln", normalization_type="LNPre"),
    "lnpre": dict(normalization_type="LNPre"),
    "no_norm": dict(normalization_type=None),
    "attn_only": dict(attn_only=True),
    "attn_only_lnpre": dict(attn_only=True, normalization_type="LNPre"),
    "vocab_out": dict(d_vocab_out=41),
    "wide_heads": dict(n_layers=3, d_model=48, d_head=16, n_heads=5, d_mlp=72),
}


def build_pair(variant: str, **extra):
    kwargs = {**BASE, **VARIANTS[variant], **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = tl_lib.HookedTransformer(tl_lib.HookedTransformerConfig(**kwargs, device="cpu")).eval()
    ours = HookedTransformer(HookedTransformerConfig(**kwargs, device="cpu")).eval()
    return tl, ours


def randomize(state_dict):
    """TL's init leaves biases 0 and LN weights 1; perturb everything so each term is tested."""
    g = torch.Generator().manual_seed(0)
    return {k: (v + 0.2 * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.dim() > 0 else v.clone())
            for k, v in state_dict.items()}


def tokens_for(cfg, batch=3, length=13):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, min(cfg.d_vocab, cfg.d_vocab_out), (batch, length), generator=generator)


SAME_DTYPE = tolerance()  # the default bounds: float32 against a same-dtype reference


def assert_close(actual, expected, what="", rtol=SAME_DTYPE["rtol"], atol=SAME_DTYPE["atol"]):
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_seeded_init_and_n_params_match(variant):
    tl, ours = build_pair(variant)
    assert ours.cfg.n_params == tl.cfg.n_params
    assert ours.cfg.d_mlp == tl.cfg.d_mlp and ours.cfg.n_heads == tl.cfg.n_heads
    assert ours.cfg.d_vocab_out == tl.cfg.d_vocab_out
    tl_state = tl.state_dict()
    our_state = ours.state_dict()
    assert list(our_state) == list(tl_state), "same names and order as TL's state dict"
    for key in tl_state:
        assert_close(our_state[key], tl_state[key], what=key, rtol=0, atol=0)
    assert sorted(ours.hook_dict) == sorted(tl.hook_dict)


PROCESSING = {
    "none": dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
    "all": dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    "fold_ln_only": dict(fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
}


@pytest.mark.parametrize("processing", list(PROCESSING))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_activations_logits_loss_and_weights_match(variant, processing):
    tl, ours = build_pair(variant)
    state = randomize(tl.state_dict())
    flags = PROCESSING[processing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.load_and_process_state_dict({k: v.clone() for k, v in state.items()}, **flags)
    ours.load_and_process_state_dict({k: v.clone() for k, v in state.items()}, **flags)
    assert ours.cfg.normalization_type == tl.cfg.normalization_type
    tl_params, our_params = dict(tl.named_parameters()), dict(ours.named_parameters())
    assert sorted(our_params) == sorted(tl_params)
    for key in tl_params:
        assert_close(our_params[key], tl_params[key], what=f"processed {key}")
    tokens = tokens_for(ours.cfg)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    with attention_backend("eager"):  # TL's op sequence: every activation as TL computes it
        logits, cache = ours.run_with_cache(tokens)
    assert sorted(cache.keys()) == sorted(tl_cache.keys())
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)
    assert_close(logits, tl_logits, what="logits")
    # The default backend takes z from one fused op whether or not hooks read the pattern: caching changes nothing.
    fused_logits, fused_cache = ours.run_with_cache(tokens)
    assert torch.equal(fused_logits, ours(tokens))
    assert sorted(fused_cache.keys()) == sorted(tl_cache.keys())
    assert_close(ours(tokens), tl_logits, what="logits (fused attention path)", **tolerance("logits_tl_twin"))
    assert_close(ours(tokens, return_type="loss"), tl(tokens, return_type="loss"), what="loss")


@pytest.mark.parametrize("variant", ["gelu_new", "solu_ln", "attn_only", "no_norm"])
def test_processing_preserves_function(variant):
    """Folding and centering are exact rewrites: log-probs are unchanged (logits up to a per-row constant)."""
    _, raw = build_pair(variant)
    _, processed = build_pair(variant)
    state = randomize(raw.state_dict())
    raw.load_and_process_state_dict(dict(state), **PROCESSING["none"])
    processed.load_and_process_state_dict(dict(state), **PROCESSING["all"])
    tokens = tokens_for(raw.cfg)
    assert_close(processed(tokens).log_softmax(-1), raw(tokens).log_softmax(-1), **tolerance("logits_tl_twin"),
                 what=variant)


@pytest.mark.parametrize("variant", ["gelu_new", "solu_ln", "attn_only"])
def test_state_dict_round_trips_with_transformerlens(variant):
    tl, ours = build_pair(variant)
    tl.load_state_dict(randomize(tl.state_dict()))
    ours.load_state_dict(tl.state_dict())  # strict: same keys, shapes and buffers
    tokens = tokens_for(ours.cfg)
    assert_close(ours(tokens), tl(tokens), what="TL -> hooklens")
    tl2, _ = build_pair(variant)
    tl2.load_state_dict(ours.state_dict())
    assert_close(tl2(tokens), tl(tokens), what="hooklens -> TL", rtol=0, atol=0)


def test_process_weights_in_place_matches_transformerlens():
    tl, ours = build_pair("gelu_new")
    state = randomize(tl.state_dict())
    tl.load_state_dict(state)
    ours.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.process_weights_()
    ours.process_weights_()
    tokens = tokens_for(ours.cfg)
    assert ours.cfg.normalization_type == "LNPre"
    assert_close(ours(tokens), tl(tokens))
    for key, value in dict(tl.named_parameters()).items():
        assert_close(dict(ours.named_parameters())[key], value, what=key)


def test_individual_processing_functions_match_transformerlens():
    tl, ours = build_pair("gelu_new")
    state = randomize(tl.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = {
            "fold_layer_norm": (tl.fold_layer_norm({k: v.clone() for k, v in state.items()}),
                                ours.fold_layer_norm({k: v.clone() for k, v in state.items()})),
            "center_writing_weights": (tl.center_writing_weights({k: v.clone() for k, v in state.items()}),
                                       ours.center_writing_weights({k: v.clone() for k, v in state.items()})),
            "center_unembed": (tl.center_unembed({k: v.clone() for k, v in state.items()}),
                               ours.center_unembed({k: v.clone() for k, v in state.items()})),
            "fold_value_biases": (tl.fold_value_biases({k: v.clone() for k, v in state.items()}),
                                  ours.fold_value_biases({k: v.clone() for k, v in state.items()})),
        }
    for step, (expected, actual) in steps.items():
        for key, value in actual.items():
            if key in expected:
                assert_close(value, expected[key], what=f"{step}: {key}")
        # TL zeroes folded LN weights in place of deleting them; hooklens drops them.
        dropped = set(expected) - set(actual)
        assert all(k.endswith((".w", ".b")) for k in dropped), (step, dropped)


def test_unsupported_fields_raise_clearly():
    with pytest.raises(NotImplementedError, match="rotary"):
        HookedTransformerConfig(**{**BASE, "positional_embedding_type": "rotary"})
    with pytest.raises(NotImplementedError, match="n_key_value_heads"):
        HookedTransformerConfig.from_dict({**BASE, "n_key_value_heads": 2})
    with pytest.raises(NotImplementedError, match="gated_mlp"):
        HookedTransformerConfig.from_dict({**BASE, "gated_mlp": True})
    with pytest.raises(ValueError, match="act_fn"):
        HookedTransformerConfig(**{**BASE, "act_fn": "swiglu"})
    with pytest.raises(ValueError, match="normalization_type"):
        HookedTransformerConfig(**{**BASE, "normalization_type": "RMS"})
    # Fields that are at their "unused" value are accepted, as TL configs always carry them.
    cfg = HookedTransformerConfig.from_dict({**BASE, "n_key_value_heads": None, "gated_mlp": False})
    assert cfg.n_heads == 4


def test_checkpoint_mismatch_is_reported():
    tl, ours = build_pair("gelu_new")
    state = tl.state_dict()
    state["blocks.0.mlp.W_in"] = state["blocks.0.mlp.W_in"][:, :-1]
    with pytest.raises(hooklens.loading.CheckpointError, match="blocks.0.mlp.W_in"):
        ours.load_and_process_state_dict(dict(state), **PROCESSING["none"])
    del state["blocks.1.attn.W_Q"]
    with pytest.raises(hooklens.loading.CheckpointError, match="blocks.1.attn.W_Q"):
        ours.load_and_process_state_dict(dict(state), **PROCESSING["none"])


def test_model_without_tokenizer_and_cfg_dict():
    model = HookedTransformer({**BASE, "device": "cpu"})
    assert model.tokenizer is None and isinstance(model.cfg, HookedTransformerConfig)
    with pytest.raises(ValueError, match="tokenizer"):
        model.to_tokens("hi")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)


@pytest.mark.parametrize("weights_file", ["model_final.pth", "model.safetensors"])
def test_transformerlens_format_directory_loads(tmp_path, weights_file):
    """A TL-format checkpoint (config.json of TL fields + a TL state dict) loads with TL's processing."""
    import json

    from safetensors.torch import save_file

    tl, _ = build_pair("solu_ln")
    tl.load_state_dict(randomize(tl.state_dict()))
    config = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in tl.cfg.to_dict().items()}
    config.update(lr=1e-3, batch_size_per_device=32)  # training fields, as published toy configs carry
    (tmp_path / "config.json").write_text(json.dumps(config, default=str))
    state = {k: v.contiguous() for k, v in tl.state_dict().items()}
    if weights_file.endswith(".pth"):
        torch.save(state, tmp_path / weights_file)
    else:
        save_file(state, str(tmp_path / weights_file))
    ours = HookedTransformer.from_pretrained(tmp_path, device="cpu")
    assert ours.tokenizer is None and ours.cfg.act_fn == "solu_ln" and ours.cfg.normalization_type == "LNPre"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.process_weights_()
    tokens = tokens_for(ours.cfg)
    _, tl_cache = tl.run_with_cache(tokens)
    _, cache = ours.run_with_cache(tokens)
    for key in tl_cache.keys():
        assert_close(cache[key], tl_cache[key], what=key)
    raw = HookedTransformer.from_pretrained_no_processing(tmp_path, device="cpu")
    assert raw.cfg.normalization_type == "LN"
    assert_close(raw(tokens).log_softmax(-1), ours(tokens).log_softmax(-1), **tolerance("logits_tl_twin"))


def test_transformer_lens_fields_of_other_architectures_read_as_unused():
    """Code written for TL reads e.g. `cfg.gated_mlp` or `cfg.n_key_value_heads`: every TL 3.9 config field exists."""
    import dataclasses

    tl_config = pytest.importorskip("transformer_lens").HookedTransformerConfig
    cfg = HookedTransformerConfig(**BASE)
    tl_fields = [f for f in dataclasses.fields(tl_config)]
    for tl_field in tl_fields:
        getattr(cfg, tl_field.name)  # AttributeError fails the test
        if not any(tl_field.name == f.name for f in dataclasses.fields(HookedTransformerConfig)):
            assert getattr(cfg, tl_field.name) == tl_field.default, tl_field.name
    cfg.gated_mlp = False  # the unused value is accepted ...
    with pytest.raises(NotImplementedError, match="final_rms=True"):
        cfg.final_rms = True  # ... any other is refused, not silently ignored
    with pytest.raises(AttributeError, match="no attribute 'n_layer'"):
        cfg.n_layer
