"""Patching sweeps: hooklens.patching against TransformerLens 3.9's patching module, IOI prompts.

GPT-2-small-shaped random weights. The metric is the (Mary - John) logit difference at the last position; hooklens
is told so (`metric_positions=[-1]`), which TL's API cannot express. Both return the full result tensor.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Tuple

import torch

import models
from harness import Case, Context, workload

CLEAN = "When John and Mary went to the shops, John gave the bag to"
CORRUPTED = "When John and Mary went to the shops, Mary gave the bag to"


def _setup(ctx: Context):
    def build():
        hl, tl = models.hooklens_model(ctx), models.tl_model(ctx)
        clean, corrupted = hl.to_tokens(CLEAN), hl.to_tokens(CORRUPTED)
        _, hl_cache = hl.run_with_cache(clean)
        _, tl_cache = tl.run_with_cache(clean)
        mary, john = hl.to_single_token(" Mary"), hl.to_single_token(" John")

        def metric(logits):
            return logits[:, -1, mary].mean() - logits[:, -1, john].mean()

        return hl, tl, corrupted, hl_cache, tl_cache, metric

    return ctx.get("ioi_patching_setup", build)


def _case(ctx: Context, fn_name: str, shape: str) -> Case:
    import hooklens.patching as hl_patching

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformer_lens.patching as tl_patching
    hl, tl, corrupted, hl_cache, tl_cache, metric = _setup(ctx)

    def run_tl():
        with contextlib.redirect_stderr(io.StringIO()):  # TL's tqdm bar
            return getattr(tl_patching, fn_name)(tl, corrupted, tl_cache, metric)

    def check(a: torch.Tensor, b: torch.Tensor) -> Tuple[bool, float]:
        diff = float((a.float() - b.float()).abs().max())
        return diff <= 1e-3, diff

    return Case(
        impls={"hooklens": lambda: getattr(hl_patching, fn_name)(hl, corrupted, hl_cache, metric,
                                                                 metric_positions=[-1], progress=False),
               "transformer_lens": run_tl},
        check=check, shape=shape, warmup=0, repeats=1,
    )


@workload("ioi_resid_pre_sweep", references=("transformer_lens",),
          description="get_act_patch_resid_pre on the IOI prompts (layers x positions).")
def ioi_resid_pre(ctx: Context) -> Case:
    return _case(ctx, "get_act_patch_resid_pre", "12 layers x 15 pos")


@workload("head_out_all_pos_sweep", references=("transformer_lens",),
          description="get_act_patch_attn_head_out_all_pos on the IOI prompts (layers x heads).")
def head_out_all_pos(ctx: Context) -> Case:
    return _case(ctx, "get_act_patch_attn_head_out_all_pos", "12 layers x 12 heads")


@workload("head_out_by_pos_sweep", references=("transformer_lens",),
          description="get_act_patch_attn_head_out_by_pos on the IOI prompts (layers x positions x heads).")
def head_out_by_pos(ctx: Context) -> Case:
    return _case(ctx, "get_act_patch_attn_head_out_by_pos", "12 layers x 15 pos x 12 heads")
