"""Hook semantics (TL's HookPoint / HookedRootModule) and the errors users get for bad input."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hooklens import HookedRootModule, HookedTransformer, HookPoint
from hooklens.loading import CheckpointError


class SquareThenAdd(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))
        self.hook_square = HookPoint()

    def forward(self, x):
        return self.hook_square(x**2) + self.offset


class TwoLayerModel(HookedRootModule):
    """TL's toy example: any model becomes hookable by using HookPoints and calling setup()."""

    def __init__(self):
        super().__init__()
        self.layer1 = SquareThenAdd(3.0)
        self.layer2 = SquareThenAdd(-4.0)
        self.hook_in = HookPoint()
        self.hook_mid = HookPoint()
        self.hook_out = HookPoint()
        self.setup()

    def forward(self, x):
        x_in = self.hook_in(x)
        x_mid = self.hook_mid(self.layer1(x_in))
        return self.hook_out(self.layer2(x_mid))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return HookedTransformer.from_pretrained(tiny_dir)


@pytest.fixture
def tokens():
    return torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))


def no_hooks_attached(model) -> bool:
    return not any(hp.has_hooks(including_permanent=True) for hp in model.hook_dict.values())


# -- toy model: TL's tutorial semantics -------------------------------------------------------------------------
def test_toy_model_cache_and_hooks():
    toy = TwoLayerModel()
    x = torch.arange(1.0, 4.0)
    out, cache = toy.run_with_cache(x)
    assert sorted(cache) == sorted(["hook_in", "hook_mid", "hook_out", "layer1.hook_square", "layer2.hook_square"])
    assert torch.equal(cache["hook_mid"], x**2 + 3)
    assert torch.equal(out, (x**2 + 3) ** 2 - 4)
    assert toy.hook_dict["layer1.hook_square"].name == "layer1.hook_square"
    out2 = toy.run_with_hooks(x, fwd_hooks=[("hook_mid", lambda t, hook: torch.zeros_like(t))])
    assert torch.equal(out2, torch.full_like(x, -4.0))
    assert no_hooks_attached(toy)


def test_hooks_context_manager_permanent_and_prepend():
    toy = TwoLayerModel()
    x = torch.tensor([2.0])
    calls = []
    toy.add_perma_hook("hook_in", lambda t, hook: calls.append("perma"))
    with toy.hooks(fwd_hooks=[("hook_in", lambda t, hook: calls.append("temp"))]):
        toy(x)
    toy.add_hook("hook_in", lambda t, hook: calls.append("first"), prepend=True)
    toy(x)
    assert calls == ["perma", "temp", "first", "perma"]
    toy.reset_hooks()
    calls.clear()
    toy(x)
    assert calls == ["perma"], "reset_hooks keeps permanent hooks"
    toy.reset_hooks(including_permanent=True)
    assert no_hooks_attached(toy)


def test_hook_name_layer_and_ctx(model, tokens):
    seen = {}

    def record(act, hook):
        seen[hook.name] = hook.layer()
        hook.ctx["shape"] = act.shape

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", record)], clear_contexts=False)
    assert seen == {"blocks.1.attn.hook_z": 1}
    with pytest.raises(ValueError, match="not inside a block"):
        model.hook_dict["hook_embed"].layer()


def test_backward_hooks_edit_gradients(model, tokens):
    with torch.enable_grad():
        grads = {}
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: grads.setdefault("g", g))]):
            model(tokens, return_type="loss").backward()
        assert grads["g"].shape == (2, 9, model.cfg.d_model)
        model.zero_grad()
        with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: torch.zeros_like(g))]):
            model(tokens, return_type="loss").backward()
        assert model.embed.W_E.grad.abs().max() == 0, "zeroing the gradient at layer 1 cuts it off from the embeddings"
        model.zero_grad()
    assert no_hooks_attached(model)


# -- cleanup after exceptions -----------------------------------------------------------------------------------
def test_hook_that_raises_leaves_no_hooks(model, tokens):
    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: None),
                                                ("blocks.1.attn.hook_pattern", boom)])
    assert no_hooks_attached(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", boom)]):
            model(tokens)
    assert no_hooks_attached(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("hook_embed", boom)]):
            model.run_with_cache(tokens)
    assert no_hooks_attached(model)
    assert not model.is_caching


def test_forward_that_raises_leaves_no_hooks(model):
    bad = torch.full((1, 4), 10**6)
    with pytest.raises(ValueError, match="Token ids"):
        model.run_with_hooks(bad, fwd_hooks=[("hook_embed", lambda a, hook: None)])
    with pytest.raises(ValueError):
        model.run_with_cache(bad)
    assert no_hooks_attached(model)


def test_hook_registration_failure_leaves_no_hooks(model, tokens):
    with pytest.raises(KeyError):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda a, hook: None),
                                                ("blocks.0.hook_rsid_pre", lambda a, hook: None)])
    assert no_hooks_attached(model)


