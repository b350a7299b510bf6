"""Gradient-based attribution: attribution patching and integrated gradients over MLP neurons.

* `attribution_patching` (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"): the
  first-order estimate of every activation patch from two forward passes and one backward pass. For an activation
  `a` (e.g. `blocks.3.hook_resid_pre`) and a patch that copies `a` at some index from the clean run into the
  corrupted run,

      metric(patched) - metric(corrupted)  ~=  sum_{batch, features} (a_clean - a_corrupted) * d metric / d a

  with the gradient taken on the corrupted run. `exact_top_entries` re-runs the largest estimates as exact patches
  on the batched engine (`hooklens.sweeps`) to check them.
* `neuron_integrated_gradients` (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"): integrated
  gradients of a target token's probability with respect to every MLP neuron (`blocks.{l}.mlp.hook_post`) at one
  position, from a zero baseline, with the integration steps stacked on the batch dimension.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from hooklens.activation_layout import ActivationLayout, layout_of
from hooklens.errors import InvalidInputError
from hooklens.sweeps import check_metric, check_tokens, index_sweep, logit_positions, metric_value, run_sweep
from hooklens.utils import get_act_name

RESID_LIKE_DEFAULT = ("resid_pre", "attn_out", "mlp_out", "z")


def _token_pair(clean_tokens: Tensor, corrupted_tokens: Tensor) -> Tuple[Tensor, Tensor]:
    """Both prompts checked (`hooklens.sweeps.check_tokens`) and of the same shape."""
    clean_tokens = check_tokens(clean_tokens, "clean_tokens")
    corrupted_tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens "
                         f"{tuple(corrupted_tokens.shape)} must have the same shape.")
    return clean_tokens, corrupted_tokens


def _differentiable_value(value) -> Tensor:
    """The attribution metric's value, which must be a scalar tensor carrying a gradient back to the logits."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"The metric must return a scalar, got shape {tuple(value.shape)}.")
    value = metric_value(value.reshape(()) if isinstance(value, Tensor) else value, differentiable=True)
    if not value.requires_grad:
        raise InvalidInputError(
            "The metric's value does not depend differentiably on the logits (it does not require grad): attribution "
            "patching needs d metric / d logits. Compute it with differentiable torch ops, e.g. a logit or log-prob "
            "difference; .item(), .detach(), argmax, comparisons and torch.tensor(...) cut the gradient.")
    return value


def _logits_at(model, resid: Tensor, metric_positions: Optional[Sequence[int]]) -> Tensor:
    """Logits from the final residual stream [b, p, d]; only at `metric_positions` (NaN elsewhere) when given."""
    if metric_positions is None:
        return model.logits_from_resid(resid)
    positions = logit_positions(metric_positions, resid.shape[1]).to(resid.device)
    part = model.logits_from_resid(resid[:, positions])  # [b, |positions|, v]
    logits = torch.full(resid.shape[:2] + part.shape[-1:], float("nan"), dtype=part.dtype, device=part.device)
    return logits.index_copy(1, positions, part)


def _check_names(activation_names) -> Tuple[str, ...]:
    """`get_act_name` short names as a tuple (one name may be given as a plain string); none is an error."""
    names = (activation_names,) if isinstance(activation_names, str) else tuple(activation_names)
    if not names or not all(isinstance(name, str) for name in names):
        raise InvalidInputError(f"activation_names must be a non-empty list of activation names, e.g. "
                                f"['resid_pre', 'z'], got {activation_names!r}.")
    return names


def _reduce(layout: ActivationLayout, product: Tensor) -> Tensor:
    """Sum (clean - corrupted) * grad [b, *act] over the batch and the feature axes, keeping the site axes (the
    activation's layout): resid-like [b, p, d] -> [p]; per-head [b, p, h, dh] -> [p, h]; attention patterns /
    scores [b, h, q, k] keep every entry -> [h, q, k]."""
    return product.sum(dim=(layout.batch,) + layout.feature_axes())


