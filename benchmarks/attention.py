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
from core import within_tolerance
from harness import Case, Context, WorkloadSkipped, workload
from hooklens.attention import reference_attention


def _qkv(ctx: Context):
    if not str(ctx.device).startswith("cuda"):
        raise WorkloadSkipped("Triton kernels are benchmarked on CUDA only (CPU runs them in the interpreter)")
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    shape = (ctx.batch, ctx.seq, 12, 64)
    dtype = ctx.dtype if ctx.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return [torch.randn(shape, generator=generator, device=ctx.device, dtype=dtype) for _ in range(3)]


@workload("pattern_attention_kernel", references=("device_copy",),
          description="Pattern-emitting attention vs a device copy moving the same number of bytes (CUDA).")
def pattern_attention_kernel(ctx: Context) -> Case:
    """The kernel must read q, k, v and write z and the pattern once: that many bytes is its floor. The reference
    copies a buffer of half that size (a copy reads and writes each byte), so it moves the same bytes through
    device memory, and the ratio copy_time / kernel_time is the fraction of measured copy bandwidth the kernel
    reaches (1.0 = as fast as a copy)."""
    from hooklens.kernels import pattern_attention

    q, k, v = _qkv(ctx)
    b, t, h, _ = q.shape
    pattern = torch.empty(b, h, t, t, device=q.device, dtype=q.dtype)
    z = torch.empty_like(q)
    floor_bytes = (pattern.numel() + 4 * q.numel()) * q.element_size()
    source = torch.empty(floor_bytes // 2, dtype=torch.uint8, device=q.device)
    target = torch.empty_like(source)

    def check(ours, _copy) -> Tuple[bool, float]:
        _, reference = reference_attention(q.float(), k.float(), v.float(), attn_scale=8.0)  # TL's pattern
        diff = float((ours[1].float() - reference).abs().max())
        return diff < 2e-2, diff

    # kernel_timing: one launch is as short as the host-side clock around it, so the harness uses CUDA events.
    return Case(impls={"hooklens": lambda: pattern_attention(q, k, v, pattern_out=pattern, z_out=z),
                       "device_copy": lambda: target.copy_(source)},
                check=check, shape=f"{b}x{t}, 12 heads", kernel_timing=True, reference_is_floor=True,
                note=f"floor: {floor_bytes / 1e9:.3f} GB read+written; ratio = fraction of copy bandwidth")


@workload("flash_attention_kernel", references=("sdpa",),
          description="z-only flash attention vs torch scaled_dot_product_attention, causal (CUDA).")
def flash_attention_kernel(ctx: Context) -> Case:
    from hooklens.kernels import flash_attention

    q, k, v = _qkv(ctx)

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    def check(ours, reference) -> Tuple[bool, float]:
        diff = float((ours.float() - reference.float()).abs().max())
        return diff < 2e-2, diff

    return Case(impls={"hooklens": lambda: flash_attention(q, k, v), "sdpa": sdpa}, check=check,
                shape=f"{q.shape[0]}x{q.shape[1]}, 12 heads", kernel_timing=True)


@workload("run_with_cache_vs_forward", references=("unhooked_forward",),
          description="hooklens run_with_cache (every hook) vs hooklens's un-hooked forward.")
def run_with_cache_vs_forward(ctx: Context) -> Case:
    model = models.hooklens_model(ctx)
    tokens = ctx.get("tokens", lambda: models.random_tokens(ctx, ctx.batch, ctx.seq))

    def check(ours, reference) -> Tuple[bool, float]:
        # Different attention kernels (pattern-emitting vs flash): logits agree to the dtype's rounding.
        return within_tolerance(ours[0], reference, ctx.dtype)

    return Case(impls={"hooklens": lambda: model.run_with_cache(tokens), "unhooked_forward": lambda: model(tokens)},
                check=check, shape=f"{ctx.batch}x{ctx.seq}")


SEQ_LEN = 50  # induction workloads: BOS + SEQ_LEN random tokens + the same tokens again


def _repeated_prompts(ctx: Context, rows: int) -> torch.Tensor:
    """[rows, 1 + 2 * SEQ_LEN] on the CPU: BOS, SEQ_LEN random tokens, the same tokens again."""
    generator = torch.Generator().manual_seed(ctx.seed)
    half = torch.randint(100, 20000, (rows, SEQ_LEN), generator=generator)
    return torch.cat([torch.full((rows, 1), 50256), half, half], dim=1)


def _tl_induction_scores(tl, tokens: torch.Tensor, chunk: int, device) -> torch.Tensor:
    """The demo's way with TL: run_with_hooks with a pattern hook per chunk of rows, mean of the induction stripe
    (the offset-(1 - SEQ_LEN) diagonal) over rows and entries. [n_layers, n_heads]."""
    scores = torch.zeros(tl.cfg.n_layers, tl.cfg.n_heads, device=device)

    def hook(pattern, hook):
        scores[hook.layer()] += pattern.diagonal(offset=1 - SEQ_LEN, dim1=-2, dim2=-1).sum(dim=(0, -1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, tokens.shape[0], chunk):
            tl.run_with_hooks(tokens[start:start + chunk].to(device), return_type=None,
                              fwd_hooks=[(lambda n: n.endswith("pattern"), hook)])
    stripe_len = tokens.shape[1] - (SEQ_LEN - 1)  # entries on that diagonal
    return scores / (tokens.shape[0] * stripe_len)


def _check_scores(ours, reference) -> Tuple[bool, float]:
    diff = float((ours.float().cpu() - reference.float().cpu()).abs().max())
    return diff < 1e-4, diff


@workload("induction_scores", references=("transformer_lens",),
          description="Induction scores of every head: hooklens.head_scores vs TL run_with_hooks + pattern hook.")
def induction_scores(ctx: Context) -> Case:
    import hooklens

    model, tl = models.hooklens_model(ctx), models.tl_model(ctx)
    tokens = _repeated_prompts(ctx, 30).to(ctx.device)
    return Case(impls={"hooklens": lambda: hooklens.head_scores(model, tokens, kinds="induction", seq_len=SEQ_LEN,
                                                                progress=False)["induction"],
                       "transformer_lens": lambda: _tl_induction_scores(tl, tokens, len(tokens), ctx.device)},
                check=_check_scores, shape=f"{len(tokens)}x{tokens.shape[1]}")


@workload("induction_scores_streamed", references=("transformer_lens",),
          description="Induction scores over ~1M tokens streamed in chunks: hooklens.head_scores vs TL's loop.")
def induction_scores_streamed(ctx: Context) -> Case:
    """9901 rows of BOS + 50 random tokens repeated (1,000,001 tokens), 100 rows per forward in both libraries.
    The note records hooklens's peak device memory above the model and inputs, against the size of one layer's
    [rows, heads, T, T] float32 pattern (TL materializes one per layer per chunk)."""
    import hooklens

    model, tl = models.hooklens_model(ctx), models.tl_model(ctx)
    rows, chunk = int(ctx.options.get("streamed_rows", 9901)), 100
    tokens = _repeated_prompts(ctx, rows)  # CPU: streamed to the device per chunk
    peak = {}

    def ours():
        cuda = str(ctx.device).startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = hooklens.head_scores(model, tokens, kinds="induction", seq_len=SEQ_LEN, batch_size=chunk,
                                   progress=False)["induction"]
        if cuda:
            peak["bytes"] = torch.cuda.max_memory_allocated() - base
        return out

    t = tokens.shape[1]
    pattern_bytes = chunk * 12 * t * t * 4
    tl_scores = lambda: _tl_induction_scores(tl, tokens, chunk, ctx.device)  # noqa: E731
    case = Case(impls={"hooklens": ours, "transformer_lens": tl_scores}, check=_check_scores,
                shape=f"{rows}x{t} ({rows * t:,} tokens), chunks of {chunk}", warmup=0, repeats=1)
    case.note_fn = lambda: (f"hooklens peak device memory above model+inputs: {peak['bytes'] / 1e6:.1f} MB; one "
                            f"layer's float32 pattern per chunk would be {pattern_bytes / 1e6:.1f} MB"
                            if "bytes" in peak else "")
    return case
