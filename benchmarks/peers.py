"""hooklens's patching sweeps against nnsight 0.8.1 on the IOI prompts of `patching_sweeps.py`.

nnsight wraps an in-memory `transformers.GPT2LMHeadModel` holding the same random weights as the hooklens model
(`nnsight.TransformersModel(hf, task="text-generation", tokenizer=tok)`, SDPA attention). The clean run's
activations are saved once, outside the timed calls (hooklens is handed its clean cache too); each patch is then
one `tracer.invoke` of the corrupted prompt that overwrites the activation with the saved clean value and saves
the (Mary - John) logit difference at the last position:

* `nnsight_batched`: `--nnsight-invokes` (default 68) invokes per trace, nnsight's documented fast path (the
  invokes are stacked on the batch dimension and run as one forward);
* `nnsight_per_patch`: one trace per patch.

The patched activations (HF module paths; `p` a position, `h` a head of width 64):

| workload | hooklens `get_act_patch_*` | nnsight, on `model.transformer` |
|---|---|---|
| `ioi_resid_pre_sweep_nnsight` | `resid_pre` | `h[l].input[:, p, :]` |
| `head_out_all_pos_sweep_nnsight` | `attn_head_out_all_pos` | `h[l].attn.c_proj.input[:, :, h*64:(h+1)*64]` |
| `mlp_out_sweep_nnsight` | `mlp_out` | `h[l].mlp.output[:, p, :]` |

hooklens's weights are processed (LayerNorm folded, writing weights and unembedding centred, value biases folded
into b_O), so its residual stream, MLP outputs and z differ from HF's by a per-position mean / the value bias; the
patched runs' logit differences are the same, and each check compares the whole result (float32: max |diff| <=
1e-3). Every workload also reports the sweep's FLOP floor (`flop_floor`).

nnsight is optional (`pip install -e ".[bench]"`); without it these workloads are skipped, and nothing else
imports it.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, List, Tuple

import torch

import models
import patching_sweeps
from harness import Case, Context, WorkloadSkipped, workload

REFERENCES = ("nnsight_batched", "nnsight_per_patch")
DEFAULT_INVOKES_PER_TRACE = 68  # the measured fast path: 204 patches in 3 traces


def _nnsight():
    if importlib.util.find_spec("nnsight") is None:
        raise WorkloadSkipped("nnsight not installed (pip install -e '.[bench]' in a separate environment)")
    import nnsight

    return nnsight


def nnsight_model(ctx: Context):
    """The seeded checkpoint as an HF `GPT2LMHeadModel` (SDPA) wrapped by `nnsight.TransformersModel`."""
    nnsight = _nnsight()

    def build():
        from transformers import GPT2LMHeadModel

        from hooklens.tokenizer import load_tokenizer, prepare_tokenizer

        hf = GPT2LMHeadModel.from_pretrained(models.hf_checkpoint(ctx), attn_implementation="sdpa",
                                             dtype=ctx.dtype).to(ctx.device).eval()
        tokenizer = prepare_tokenizer(load_tokenizer())
        return nnsight.TransformersModel(hf, task="text-generation", tokenizer=tokenizer)

    return ctx.get("nnsight_model", build)


# How each sweep reads the clean value and writes the patch, on nnsight's envoy of the HF model.
def _resid_pre_site(model, l: int):
    return model.transformer.h[l].input


def _mlp_out_site(model, l: int):
    return model.transformer.h[l].mlp.output


def _z_site(model, l: int):
    return model.transformer.h[l].attn.c_proj.input  # [batch, pos, n_heads * d_head]: every head's z, concatenated


def _sweep_spec(ctx: Context, kind: str):
    """(site, variants [(layer, index)], slicer(index) -> the patched slice of the site's [batch, pos, width])."""
    hl, _, corrupted = patching_sweeps._setup(ctx)[:3]
    n_layers, n_pos, n_heads, d_head = hl.cfg.n_layers, corrupted.shape[1], hl.cfg.n_heads, hl.cfg.d_head
    if kind == "resid_pre":
        site, n_index = _resid_pre_site, n_pos
    elif kind == "mlp_out":
        site, n_index = _mlp_out_site, n_pos
    elif kind == "attn_head_out_all_pos":
        site, n_index = _z_site, n_heads
    else:  # pragma: no cover - the workloads below name only these
        raise ValueError(f"no nnsight sweep for {kind!r}")

    def slicer(index: int):
        if kind == "attn_head_out_all_pos":
            return (slice(None), slice(None), slice(index * d_head, (index + 1) * d_head))  # head's z, every pos
        return (slice(None), index, slice(None))  # one position

    return site, [(l, i) for l in range(n_layers) for i in range(n_index)], slicer


def nnsight_sweeps(ctx: Context, kind: str) -> Tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(batched, per_patch) zero-argument callables, each returning the `[layers, index]` metric like hooklens."""
    model = nnsight_model(ctx)
    hl, _, corrupted = patching_sweeps._setup(ctx)[:3]
    clean = hl.to_tokens(patching_sweeps.CLEAN)
    mary, john = hl.to_single_token(" Mary"), hl.to_single_token(" John")
    site, variants, slicer = _sweep_spec(ctx, kind)
    n_layers = hl.cfg.n_layers

    def build_clean():
        saved = []
        with torch.no_grad(), model.trace(clean):
            for l in range(n_layers):
                saved.append(site(model, l).save())
        return saved

    clean_values = ctx.get(f"nnsight_clean_{kind}", build_clean)

    def run(per_trace: int) -> torch.Tensor:
        values: List[torch.Tensor] = []
        for start in range(0, len(variants), per_trace):
            chunk_values = []
            with model.trace() as tracer:
                for l, index in variants[start:start + per_trace]:
                    with tracer.invoke(corrupted):
                        where = slicer(index)
                        site(model, l)[where] = clean_values[l][where]
                        logits = model.lm_head.output
                        chunk_values.append((logits[:, -1, mary].mean() - logits[:, -1, john].mean()).save())
            values += chunk_values
        return torch.stack(values).view(n_layers, -1)  # [layers, index], as hooklens returns it

    invokes = ctx.options.get("nnsight_invokes") or DEFAULT_INVOKES_PER_TRACE
    return (lambda: run(invokes)), (lambda: run(1))


def _case(ctx: Context, kind: str) -> Case:
    batched, per_patch = nnsight_sweeps(ctx, kind)
    invokes = ctx.options.get("nnsight_invokes") or DEFAULT_INVOKES_PER_TRACE
    return Case(
        impls={"hooklens": patching_sweeps.hooklens_sweep(ctx, kind), "nnsight_batched": batched,
               "nnsight_per_patch": per_patch},
        check=patching_sweeps.check_sweep, shape=patching_sweeps.sweep_shape(ctx, kind), warmup=0, repeats=1,
        flops=patching_sweeps.sweep_flops(ctx, kind),
        note=f"nnsight {_nnsight().__version__}, {invokes} invokes per batched trace",
    )


@workload("ioi_resid_pre_sweep_nnsight", references=REFERENCES,
          description="get_act_patch_resid_pre vs nnsight invokes patching transformer.h[l].input[:, p]")
def resid_pre_nnsight(ctx: Context) -> Case:
    return _case(ctx, "resid_pre")


@workload("head_out_all_pos_sweep_nnsight", references=REFERENCES,
          description="get_act_patch_attn_head_out_all_pos vs nnsight invokes patching a head's c_proj.input slice")
def head_out_all_pos_nnsight(ctx: Context) -> Case:
    return _case(ctx, "attn_head_out_all_pos")


@workload("mlp_out_sweep_nnsight", references=REFERENCES,
          description="get_act_patch_mlp_out vs nnsight invokes patching transformer.h[l].mlp.output[:, p]")
def mlp_out_nnsight(ctx: Context) -> Case:
    return _case(ctx, "mlp_out")