def attribution_patching(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Callable[[Tensor], Tensor],
    activation_names: Sequence[str] = RESID_LIKE_DEFAULT,
    metric_positions: Optional[Sequence[int]] = None,
) -> Dict[str, Tensor]:
    """Linear estimates of `metric(patched) - metric(corrupted)` for every patch, per activation name.

    `metric(logits [b, p, d_vocab]) -> scalar` must be differentiable. `activation_names` are `get_act_name`
    short names. Each estimate is the change from copying the clean activation into the corrupted run at that
    index (in every batch row at once, as `hooklens.patching` does), to first order:
    `sum over batch and features of (clean_act - corrupted_act) * d metric / d act` on the corrupted run.

    Returns `{name: tensor}` with shapes, as the matching `hooklens.patching` function indexes them:
    `[n_layers, pos]` for residual-like activations (`resid_pre/mid/post`, `attn_out`, `mlp_out`, ...; the
    whole position vector is patched), `[n_layers, pos, n_heads]` for per-head vectors (`z`, `q`, `k`, `v`,
    `result`), `[n_layers, n_heads, dest, src]` for `pattern` / `attn_scores`. Positions where the metric reads
    no logit (with `metric_positions`) are not computed, so only logits at `metric_positions` are formed.

    Cost: one forward pass without gradients (clean) and one forward + backward (corrupted). The gradient is taken
    with `torch.autograd.grad` on the hooked activations, so the model's parameter `.grad`s are left untouched.

    Errors: tokens that are not `[batch, pos]` integer ids, out-of-range `metric_positions`, and (checked on the
    clean run's logits, before the backward pass) a metric that returns no tensor or reads logits outside
    `metric_positions` raise; so does a metric whose value carries no gradient (e.g. through `.item()`).
    """
    clean_tokens, corrupted_tokens = _token_pair(clean_tokens, corrupted_tokens)
    activation_names = _check_names(activation_names)
    positions = logit_positions(metric_positions, clean_tokens.shape[1]) if metric_positions is not None else None
    device = model.W_E.device
    n_layers = model.cfg.n_layers
    hook_names = {(short, l): get_act_name(short, l) for short in activation_names for l in range(n_layers)}
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens.to(device),
                                                         names_filter=list(hook_names.values()),
                                                         return_cache_object=False)
        # Before the backward pass: the metric returns a tensor and reads only metric_positions (the rest are NaN).
        check_metric(metric, clean_logits, positions, differentiable=True)
    captured: Dict[str, Tensor] = {}

    def capture(act: Tensor, hook) -> Optional[Tensor]:
        if not act.requires_grad:  # e.g. frozen parameters: start the graph here (nothing upstream to cut)
            act = act.detach().requires_grad_(True)
            captured[hook.name] = act
            return act
        captured[hook.name] = act
        return None

    with torch.enable_grad():
        with model.hooks(fwd_hooks=[(name, capture) for name in hook_names.values()]):
            resid = model(corrupted_tokens.to(device), stop_at_layer=n_layers)
        value = _differentiable_value(metric(_logits_at(model, resid, metric_positions)))
        names = list(hook_names.values())
        grads = torch.autograd.grad(value, [captured[n] for n in names], allow_unused=True)
    grad_of = dict(zip(names, grads))
    out: Dict[str, Tensor] = {}
    for short in activation_names:
        per_layer = []
        for l in range(n_layers):
            name = hook_names[(short, l)]
            layout = layout_of(name, model.cfg)
            corrupted_act = captured[name].detach()
            grad = grad_of[name]
            if grad is None:  # the metric does not depend on this activation
                grad = torch.zeros_like(corrupted_act)
            delta = clean_cache[name] - corrupted_act
            if layout.key_pos is not None:  # masked scores are -inf in both runs: no difference there, not NaN
                delta = delta.nan_to_num(nan=0.0)
            per_layer.append(_reduce(layout, delta * grad))
        out[short] = torch.stack(per_layer)
    return out


