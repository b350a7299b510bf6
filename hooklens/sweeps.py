"""The batched patching engine under `hooklens.patching`.

TransformerLens runs one full forward pass (and one host sync) per patch. Here a sweep is a list of patches
("variants"), each `(layer, index)` on one activation, and the engine

1. runs the corrupted prompt once, caching its residual stream entering every layer, its keys and values, and
   its logits;
2. sorts the variants by layer (then start position) and runs each chunk of them in one *packed* forward
   (`hooklens.sweep_engine`): a variant of layer l starting at position s (the first position its patch can
   change; causal attention) is computed in blocks l.. at positions s.. only, the earlier ones read from the
   corrupted run's keys and values; every variant's live tokens share one matrix, so each block is one GEMM per
   weight for the whole chunk, whatever layers its variants start at;
3. computes only what the metric can read: no position after the last one in `metric_positions`, and in the last
   block the attention output, MLP and unembedding only at `metric_positions` (default all);
4. applies the patch inside that forward for the variants starting at each block, from per-variant masks (no hook
   fires, no Python loop over variants); its number of ops depends on the blocks and chunks, not the variants,
   and it runs on static buffers that CUDA replays as a graph once a chunk structure repeats
   (`hooklens.sweep_graphs`);
5. evaluates the metric for all variants of a chunk at once with `torch.vmap`;
6. chunks variants to a memory budget (half the free GPU memory; on CPU a quarter of the available memory, at most
   8 GiB), retrying a chunk that runs out of GPU memory as halves, with a tqdm bar.

Each step is exact: `tests/test_patching.py` and `tests/test_sweep_engine.py` check them against the
one-forward-per-patch loop. Some sweeps run on the hook-based path instead (`packed=False` forces it): chunks of
one layer, starting at the chunk's earliest position, patched by a hook with `hooklens.ops.patching.masked_patch`
(a `torch.where`). That path serves hook points the packed forward does not patch (LayerNorm
internals, split q/k/v inputs, ...) and models it does not cover (`sweep_engine.packed_kind`), and runs each
variant from position 0 in two cases, because their Python code must see what it sees in TransformerLens: a
user-written patch setter (called per variant on its `[batch, pos, ...]` slice) and hooks already attached to the
model (one variant per forward, so they see `[batch, pos, ...]` too; a warning says so). Left-padded prompts carry
their attention mask into every run.

Checks, once per sweep and before the chunks run: the tokens are `[batch, pos]` (or `[pos]`) integer ids;
`metric_positions` are in range; the metric returns one number per run, and (with `metric_positions`) its value on
the unpatched run does not depend on the logits at other positions, which a sweep leaves NaN (`check_metric`).
An exception raised while the chunks run (a metric's error, Ctrl-C, out of memory) keeps the finished work: it
carries `partial_result` (the sweep's result, NaN where not done) and `done` (bool, True where done), and is
re-raised with its own type (`attach_partial`). `prepare_sweep` does the checks and the corrupted run alone, once,
for `run_sweep(..., prepared=)` to run any subsets of a sweep's variants against (a sharded sweep's work units:
`hooklens.sharding`).

Public helpers for sweeps built on the engine (`hooklens.patching`, `hooklens.ablation`, `hooklens.attribution`,
`hooklens.path_patching`): `index_mask` builds the per-variant masks and `index_sweep` a whole mask sweep;
`logit_positions` says which positions' logits a metric reads; `check_metric` checks a metric once per sweep
(`metric_value` checks one value); `apply_metric` evaluates a metric over stacked variants; `check_tokens` checks a
sweep's tokens; `attach_partial` keeps a sweep's finished work on the exception that stopped it. Which axis of the
patched activation is the position comes from `hooklens.activation_layout`.
"""
from __future__ import annotations

import logging
import math
import numbers
import operator
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooklens.activation_layout import find_layout, layout_of
from hooklens.errors import InvalidInputError
from hooklens.kv_cache import HookedTransformerKeyValueCacheEntry
from hooklens.progress import bar_disabled
from hooklens.sweep_engine import packed_forward, packed_kind, plan_chunk
from hooklens.sweep_graphs import run_packed
from hooklens.utils import get_act_name

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import HookedTransformer

logger = logging.getLogger(__name__)

MaskBuilder = Callable[[Tensor, Tuple[int, ...]], Tensor]
"""(indices [n, n_axes], activation shape without batch) -> bool mask [n, *shape]: where to take clean values."""


@dataclass
class PatchSweep:
    """One activation patched at many indices. `indices[:, 0]` is the layer; `start_positions` the first
    position each patch can affect (0 when it spans every position). Patches are either masks (`build_masks`:
    where to take the clean values, vectorized over variants, e.g. `partial(index_mask, axes=...)`) or a user's
    TL-style `patch_setter(corrupted_activation, index, clean_activation)`, called for each variant."""

    activation_name: str
    indices: Tensor  # [n, n_axes], int64
    start_positions: Tensor  # [n]
    build_masks: Optional[MaskBuilder] = None
    patch_setter: Optional[Callable[[Tensor, Tuple[int, ...], Tensor], Optional[Tensor]]] = None
    # For `index_sweep`s: the activation axes (without batch) that index columns 1.. address, so the engine can
    # patch by index (`hooklens.ops.patching.index_patch_`) instead of building masks.
    axes: Optional[Tuple[int, ...]] = None


