"""Attention workloads: the fused Triton kernels and what they buy end to end.

* `pattern_attention_kernel` (CUDA only): the pattern-emitting kernel against a device-to-device copy of the same
  number of bytes (the bandwidth floor: the pattern must be written once). Reported ratio = copy time / kernel
  time, i.e. the fraction of copy bandwidth the kernel reaches.
* `flash_attention_kernel` (CUDA only): the z-only kernel against `scaled_dot_product_attention` (causal).
* `run_with_cache_vs_forward`: hooklens `run_with_cache` (all hooks) against hooklens's own un-hooked forward.
* `induction_scores`: `hooklens.head_scores` against TransformerLens's `run_with_hooks` with a pattern hook
  (the induction demo: batch 30 of BOS + 50 random tokens repeated).
Shapes: GPT-2 small (12 heads, d_head 64); the kernel workloads use batch x seq from the run (8 x 1024 on CUDA).
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
import torch.nn.functional as F

import models
from harness import Case, Context, WorkloadSkipped, workload


def _qkv(ctx: Context):
    if not str(ctx.device).startswith("cuda"):
        raise WorkloadSkipped("Triton kernels are benchmarked on CUDA only (CPU runs them in the interpreter)")
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    shape = (ctx.batch, ctx.seq, 12, 64)
    dtype = ctx.dtype if ctx.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return [torch.randn(shape, generator=generator, device=ctx.device, dtype=dtype) for _ in range(3)]


@workload("pattern_attention_kernel", references=("device_copy",),
          description="Pattern-emitting attention vs a device copy of the pattern's bytes (CUDA).")
def pattern_attention_kernel(ctx: Context) -> Case:
    from hooklens.kernels import pattern_attention

    q, k, v = _qkv(ctx)
    b, t, h, _ = q.shape
    pattern = torch.empty(b, h, t, t, device=q.device, dtype=q.dtype)
    z = torch.empty_like(q)
    source, target = torch.empty_like(pattern), torch.empty_like(pattern)

    def check(ours, _copy) -> Tuple[bool, float]:
        reference = F.softmax(((q.float().transpose(1, 2) @ k.float().permute(0, 2, 3, 1)) / 8.0).masked_fill(
            torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf")), dim=-1)
        diff = float((ours[1].float() - reference).abs().max())
        return diff < 2e-2, diff

    return Case(impls={"hooklens": lambda: pattern_attention(q, k, v, pattern_out=pattern, z_out=z),
                       "device_copy": lambda: target.copy_(source)},
                check=check, shape=f"{b}x{t}, 12 heads")


@workload("flash_attention_kernel", references=("sdpa",),
          description="z-only flash attention vs torch scaled_dot_product_attention, causal (CUDA).")
def flash_attention_kernel(ctx: Context) -> Case:
    from hooklens.kernels import flash_attention

    q, k, v = _qkv(ctx)
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

    def check(ours, reference) -> Tuple[bool, float]:
        diff = float((ours.float() - reference.float()).abs().max())
        return diff < 2e-2, diff

    return Case(impls={"hooklens": lambda: flash_attention(q, k, v), "sdpa": sdpa}, check=check,
                shape=f"{q.shape[0]}x{q.shape[1]}, 12 heads")


@workload("run_with_cache_vs_forward", references=("unhooked_forward",),
          description="hooklens run_with_cache (every hook) vs hooklens's un-hooked forward.")
def run_with_cache_vs_forward(ctx: Context) -> Case:
    model = models.hooklens_model(ctx)
    tokens = ctx.get("tokens", lambda: models.random_tokens(ctx, ctx.batch, ctx.seq))

    def check(ours, reference) -> Tuple[bool, float]:
        diff = float((ours[0].float() - reference.float()).abs().max())
        return diff < 1e-3, diff

    return Case(impls={"hooklens": lambda: model.run_with_cache(tokens), "unhooked_forward": lambda: model(tokens)},
                check=check, shape=f"{ctx.batch}x{ctx.seq}")


@workload("induction_scores", references=("transformer_lens",),
          description="Induction scores of every head: hooklens.head_scores vs TL run_with_hooks + pattern hook.")
def induction_scores(ctx: Context) -> Case:
    import hooklens

    model, tl = models.hooklens_model(ctx), models.tl_model(ctx)
    seq_len, batch = 50, 30
    generator = torch.Generator().manual_seed(ctx.seed)
    half = torch.randint(100, 20000, (batch, seq_len), generator=generator)
    tokens = torch.cat([torch.full((batch, 1), 50256), half, half], dim=1).to(ctx.device)

    def tl_scores():
        scores = torch.zeros(tl.cfg.n_layers, tl.cfg.n_heads, device=ctx.device)

        def hook(pattern, hook):
            scores[hook.layer()] = pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1).mean(dim=(0, -1))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tl.run_with_hooks(tokens, return_type=None, fwd_hooks=[(lambda n: n.endswith("pattern"), hook)])
        return scores

    def check(ours, reference) -> Tuple[bool, float]:
        diff = float((ours.float().cpu() - reference.float().cpu()).abs().max())
        return diff < 1e-4, diff

    return Case(impls={"hooklens": lambda: hooklens.head_scores(model, tokens, kinds="induction", seq_len=seq_len,
                                                                progress=False)["induction"],
                       "transformer_lens": tl_scores},
                check=check, shape=f"{batch}x{1 + 2 * seq_len}")