def exact_top_entries(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Callable[[Tensor], Tensor],
    attributions: Dict[str, Tensor],
    k: int = 10,
    metric_positions: Optional[Sequence[int]] = None,
    memory_budget: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, Tuple[Tensor, Tensor, Tensor]]:
    """Check the `k` largest (by absolute value) attribution-patching estimates of each activation with exact
    patches (`hooklens.sweeps.run_sweep`, the engine of `hooklens.patching`).

    `attributions` is `attribution_patching`'s output. Returns `{name: (indices [k, n_axes], estimate [k],
    exact [k])}`, where `indices` index `attributions[name]` (column 0 is the layer), and `exact` is
    `metric(patched) - metric(corrupted)` for the same patch, so `estimate` and `exact` are directly comparable.

    Recipe for a full check instead: `hooklens.patching.get_act_patch_resid_pre(model, corrupted_tokens,
    clean_cache, metric) - metric(model(corrupted_tokens))` is the exact counterpart of
    `attribution_patching(...)["resid_pre"]` (likewise `get_act_patch_attn_head_out_by_pos` for `"z"`).

    An exception raised while a name's patches run keeps its type and carries that sweep's `partial_result`
    ([k] metric values, not yet minus the corrupted run's; NaN where not done) and `done` (see `hooklens.sweeps`).
    """
    clean_tokens, corrupted_tokens = _token_pair(clean_tokens, corrupted_tokens)
    device = model.W_E.device
    n_layers = model.cfg.n_layers
    names = [get_act_name(short, l) for short in attributions for l in range(n_layers)]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens.to(device), names_filter=names, return_cache_object=False)
        base = metric(_logits_at(model, model(corrupted_tokens.to(device), stop_at_layer=n_layers), metric_positions))
    out = {}
    for short, attr in attributions.items():
        flat = attr.reshape(-1)
        top = flat.abs().nan_to_num(-1.0).topk(min(k, flat.numel())).indices
        indices = torch.stack(torch.unravel_index(top.cpu(), attr.shape), dim=1).long()  # [k, attr.dim()]
        # attributions index [layer, *site axes] (see _reduce): patch each entry at those axes
        site_axes = layout_of(get_act_name(short, 0), model.cfg).site_axes(batch_dim=False)
        sweep = index_sweep(model, short, indices, site_axes)
        exact = run_sweep(model, corrupted_tokens, clean_cache, metric, sweep, metric_positions, memory_budget,
                          progress)
        out[short] = (indices, flat[top].detach(), exact - base)
    return out


# -- integrated gradients over MLP neurons -----------------------------------------------------------------------
def _ig_arguments(model, layer, position, steps, seq_len: int) -> Tuple[List[int], int, int]:
    """Layers (None: all) and position, negative ones counted from the end; out of range, or steps < 1, raise."""
    n_layers = model.cfg.n_layers
    if layer is None:
        requested = list(range(n_layers))
    elif isinstance(layer, Tensor):
        requested = layer.reshape(-1).tolist()
    else:
        requested = list(layer) if isinstance(layer, (list, tuple, range)) else [layer]
    try:
        requested = [operator.index(l) for l in requested]
        position, steps = operator.index(position), operator.index(steps)
    except TypeError:
        raise TypeError(f"layer must be None, an int or a list of ints, position and steps ints; got layer={layer!r}, "
                        f"position={position!r}, steps={steps!r}.") from None
    if not requested:
        raise InvalidInputError("layer is empty: give the layers to attribute (an int or a list), or None for all.")
    outside = [l for l in requested if not -n_layers <= l < n_layers]
    if outside:
        raise IndexError(f"layer {outside} is out of range for a model of {n_layers} layers (valid: {-n_layers}.."
                         f"{n_layers - 1}, negative ones counting from the end).")
    if not -seq_len <= position < seq_len:
        raise IndexError(f"position {position} is out of range for prompts of {seq_len} tokens (valid: {-seq_len}.."
                         f"{seq_len - 1}, negative ones counting from the end).")
    if steps < 1:
        raise InvalidInputError(f"steps must be >= 1 (the number of integration steps, e.g. 20), got {steps}.")
    return [l % n_layers for l in requested], position % seq_len, steps


def _ig_target(model, target_token, batch: int, device) -> Tensor:
    """The target id of each batch row, `[batch]` int64; non-integer or out-of-vocabulary ids raise."""
    target = torch.as_tensor(target_token, device=device)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target_token must be an int token id (or one per batch row), got {target_token!r}.")
    target = target.long().reshape(-1)
    target = target.expand(batch) if target.numel() == 1 else target
    if target.shape != (batch,):
        raise ValueError(f"target_token must be an int or one id per batch row ({batch}), got {tuple(target.shape)}")
    vocab = model.cfg.d_vocab_out
    if bool(((target < 0) | (target >= vocab)).any()):  # once per call, on the user's ids
        raise IndexError(f"target_token {target.tolist()} is out of range for a vocabulary of {vocab} tokens.")
    return target


