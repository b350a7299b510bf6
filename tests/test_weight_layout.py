"""W_Q / W_K / W_V are stored head-major ([h, dh, d] memory, [h, d, dh] shape) so the attention projections use
them without a per-forward copy; everything users see (shapes, values, state dicts, seeded inits) is unchanged."""
from __future__ import annotations

import torch

from hooklens import HookedTransformer, HookedTransformerConfig


def _flat_is_a_view(W: torch.Tensor) -> bool:
    h, d, dh = W.shape
    flat = W.permute(0, 2, 1).reshape(h * dh, d)
    return flat.data_ptr() == W.data_ptr() and flat.is_contiguous()


def _attention_weights(model):
    for block in model.blocks:
        yield from (block.attn.W_Q, block.attn.W_K, block.attn.W_V)


def test_loaded_processed_and_cast_models_keep_the_head_major_layout(tiny_dir):
    model = HookedTransformer.from_pretrained(tiny_dir)
    assert all(_flat_is_a_view(W) for W in _attention_weights(model))
    model.process_weights_(fold_ln=True)
    model = model.to(torch.float64)
    assert all(_flat_is_a_view(W) for W in _attention_weights(model))
    # The state dict has TL's shapes; .contiguous() gives a plain copy (e.g. for safetensors).
    state = model.state_dict()
    assert state["blocks.0.attn.W_Q"].shape == model.blocks[0].attn.W_Q.shape
    assert torch.equal(state["blocks.0.attn.W_Q"].contiguous(), model.blocks[0].attn.W_Q)


def test_seeded_init_does_not_depend_on_the_storage_layout():
    cfg = dict(n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=20, act_fn="gelu", seed=3)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    # The same draws into plain contiguous tensors, in registration order (what TL does).
    torch.manual_seed(3)
    expected = {}
    for name, param in model.named_parameters():
        if "W_" in name:
            expected[name] = torch.empty(param.shape).normal_(std=model.cfg.initializer_range)
    for name, value in expected.items():
        assert torch.equal(model.get_parameter(name), value), name
    assert all(_flat_is_a_view(W) for W in _attention_weights(model))
