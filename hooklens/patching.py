"""Activation patching with TransformerLens 3.9's functions and signatures, on hooklens's batched engine.

Every `get_act_patch_*` returns the same tensor TransformerLens returns (same shape, same numbers up to float
rounding), but runs many patches per forward pass (see `hooklens.sweeps`). Extra keyword-only arguments:

* `metric_positions`: the positions the metric reads, e.g. `[-1]` (logits elsewhere are NaN); default all;
* `memory_budget`: bytes per chunk of stacked variants (default: half the free GPU memory; on CPU a quarter of the
  available memory, at most 8 GiB); a chunk that runs out of memory is retried in halves;
* `progress`: show a tqdm bar;
* `dtype`: the precision the sweep's forwards run in: None (default) for the model's own, exactly as without the
  argument; `torch.bfloat16` or `torch.float16` on a float32 model runs them under `torch.autocast` without changing
  the model (results stay float32 tensors);
* `allow_tf32`: TF32 matmuls on CUDA for the duration of the sweep (a process-wide flag, restored after); a no-op on
  the CPU;
* `shard=(i, n)`, `results_dir`: split the sweep over processes / nodes / job-array tasks and keep finished work
  units on disk, resumable; with an initialized `torch.distributed` process group every rank returns the whole
  result (`hooklens.sharding`).

The lower-precision options are opt-in and approximate: their measured error against float32 (normalized metric,
rank correlation of the patch effects, IOI and repeated-token sweeps) is in docs/sweep-precision.md; the mechanism
and what is refused are in `hooklens.sweep_precision`.

Checked before any patch runs: the tokens (`[batch, pos]` or `[pos]` integer ids), `metric_positions` (in range; a
metric reading logits outside them raises, since those are NaN) and the metric (one number per run). An exception
raised during a sweep (a metric's error, Ctrl-C, out of memory) is re-raised with its own type and the finished
work attached: `exc.partial_result` shaped like the function's result (NaN where not done) and `exc.done` (bool,
True where done). See `hooklens.sweeps`.

As in TransformerLens: a clean cache of one prompt is used for every corrupted prompt; the setters defined here run
as vectorized masks, any other `patch_setter(corrupted_activation, index, clean_activation)` is called once per
patch; results are float32 whatever the model's dtype. Beyond it: negative indices in `index_df` count from the
end, and mismatched clean/corrupted shapes or non-scalar metrics raise errors that say what to fix.
"""
from __future__ import annotations

import itertools
from functools import partial
from typing import Callable, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens import sharding
from hooklens.sweep_precision import SweepPrecision
from hooklens.sweeps import PatchSweep, attach_partial, check_tokens, index_sweep, run_sweep

AXIS_NAMES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos")
# TransformerLens's type names, for code that annotates with them.
Logits = torch.Tensor
AxisNames = Literal["layer", "pos", "head_index", "head", "src_pos", "dest_pos"]
CorruptedActivation = torch.Tensor
PatchedActivation = torch.Tensor


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """Every combination of `range(max)` per column as a pandas DataFrame, last column fastest (TL's helper, for
    building `index_df`)."""
    import pandas as pd

    rows = list(itertools.product(*[range(axis_max_range) for axis_max_range in column_max_ranges]))
    return pd.DataFrame(rows, columns=list(column_names))


# -- TL's patch setters (used by generic_activation_patch and by custom sweeps) -----------------------------------
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos]: copy position `pos` (axis 1) of a [batch, pos, ...] activation."""
    layer, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head_index] on a [batch, pos, head, d] activation."""
    layer, pos, head_index = index
    corrupted_activation[:, pos, head_index] = clean_activation[:, pos, head_index]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]: every position of one head of a [batch, pos, head, d] activation."""
    layer, head_index = index
    corrupted_activation[:, :, head_index] = clean_activation[:, :, head_index]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index] on a [batch, head, dest, src] pattern."""
    layer, head_index = index
    corrupted_activation[:, head_index, :, :] = clean_activation[:, head_index, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos]: one destination row of a pattern."""
    layer, head_index, dest_pos = index
    corrupted_activation[:, head_index, dest_pos, :] = clean_activation[:, head_index, dest_pos, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos, src_pos]: one entry of a pattern."""
    layer, head_index, dest_pos, src_pos = index
    corrupted_activation[:, head_index, dest_pos, src_pos] = clean_activation[:, head_index, dest_pos, src_pos]
    return corrupted_activation


