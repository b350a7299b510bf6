"""Path patching (Wang et al. 2022, "Interpretability in the Wild"; the TransformerLens-community recipe as in
ARENA's IOI notebook), with the corrupted run as the base and the clean run as the source of the patch.

`path_patch(model, clean_tokens, corrupted_tokens, sender_heads, receiver_hooks, metric)` measures the effect of
the senders on the metric *only through* the receivers:

1. cache every head's output `z` (`blocks.{l}.attn.hook_z`, every position) on the clean and the corrupted run;
2. run the corrupted tokens with every head's `z` replaced: the senders' by their clean values, every other head's
   by its corrupted value (frozen, so the senders' effect cannot travel through other heads; MLPs and LayerNorm
   scales are recomputed, as in the community recipe), and record each receiver activation;
3. run the corrupted tokens again with only the receivers' activations replaced by the values recorded in step 2
   (for a `(hook_name, head)` receiver only that head's slice; `head=None` replaces the whole activation), and
   return `metric(logits)`.

Receivers are any hook names, e.g. `blocks.3.attn.hook_q` / `hook_k` / `hook_v` (head axis 2, `[b, p, h, dh]`),
`blocks.3.hook_q_input` (needs `model.set_use_split_qkv_input(True)`), `blocks.3.hook_resid_pre` or
`blocks.{n_layers-1}.hook_resid_post` (head None), `blocks.3.attn.hook_pattern` (head axis 1); the head axis of
each comes from `hooklens.activation_layout`. A receiver at or
before the senders' layer is unaffected by them (its recorded value equals the corrupted one).

`path_patch_senders` runs the common sweep "each head alone as the sender" with all variants stacked on the batch
dimension: `[n_layers, n_heads]` in 3 batched forward passes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hooklens import sharding
from hooklens.activation_layout import layout_of
from hooklens.sweeps import apply_metric, check_tokens
from hooklens.utils import get_act_name

Receiver = Tuple[str, Optional[int]]


def _check_senders(model, senders: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """(layer, head) pairs with negative layers counted from the end; anything out of range is an error."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    checked = []
    for sender in senders:
        layer, head = sender
        if not (-n_layers <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"Sender head {sender!r} is out of range: the model has {n_layers} layers and "
                             f"{n_heads} heads.")
        checked.append((layer % n_layers, head))
    return checked


def _select_head(model, x: Tensor, hook_name: str, head: Optional[int]) -> Tensor:
    """The receiver's part of activation `x`: head `head` along its layout's head axis, or all of it."""
    return x if head is None else x.select(layout_of(hook_name, model.cfg).head, head)


def _z_caches(model, clean_tokens: Tensor, corrupted_tokens: Tensor) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    names = [get_act_name("z", l) for l in range(model.cfg.n_layers)]
    _, clean = model.run_with_cache(clean_tokens, names_filter=names, return_cache_object=False)
    _, corrupted = model.run_with_cache(corrupted_tokens, names_filter=names, return_cache_object=False)
    return clean, corrupted


def _check_inputs(model, clean_tokens, corrupted_tokens, receiver_hooks) -> Tuple[Tensor, Tensor]:
    clean_tokens = check_tokens(clean_tokens, "clean_tokens")
    corrupted_tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens "
                         f"{tuple(corrupted_tokens.shape)} must have the same shape.")
    if not receiver_hooks or isinstance(receiver_hooks, (str, tuple)):
        raise ValueError("receiver_hooks must be a list of (hook_name, head or None) pairs, e.g. "
                         f"[('blocks.1.attn.hook_v', 0)]; got {receiver_hooks!r}.")
    for receiver in receiver_hooks:
        if not (isinstance(receiver, (tuple, list)) and len(receiver) == 2 and isinstance(receiver[0], str)):
            raise ValueError(f"Each receiver is a (hook_name, head or None) pair, got {receiver!r}.")
        name, head = receiver
        model.get_hook_point(name)  # raises a helpful error for unknown names
        if head is not None and layout_of(name, model.cfg).head is None:
            raise ValueError(f"Receiver {receiver!r}: {name} has no head axis; use head None.")
        if head is not None and not 0 <= head < model.cfg.n_heads:
            raise ValueError(f"Receiver {receiver!r}: head {head} is out of range for {model.cfg.n_heads} heads.")
    device = model.W_E.device
    return clean_tokens.to(device), corrupted_tokens.to(device)


@torch.no_grad()
def path_patch(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    sender_heads: Sequence[Tuple[int, int]],
    receiver_hooks: Sequence[Receiver],
    metric: Callable[[Tensor], Tensor],
) -> Tensor:
    """Metric of the corrupted run after patching the path sender heads (clean) -> receivers; see module doc."""
    clean_tokens, corrupted_tokens = _check_inputs(model, clean_tokens, corrupted_tokens, receiver_hooks)
    clean_z, corrupted_z = _z_caches(model, clean_tokens, corrupted_tokens)
    senders: Dict[int, List[int]] = {}
    for layer, head in _check_senders(model, sender_heads):
        senders.setdefault(layer, []).append(head)

    def freeze(z: Tensor, hook) -> Tensor:
        name = hook.name
        out = corrupted_z[name].clone()
        for head in senders.get(hook.layer(), []):
            out[:, :, head] = clean_z[name][:, :, head]
        return out

    return metric(_frozen_then_patched_logits(model, corrupted_tokens, freeze, receiver_hooks))