# -- the sweep engine's public helpers ------------------------------------------------------------------------------
def index_mask(indices: Tensor, shape: Tuple[int, ...], axes: Sequence[int]) -> Tensor:
    """Where each patch takes the clean activation: bool `[n, *shape]` for an activation of `shape` (without its
    batch dim), True where the activation's index along `axes[i]` equals `indices[:, i + 1]` for every i
    (column 0 of `indices` is the layer); every other axis is patched whole.

    E.g. `axes=(0,)` on a `[pos, d_model]` activation patches one position, `axes=(0, 1)` on `[pos, head, d_head]`
    one head at one position, `axes=(1,)` one head at every position."""
    n = len(indices)
    mask = torch.ones((n,) + (1,) * len(shape), dtype=torch.bool, device=indices.device)
    for column, axis in enumerate(axes, start=1):
        one_hot = torch.nn.functional.one_hot(indices[:, column], shape[axis]).bool()  # [n, shape[axis]]
        view = [n] + [1] * len(shape)
        view[axis + 1] = shape[axis]
        mask = mask & one_hot.view(view)  # [n, 1.., shape[axis], 1..] broadcast into the mask
    return mask.expand((n,) + tuple(shape))


def index_sweep(model, activation_name: str, indices: Tensor, axes: Sequence[int]) -> PatchSweep:
    """A mask sweep (`index_mask` over `axes`) of `activation_name` at `indices` (`[n, 1 + len(axes)]`, column 0
    the layer). A patch changes nothing before the position it addresses (causal attention), so when an index
    column addresses the activation's position axis (by its layout), that column is each patch's first affected
    position; otherwise every patch starts at position 0."""
    axes = tuple(axes)
    layout = find_layout(get_act_name(activation_name, int(indices[0, 0])), model.cfg)
    pos_axis = layout.axis("pos", batch_dim=False) if layout is not None else None
    if pos_axis in axes:
        starts = indices[:, 1 + axes.index(pos_axis)]
    else:
        starts = torch.zeros(len(indices), dtype=torch.long)
    return PatchSweep(activation_name, indices, starts, build_masks=partial(index_mask, axes=axes), axes=axes)


