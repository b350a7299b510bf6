"""CUDA-graph replay of the packed sweep forward (`hooklens.sweep_engine.packed_forward`).

The packed forward of one chunk is a fixed sequence of ops whose shapes depend only on the chunk's *structure*
(which layers its variants start at, how many live tokens each block holds, the patched hook point, the prompt
shape), not on the values of its index tensors, masks, clean activations or the corrupted run. So each chunk runs
on *static buffers*: its inputs are copied into buffers kept per structure, the forward reads only those, and its
output is a buffer too. On CUDA a structure seen a second time is captured as a `torch.cuda.CUDAGraph` and from then
on replayed: one launch for the whole chunk instead of a few hundred kernels, no Python and no host work. A sweep
repeated over many prompt pairs of one shape (the common case) replays from its second run on. A one-off structure
is never captured (capture costs about one more forward), so a single sweep does no extra work.

Entries are kept per model (weakly: they go with the model), at most `MAX_ENTRIES` per model (least recently used
dropped), and keyed also by the dtype, the autocast state and the TF32 switch, which change the captured kernels.
Any change to the model's parameters (an in-place edit moves a parameter's version counter; a replaced parameter
changes its identity) drops the model's entries, as captured kernels read the old storage.

With `capture=False` (the default on CPU, where there are no graphs) the very same static-buffer code runs, and the
forward is called eagerly on the buffers: that is how CPU tests exercise it. User hooks and user patch setters never
reach here: `hooklens.sweeps` runs those on the hook-based path, since Python hooks cannot fire during a replay.
Pattern and score patches run eagerly too (their reference steps create a scalar tensor on the device, which is not
allowed while capturing).
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from hooklens.sweep_engine import _PER_ROW, ChunkPlan, packed_forward
from hooklens.sweep_precision import cuda_matmul_precision

logger = logging.getLogger(__name__)

MAX_ENTRIES = 8

_models: "weakref.WeakKeyDictionary[Any, _ModelGraphs]" = weakref.WeakKeyDictionary()


@dataclass
class _Entry:
    plan: ChunkPlan  # static copies of a plan's tensors
    inputs: List[Tensor]  # static corrupted block inputs / keys / values (shared by entries of one prompt shape)
    keys: List[Tensor]
    values: List[Tensor]
    runs: int = 0
    graph: Optional[Any] = None  # torch.cuda.CUDAGraph once captured
    output: Optional[Tensor] = None  # the graph's output buffer


class _ModelGraphs:
    def __init__(self):
        self.entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self.params: Optional[tuple] = None
        # One set of static corrupted-run buffers per prompt shape: every entry copies its run in before running
        # (runs are sequential), so they share them instead of each holding 3 x n_layers activations.
        self.corrupted: Dict[tuple, Tuple[List[Tensor], List[Tensor], List[Tensor]]] = {}


def _param_key(model) -> tuple:
    return tuple((id(p), p._version) for p in model.parameters())


def _tensor_key(t: Optional[Tensor]) -> Optional[tuple]:
    return None if t is None else (tuple(t.shape), t.dtype, str(t.device))


def structure_key(plan: ChunkPlan, kind: str, inputs: List[Tensor], keys: List[Tensor]) -> tuple:
    """What the packed forward's op sequence and shapes depend on (nothing value-dependent)."""
    patches = tuple((j, _tensor_key(m), _tensor_key(c)) for j, (m, c) in sorted(plan.patches.items()))
    # Every field of the plan that is not a tensor: the static plan keeps the first plan's.
    scalars = (plan.n, plan.batch, plan.length, plan.first_query, plan.first_layer, tuple(plan.rows_upto),
               tuple(plan.tokens_upto), plan.out_rows_from, plan.patch_axes)
    tensors = tuple(_tensor_key(getattr(plan, f)) for f in ("key_index", "query_index", "source_index", "out_tokens",
                                                          "out_logit_index", "attention_mask"))
    device = inputs[0].device
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)) \
        if device.type in ("cuda", "cpu") else None
    tf32 = cuda_matmul_precision() if device.type == "cuda" else None  # the legacy flag's read can raise
    return (kind, scalars, tensors, patches, _tensor_key(inputs[0]), _tensor_key(keys[0]), autocast, tf32)