@torch.no_grad()
def path_patch_senders(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    receiver_hooks: Sequence[Receiver],
    metric: Callable[[Tensor], Tensor],
    senders: Optional[Sequence[Tuple[int, int]]] = None,
    *,
    shard: Optional[Tuple[int, int]] = None,
    results_dir=None,
    unit_size: Optional[int] = None,
) -> Tensor:
    """`path_patch` with each head alone as the sender, batched: `[n_layers, n_heads]` (heads not in `senders`,
    when given, are NaN). Equal to looping `path_patch(..., [(l, h)], receiver_hooks, metric)` over heads; all
    variants share one batch (memory grows with `n_layers * n_heads * batch`).

    `shard=(i, n)` / `results_dir=` / `unit_size=`: run by work units of `unit_size` senders (one batch each, so
    this also bounds the memory), split over processes / job-array tasks and kept in
    `results_dir/path_patch_senders` (resumable); under an initialized `torch.distributed` process group every rank
    returns the whole result (`hooklens.sharding`)."""
    clean_tokens, corrupted_tokens = _check_inputs(model, clean_tokens, corrupted_tokens, receiver_hooks)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if senders is None:
        senders = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    senders = _check_senders(model, senders)
    clean_z, corrupted_z = _z_caches(model, clean_tokens, corrupted_tokens)
    if sharding.wants_units(shard, results_dir) or unit_size is not None:
        values = _sender_values_by_units(model, clean_z, corrupted_z, corrupted_tokens, clean_tokens, receiver_hooks,
                                         metric, senders, shard, results_dir, unit_size)
    else:
        values = _sender_values(model, clean_z, corrupted_z, corrupted_tokens, receiver_hooks, metric, senders)
    out = torch.full((n_layers, n_heads), float("nan"), dtype=values.dtype, device=values.device)
    where = torch.tensor(senders, dtype=torch.long, device=values.device).view(-1, 2)  # [n, 2] (layer, head)
    out[where[:, 0], where[:, 1]] = values
    return out


def _sender_values(model, clean_z, corrupted_z, corrupted_tokens: Tensor, receiver_hooks: Sequence[Receiver],
                   metric: Callable[[Tensor], Tensor], senders: List[Tuple[int, int]]) -> Tensor:
    """[len(senders)]: the metric with each sender alone, all senders in one batch."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n, batch = len(senders), corrupted_tokens.shape[0]
    device = corrupted_tokens.device
    # mask[v, l, h]: variant v takes head (l, h) from the clean run
    where = torch.tensor(senders, dtype=torch.long, device=device).view(-1, 2)  # [n, 2] (layer, head)
    mask = torch.zeros(n, n_layers, n_heads, dtype=torch.bool, device=device)
    mask[torch.arange(n, device=device), where[:, 0], where[:, 1]] = True
    tokens = corrupted_tokens.repeat(n, 1)  # variant v owns rows v*b .. (v+1)*b - 1

    def freeze(z: Tensor, hook) -> Tensor:
        name, layer = hook.name, hook.layer()
        m = mask[:, layer][:, None, None, :, None]  # [n, 1(b), 1(p), h, 1(dh)]
        out = torch.where(m, clean_z[name][None], corrupted_z[name][None])  # [n, b, p, h, dh]
        return out.reshape(z.shape)

    logits = _frozen_then_patched_logits(model, tokens, freeze, receiver_hooks)
    logits = logits.view((n, batch) + logits.shape[1:])
    return apply_metric(metric, logits)


def _sender_values_by_units(model, clean_z, corrupted_z, corrupted_tokens: Tensor, clean_tokens: Tensor,
                            receiver_hooks: Sequence[Receiver], metric, senders: List[Tuple[int, int]], shard,
                            results_dir, unit_size: Optional[int]) -> Tensor:
    """`_sender_values` by `hooklens.sharding` work units of `unit_size` senders."""
    unit_size = int(unit_size) if unit_size is not None else sharding.default_unit_size(len(senders))

    def fingerprint():
        return {"model": sharding.model_fingerprint(model), "sweep": {
            "method": "path_patch_senders", "senders": sharding.digest([list(s) for s in senders]),
            "tokens": sharding.digest(clean_tokens.long(), corrupted_tokens.long()),
            "receivers": sharding.digest([[name, head] for name, head in receiver_hooks]),
            "metric": sharding.callable_name(metric), "n_variants": str(len(senders)),
            "unit_size": str(unit_size), "format": str(sharding.FORMAT)}}

    plan = sharding.plan_units(len(senders), fingerprint, unit_size=unit_size, shard=shard, results_dir=results_dir,
                               key="path_patch_senders")

    def compute(start: int, stop: int) -> Tensor:
        return _sender_values(model, clean_z, corrupted_z, corrupted_tokens, receiver_hooks, metric,
                              senders[start:stop])

    values, _ = sharding.run_units(compute, plan, corrupted_tokens.device, progress=False, stacklevel=5)
    return values


def _frozen_then_patched_logits(model, tokens: Tensor, freeze: Callable,
                                receiver_hooks: Sequence[Receiver]) -> Tensor:
    """The two runs of path patching. Run 1: every head's z set by `freeze` (senders clean, the rest corrupted);
    record the receivers. Run 2: a plain run on `tokens` with only the receivers replaced by those recordings."""
    recorded: Dict[Receiver, Tensor] = {}

    def record(key: Receiver):
        def hook(act: Tensor, hook) -> None:
            recorded[key] = _select_head(model, act, key[0], key[1]).clone()
        return hook

    fwd = [(get_act_name("z", l), freeze) for l in range(model.cfg.n_layers)]
    fwd += [(name, record((name, head))) for name, head in receiver_hooks]
    model.run_with_hooks(tokens, fwd_hooks=fwd, return_type=None)

    def patch(key: Receiver):
        def hook(act: Tensor, hook) -> Tensor:
            act = act.clone()
            _select_head(model, act, key[0], key[1]).copy_(recorded[key])
            return act
        return hook

    return model.run_with_hooks(tokens, fwd_hooks=[(name, patch((name, head))) for name, head in receiver_hooks])
