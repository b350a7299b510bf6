"""hooklens.activation_layout: every hook point of a real model has a layout, and it matches the cached shapes
(hooklens's and TransformerLens 3.9's), with and without the batch dim; caching `pos_slice` cuts that axis."""
from __future__ import annotations

import pytest
import torch

from hooklens import HookedTransformer
from hooklens.activation_layout import LAYOUTS, ActivationLayout, find_layout, layout_of
from hooklens.utils import Slice

pytestmark = pytest.mark.usefixtures("no_grad")

SWITCHES = {
    "default": (),
    "split_qkv": ("set_use_split_qkv_input",),
    "attn_in": ("set_use_attn_in",),
    "all": ("set_use_attn_result", "set_use_split_qkv_input", "set_use_attn_in", "set_use_hook_mlp_in",
            "set_use_hook_tokens"),
}
BATCH, SEQ = 2, 7


def _switched_on(model, switches):
    for switch in switches:
        getattr(model, switch)(True)
    if hasattr(model, "setup"):
        model.setup()  # TL registers a newly added hook point (hook_tokens) in setup()
    return model


@pytest.fixture(scope="module", params=list(SWITCHES))
def switched(request, tiny_dir):
    return request.param, _switched_on(HookedTransformer.from_pretrained(tiny_dir, device="cpu"),
                                       SWITCHES[request.param])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(100, 20000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _expected_sizes(cfg, batch):
    return {"batch": batch, "pos": SEQ, "key_pos": SEQ, "head": cfg.n_heads, "d_model": cfg.d_model,
            "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab_out, "1": 1}


def _assert_layout_fits(name, tensor, cfg, batch_dim=True):
    layout = layout_of(name, cfg)
    dims = layout.dims if batch_dim else layout.dims[1:]
    sizes = _expected_sizes(cfg, BATCH)
    assert tensor.shape == tuple(sizes[d] for d in dims), (name, layout, tuple(tensor.shape))


def test_every_hook_point_has_a_layout_matching_its_activation(switched, tokens):
    which, model = switched
    _, cache = model.run_with_cache(tokens, return_cache_object=False)
    assert all(find_layout(name, model.cfg) is not None for name in model.hook_dict)
    if which == "all":  # every hook point fires: the layouts below cover them all
        assert set(cache) == set(model.hook_dict)
        assert {"hook_tokens", "blocks.0.hook_q_input", "blocks.0.hook_attn_in", "blocks.0.attn.hook_result",
                "blocks.0.hook_mlp_in"} <= set(cache)
    for name, activation in cache.items():
        _assert_layout_fits(name, activation, model.cfg)


def test_layout_without_the_batch_dim(switched, tokens):
    _, model = switched
    _, cache = model.run_with_cache(tokens[:1], remove_batch_dim=True, return_cache_object=False)
    for name, activation in cache.items():
        layout = layout_of(name, model.cfg)
        assert activation.dim() == layout.ndim - 1, name
        assert activation.shape[layout.axis("pos", batch_dim=False)] == SEQ, name
        if layout.head is not None:
            assert activation.shape[layout.axis("head", batch_dim=False)] == model.cfg.n_heads, name
        assert layout.axis("batch", batch_dim=False) is None


@pytest.mark.parametrize("which", list(SWITCHES))
def test_layouts_match_transformer_lens_cached_shapes(tiny_dir, tokens, which):
    from conftest import tl_model_from_hf

    switches = [s for s in SWITCHES[which] if s != "set_use_hook_tokens"]  # TL: a config flag, no switch
    tl = _switched_on(tl_model_from_hf(tiny_dir, use_hook_tokens=len(switches) < len(SWITCHES[which])), switches)
    _, cache = tl.run_with_cache(tokens)
    assert len(cache.cache_dict) >= 20 * tl.cfg.n_layers
    for name, activation in cache.cache_dict.items():
        _assert_layout_fits(name, activation, tl.cfg)


@pytest.mark.parametrize("pos_slice", [-1, (1, 4), [0, 5]])
def test_caching_pos_slice_cuts_each_layout_position_axis(switched, tokens, pos_slice):
    _, model = switched
    _, full = model.run_with_cache(tokens, return_cache_object=False)
    _, sliced = model.run_with_cache(tokens, pos_slice=pos_slice, return_cache_object=False)
    for name, activation in full.items():
        expected = Slice.unwrap(pos_slice).apply(activation, dim=layout_of(name, model.cfg).pos)
        torch.testing.assert_close(sliced[name], expected, rtol=0, atol=0, msg=name)


def test_names_shorthands_and_grad_keys():
    pattern = layout_of("blocks.3.attn.hook_pattern")
    assert pattern.dims == ("batch", "head", "pos", "key_pos")
    assert (pattern.pos, pattern.head, pattern.key_pos) == (2, 1, 3)
    assert pattern.axis("pos", batch_dim=False) == 1 and pattern.axis("head", batch_dim=False) == 0
    assert pattern.site_axes() == (1, 2, 3) and pattern.feature_axes() == ()
    assert pattern.from_end("pos") == -2 and layout_of("result").from_end("pos") == -3
    assert layout_of("resid_post").from_end("head") is None
    z = layout_of("z")
    assert z == layout_of("blocks.0.attn.hook_z") == layout_of("blocks.0.attn.hook_z_grad")
    assert (z.pos, z.head, z.site_axes(batch_dim=False), z.feature_axes()) == (1, 2, (0, 1), (3,))
    resid = layout_of("resid_pre")
    assert (resid.pos, resid.head, resid.key_pos, resid.feature_axes(batch_dim=False)) == (1, None, None, (1,))
    assert layout_of("scale").dims == ("batch", "pos", "1")
    assert layout_of("blocks.0.ln2.hook_scale") == layout_of("ln_final.hook_scale") == layout_of("scale")


def test_ln1_gains_a_head_axis_only_when_inputs_are_split(tiny_dir):
    cfg = HookedTransformer.from_pretrained(tiny_dir, device="cpu").cfg
    assert layout_of("blocks.1.ln1.hook_scale", cfg).head is None
    cfg.use_split_qkv_input = True
    assert layout_of("blocks.1.ln1.hook_scale", cfg).dims == ("batch", "pos", "head", "1")
    assert layout_of("blocks.1.ln1.hook_normalized", cfg).head == 2
    assert layout_of("blocks.1.ln2.hook_scale", cfg).head is None  # ln2 normalizes the unsplit residual stream


def test_unknown_names():
    assert find_layout("blocks.0.attn.not_a_hook") is None and find_layout("hook_nothing") is None
    with pytest.raises(KeyError, match="No activation layout for 'blocks.0.hook_nothing'"):
        layout_of("blocks.0.hook_nothing")
    assert all(isinstance(layout, ActivationLayout) and layout.dims[:1] == ("batch",) for layout in LAYOUTS.values())