def check_tokens(tokens, name: str = "tokens") -> Tensor:
    """`tokens` as int64 `[batch, pos]` (a `[pos]` prompt gets a batch dim); anything else is an error naming `name`:
    a non-tensor or non-integer tensor (TypeError), another number of dims or no tokens (InvalidInputError)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a tensor of token ids [batch, pos] (or [pos]), got {type(tokens).__name__}; "
                        "tokenize text with model.to_tokens(...).")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}; convert with .long() (or "
                        "tokenize text with model.to_tokens(...)).")
    if tokens.dim() not in (1, 2):
        raise InvalidInputError(f"{name} must be token ids [batch, pos] (or [pos]), got shape {tuple(tokens.shape)}; "
                                "flatten extra dims into the batch, e.g. tokens.reshape(-1, tokens.shape[-1]).")
    if tokens.numel() == 0:
        raise InvalidInputError(f"{name} is empty (shape {tuple(tokens.shape)}); a sweep needs at least one prompt "
                                "of at least one token.")
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    return tokens.long()  # int8 / uint8 ids would index as a boolean mask


def logit_positions(metric_positions: Optional[Sequence[int]], seq_len: int) -> Tensor:
    """The positions whose logits a metric reads, `[k]` int64 on the CPU, sorted and unique (negative ones count
    from the end); every position when `metric_positions` is None. Logits elsewhere need not be computed (they are
    NaN). A position outside the prompt raises IndexError (it does not wrap around)."""
    if metric_positions is None:
        return torch.arange(seq_len)
    if isinstance(metric_positions, (int, Tensor)) and not isinstance(metric_positions, bool):
        metric_positions = [metric_positions] if not isinstance(metric_positions, Tensor) else \
            metric_positions.reshape(-1).tolist()
    try:
        positions = [operator.index(p) for p in metric_positions]
    except TypeError:
        raise TypeError(f"metric_positions must be a list of int positions, e.g. [-1], got {metric_positions!r}.") \
            from None
    if not positions:
        raise InvalidInputError("metric_positions is empty: give the positions the metric reads, e.g. [-1], or None "
                                "for every position.")
    outside = [p for p in positions if not -seq_len <= p < seq_len]
    if outside:
        raise IndexError(f"metric_positions {outside} are out of range for prompts of {seq_len} tokens (valid: "
                         f"{-seq_len}..{seq_len - 1}, negative ones counting from the end); they index the "
                         "corrupted prompt's positions.")
    return torch.tensor([p % seq_len for p in positions], dtype=torch.long).unique()


def metric_value(value, differentiable: bool = False) -> Tensor:
    """One metric value as a 0-d tensor: a tensor, or (unless `differentiable`) a Python / NumPy real number.
    `differentiable` (attribution) also takes a one-element tensor of any shape, as it always has."""
    if isinstance(value, Tensor):
        if differentiable and value.numel() == 1:
            return value.reshape(())
        if value.dim() != 0:
            raise InvalidInputError(f"The metric must return one number per run (a scalar), but it returned shape "
                                    f"{tuple(value.shape)}; reduce it, e.g. with .mean() over the batch.")
        return value
    if not differentiable and isinstance(value, numbers.Real):
        return torch.as_tensor(value)
    need = "a scalar tensor computed from the logits with differentiable torch ops" if differentiable else \
        "a scalar tensor (or a Python number)"
    raise TypeError(f"The metric must return {need}, e.g. logits[:, -1, answer].mean(); it returned "
                    f"{type(value).__name__}.")


def check_metric(metric: Callable[[Tensor], Tensor], logits: Tensor, positions: Optional[Tensor] = None,
                 differentiable: bool = False) -> None:
    """Once per sweep, on the unpatched run's full logits `[b, p, v]`: `metric` returns one number, and when it is
    only given the logits at `positions` (from `logit_positions`; the rest NaN) its value does not depend on the
    others. A metric reading other positions would get NaN there and report wrong numbers for every patch (an
    argmax accuracy drops to 0): that raises InvalidInputError naming `metric_positions`.

    Two signs of such a read, both on this one run: the value changes when the other positions' logits change
    (rolled and rescaled along the vocabulary), or it becomes NaN when they are NaN. A metric that only asks
    whether they are NaN passes. The metric is called on copies, 1 to 3 times."""
    real = metric_value(metric(logits.clone()), differentiable)
    seq_len = logits.shape[1]
    if positions is None or len(positions) == seq_len:
        return
    unread = torch.tensor(sorted(set(range(seq_len)) - set(positions.tolist())), device=logits.device)
    moved = logits.index_select(1, unread).roll(1, dims=-1) * 0.5 + 1.0
    perturbed = metric_value(metric(logits.index_copy(1, unread, moved)), differentiable).to(real.device)
    on_nan = metric_value(metric(logits.index_fill(1, unread, float("nan"))), differentiable).to(real.device)
    depends = (real != perturbed) & ~(real.isnan() & perturbed.isnan())
    if bool(depends | (on_nan.isnan() & ~real.isnan())):  # one host sync per sweep
        raise InvalidInputError(
            f"The metric reads logits outside metric_positions (positions {positions.tolist()} of {seq_len}): a "
            f"sweep computes only those and leaves the rest NaN, so the metric would be wrong for every patch (on the "
            f"unpatched run it gives {real.item():.6g} with every logit, {on_nan.item():.6g} with only "
            "metric_positions'). Add the positions it reads to metric_positions, or pass metric_positions=None."
        )


def attach_partial(exc: BaseException, partial: Tensor, done: Tensor) -> None:
    """Keep a sweep's finished work on the exception that stopped it: `exc.partial_result` (NaN where not done)
    and `exc.done` (bool, same shape, True where done). The exception keeps its type (a KeyboardInterrupt stays
    one); a note says where the results are. Callers that reshape a sweep's result call this again."""
    first = getattr(exc, "partial_result", None) is None
    try:
        exc.partial_result, exc.done = partial, done.to(partial.device)
    except AttributeError:  # an exception type with __slots__ takes no attributes
        return
    if first:
        exc.add_note(f"hooklens: {int(done.sum())} of {done.numel()} patches of the sweep had finished; their results "
                     "are in this exception's .partial_result (NaN where not done; .done marks which).")


