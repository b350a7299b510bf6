"""Head ablation on the batched patching engine (`hooklens.sweeps`).

`head_ablation` replaces one attention head's output `z` (`blocks.{l}.attn.hook_z`, every position) at a time and
records the metric, for every head: a `[n_layers, n_heads]` tensor. It is activation patching where the "clean"
activation is the ablation value, so it runs on `run_sweep`: many heads per forward, each run starting at its
head's layer from the cached residual stream of the unablated run.

Ablation values (`kind`), for head `h` of layer `l` with `z = blocks.{l}.attn.hook_z` on `tokens` ([b, p, h, dh]):

* `"zero"`: `z[:, :, h] = 0`;
* `"mean"`: `z[:, :, h] = z[:, :, h].mean over (batch, position)`: one `d_head` vector per head, the mean of that
  head's output over every row of `tokens` and every position (the same vector is written at every position);
  `tokens` serves as its own reference distribution;
* `"resample"`: `z[:, :, h] = z_r[:, :, h]` where `z_r` is the head's output on `resample_tokens` (same shape as
  `tokens`; row `i` of the ablated run receives row `i` of the resampled run, position by position).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens import sharding
from hooklens.activation_layout import layout_of
from hooklens.sweep_precision import SweepPrecision
from hooklens.sweeps import attach_partial, check_tokens, index_sweep, logit_positions, run_sweep
from hooklens.utils import get_act_name

ABLATION_KINDS = ("zero", "mean", "resample")


def ablation_values(model, tokens: Tensor, kind: str = "zero",
                    resample_tokens: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The replacement `z` of every layer for `kind` (see the module docstring):
    `{"blocks.{l}.attn.hook_z": [b, p, h, dh]}`."""
    if kind not in ABLATION_KINDS:
        raise ValueError(f"kind must be one of {ABLATION_KINDS}, got {kind!r}")
    tokens = check_tokens(tokens)
    names = [get_act_name("z", l) for l in range(model.cfg.n_layers)]
    if kind == "resample":
        if resample_tokens is None:
            raise ValueError("kind='resample' needs resample_tokens (same shape as tokens).")
        resample_tokens = check_tokens(resample_tokens, "resample_tokens")
        if resample_tokens.shape != tokens.shape:
            raise ValueError(f"resample_tokens has shape {tuple(resample_tokens.shape)}, tokens {tuple(tokens.shape)}; "
                             "they must match.")
        source = resample_tokens
    elif resample_tokens is not None:
        raise ValueError(f"resample_tokens is only used with kind='resample', not kind={kind!r}.")
    else:
        source = tokens
    device = model.W_E.device
    with torch.no_grad():
        _, cache = model.run_with_cache(source.to(device), names_filter=names, return_cache_object=False)
    if kind == "resample":
        return {n: cache[n] for n in names}
    if kind == "zero":
        return {n: torch.zeros_like(cache[n]) for n in names}
    return {n: cache[n].mean(dim=(0, 1), keepdim=True).expand_as(cache[n]).contiguous() for n in names}


def head_ablation(
    model,
    tokens: Tensor,
    metric: Callable[[Tensor], Tensor],
    kind: str = "zero",
    resample_tokens: Optional[Tensor] = None,
    metric_positions: Optional[Sequence[int]] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    *,
    dtype: Optional[torch.dtype] = None,
    allow_tf32: bool = False,
    shard: Optional[Tuple[int, int]] = None,
    results_dir=None,
) -> Tensor:
    """Metric after ablating each head's `z` at every position: `[n_layers, n_heads]`.

    `metric(logits [b, p, d_vocab]) -> scalar`, as in `hooklens.patching` (`metric_positions=[-1]` computes logits
    only there; other positions are NaN, and a metric reading them raises). `kind`: "zero", "mean" or "resample"
    (see the module docstring). An exception raised while the heads run (Ctrl-C too) keeps its type and carries
    `partial_result` ([n_layers, n_heads], NaN where not done) and `done` (bool, True where done).

    `dtype` / `allow_tf32`: the precision of the ablated forwards, as in `hooklens.patching` (default: the model's,
    exact; `torch.bfloat16` runs them under autocast, see `hooklens.sweep_precision`). The ablation values themselves
    (the unablated run's `z`) are computed in the model's precision, as a clean cache is in patching.

    `shard=(i, n)` / `results_dir=`: split the heads over processes / job-array tasks and keep finished work units
    in `results_dir/head_ablation-<kind>` (resumable), as in `hooklens.patching`; under an initialized
    `torch.distributed` process group every rank returns the whole result (`hooklens.sharding`).
    """
    tokens = check_tokens(tokens)
    precision = SweepPrecision(model, dtype, allow_tf32)  # a refused dtype raises before any forward
    logit_positions(metric_positions, tokens.shape[1])  # out-of-range positions raise before any forward
    replacement = ablation_values(model, tokens, kind, resample_tokens)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    indices = torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads)).view(-1, 2)
    head_axis = layout_of("z").axis("head", batch_dim=False)
    sweep = index_sweep(model, "z", indices, axes=(head_axis,))  # one head, every position
    try:
        with precision:
            if sharding.wants_units(shard, results_dir):
                values = sharding.run_sharded(
                    model, tokens, replacement, metric, sweep, metric_positions, memory_budget, progress,
                    shard=shard, results_dir=results_dir, key=f"head_ablation-{kind}",
                    extra={"dtype": str(dtype), "allow_tf32": allow_tf32})
            else:
                values = run_sweep(model, tokens, replacement, metric, sweep, metric_positions, memory_budget,
                                   progress)
    except BaseException as exc:
        if getattr(exc, "partial_result", None) is not None:
            attach_partial(exc, exc.partial_result.view(n_layers, n_heads), exc.done.view(n_layers, n_heads))
        raise
    return values.view(n_layers, n_heads)