def _static_plan(plan: ChunkPlan) -> ChunkPlan:
    copies = {}
    for f in fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, Tensor):
            value = value.clone()
        elif f.name == "patches":
            value = {j: (m.clone(), c.clone()) for j, (m, c) in value.items()}
        copies[f.name] = value
    return ChunkPlan(**copies)


def _copy_plan(into: ChunkPlan, plan: ChunkPlan) -> None:
    for f in fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, Tensor):
            getattr(into, f.name).copy_(value)
    for j, (mask, clean) in plan.patches.items():
        into.patches[j][0].copy_(mask)
        into.patches[j][1].copy_(clean)


def run_packed(model, plan: ChunkPlan, kind: str, inputs: List[Tensor], keys: List[Tensor], values: List[Tensor],
               capture: bool, forward: Callable = packed_forward) -> Tensor:
    """`packed_forward(model, plan, kind, inputs, keys, values)` on static buffers kept per chunk structure,
    replayed as a CUDA graph when `capture` (see the module docstring). Returns a new tensor `[k, d_model]`."""
    graphs = _models.get(model)
    if graphs is None:
        graphs = _models[model] = _ModelGraphs()
    params = _param_key(model)
    if graphs.params != params:  # weights edited or replaced: captured kernels would read stale storage
        graphs.entries.clear()
        graphs.corrupted.clear()
        graphs.params = params
    shape_key = (_tensor_key(inputs[0]), _tensor_key(keys[0]), len(inputs))
    corrupted = graphs.corrupted.get(shape_key)
    if corrupted is None:
        corrupted = graphs.corrupted[shape_key] = ([torch.empty_like(t) for t in inputs],
                                                   [torch.empty_like(t) for t in keys],
                                                   [torch.empty_like(t) for t in values])
    for static, new in zip(corrupted[0] + corrupted[1] + corrupted[2], inputs + keys + values):
        static.copy_(new)
    key = structure_key(plan, kind, inputs, keys)
    entry = graphs.entries.get(key)
    if entry is None:
        entry = _Entry(_static_plan(plan), *corrupted)
        graphs.entries[key] = entry
        while len(graphs.entries) > MAX_ENTRIES:
            graphs.entries.popitem(last=False)
    else:
        graphs.entries.move_to_end(key)
        _copy_plan(entry.plan, plan)
    entry.runs += 1
    capturable = capture and inputs[0].device.type == "cuda" and kind not in _PER_ROW
    if capturable and entry.graph is None and entry.runs >= 2:
        entry.graph, entry.output = _capture(lambda: forward(model, entry.plan, kind, entry.inputs, entry.keys,
                                                             entry.values))
    if capturable and entry.graph is not None:
        entry.graph.replay()
        return entry.output.clone()
    return forward(model, entry.plan, kind, entry.inputs, entry.keys, entry.values)


def _capture(fn: Callable[[], Tensor]) -> Tuple[Any, Tensor]:
    """A CUDA graph of `fn` (warmed up once on a side stream, as torch.cuda.graphs requires) and its output."""
    # A caller's autocast with its weight cache on would let the graph read low-precision weight copies that are
    # freed when that autocast block ends, while later sweeps still replay the graph: capture without the cache.
    no_cache = torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                              dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), no_cache:
        fn()  # warm-up: lazy initialisations (cuBLAS handles, SDPA kernel choice) happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), no_cache:
        output = fn()
    logger.debug("Captured the packed sweep forward as a CUDA graph.")
    return graph, output


def cached_entries(model) -> Dict[tuple, _Entry]:
    """The static-buffer entries kept for `model` (for tests)."""
    graphs = _models.get(model)
    return {} if graphs is None else dict(graphs.entries)
