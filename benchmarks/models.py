"""The three models every core workload compares, all holding the same random GPT-2-small-shaped weights.

* `hf_checkpoint(ctx)`: a seeded `GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab 50257,
  n_positions 1024))`, saved once per run (`save_pretrained`) to a temporary directory.
* `hooklens_model(ctx)`: `hooklens.HookedTransformer.from_pretrained(dir)`, i.e. processed weights (LN folded,
  writing weights and unembedding centred, value biases folded) through hooklens's real loading code.
* `tl_model(ctx)`: TransformerLens 3.9's `HookedTransformer` built offline from the same checkpoint with
  `convert_gpt2_weights` + `load_and_process_state_dict` and the same processing flags.
* `hf_model(ctx)`: the checkpoint loaded back with `attn_implementation="sdpa"` (the plain-forward reference).

No weights are downloaded. Weight processing always runs in float32; the models are cast to `ctx.dtype` after.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict

import torch

from harness import Context

GPT2_SMALL_SHAPE: Dict[str, Any] = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def _make_hf_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL_SHAPE)).eval()
    # Random (not zero / one) biases and LayerNorm parameters, so weight processing really changes the weights.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def hf_checkpoint(ctx: Context) -> Path:
    """Directory holding the seeded random checkpoint (HF format), created once per run and removed at exit."""

    def build() -> Path:
        directory = Path(tempfile.mkdtemp(prefix="hooklens-bench-gpt2-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _make_hf_gpt2(ctx.seed).save_pretrained(directory)
        return directory

    return ctx.get("hf_checkpoint", build)


def hooklens_model(ctx: Context):
    def build():
        from hooklens import HookedTransformer

        model = HookedTransformer.from_pretrained(str(hf_checkpoint(ctx)), device=ctx.device, dtype=ctx.dtype)
        return model.eval()

    return ctx.get("hooklens_model", build)


def tl_model(ctx: Context):
    def build():
        from transformers import GPT2LMHeadModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformer_lens import HookedTransformer, HookedTransformerConfig
            from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        hf = GPT2LMHeadModel.from_pretrained(hf_checkpoint(ctx), attn_implementation="eager").eval()
        c = hf.config
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
            normalization_type="LN", original_architecture="GPT2LMHeadModel", device="cpu", dtype=torch.float32,
        )
        model = HookedTransformer(cfg)
        model.load_and_process_state_dict(
            convert_gpt2_weights(hf, cfg), fold_ln=True, center_writing_weights=True, center_unembed=True,
            fold_value_biases=True,
        )
        del hf
        model = model.to(torch.device(ctx.device), print_details=False)
        if ctx.dtype != torch.float32:
            model = model.to(ctx.dtype, print_details=False)
        return model.eval()

    return ctx.get("tl_model", build)


def hf_model(ctx: Context):
    def build():
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(hf_checkpoint(ctx), attn_implementation="sdpa", dtype=ctx.dtype)
        return model.to(ctx.device).eval()

    return ctx.get("hf_model", build)


def random_tokens(ctx: Context, batch: int, seq: int, seed_offset: int = 0) -> torch.Tensor:
    """Seeded uniform random token ids `[batch, seq]` on the run's device."""
    generator = torch.Generator().manual_seed(ctx.seed + 1000 + seed_offset)
    tokens = torch.randint(0, GPT2_SMALL_SHAPE["vocab_size"], (batch, seq), generator=generator)
    return tokens.to(ctx.device)