def apply_metric(metric: Callable[[Tensor], Tensor], logits: Tensor, state: Optional[dict] = None,
                 variants_per_call: Optional[int] = None) -> Tensor:
    """`metric` over each variant's logits: `[n, b, p, v] -> [n]`, vectorized with `torch.vmap` when the metric
    allows (metrics calling `.item()` or branching on values are evaluated once per variant instead).

    `state` (one dict per sweep) remembers a metric that vmap cannot run, so it is reported and retried once.
    A metric must return one number per run (a 0-d tensor, or a Python number when vmap cannot run it); anything
    else raises InvalidInputError (a ValueError) or TypeError.

    `variants_per_call`: variants per vmapped call (default: as many as keep ~16 MiB of logits per call). The sweep
    engine passes all of a chunk's (the chunk is already sized to memory), so the metric costs a fixed number of ops
    per chunk, not per variant."""
    state = {} if state is None else state
    values = None
    if state.get("vmap", True):
        # vmap in chunks of a few variants: a metric's temporaries (log_softmax of a position slice, which makes a
        # contiguous copy) then stay cache-sized instead of spanning every variant at once.
        per_variant = max(1, logits[0].numel() * logits.element_size())
        chunk_size = variants_per_call or max(1, (16 << 20) // per_variant)
        try:
            values = torch.vmap(metric, chunk_size=chunk_size)(logits)
        except Exception as err:  # metrics that call .item() or data-dependent Python control flow
            logger.warning("The patching metric is not vmap-compatible (%s); evaluating it per variant.", err)
            state["vmap"] = False
    if values is None:
        values = torch.stack([metric_value(metric(l)).to(logits.device) for l in logits])
    if values.dim() != 1:
        raise InvalidInputError(
            f"The metric must return one number per run (a scalar), but it returned shape {tuple(values.shape[1:])} "
            f"for logits of shape {tuple(logits.shape[1:])}; reduce it, e.g. with .mean() over the batch."
        )
    return values


# -- the engine -------------------------------------------------------------------------------------------------
@dataclass
class _CorruptedRun:
    """What every chunk of a sweep starts from: the corrupted prompt, its logits and the activations cached on it."""

    tokens: Tensor  # [b, p]
    logits: Tensor  # [b, p, v]
    activations: Dict[str, Tensor]  # block inputs, keys and values of every layer, the patched activation
    attention_mask: Optional[Tensor]  # [b, p] for left-padded prompts, else None


# Logits per metric call on CPU (the packed path): a cache-friendly buffer reused across a sweep's calls, as
# apply_metric's default chunk.
METRIC_BUFFER_BYTES = 16 << 20

CPU_BUDGET_CAP = 8 * 1024**3  # a sweep's chunk is plenty fast at this size; more only risks swapping


def default_memory_budget(device: torch.device) -> int:
    """Bytes one chunk of stacked variants may use: half the free GPU memory, or on CPU a quarter of the memory
    the OS reports available (/proc/meminfo's MemAvailable, else psutil's, else 8 GiB), capped at 8 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    available = _available_host_memory()
    return CPU_BUDGET_CAP if available is None else max(64 * 1024**2, min(available // 4, CPU_BUDGET_CAP))


def _available_host_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _variant_bytes(model: "HookedTransformer", batch: int, seq_len: int, n_logit_positions: int,
                   act_numel: int) -> int:
    """Rough peak memory of one variant: residual-sized tensors, one attention pattern, its slot of the
    [variants, b, p, vocab] logits buffer plus the unembedding output at the metric's positions, its mask."""
    cfg = model.cfg
    per_token = 12 * cfg.d_model + 2 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * seq_len
    element = torch.finfo(cfg.dtype).bits // 8
    logits = (seq_len + n_logit_positions) * cfg.d_vocab_out
    return batch * (seq_len * per_token + logits + act_numel) * element + act_numel


@dataclass
class PreparedSweep:
    """What `run_sweep` computes once before its chunks, for any of a sweep's variants (`prepare_sweep`): the checked
    tokens and metric positions, the corrupted run (`state`), the chunk size and the packed forward's inputs.
    A sharded sweep prepares once per process and runs each work unit against it (`run_sweep(..., prepared=)`),
    instead of repeating the corrupted forward and the metric check per unit."""

    model: "HookedTransformer"
    tokens: Tensor  # [b, p] on the model's device
    metric: Callable[[Tensor], Tensor]
    activation_name: str
    host_positions: Tensor  # [k] the metric's positions, on the CPU
    memory_budget: Optional[int]  # as given (None: the device's default, resolved once here)
    hooked: bool  # hooks were attached to the model: one variant per forward, from position 0
    chunk_size: int  # variants per chunk: a function of the prompts, metric positions and budget, not of the variants
    state: _SweepState
    inputs: List[Tensor]  # per layer: the corrupted run's block input [b, p, d] ...
    keys: List[Tensor]  # ... keys [b, p, h, dh] ...
    values: List[Tensor]  # ... and values, which the packed forward reads before each variant's start


@torch.no_grad()
def prepare_sweep(model: "HookedTransformer", corrupted_tokens: Tensor, metric: Callable[[Tensor], Tensor],
                  sweep: PatchSweep, metric_positions: Optional[Sequence[int]] = None,
                  memory_budget: Optional[int] = None) -> PreparedSweep:
    """The checks and the corrupted run of `run_sweep`, done once: pass the result as `run_sweep(..., prepared=)`
    to run any subset of `sweep`'s variants (same activation, prompts, metric) without repeating them. Each call
    then chunks its own variants exactly as `run_sweep` without `prepared` does, so its values are the same bits."""
    device = model.W_E.device
    corrupted_tokens = check_tokens(corrupted_tokens, "corrupted_tokens").to(device)
    batch, seq_len = corrupted_tokens.shape
    positions = logit_positions(metric_positions, seq_len)
    hooked = _warn_if_hooked(model)
    first_name = get_act_name(sweep.activation_name, int(sweep.indices[0, 0]))
    run = _run_corrupted(model, corrupted_tokens, first_name)
    check_metric(metric, run.logits, positions if metric_positions is not None else None)
    act_shape = tuple(run.activations[first_name].shape[1:])
    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    per_variant = _variant_bytes(model, batch, seq_len, len(positions), math.prod(act_shape))
    chunk_size = 1 if hooked else max(1, budget // max(per_variant, 1))
    state = _SweepState(run, positions.to(device), layout_of(first_name, model.cfg).axis("pos", batch_dim=False),
                        act_shape)
    n_layers = model.cfg.n_layers
    return PreparedSweep(
        model, corrupted_tokens, metric, sweep.activation_name, positions, memory_budget, hooked, chunk_size, state,
        inputs=[_block_input(run.activations, j) for j in range(n_layers)],
        keys=[run.activations[get_act_name("k", j)] for j in range(n_layers)],
        values=[run.activations[get_act_name("v", j)] for j in range(n_layers)])


def _check_prepared(prepared: PreparedSweep, model, corrupted_tokens: Tensor, metric: Callable, sweep: PatchSweep,
                    metric_positions, memory_budget: Optional[int]) -> None:
    """`prepared` was made for this call's model, prompts, metric, activation, positions and budget, else
    InvalidInputError naming the first that differs (its state would silently give another sweep's values)."""
    tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    differs = [
        ("model", prepared.model is not model),
        ("metric", prepared.metric is not metric),
        ("activation", prepared.activation_name != sweep.activation_name),
        ("corrupted_tokens", tokens.shape != prepared.tokens.shape
         or not torch.equal(tokens.to(prepared.tokens.device), prepared.tokens)),
        ("metric_positions", not torch.equal(logit_positions(metric_positions, tokens.shape[1]),
                                             prepared.host_positions)),
        ("memory_budget", memory_budget is not None and memory_budget != prepared.memory_budget),
    ]
    for what, different in differs:
        if different:
            raise InvalidInputError(f"run_sweep(prepared=...) was prepared with another {what} than this call's; "
                                    "prepare_sweep with this call's arguments (or pass prepared=None).")


@torch.no_grad()
def run_sweep(
    model: "HookedTransformer",
    corrupted_tokens: Tensor,
    clean_cache,
    metric: Callable[[Tensor], Tensor],
    sweep: PatchSweep,
    metric_positions: Optional[Sequence[int]] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    *,
    packed: bool = True,
    capture: Optional[bool] = None,
    prepared: Optional[PreparedSweep] = None,
) -> Tensor:
    """Metric value of every patch in `sweep`: a float32 [n] tensor in the order of `sweep.indices` (TL stores each
    value with `.item()` into a float32 tensor, whatever the model's dtype).

    The tokens, `metric_positions` and the metric are checked before the first chunk (see the module docstring).
    An exception raised while the chunks run (a KeyboardInterrupt too) is re-raised with the finished work attached:
    `exc.partial_result` ([n], NaN where not done) and `exc.done` ([n] bool); no hooks are left on the model.
    A chunk that runs out of GPU memory is retried as halves (logged once); finished chunks are kept.

    `prepared` (from `prepare_sweep` with the same model, prompts, metric, activation and metric positions): skip
    the checks and the corrupted run, which it holds; `sweep` may be any subset of the prepared sweep's variants.
    `packed=False` runs the hook-based path even where the packed forward could (for tests and benchmarks).
    `capture` (default: on CUDA): replay the packed forward of a chunk structure seen before as a CUDA graph
    (`hooklens.sweep_graphs`); False runs the same static-buffer code eagerly."""
    if prepared is None:
        prepared = prepare_sweep(model, corrupted_tokens, metric, sweep, metric_positions, memory_budget)
    else:
        _check_prepared(prepared, model, corrupted_tokens, metric, sweep, metric_positions, memory_budget)
    state, device = prepared.state, prepared.tokens.device
    seq_len = prepared.tokens.shape[1]
    first_layer = int(sweep.indices[0, 0])
    kind = None
    if packed and not prepared.hooked and sweep.build_masks is not None:
        kind = packed_kind(model, sweep.activation_name, first_layer)
    # A user's setter and hooks already on the model see [batch, pos, ...] from position 0, as in TransformerLens.
    from_start = prepared.hooked or sweep.patch_setter is not None
    if sweep.patch_setter is not None:
        logger.info("A custom patch_setter is Python called per variant: patching %s on the hook-based path.",
                    sweep.activation_name)
    start_positions = torch.zeros_like(sweep.start_positions) if from_start else sweep.start_positions.cpu()
    chunk_size = prepared.chunk_size

    n = len(sweep.indices)
    results = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    if kind is not None:
        host_indices = sweep.indices.cpu()  # once per sweep: chunks are planned on the host
        layers = host_indices[:, 0]
        # Sorted by layer (the packed forward's prefix order), then by start (similar suffixes share a chunk).
        order = torch.argsort(layers * (seq_len + 1) + start_positions.clamp(max=seq_len), stable=True)
        chunks = list(order.split(chunk_size))
        capture = device.type == "cuda" if capture is None else bool(capture)

        def run_chunk(chunk: Tensor) -> Tensor:
            return _run_packed_chunk(model, clean_cache, metric, sweep, kind, chunk, host_indices[chunk],
                                     start_positions, prepared.host_positions, state, prepared.inputs,
                                     prepared.keys, prepared.values, capture)
    else:
        chunks = _chunks(sweep.indices[:, 0], start_positions, chunk_size)

        def run_chunk(chunk: Tensor) -> Tensor:
            start = int(start_positions[chunk].min())
            return _run_chunk(model, clean_cache, metric, sweep, chunk, start, state)

    done = torch.zeros(n, dtype=torch.bool)
    try:
        _run_chunks(chunks, run_chunk, results, done, progress, f"patching {sweep.activation_name}")
    except BaseException as exc:  # Ctrl-C, a metric's error, out of memory: keep what finished
        attach_partial(exc, results, done)
        raise
    return results


def _run_chunks(chunks: List[Tensor], run_chunk: Callable[[Tensor], Tensor], results: Tensor, done: Tensor,
                progress: bool, description: str) -> None:
    """Runs every chunk, writing its values into `results` and marking `done`. A chunk raising
    torch.OutOfMemoryError is freed and retried as halves, and later chunks are capped at that size (logged once
    per sweep); a one-variant chunk that runs out of memory raises."""
    pending = deque(chunks)
    limit = max((len(c) for c in chunks), default=1)
    warned = False
    with tqdm(total=int(sum(len(c) for c in chunks)), disable=bar_disabled(progress), desc=description) as bar:
        while pending:
            chunk = pending.popleft()
            if len(chunk) > limit:  # split lazily, keeping the chunk's order (the packed forward sorts by layer)
                pending.extendleft(reversed(chunk.split(limit)))
                continue
            try:
                values = run_chunk(chunk)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                _free_memory()
                limit = (len(chunk) + 1) // 2
                if not warned:
                    logger.warning("Out of memory in a chunk of %d patches: retrying in chunks of at most %d (pass "
                                   "a smaller memory_budget to start there).", len(chunk), limit)
                    warned = True
                pending.appendleft(chunk)
                continue
            results[chunk.to(results.device)] = values
            done[chunk.cpu()] = True
            bar.update(len(chunk))


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_packed_chunk(model, clean_cache, metric: Callable, sweep: PatchSweep, kind: str, chunk: Tensor,
                      indices: Tensor, start_positions: Tensor, host_positions: Tensor, state: "_SweepState",
                      inputs: List[Tensor], keys: List[Tensor], values: List[Tensor], capture: bool) -> Tensor:
    """The metric of each variant in `chunk` (sorted by layer) from one packed forward (`hooklens.sweep_engine`),
    on static buffers, replayed as a CUDA graph when `capture` (`hooklens.sweep_graphs`)."""
    run, device = state.run, state.positions.device
    batch, seq_len = run.tokens.shape

    def clean_of(layer: int) -> Tensor:
        name = get_act_name(sweep.activation_name, layer)
        return _clean_activation(clean_cache, name, state.act_shape, batch, device)

    plan = plan_chunk(model, indices[:, 0], start_positions[chunk], indices, sweep, kind, clean_of, state.act_shape,
                      batch, seq_len, host_positions, run.attention_mask, device)
    resid = run_packed(model, plan, kind, inputs, keys, values, capture, forward=packed_forward)  # [k, d]
    n = len(chunk)
    computed = model.logits_from_resid(resid).to(run.logits.dtype)  # [k, v]
    # The metric sees [variants, b, p, v] logits, NaN where it does not read. On CPU a NaN buffer for the whole
    # chunk is hundreds of MB of fresh pages per sweep (~0.2 s of a 1.5 s IOI resid_pre sweep): instead one buffer
    # of METRIC_BUFFER_BYTES is NaN-filled once per sweep and reused, the metric running on that many variants
    # per call. On CUDA the caching allocator reuses memory and each call is launches: the whole chunk per call.
    variant_bytes = max(1, run.logits.numel() * run.logits.element_size())
    per_call = n if device.type == "cuda" else max(1, min(n, METRIC_BUFFER_BYTES // variant_bytes))
    if state.logits_buffer is None or state.logits_buffer.shape[0] < per_call:
        state.logits_buffer = torch.full((per_call,) + tuple(run.logits.shape), float("nan"),
                                         dtype=run.logits.dtype, device=device)
    flat_per_variant = batch * seq_len  # rows of one variant in the [variants * b * p, v] view of the logits
    values = []
    for lo in range(0, n, per_call):  # per buffer-full of variants (a fixed number per chunk), not per variant
        hi = min(n, lo + per_call)
        logits = state.logits_buffer[:hi - lo]  # [m, b, p, v]; NaN except at the metric's positions
        # The corrupted logits where a variant's patch starts after a metric position (nothing recomputed there),
        # the packed forward's everywhere else it read.
        logits[:, :, state.positions] = run.logits[:, state.positions].unsqueeze(0)
        first, end = plan.out_variant_bounds[lo], plan.out_variant_bounds[hi]
        if end > first:
            logits.view(-1, logits.shape[-1]).index_copy_(
                0, plan.out_logit_index[first:end] - lo * flat_per_variant, computed[first:end])
        version = state.logits_buffer._version
        values.append(apply_metric(metric, logits, state.metric_state, variants_per_call=hi - lo))
        if state.logits_buffer._version != version:  # the metric wrote into its logits: restore the NaNs
            state.logits_buffer.fill_(float("nan"))
    return torch.cat(values).to(torch.float32)


@dataclass
class _SweepState:
    """What the chunks of one sweep share: the corrupted run, the metric's positions, the patched activation's
    position axis and shape, one NaN-filled logits buffer (so a sweep does not allocate and NaN-fill
    [variants, b, p, vocab] per chunk), and whether vmap could run the metric."""

    run: _CorruptedRun
    positions: Tensor  # [k] on the model's device
    pos_axis: int
    act_shape: Tuple[int, ...]
    logits_buffer: Optional[Tensor] = None
    metric_state: dict = field(default_factory=dict)


def _run_chunk(model, clean_cache, metric: Callable, sweep: PatchSweep, chunk: Tensor, start: int,
               state: _SweepState) -> Tensor:
    """The metric of each variant in `chunk` (one layer; every patch starts at or after position `start`): [n]."""
    run, device = state.run, state.positions.device
    layer, n = int(sweep.indices[chunk[0], 0]), len(chunk)
    batch = run.tokens.shape[0]
    name = get_act_name(sweep.activation_name, layer)
    clean = _clean_activation(clean_cache, name, state.act_shape, batch, device)  # [b, *act]
    patch = _patch_hook(sweep, chunk, clean, state.pos_axis, start, batch)
    resid = _run_variants(model, run, layer, start, n, name, patch)  # [n*b, suffix, d]
    if state.logits_buffer is None or state.logits_buffer.shape[0] < n:
        state.logits_buffer = torch.full((n,) + tuple(run.logits.shape), float("nan"), dtype=run.logits.dtype,
                                         device=device)
    # Every chunk rewrites the metric's positions of the shared buffer and leaves the others NaN.
    logits = _assemble_logits(model, resid, run.logits, state.positions, start, state.logits_buffer[:n])
    version = state.logits_buffer._version
    values = apply_metric(metric, logits, state.metric_state, variants_per_call=n).to(torch.float32)
    if state.logits_buffer._version != version:  # the metric wrote into its logits: restore the NaNs
        state.logits_buffer.fill_(float("nan"))
    return values


def _warn_if_hooked(model) -> bool:
    """Whether hooks are attached to the model (then each variant runs alone, from position 0)."""
    hooked = sorted(name for name, point in model.hook_dict.items() if point.has_hooks())
    if hooked:
        logger.warning(
            "Hooks are attached at %s: patching one variant per forward from position 0, so they see [batch, pos, "
            "...] as in TransformerLens (slower); model.reset_hooks() first for the batched sweep.", hooked[:4]
        )
    return bool(hooked)


def _run_corrupted(model, corrupted_tokens: Tensor, patched_name: str) -> _CorruptedRun:
    """One run of the corrupted prompt, caching what every chunk starts from."""
    n_layers = model.cfg.n_layers
    # Each run starts from a block's *input* (before its hook_resid_pre, whose hooks the block applies itself).
    wanted = ["hook_embed", "hook_pos_embed", patched_name]
    wanted += [f"blocks.{l}.hook_resid_post" for l in range(n_layers - 1)]
    wanted += [get_act_name(k, l) for l in range(n_layers) for k in ("k", "v")]
    logits, activations = model.run_with_cache(corrupted_tokens, names_filter=wanted, return_cache_object=False)
    return _CorruptedRun(corrupted_tokens, logits, activations, model.padding_attention_mask(corrupted_tokens))


def _chunks(layers: Tensor, start_positions: Tensor, chunk_size: int) -> List[Tensor]:
    """Variant indices grouped by layer, then by start position (similar starts share a chunk), `chunk_size` each."""
    chunks: List[Tensor] = []
    for layer in layers.unique().tolist():
        members = torch.nonzero(layers == layer).flatten()
        members = members[start_positions[members].argsort(stable=True)]
        chunks.extend(members.split(chunk_size))
    return chunks


def _patch_hook(sweep: PatchSweep, chunk: Tensor, clean: Tensor, pos_axis: int, start: int, batch: int) -> Callable:
    """The hook patching every variant of `chunk` at once, on activations of the positions from `start` on."""
    if sweep.patch_setter is not None:
        return _setter_hook(sweep.patch_setter, sweep.indices[chunk], clean, batch)
    from hooklens.ops.patching import masked_patch  # lazy: hooklens.ops loads torch._dynamo (and Triton)

    suffix = clean.shape[pos_axis + 1] - start
    masks = sweep.build_masks(sweep.indices[chunk], tuple(clean.shape[1:])).to(clean.device)  # [n, *act]
    masks = masks.narrow(pos_axis + 1, start, suffix)  # suffix positions only
    clean_suffix = clean.narrow(pos_axis + 1, start, suffix)  # [b, *suffix act]

    def patch(activation: Tensor, hook) -> Tensor:
        # activation: [n*b, *suffix act]; variant v owns rows v*b .. (v+1)*b - 1.
        # In the activation's dtype: under autocast the clean run's may differ from it.
        return masked_patch(activation, clean_suffix.to(activation.dtype), masks)

    return patch


def _run_variants(model, run: _CorruptedRun, layer: int, start: int, n: int, name: str, patch: Callable) -> Tensor:
    """The final residual stream `[n*b, p - start, d]` of `n` variants run from block `layer` and position `start`
    (earlier positions come from the corrupted keys and values), with `patch` on the hook point `name`."""
    resid = _repeat_variants(_block_input(run.activations, layer)[:, start:], n)  # [n*b, suffix, d]
    mask = _repeat_variants(run.attention_mask, n) if run.attention_mask is not None else None  # [n*b, p]
    kv_cache = _prefix_kv_cache(model, run.activations, layer, start, n) if start > 0 else None
    with model.hooks(fwd_hooks=[(name, patch)]):
        for index in range(layer, model.cfg.n_layers):
            entry = kv_cache[index - layer] if kv_cache is not None else None
            resid = model.blocks[index](resid, past_kv_cache_entry=entry, attention_mask=mask)
    return resid


def _repeat_variants(t: Tensor, n: int) -> Tensor:
    """[b, ...] -> [n*b, ...]: variant v owns rows v*b .. (v+1)*b - 1."""
    return t.unsqueeze(0).expand(n, *t.shape).reshape(n * t.shape[0], *t.shape[1:])


def _block_input(corrupted: Dict[str, Tensor], layer: int) -> Tensor:
    """What block `layer` receives in the corrupted run: the previous block's output, or the embeddings' sum."""
    if layer == 0:
        return corrupted["hook_embed"] + corrupted["hook_pos_embed"]
    return corrupted[f"blocks.{layer - 1}.hook_resid_post"]


def _clean_activation(clean_cache, name: str, act_shape: Tuple[int, ...], batch: int, device) -> Tensor:
    """The clean activation at `name`, checked against the corrupted run's shape: `[batch, *act_shape]` (a single
    clean prompt is used for every corrupted one, as TransformerLens broadcasts it)."""
    if name not in clean_cache:
        raise KeyError(f"The clean cache has no {name!r}, which this sweep patches; cache it (run_with_cache without "
                       "a names_filter, or one that includes it).")
    clean = clean_cache[name]
    if tuple(clean.shape[1:]) != act_shape or clean.shape[0] not in (1, batch):
        raise ValueError(
            f"clean_cache[{name!r}] has shape {tuple(clean.shape)}, but the corrupted run's has "
            f"{(batch,) + act_shape}: clean and corrupted prompts need the same number of tokens (and a cache from "
            "this model, made without remove_batch_dim)."
        )
    return clean.to(device).expand((batch,) + act_shape)


def _setter_hook(setter: Callable, indices: Tensor, clean: Tensor, batch: int) -> Callable:
    """A hook applying a user's TL-style setter to each variant's [b, ...] slice, with TL's arguments."""
    rows = indices.tolist()  # index lists, as TL passes them; the setter is Python, called once per variant

    def hook(activation: Tensor, hook) -> Tensor:
        patched = activation.clone()  # setters write in place; the input may share memory with cached tensors
        for v, index in enumerate(rows):
            part = patched[v * batch:(v + 1) * batch]
            out = setter(part, index, clean)
            if out is not None and out.data_ptr() != part.data_ptr():
                part.copy_(out)
        return patched

    return hook


def _prefix_kv_cache(model, corrupted: Dict[str, Tensor], layer: int, start: int,
                     n: int) -> List[HookedTransformerKeyValueCacheEntry]:
    """Frozen per-layer caches holding the corrupted keys/values of positions < start, repeated per variant."""
    entries = []
    for index in range(layer, model.cfg.n_layers):
        k = corrupted[get_act_name("k", index)][:, :start]  # [b, start, h, dh]
        v = corrupted[get_act_name("v", index)][:, :start]
        entries.append(HookedTransformerKeyValueCacheEntry(_repeat_variants(k, n), _repeat_variants(v, n),
                                                           frozen=True))
    return entries


def _assemble_logits(model, resid: Tensor, corrupted_logits: Tensor, positions: Tensor, start: int,
                     out: Tensor) -> Tensor:
    """Writes the [n, b, p, v] logits at the metric's positions into `out` (corrupted values before `start`,
    which patches cannot change; computed after) and returns it; `out` is NaN where the metric does not read."""
    n, batch = out.shape[:2]
    before = positions[positions < start]
    after = positions[positions >= start]
    if len(before):
        out[:, :, before] = corrupted_logits[:, before].unsqueeze(0)
    if len(after):
        final = resid[:, after - start]  # [n*b, |after|, d]
        out[:, :, after] = model.logits_from_resid(final).view(n, batch, len(after), -1)
    return out
