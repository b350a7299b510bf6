"""Patching sweeps: hooklens.patching against TransformerLens 3.9's patching module, IOI prompts.

GPT-2-small-shaped random weights. The metric is the (Mary - John) logit difference at the last position; hooklens
is told so (`metric_positions=[-1]`), which TL's API cannot express. Both return the full result tensor.

Each sweep also reports its FLOP floor (`flop_floor.sweep_floor`: the ideal reuse algorithm's matmul FLOPs) and
the fraction of it reached at the run's measured GEMM rate. `peers.py` times the same sweeps against nnsight.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Tuple

import torch

import flop_floor
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


METRIC_POSITIONS = [-1]  # the logit difference reads the last position only


def sweep_flops(ctx: Context, kind: str) -> int:
    """FLOP floor of the IOI sweep `kind` (`flop_floor.sweep_variants`) for hooklens's model and prompt."""
    hl, _, corrupted = _setup(ctx)[:3]
    batch, n_pos = corrupted.shape
    return flop_floor.sweep_floor(kind, flop_floor.Shape.of(hl.cfg), n_pos, METRIC_POSITIONS, batch)


def sweep_shape(ctx: Context, kind: str) -> str:
    hl, _, corrupted = _setup(ctx)[:3]
    n_pos, cfg = corrupted.shape[1], hl.cfg
    second = f"{cfg.n_heads} heads" if kind == "attn_head_out_all_pos" else f"{n_pos} pos"
    extra = f" x {cfg.n_heads} heads" if kind == "attn_head_out_by_pos" else ""
    return f"{cfg.n_layers} layers x {second}{extra}"


def hooklens_sweep(ctx: Context, kind: str):
    """hooklens's `get_act_patch_<kind>` on the IOI prompts, as a zero-argument callable."""
    import hooklens.patching as hl_patching

    hl, _, corrupted, hl_cache, _, metric = _setup(ctx)
    fn = getattr(hl_patching, f"get_act_patch_{kind}")
    return lambda: fn(hl, corrupted, hl_cache, metric, metric_positions=METRIC_POSITIONS, progress=False)


def check_sweep(a: torch.Tensor, b: torch.Tensor) -> Tuple[bool, float]:
    """float32 tolerance of the sweeps: max |diff| <= 1e-3 over the whole result."""
    if a.shape != b.shape:
        return False, float("inf")
    diff = float((a.float() - b.float()).abs().max())
    return diff <= 1e-3, diff


def _case(ctx: Context, kind: str) -> Case:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformer_lens.patching as tl_patching
    _, tl, corrupted, _, tl_cache, metric = _setup(ctx)

    def run_tl():
        with contextlib.redirect_stderr(io.StringIO()):  # TL's tqdm bar
            return getattr(tl_patching, f"get_act_patch_{kind}")(tl, corrupted, tl_cache, metric)

    return Case(
        impls={"hooklens": hooklens_sweep(ctx, kind), "transformer_lens": run_tl},
        check=check_sweep, shape=sweep_shape(ctx, kind), warmup=0, repeats=1, flops=sweep_flops(ctx, kind),
    )


@workload("ioi_resid_pre_sweep", references=("transformer_lens",),
          description="get_act_patch_resid_pre on the IOI prompts (layers x positions).")
def ioi_resid_pre(ctx: Context) -> Case:
    return _case(ctx, "resid_pre")


@workload("head_out_all_pos_sweep", references=("transformer_lens",),
          description="get_act_patch_attn_head_out_all_pos on the IOI prompts (layers x heads).")
def head_out_all_pos(ctx: Context) -> Case:
    return _case(ctx, "attn_head_out_all_pos")


@workload("head_out_by_pos_sweep", references=("transformer_lens",),
          description="get_act_patch_attn_head_out_by_pos on the IOI prompts (layers x positions x heads).")
def head_out_by_pos(ctx: Context) -> Case:
    return _case(ctx, "attn_head_out_by_pos")


@workload("mlp_out_sweep", references=("transformer_lens",),
          description="get_act_patch_mlp_out on the IOI prompts (layers x positions).")
def mlp_out(ctx: Context) -> Case:
    return _case(ctx, "mlp_out")