# The setters defined here run as vectorized masks (`hooklens.sweeps.index_mask`): setter -> (the activation axes,
# without the batch dim, that index columns 1.. address, exactly as the setter indexes them; what each column is).
_KNOWN_SETTERS = {
    layer_pos_patch_setter: ((0,), ("layer", "pos")),
    layer_pos_head_vector_patch_setter: ((0, 1), ("layer", "pos", "head")),
    layer_head_vector_patch_setter: ((1,), ("layer", "head")),
    layer_head_pattern_patch_setter: ((0,), ("layer", "head")),
    layer_head_pos_pattern_patch_setter: ((0, 1), ("layer", "head", "dest_pos")),
    layer_head_dest_src_pos_pattern_patch_setter: ((0, 1, 2), ("layer", "head", "dest_pos", "src_pos")),
}


def _normalized_indices(indices: Tensor, sizes: Sequence[int], what: Sequence[str]) -> Tensor:
    """Negative indices counted from the end (as Python indexing does); out-of-range ones are an error."""
    if indices.shape[1] != len(sizes):
        raise ValueError(f"Each patch index needs {len(sizes)} entries ({', '.join(what)}), got {indices.shape[1]}.")
    size = torch.tensor(list(sizes), dtype=torch.long)
    bad = (indices < -size) | (indices >= size)
    if bad.any():
        row, column = (int(i) for i in torch.nonzero(bad)[0])
        raise IndexError(f"Patch index {indices[row].tolist()}: {what[column]}={int(indices[row, column])} is out of "
                         f"range for size {sizes[column]}.")
    return torch.where(indices < 0, indices + size, indices)


def _axis_ranges(model, corrupted_tokens: Tensor) -> dict:
    ranges = {"layer": model.cfg.n_layers, "pos": corrupted_tokens.shape[-1], "head_index": model.cfg.n_heads}
    ranges.update(src_pos=ranges["pos"], dest_pos=ranges["pos"], head=ranges["head_index"])
    return ranges


def _index_grid(model, corrupted_tokens: Tensor, activation_name: str,
                index_axis_names: Sequence[str]) -> Tuple[Tensor, list]:
    ranges = _axis_ranges(model, corrupted_tokens)
    unknown = [a for a in index_axis_names if a not in ranges]
    if unknown:
        raise ValueError(f"Unknown index axis names {unknown}; use {list(ranges)}")
    sizes = [ranges[a] for a in index_axis_names]
    grid = torch.tensor(list(itertools.product(*[range(s) for s in sizes])), dtype=torch.long)
    return grid.view(-1, len(sizes)), sizes


