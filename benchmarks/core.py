"""Core workloads: plain forward, `run_with_cache` (all hooks / patterns only) and a `run_with_hooks` patching loop.

Each workload calls hooklens and its reference(s) through *identical* code on the same tokens and the same
weights (see `models.py`), checks that the outputs agree, and is then timed by the harness.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

import models
from harness import Case, Context, workload

# Agreement tolerances per dtype: |hooklens - reference| <= atol + rtol * |reference|.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-3, 0.0),
    torch.float64: (1e-6, 0.0),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float32; equal infinities (masked attention scores) count as 0, unequal ones as inf."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().float(), b.detach().float()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.where(finite, 0.0, a), torch.where(finite, 0.0, b)):
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().masked_fill(~finite, 0.0).max())


def within_tolerance(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> Tuple[bool, float]:
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    diff = max_abs_diff(a, b)
    if diff == float("inf"):
        return False, diff
    a32, b32 = a.detach().float(), b.detach().float()
    finite = torch.isfinite(a32) & torch.isfinite(b32)
    excess = ((a32 - b32).abs() - atol - rtol * b32.abs()).masked_fill(~finite, 0.0)
    return bool(excess.numel() == 0 or excess.max() <= 0), diff


def shape_str(ctx: Context) -> str:
    return f"{ctx.batch}x{ctx.seq}"


def _tokens(ctx: Context) -> torch.Tensor:
    return ctx.get("tokens", lambda: models.random_tokens(ctx, ctx.batch, ctx.seq))


# -- forward ----------------------------------------------------------------------------------------------------
@workload("forward", references=("hf", "transformer_lens"),
          description="Plain forward pass to logits [b, p, vocab]; no hooks.")
def forward(ctx: Context) -> Case:
    tokens = _tokens(ctx)
    hl, tl, hf = models.hooklens_model(ctx), models.tl_model(ctx), models.hf_model(ctx)

    def check(hooklens_logits: torch.Tensor, ref_out: Any) -> Tuple[bool, float]:
        if isinstance(ref_out, tuple) and ref_out[0] == "hf":
            # hooklens centres the unembedding (logits shift by a per-position constant), so compare log-probs.
            return within_tolerance(F.log_softmax(hooklens_logits.float(), -1), F.log_softmax(ref_out[1].float(), -1),
                                    ctx.dtype)
        return within_tolerance(hooklens_logits, ref_out, ctx.dtype)

    return Case(
        impls={
            "hooklens": lambda: hl(tokens),
            "transformer_lens": lambda: tl(tokens),
            "hf": lambda: ("hf", hf(tokens, use_cache=False).logits),
        },
        check=check,
        shape=shape_str(ctx),
    )


# -- run_with_cache ---------------------------------------------------------------------------------------------
def _cache_check(ctx: Context):
    def check(hooklens_out: Tuple[torch.Tensor, Mapping[str, torch.Tensor]],
              ref_out: Tuple[torch.Tensor, Mapping[str, torch.Tensor]]) -> Tuple[bool, float]:
        (hl_logits, hl_cache), (ref_logits, ref_cache) = hooklens_out, ref_out
        ok, worst = within_tolerance(hl_logits, ref_logits, ctx.dtype)
        hl_keys, ref_keys = set(hl_cache.keys()), set(ref_cache.keys())
        if hl_keys != ref_keys:
            print(f"    cache keys differ: only hooklens {sorted(hl_keys - ref_keys)[:6]}, "
                  f"only reference {sorted(ref_keys - hl_keys)[:6]}")
            ok = False
        for key in sorted(hl_keys & ref_keys):
            key_ok, diff = within_tolerance(hl_cache[key], ref_cache[key], ctx.dtype)
            if not key_ok:
                print(f"    {key}: max |diff| {diff:.3g}")
            ok, worst = ok and key_ok, max(worst, diff)
        return ok, worst

    return check


@workload("run_with_cache_all", references=("transformer_lens",),
          description="run_with_cache with no names_filter: logits plus every hook point's activation.")
def run_with_cache_all(ctx: Context) -> Case:
    tokens = _tokens(ctx)
    hl, tl = models.hooklens_model(ctx), models.tl_model(ctx)
    return Case(
        impls={"hooklens": lambda: hl.run_with_cache(tokens), "transformer_lens": lambda: tl.run_with_cache(tokens)},
        check=_cache_check(ctx),
        shape=shape_str(ctx),
    )


def _is_pattern(name: str) -> bool:
    return name.endswith("hook_pattern")


@workload("run_with_cache_patterns", references=("transformer_lens",),
          description="run_with_cache(names_filter=lambda n: n.endswith('hook_pattern')): logits + attention patterns.")
def run_with_cache_patterns(ctx: Context) -> Case:
    tokens = _tokens(ctx)
    hl, tl = models.hooklens_model(ctx), models.tl_model(ctx)
    return Case(
        impls={
            "hooklens": lambda: hl.run_with_cache(tokens, names_filter=_is_pattern),
            "transformer_lens": lambda: tl.run_with_cache(tokens, names_filter=_is_pattern),
        },
        check=_cache_check(ctx),
        shape=shape_str(ctx),
    )


# -- activation patching ----------------------------------------------------------------------------------------
def patching_positions(seq: int, count: int) -> List[int]:
    """`count` distinct positions spread over the sequence, always including the last one."""
    count = max(1, min(count, seq))
    return sorted({round((i + 1) * (seq - 1) / count) for i in range(count)})


def patch_resid_pre(model: Any, clean: torch.Tensor, corrupted: torch.Tensor, answer: int, wrong: int,
                    layers: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """The classic residual-stream patching sweep, written once for any TL-API model.

    Cache the clean run's `hook_resid_pre`s, then for every (layer, position) rerun the corrupted tokens with the
    clean residual patched in at that position, and record the logit difference `answer - wrong` at the last
    position (batch mean). Returns `[len(layers), len(positions)]`.
    """
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    out = torch.empty(len(layers), len(positions), device=clean.device, dtype=torch.float32)
    for i, layer in enumerate(layers):
        name = f"blocks.{layer}.hook_resid_pre"
        clean_resid = clean_cache[name]  # [b, p, d]
        for j, pos in enumerate(positions):
            def patch(resid: torch.Tensor, hook: Any, pos: int = pos) -> torch.Tensor:
                resid[:, pos, :] = clean_resid[:, pos, :]
                return resid

            logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
            out[i, j] = (logits[:, -1, answer] - logits[:, -1, wrong]).float().mean()
    return out


@workload("patching_loop", references=("transformer_lens",),
          description="Clean run_with_cache(resid_pre) + run_with_hooks patching every layer x a few positions.")
def patching_loop(ctx: Context) -> Case:
    clean = _tokens(ctx)
    corrupted = clean.clone()
    # Corrupt the first half of every prompt, so patching early positions matters.
    half = max(1, ctx.seq // 2)
    corrupted[:, :half] = models.random_tokens(ctx, ctx.batch, ctx.seq, seed_offset=1)[:, :half]
    hl, tl = models.hooklens_model(ctx), models.tl_model(ctx)
    layers = list(range(hl.cfg.n_layers))
    positions = patching_positions(ctx.seq, int(ctx.options.get("patch_positions") or 3))
    answer, wrong = 318, 262  # any two token ids

    def run(model: Any) -> torch.Tensor:
        return patch_resid_pre(model, clean, corrupted, answer, wrong, layers, positions)

    return Case(
        impls={"hooklens": lambda: run(hl), "transformer_lens": lambda: run(tl)},
        check=lambda a, b: within_tolerance(a, b, ctx.dtype),
        shape=shape_str(ctx),
        # One call is 1 + layers x positions forward passes, so it is timed fewer times than the other workloads.
        repeats=int(ctx.options.get("patch_repeats") or min(ctx.repeats, 3)),
        note=f"{len(layers)} layers x {len(positions)} positions = {len(layers) * len(positions)} patched runs "
             "+ 1 cached run",
    )
