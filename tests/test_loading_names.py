"""Resolving model names through a (fake) local Hugging Face cache, and the checkpoint layouts hooklens accepts.

Nothing is downloaded: a random GPT-2 is saved where the HF cache would keep `openai-community/gpt2`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import HF_CONFIGS, load_hf, save_hf_gpt2
from tolerances import tolerance

from hooklens import HookedTransformer, loading
from hooklens.loading import CheckpointError

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

TOKENS = torch.randint(0, 50000, (2, 12), generator=torch.Generator().manual_seed(0))
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A fake HF hub cache holding models--openai-community--gpt2 (a random tiny GPT-2) and nothing else."""
    root = tmp_path_factory.mktemp("hf_home") / "hub"
    repo = root / "models--openai-community--gpt2"
    save_hf_gpt2(repo / "snapshots" / SNAPSHOT, seed=21, **HF_CONFIGS["tiny"])
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return root


@pytest.fixture
def use_hub(hub, monkeypatch, tmp_path):
    """Point hooklens at the fake cache the way a user would (HF_HUB_CACHE), and run from an empty directory so a
    local folder named like the model cannot shadow the cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    # huggingface_hub reads HF_HUB_CACHE once, at import; mirror what a fresh process would see.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    assert loading._hf_cache_dir() == hub
    return hub


@pytest.fixture(scope="module")
def reference(hub):
    snapshot = hub / "models--openai-community--gpt2" / "snapshots" / SNAPSHOT
    return HookedTransformer.from_pretrained(snapshot)(TOKENS), load_hf(snapshot)(TOKENS).logits


@pytest.mark.parametrize("name", ["gpt2", "gpt2-small", "openai-community/gpt2", "GPT2"])
def test_names_resolve_to_the_cached_snapshot(use_hub, reference, name):
    expected, hf_logits = reference
    snapshot = use_hub / "models--openai-community--gpt2" / "snapshots" / SNAPSHOT
    assert loading.resolve_model_dir(name) == snapshot
    model = HookedTransformer.from_pretrained(name)
    torch.testing.assert_close(model(TOKENS), expected, **tolerance("same_dtype_abs"))
    raw = HookedTransformer.from_pretrained_no_processing(name)
    torch.testing.assert_close(raw(TOKENS), hf_logits, **tolerance("logits_cross_impl"))
    assert model.cfg.model_name == name


def test_legacy_repo_spelling_and_monkeypatched_cache_dir(hub, reference, tmp_path, monkeypatch):
    # Older caches use models--gpt2; hooklens tries both spellings. Also: _hf_cache_dir is the one seam to patch.
    legacy = tmp_path / "hub"
    shutil.copytree(hub / "models--openai-community--gpt2", legacy / "models--gpt2")
    monkeypatch.setattr(loading, "_hf_cache_dir", lambda: legacy)
    monkeypatch.chdir(tmp_path)
    assert loading.resolve_model_dir("gpt2") == legacy / "models--gpt2" / "snapshots" / SNAPSHOT
    torch.testing.assert_close(HookedTransformer.from_pretrained("gpt2-small")(TOKENS), reference[0],
                               **tolerance("same_dtype_abs"))


def test_newest_complete_snapshot_wins(hub, tmp_path, monkeypatch):
    root = tmp_path / "hub"
    snapshots = root / "models--openai-community--gpt2" / "snapshots"
    old = save_hf_gpt2(snapshots / "old", seed=1, **HF_CONFIGS["tiny"])
    new = save_hf_gpt2(snapshots / "new", seed=2, **HF_CONFIGS["tiny"])
    incomplete = snapshots / "newest-but-incomplete"
    incomplete.mkdir()
    shutil.copy(new / "config.json", incomplete / "config.json")  # no weights: must be skipped
    now = time.time()
    for i, path in enumerate([new, old, incomplete]):
        os.utime(path, (now - 100 + 50 * i, now - 100 + 50 * i))
    monkeypatch.setattr(loading, "_hf_cache_dir", lambda: root)
    monkeypatch.chdir(tmp_path)
    assert loading.resolve_model_dir("gpt2") == old


def test_missing_model_names_the_directory_and_how_to_get_weights(use_hub):
    with pytest.raises(CheckpointError) as info:
        HookedTransformer.from_pretrained("gpt2-medium")
    message = str(info.value)
    assert str(use_hub / "models--openai-community--gpt2-medium") in message
    assert "huggingface-cli download" in message and "openai-community/gpt2-medium" in message
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        HookedTransformer.from_pretrained("someone/not-cached")
    with pytest.raises(CheckpointError):
        HookedTransformer.from_pretrained("no-such-model-name")


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        HookedTransformer.from_pretrained(tmp_path / "empty")


# -- checkpoint layouts -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return save_hf_gpt2(tmp_path_factory.mktemp("layouts") / "safetensors", seed=4, **HF_CONFIGS["tiny"])


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _assert_same_model(a: HookedTransformer, b: HookedTransformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    torch.testing.assert_close(a(TOKENS), b(TOKENS), rtol=0, atol=0)


def test_pytorch_model_bin_matches_safetensors(st_dir, tmp_path):
    hf = load_hf(st_dir)
    bin_dir = _copy_config(st_dir, tmp_path / "bin")
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")  # tied lm_head shares storage with wte
    assert not (bin_dir / "model.safetensors").exists()
    for load in (HookedTransformer.from_pretrained, HookedTransformer.from_pretrained_no_processing):
        _assert_same_model(load(bin_dir), load(st_dir))


def test_old_checkpoints_with_attention_mask_buffers_load(st_dir, tmp_path):
    # GPT-2 checkpoints from older transformers carry causal-mask buffers h.N.attn.bias / masked_bias.
    hf = load_hf(st_dir)
    state = dict(hf.state_dict())
    n_ctx = hf.config.n_positions
    for layer in range(hf.config.n_layer):
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    old_dir = _copy_config(st_dir, tmp_path / "old")
    torch.save(state, old_dir / "pytorch_model.bin")
    _assert_same_model(HookedTransformer.from_pretrained(old_dir), HookedTransformer.from_pretrained(st_dir))


def test_checkpoint_without_transformer_prefix_loads(st_dir, tmp_path):
    from safetensors.torch import save_file

    hf = load_hf(st_dir)
    body = {k: v.contiguous() for k, v in hf.transformer.state_dict().items()}  # GPT2Model: wte.weight, h.0...
    assert "wte.weight" in body and "h.0.attn.c_attn.weight" in body
    assert not any(k.startswith("transformer.") for k in body)
    bare = _copy_config(st_dir, tmp_path / "bare")
    save_file(body, str(bare / "model.safetensors"))
    _assert_same_model(HookedTransformer.from_pretrained(bare), HookedTransformer.from_pretrained(st_dir))
    torch.testing.assert_close(HookedTransformer.from_pretrained_no_processing(bare)(TOKENS), hf(TOKENS).logits,
                               **tolerance("logits_cross_impl"))
    bare_bin = _copy_config(st_dir, tmp_path / "bare_bin")
    torch.save(body, bare_bin / "pytorch_model.bin")
    _assert_same_model(HookedTransformer.from_pretrained(bare_bin), HookedTransformer.from_pretrained(st_dir))


def test_unsafe_or_broken_checkpoints_raise_checkpoint_error(st_dir, tmp_path):
    pickled = _copy_config(st_dir, tmp_path / "pickled")
    torch.save({"wte.weight": Path("an arbitrary pickled object")}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):  # refused, never unpickled
        HookedTransformer.from_pretrained(pickled)
    not_tensors = _copy_config(st_dir, tmp_path / "not_tensors")
    torch.save({"wte.weight": [1, 2, 3]}, not_tensors / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        HookedTransformer.from_pretrained(not_tensors)
    truncated = _copy_config(st_dir, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((st_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        HookedTransformer.from_pretrained(truncated)
    wrong_shape = _copy_config(st_dir, tmp_path / "wrong")
    config = json.loads((st_dir / "config.json").read_text())
    config["n_embd"] = 32
    (wrong_shape / "config.json").write_text(json.dumps(config))
    shutil.copy(st_dir / "model.safetensors", wrong_shape / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        HookedTransformer.from_pretrained(wrong_shape)


# -- tokenizers -------------------------------------------------------------------------------------------------
EXTRA = "<|hooklens-test-token|>"


def test_directory_tokenizer_takes_precedence_over_shipped_one(tmp_path):
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok

    directory = save_hf_gpt2(tmp_path / "with_tok", seed=5, **{**HF_CONFIGS["tiny"], "vocab_size": 50258})
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    assert tokenizer.add_tokens([EXTRA]) == 1
    tokenizer.save_pretrained(directory)
    model = HookedTransformer.from_pretrained(directory)
    assert EXTRA in model.tokenizer.get_vocab() and len(model.tokenizer) == 50258
    tokens = model.to_tokens(f"Hello{EXTRA} world")
    assert tokens[0].tolist() == [50256, 15496, 50257, 995]
    assert model.to_str_tokens(tokens[0])[2] == EXTRA
    assert model(tokens).shape == (1, 4, 50258)
    # The same checkpoint without tokenizer files falls back to the shipped GPT-2 tokenizer.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, plain / name)
    assert EXTRA not in HookedTransformer.from_pretrained(plain).tokenizer.get_vocab()


def test_cached_snapshot_tokenizer_files_are_used(hub, tmp_path, monkeypatch):
    from transformers import GPT2TokenizerFast

    import hooklens.tokenizer as tok

    root = tmp_path / "hub"
    shutil.copytree(hub / "models--openai-community--gpt2", root / "models--openai-community--gpt2")
    snapshot = root / "models--openai-community--gpt2" / "snapshots" / SNAPSHOT
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tok.SHIPPED_TOKENIZER_DIR))
    tokenizer.add_tokens([EXTRA])
    tokenizer.save_pretrained(snapshot)
    monkeypatch.setattr(loading, "_hf_cache_dir", lambda: root)
    monkeypatch.chdir(tmp_path)
    assert EXTRA in HookedTransformer.from_pretrained("gpt2").tokenizer.get_vocab()


def test_from_pretrained_takes_transformer_lens_signature(hf_dirs):
    """TL's positional order, first_n_layers (against the TL twin cut the same way), n_ctx, move_to_device."""
    from conftest import tl_model_from_hf

    directory = hf_dirs["odd"]  # 3 layers, n_ctx 64
    model = HookedTransformer.from_pretrained(str(directory), True, True, True, False, first_n_layers=2, n_ctx=16,
                                              move_to_device=False, default_prepend_bos=None, default_padding_side=None)
    assert (model.cfg.n_layers, model.cfg.n_ctx, tuple(model.W_pos.shape)) == (2, 16, (16, 96))
    assert len(model.blocks) == 2 and model.cfg.n_params == 2 * (96 * 96 * 4 + 96 * 200 * 2)
    assert model.cfg.default_prepend_bos is True and model.tokenizer.padding_side == "right"
    tl = tl_model_from_hf(directory)
    tokens = TOKENS[:, :10]
    _, cache = model.run_with_cache(tokens)
    _, tl_cache = tl.run_with_cache(tokens)
    for name in ("blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_post"):
        torch.testing.assert_close(cache[name], tl_cache[name], **tolerance())
    with pytest.raises(ValueError, match="sequence|n_ctx|context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(first_n_layers=4), "first_n_layers=4: the checkpoint has 3 layers"),
    (dict(first_n_layers=0), "pass 1 to 3"),
    (dict(n_ctx=65), "cover 64 positions"),
    (dict(checkpoint_index=2), "training checkpoints"),
    (dict(n_devices=2), "one device"),
])
def test_from_pretrained_bad_transformer_lens_arguments(hf_dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HookedTransformer.from_pretrained(str(hf_dirs["odd"]), **kwargs)


def test_to_takes_transformer_lens_signature(hf_dirs, capsys):
    model = HookedTransformer.from_pretrained(str(hf_dirs["tiny"]))
    assert model.to("cpu", False) is model and capsys.readouterr().out == ""
    model.to(device_or_dtype=torch.float64, print_details=True)
    assert model.cfg.dtype == torch.float64 and model.W_E.dtype == torch.float64
    assert "Moving model to" in capsys.readouterr().out
    model.to(torch.float32)  # torch's form still works, silently
    assert model.cfg.dtype == torch.float32 and capsys.readouterr().out == ""