def _target_prob(model, resid: Tensor, position: int, target: Tensor) -> Tensor:
    """Probability of `target` [rows] at `position` from the final residual stream [rows, p, d]: [rows]."""
    logits = model.logits_from_resid(resid[:, position, None])[:, 0]  # [rows, 1, d] -> [rows, v]
    return logits.softmax(-1).gather(-1, target[:, None])[:, 0]


def neuron_integrated_gradients(
    model,
    tokens: Tensor,
    target_token: Union[int, Tensor],
    layer: Union[None, int, Sequence[int]] = None,
    steps: int = 20,
    position: int = -1,
    batch_alphas: bool = True,
) -> Tensor:
    """Integrated gradients of `P(target_token)` at `position` w.r.t. each MLP neuron's activation there.

    For layer `l`, with `x = blocks.{l}.mlp.hook_post[:, position]` ([b, d_mlp]) on `tokens` and `F(x')` the
    target's probability at `position` when that activation is replaced by `x'` (other positions and layers
    unchanged), the attribution of neuron `i` is the right Riemann sum, with `alpha_k = k / steps`, k = 1..steps,

        IG_i = x_i * (1 / steps) * sum_k dF / dx'_i (alpha_k * x),

    averaged over the batch rows of `tokens` (one prompt: `[p]` or `[1, p]`). The baseline is zero activations, so
    by completeness `IG.sum(-1)[l] ~= F(x) - F(0)` (exact as `steps -> oo`; the right Riemann sum's error is
    O(1 / steps)).

    `target_token`: an int, or one id per batch row. `layer`: None (every layer), an int or a list. Returns
    `[n_layers, d_mlp]`, zero in rows for layers not requested. With `batch_alphas=True` the `steps` scaled copies
    are stacked on the batch dimension: one forward + backward per layer, starting at that layer from the cached
    residual stream (earlier layers cannot change); `batch_alphas=False` does one forward + backward per step
    (less memory, same numbers).

    `layer` and `position` out of range (they do not wrap around), `steps < 1`, target ids outside the vocabulary
    and tokens that are not `[batch, pos]` integer ids raise before any forward pass.
    """
    tokens = check_tokens(tokens)
    device = model.W_E.device
    tokens = tokens.to(device)
    batch, seq_len = tokens.shape
    n_layers = model.cfg.n_layers
    layers, position, steps = _ig_arguments(model, layer, position, steps, seq_len)
    target = _ig_target(model, target_token, batch, device)

    cached = [get_act_name("post", l) for l in layers] + [get_act_name("resid_pre", l) for l in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=cached, return_cache_object=False)
    alphas = torch.arange(1, steps + 1, device=device, dtype=model.cfg.dtype) / steps  # [steps]
    result = torch.zeros(n_layers, model.cfg.d_mlp, device=device, dtype=model.cfg.dtype)
    groups = [alphas] if batch_alphas else [alphas[i:i + 1] for i in range(steps)]
    for l in layers:
        x = cache[get_act_name("post", l)][:, position]  # [b, m]
        resid_pre = cache[f"blocks.{l}.hook_resid_pre"]  # [b, p, d]
        grad_sum = torch.zeros_like(x)
        for group in groups:
            n = len(group)
            scaled = (group[:, None, None] * x[None]).reshape(n * batch, -1).detach().requires_grad_(True)

            def replace(act: Tensor, hook) -> Tensor:  # act: [n*b, p, m]
                return torch.cat([act[:, :position], scaled[:, None], act[:, position + 1:]], dim=1)

            with torch.enable_grad():
                resid = resid_pre.unsqueeze(0).expand(n, -1, -1, -1).reshape(n * batch, seq_len, -1)
                with model.hooks(fwd_hooks=[(get_act_name("post", l), replace)]):
                    resid = model(resid, start_at_layer=l, stop_at_layer=n_layers)
                prob = _target_prob(model, resid, position, target.repeat(n))  # [n*b]
                (grad,) = torch.autograd.grad(prob.sum(), [scaled])
            grad_sum += grad.view(n, batch, -1).sum(0)
        result[l] = (x * grad_sum / steps).mean(0)
    return result