def generic_activation_patch(
    model,
    corrupted_tokens: Tensor,
    clean_cache,
    patching_metric: Callable[[Tensor], Tensor],
    patch_setter: Callable,
    activation_name: str,
    index_axis_names: Optional[Sequence[str]] = None,
    index_df=None,
    return_index_df: bool = False,
    *,
    metric_positions: Optional[Sequence[int]] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    dtype: Optional[torch.dtype] = None,
    allow_tf32: bool = False,
    shard: Optional[Tuple[int, int]] = None,
    results_dir=None,
):
    """Patch `activation_name` from `clean_cache` into the corrupted run at every index and record the metric.

    Indices come from `index_axis_names` (every combination; result shaped by the axes) or from `index_df` (a
    pandas DataFrame, one row per patch; result flat, as in TransformerLens). Index column 0 is the layer. The
    setters defined here are applied as vectorized masks; any other `patch_setter(corrupted_activation, index,
    clean_activation)` is called as TransformerLens calls it, once per patch, on that run's `[batch, ...]` slice.
    `return_index_df=True` also returns the indices as a DataFrame. `dtype` / `allow_tf32`: the sweep's precision
    (see the module docstring and `hooklens.sweep_precision`; default: the model's, exact).

    `shard=(i, n)` / `results_dir=`: run this process's share of the sweep's work units and keep finished units
    in `results_dir/<activation>-<axes>` (resumable); under an initialized `torch.distributed` process group the
    ranks split the sweep and each returns the whole result. See `hooklens.sharding`.

    An exception raised while the patches run carries `partial_result` (shaped like the result, NaN where not
    done) and `done` (bool, True where done), and keeps its type.
    """
    corrupted_tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    precision = SweepPrecision(model, dtype, allow_tf32)  # a refused dtype raises before any forward
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("Give index_axis_names (e.g. ('layer', 'pos')) or index_df.")
        indices, out_shape = _index_grid(model, corrupted_tokens, activation_name, index_axis_names)
        if return_index_df:
            index_df = make_df_from_ranges(out_shape, index_axis_names)
    else:
        if index_axis_names is not None:
            raise ValueError("Give index_axis_names or index_df, not both.")
        # A copy: pandas' copy-on-write hands out read-only arrays, which torch warns about when it shares them.
        indices = torch.tensor(index_df.to_numpy(), dtype=torch.long)
        out_shape = [len(index_df)]
    if len(indices) == 0:
        raise ValueError("No patches to run: index_df is empty.")
    ranges = _axis_ranges(model, corrupted_tokens)
    layer_column = _normalized_indices(indices[:, :1], [ranges["layer"]], ["layer"])
    indices = torch.cat([layer_column, indices[:, 1:]], dim=1)
    if patch_setter in _KNOWN_SETTERS:
        axes, columns = _KNOWN_SETTERS[patch_setter]
        indices = _normalized_indices(indices, [ranges[column] for column in columns], columns)
        sweep = index_sweep(model, activation_name, indices, axes)
    else:
        sweep = PatchSweep(activation_name, indices, torch.zeros(len(indices), dtype=torch.long),
                           patch_setter=patch_setter)
    try:
        with precision:
            if sharding.wants_units(shard, results_dir):
                key = f"{activation_name}-{'_'.join(index_axis_names) if index_axis_names else 'index_df'}"
                values = sharding.run_sharded(
                    model, corrupted_tokens, clean_cache, patching_metric, sweep, metric_positions, memory_budget,
                    progress, shard=shard, results_dir=results_dir, key=key,
                    extra={"dtype": str(dtype), "allow_tf32": allow_tf32})
            else:
                values = run_sweep(model, corrupted_tokens, clean_cache, patching_metric, sweep, metric_positions,
                                   memory_budget, progress)
    except BaseException as exc:
        reshape_partial(exc, out_shape)
        raise
    values = values.view(out_shape)
    return (values, index_df) if return_index_df else values


def _specialize(setter, activation_name: str, axes: Tuple[str, ...], doc: str):
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=activation_name, index_axis_names=axes)
    fn.__doc__ = f"{doc} Result shape [{', '.join(axes)}]. See generic_activation_patch."
    return fn


get_act_patch_resid_pre = _specialize(layer_pos_patch_setter, "resid_pre", ("layer", "pos"),
                                      "Patch the residual stream entering each block, by position.")
get_act_patch_resid_mid = _specialize(layer_pos_patch_setter, "resid_mid", ("layer", "pos"),
                                      "Patch the residual stream between attention and MLP, by position.")
get_act_patch_attn_out = _specialize(layer_pos_patch_setter, "attn_out", ("layer", "pos"),
                                     "Patch each attention layer's output, by position.")
get_act_patch_mlp_out = _specialize(layer_pos_patch_setter, "mlp_out", ("layer", "pos"),
                                    "Patch each MLP layer's output, by position.")
get_act_patch_attn_head_out_by_pos = _specialize(layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"),
                                                 "Patch each head's output z, by position.")
get_act_patch_attn_head_q_by_pos = _specialize(layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"),
                                               "Patch each head's queries, by position.")
get_act_patch_attn_head_k_by_pos = _specialize(layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"),
                                               "Patch each head's keys, by position.")
get_act_patch_attn_head_v_by_pos = _specialize(layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"),
                                               "Patch each head's values, by position.")