# -- clear errors -----------------------------------------------------------------------------------------------
def test_unknown_hook_name_suggests_closest(model, tokens):
    with pytest.raises(KeyError) as err:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_patern", lambda a, hook: None)])
    assert "blocks.0.attn.hook_pattern" in str(err.value)
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_posts"])
    with pytest.raises(KeyError, match="Unknown hook name"):
        model.add_hook("nonsense", lambda a, hook: None)


def test_wrong_hook_return_shape_names_hook_and_shape(model, tokens):
    with pytest.raises(ValueError) as err:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z[:, :, 0])])
    message = str(err.value)
    assert "blocks.0.attn.hook_z" in message and "(2, 9, 4, 16)" in message and "(2, 9, 16)" in message
    with pytest.raises(TypeError, match="hook_embed"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda a, hook: a.tolist())])
    assert no_hooks_attached(model)


def test_disabled_hook_points_explain_the_switch(model, tokens):
    with pytest.raises(ValueError, match="set_use_attn_result"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", lambda a, hook: None)])
    with pytest.raises(ValueError, match="set_use_split_qkv_input"):
        model.add_hook("blocks.0.hook_q_input", lambda a, hook: None)
    assert no_hooks_attached(model)


def test_token_errors(model):
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        model(torch.tensor([[1, 2, 50257]]))
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="n_ctx=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, pos\].*shape \(2, 3, 4\)"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"at least one position.*shape \(1, 0\).*prepend_bos=True"):
        model("", prepend_bos=False)
    with pytest.raises(ValueError, match="return_type"):
        model(torch.zeros(1, 4, dtype=torch.long), return_type="logprobs")
    # Strings are truncated to n_ctx by to_tokens, as in TL, but not silently unless truncate=True is asked for.
    with pytest.warns(UserWarning, match="n_ctx"):
        assert model.to_tokens("hello " * 500).shape[1] == 128
    assert model.to_tokens("hello " * 500, truncate=True).shape[1] == 128


def test_model_without_tokenizer_needs_tokens():
    from hooklens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_ctx=8, d_vocab=11, act_fn="relu", seed=0)
    model = HookedTransformer(cfg)
    assert model.tokenizer is None
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 11)
    with pytest.raises(ValueError, match="tokenizer"):
        model("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        model.to_str_tokens(torch.tensor([1, 2]))


# -- bad checkpoints --------------------------------------------------------------------------------------------
def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors_is_reported(tiny_dir, tmp_path):
    d = _copy_checkpoint(tiny_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HookedTransformer.from_pretrained(d)


def test_wrong_shapes_are_reported(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_checkpoint(tiny_dir, tmp_path / "shapes")
    state = load_file(str(d / "model.safetensors"))
    key = next(k for k in state if k.endswith("h.1.mlp.c_fc.weight"))
    state[key] = state[key][:, :-1].contiguous()
    del state[next(k for k in state if k.endswith("h.0.ln_2.bias"))]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        HookedTransformer.from_pretrained(d)
    assert "h.1.mlp.c_fc.weight" in str(err.value) and "h.0.ln_2.bias" in str(err.value)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCode.marker),))


def test_pickle_that_would_run_code_is_refused(tiny_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    marker = tmp_path / "pwned"
    _RunsCode.marker = str(marker)
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        HookedTransformer.from_pretrained(d)
    assert not marker.exists(), "the pickled payload must not have run"


def test_directory_without_config_and_missing_model(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        HookedTransformer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        HookedTransformer.from_pretrained("gpt2-xl")


def test_import_has_no_heavy_side_effects():
    """`import hooklens` loads neither Triton nor torch._dynamo nor the C++ extension (kernels are opt-in, and
    Triton's interpreter switch must be settable after importing hooklens)."""
    import subprocess
    import sys

    code = ("import sys, hooklens; bad = [m for m in ('triton', 'torch._dynamo', 'hooklens._C', 'transformers', "
            "'matplotlib') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_add_caching_hooks_and_pytorch_module_hooks(model, tokens):
    """TL's add_caching_hooks; PyTorch's own module hooks on a HookPoint fire as they do on TL's."""
    cache = model.add_caching_hooks(names_filter=["blocks.0.hook_resid_post", "ln_final.hook_scale"])
    try:
        assert model.is_caching
        logits = model(tokens)
        _, reference = model.run_with_cache(tokens, names_filter=list(cache))
    finally:
        model.reset_hooks()
    assert sorted(cache) == ["blocks.0.hook_resid_post", "ln_final.hook_scale"] and not model.is_caching
    for name in cache:
        torch.testing.assert_close(cache[name], reference[name])
    assert no_hooks_attached(model)

    seen = []
    hook_point = model.hook_dict["blocks.1.hook_resid_mid"]
    handle = hook_point.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        torch.testing.assert_close(model(tokens), logits)
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_mid", lambda t, hook: t * 2)])
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 9, 64])] * 2