get_act_patch_attn_head_pattern_by_pos = _specialize(layer_head_pos_pattern_patch_setter, "pattern",
                                                     ("layer", "head_index", "dest_pos"),
                                                     "Patch each head's attention pattern, by destination position.")
get_act_patch_attn_head_pattern_dest_src_pos = _specialize(
    layer_head_dest_src_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos", "src_pos"),
    "Patch each (destination, source) pattern entry of each head.")
get_act_patch_attn_head_out_all_pos = _specialize(layer_head_vector_patch_setter, "z", ("layer", "head"),
                                                  "Patch each head's output z at every position.")
get_act_patch_attn_head_q_all_pos = _specialize(layer_head_vector_patch_setter, "q", ("layer", "head"),
                                                "Patch each head's queries at every position.")
get_act_patch_attn_head_k_all_pos = _specialize(layer_head_vector_patch_setter, "k", ("layer", "head"),
                                                "Patch each head's keys at every position.")
get_act_patch_attn_head_v_all_pos = _specialize(layer_head_vector_patch_setter, "v", ("layer", "head"),
                                                "Patch each head's values at every position.")
get_act_patch_attn_head_pattern_all_pos = _specialize(layer_head_pattern_patch_setter, "pattern",
                                                      ("layer", "head_index"),
                                                      "Patch each head's whole attention pattern.")


def reshape_partial(exc: BaseException, shape: Sequence[int], transform: Optional[Callable] = None) -> None:
    """Reshape the finished work a sweep attached to `exc` (see `hooklens.sweeps.attach_partial`) to `shape`, then
    apply `transform` (e.g. a transpose) to it and to its `done` mask; nothing when none is attached."""
    partial, done = getattr(exc, "partial_result", None), getattr(exc, "done", None)
    if partial is None or done is None:
        return
    partial, done = partial.reshape(shape), done.reshape(shape)
    if transform is not None:
        partial, done = transform(partial), transform(done)
    attach_partial(exc, partial, done)


def _stacked(calls: Sequence[Callable[[], Tensor]], transforms: Optional[Sequence[Optional[Callable]]] = None):
    """`torch.stack` of the sweeps `calls` (each with its `transforms` entry applied to its result). An exception
    in one of them carries the stack's finished work: earlier sweeps whole, that one's `partial_result`, NaN
    after."""
    transforms = transforms or [None] * len(calls)
    results = []
    try:
        for call, transform in zip(calls, transforms):
            value = call()
            results.append(transform(value) if transform is not None else value)
    except BaseException as exc:
        partial, done = getattr(exc, "partial_result", None), getattr(exc, "done", None)
        if partial is not None and done is not None:
            transform = transforms[len(results)]
            if transform is not None:
                partial, done = transform(partial), transform(done)
            rest = len(calls) - len(results) - 1
            partial = torch.stack(results + [partial] + [torch.full_like(partial, float("nan"))] * rest)
            done = torch.stack([torch.ones_like(done)] * len(results) + [done] + [torch.zeros_like(done)] * rest)
            attach_partial(exc, partial, done)
        raise
    return torch.stack(results, dim=0)


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """[5, layer, head]: output, query, key, value and pattern patching of every head, all positions."""
    return _stacked([partial(fn, model, corrupted_tokens, clean_cache, metric, **kwargs) for fn in (
        get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos,
        get_act_patch_attn_head_v_all_pos, get_act_patch_attn_head_pattern_all_pos)])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """[5, layer, pos, head]: output, query, key, value and pattern patching of every head, by position."""
    fns = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos, get_act_patch_attn_head_k_by_pos,
           get_act_patch_attn_head_v_by_pos, get_act_patch_attn_head_pattern_by_pos)
    pattern_to_by_pos = partial(torch.transpose, dim0=1, dim1=2)  # [layer, head, pos] -> [layer, pos, head]
    return _stacked([partial(fn, model, corrupted_tokens, clean_cache, metric, **kwargs) for fn in fns],
                    [None] * 4 + [pattern_to_by_pos])


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """[3, layer, pos]: residual stream, attention output and MLP output patching, by position."""
    return _stacked([partial(fn, model, corrupted_tokens, clean_cache, metric, **kwargs) for fn in (
        get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)])
