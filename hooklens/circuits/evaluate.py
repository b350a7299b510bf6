"""EAP-IG's `evaluate_graph` / `evaluate_baseline`, and `evaluate_graphs` for many circuits in one pass.

A circuit is evaluated as in EAP-IG (hannamw/EAP-IG, eap/evaluate.py): the graph is pruned, then every receiver
(a head's q, k or v input, an MLP's input, the logits' input) sees its in-flight input plus, for each *absent* edge
from an earlier sender, (replacement output - in-flight output) of that sender. EAP-IG does this with a hook per
receiver that adds an einsum over a `[batch, pos, n_forward, d_model]` difference tensor filled by further hooks.
Here the forward is written over the decomposition itself: a receiver's input is

    base + sum_s in_graph[s, r] * in_flight[s] + sum_s (1 - in_graph[s, r]) * replacement[s]

(base = positional embedding + earlier attention biases: the residual terms no edge carries), one
`[n_senders] x [n_receivers]` mask contraction per layer, for a stack of circuits at once (circuits on a leading
variant dim, chunked to a memory budget). Receivers of nodes that pruning removed are computed too; they have no
outgoing edges left, so nothing reads them (EAP-IG skips their hooks; the result is the same).

Metrics are EAP-IG's `metric(logits, clean_logits, input_lengths, labels)`. The logits are unembedded only at each
prompt's last token when the metric provably reads nothing else (see `positions_plan`).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooklens.circuits import interventions as iv

Metric = Callable[..., Tensor]
DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes of activations per chunk of circuits (or of edges, in exact)


# -- metrics --------------------------------------------------------------------------------------------------
def _gather_last(logits: Optional[Tensor], input_lengths: Tensor) -> Optional[Tensor]:
    """`[..., b, p, v]` -> `[..., b, 1, v]`, each prompt's logits at its last real token."""
    if logits is None:
        return None
    index = (input_lengths - 1).view(*([1] * (logits.dim() - 3)), -1, 1, 1)  # [..., b, 1, 1]
    index = index.expand(*logits.shape[:-2], 1, logits.shape[-1])
    return logits.gather(-2, index)


def _close(a, b) -> bool:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def positions_plan(metrics: Sequence[Metric], probes: Sequence[Tensor], clean_logits: Optional[Tensor],
                   input_lengths: Tensor, labels, metric_positions: Optional[str]) -> str:
    """'last' when every metric reads the logits only at `input_lengths - 1` (EAP-IG's metrics do), else 'all'.

    `metric_positions` 'last' / 'all' says so; None probes: each metric on full logits must equal the metric on
    the `[b, 1, v]` logits of the last tokens with `input_lengths` all 1, for each probe logits (e.g. the clean and
    the corrupted run's). A metric reading other positions, or ignoring `input_lengths` on prompts of unequal
    length, gives different numbers and gets full logits."""
    if metric_positions is not None:
        if metric_positions not in ("last", "all"):
            raise ValueError(f"metric_positions must be None (probe), 'last' or 'all', got {metric_positions!r}.")
        return metric_positions
    ones = torch.ones_like(input_lengths)
    compact_clean = _gather_last(clean_logits, input_lengths)
    for metric in metrics:
        for logits in probes:
            try:
                full = metric(logits, clean_logits, input_lengths, labels)
                compact = metric(_gather_last(logits, input_lengths), compact_clean, ones, labels)
            except Exception:  # a metric that cannot take [b, 1, v] logits reads more than the last token
                return "all"
            if not _close(full, compact):
                return "all"
    return "last"


def _metric_value(metric: Metric, logits: Tensor, input_lengths: Tensor, labels) -> Tensor:
    return torch.as_tensor(metric(logits, None, input_lengths, labels))


def columns_plan(metric: Metric, probes: Sequence[Tensor], input_lengths: Tensor, labels, metric_columns,
                 d_vocab: int) -> Optional[Tensor]:
    """The vocabulary columns `metric(logits, None, input_lengths, labels)` reads, as a sorted index tensor, or None
    for all of them. Logits are then computed only there (zeros elsewhere): logit_diff reads 2 of GPT-2's 50,257.

    `metric_columns` 'all' -> None; a sequence of token ids -> those (the caller vouches for them). None probes on
    each of `probes` (logits as the metric will get them): the candidates are the columns where the metric's
    gradient is nonzero plus the values of integer `labels`; they are kept only if the metric's value is unchanged
    (float32 tolerance) when every other column is replaced by zeros and by large random values. A metric that
    fails under autograd, reads more than an eighth of the vocabulary or changes under the test reads 'all'."""
    if metric_columns is not None:
        if isinstance(metric_columns, str):
            if metric_columns != "all":
                raise ValueError(f"metric_columns must be None (probe), 'all' or token ids, got {metric_columns!r}.")
            return None
        columns = torch.as_tensor(metric_columns).reshape(-1)
        if columns.dtype.is_floating_point or columns.dtype == torch.bool or not len(columns) or \
                int(columns.min()) < 0 or int(columns.max()) >= d_vocab:
            raise ValueError(f"metric_columns must be token ids in [0, {d_vocab}) (or None to probe, 'all'); got "
                             f"{metric_columns!r}.")
        return columns.to(torch.long).unique()
    if not probes:
        return None
    device = probes[0].device
    read = torch.zeros(d_vocab, dtype=torch.bool, device=device)
    if isinstance(labels, Tensor) and not labels.dtype.is_floating_point and labels.dtype != torch.bool:
        valid = labels[(labels >= 0) & (labels < d_vocab)]
        read[valid.to(device=device, dtype=torch.long)] = True
    hits = []
    try:
        # the probes may be inference tensors (callers run under inference_mode): differentiate a normal copy, and
        # update `read` (maybe an inference tensor) only back in the caller's mode
        with torch.inference_mode(False), torch.enable_grad():
            for logits in probes:
                x = logits.detach().clone().requires_grad_(True)
                out = _metric_value(metric, x, input_lengths, labels)
                if out.requires_grad:
                    (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
                    if grad is not None:
                        hits.append((grad != 0).reshape(-1, d_vocab).any(0))
    except Exception:  # a metric autograd cannot differentiate: no column plan
        return None
    for hit in hits:
        read |= hit
    columns = read.nonzero()[:, 0]
    if len(columns) > d_vocab // 8:
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for logits in probes:
            expected = _metric_value(metric, logits, input_lengths, labels)
            noise = torch.randn(logits.shape, generator=gen).to(device=device, dtype=logits.dtype)
            for filler in (torch.zeros_like(logits), noise * (10 * logits.abs().max() + 10)):
                filler[..., columns] = logits[..., columns]
                try:
                    if not _close(expected, _metric_value(metric, filler, input_lengths, labels)):
                        return None
                except Exception:
                    return None
    return columns


def width_plan(metric: Metric, probes: Sequence[Tensor], input_lengths: Tensor, labels, columns: Tensor) -> int:
    """How many leading vocabulary columns the metric needs to see when it reads only `columns` (see
    `columns_plan`): `max(columns) + 1` if the metric's value on each probe is unchanged when the logits are cut
    there (zeros elsewhere, as the engines give them), else the whole vocabulary. A metric that reads label columns
    copies whole vocabulary rows (e.g. `logits[range(b), input_lengths - 1]`); on CPU that copy costs more than
    the rest of a small model's edge, and label ids (names) sit well below GPT-2's 50,257."""
    d_vocab = probes[0].shape[-1] if probes else 0
    width = int(columns.max()) + 1 if len(columns) else 1
    if not probes or width >= d_vocab:
        return d_vocab
    with torch.inference_mode():
        for logits in probes:
            expected = _metric_value(metric, logits, input_lengths, labels)
            cut = torch.zeros_like(logits[..., :width])
            cut[..., columns] = logits[..., columns]
            try:
                if not _close(expected, _metric_value(metric, cut, input_lengths, labels)):
                    return d_vocab
            except Exception:  # e.g. a metric reading logits[..., -1] or checking the vocabulary size
                return d_vocab
    return width


def apply_metric(metric: Metric, logits: Tensor, clean_logits: Optional[Tensor], input_lengths: Tensor, labels,
                 state: Dict) -> Tensor:
    """`metric` on each variant's logits `[V, b, p, v]` -> `[V, k]` (k = b for per-example metrics, 1 for a scalar).

    One `torch.vmap` call over the variants when the metric allows; metrics vmap cannot run (`.item()`, branching on
    values, ...) are called once per variant instead (remembered in `state`)."""
    def one(variant_logits):
        return torch.as_tensor(metric(variant_logits, clean_logits, input_lengths, labels))

    if not state.get("loop", False):
        try:
            out = torch.vmap(one)(logits)
            return out.reshape(logits.shape[0], -1)
        except Exception:
            state["loop"] = True
    return torch.stack([one(v).reshape(-1) for v in logits.unbind(0)])


def _as_list(metrics) -> List[Metric]:
    return list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]


def _unwrap(results: List[Tensor]):
    return results[0] if len(results) == 1 else results


def _check_batch(clean, corrupted, clean_tokens: Tensor, corrupted_tokens: Tensor) -> None:
    if len(clean) != len(corrupted):
        raise ValueError(f"A batch has {len(clean)} clean but {len(corrupted)} corrupted prompts; pair them 1:1.")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"Clean tokens {tuple(clean_tokens.shape)} and corrupted tokens {tuple(corrupted_tokens.shape)} differ in "
            "shape; EAP-IG patches position by position, so each batch's clean and corrupted prompts must pad to the "
            "same number of tokens (give counterfactuals of the same token length)."
        )


def _logits(model, resid: Tensor, input_lengths: Tensor, positions: str) -> Tensor:
    """Final residual `[..., b, p, d]` -> logits `[..., b, p or 1, v]` (only the last tokens for 'last')."""
    if positions == "last":
        index = (input_lengths - 1).view(*([1] * (resid.dim() - 3)), -1, 1, 1)  # [..., b, 1, 1]
        resid = resid.gather(-2, index.expand(*resid.shape[:-2], 1, resid.shape[-1]))  # [..., b, 1, d]
    return model.unembed(model.ln_final(resid))


# -- the multi-circuit forward --------------------------------------------------------------------------------
def circuits_forward(model, cache_pos: Tensor, tokens_embed: Tensor, attention_mask: Tensor, replacement: Tensor,
                     in_graph: Tensor, input_lengths: Tensor, positions: str) -> Tensor:
    """Logits `[V, b, p or 1, v]` of V circuits on one batch.

    cache_pos: positional embedding `[b, p, d]`; tokens_embed: the `input` sender `[b, p, d]`; replacement:
    absent senders' outputs, broadcastable to `[b, p, n_forward, d]`; in_graph: `[V, n_forward, n_backward]` 0/1
    in the model's dtype (after pruning)."""
    cfg = model.cfg
    H = cfg.n_heads
    V = in_graph.shape[0]
    b, p, d = tokens_embed.shape
    n_f = iv.n_forward(cfg)
    absent = 1 - in_graph
    replacement = replacement.expand(b, p, n_f, d)
    out = tokens_embed.new_zeros(V, b, p, n_f, d)  # in-flight sender outputs of each circuit
    out[:, :, :, 0] = tokens_embed
    mask_rows = attention_mask.repeat(V, 1)  # [V*b, p]
    base = cache_pos

    def receiver_inputs(n_prev: int, receivers: slice) -> Tensor:
        # [V, b, p, n_receivers, d]: the in-graph senders' in-flight outputs plus the absent senders' replacements
        kept = torch.einsum("vbpsd,vsr->vbprd", out[:, :, :, :n_prev], in_graph[:, :n_prev, receivers])
        patched = torch.einsum("bpsd,vsr->vbprd", replacement[:, :, :n_prev], absent[:, :n_prev, receivers])
        return base[None, :, :, None] + kept + patched

    for layer, block in enumerate(model.blocks):
        attn = block.attn
        first = layer * (3 * H + 1)
        n_prev = iv.prev_index(cfg, layer, mlp=False)
        x = block.ln1(receiver_inputs(n_prev, slice(first, first + 3 * H)))  # [V, b, p, 3H, d]
        x = x.view(V * b, p, 3, H, d)  # receivers are ordered q heads, k heads, v heads
        q = torch.einsum("nphd,hde->nphe", x[:, :, 0], attn.W_Q) + attn.b_Q  # [V*b, p, H, dh]
        k = torch.einsum("nphd,hde->nphe", x[:, :, 1], attn.W_K) + attn.b_K
        v = torch.einsum("nphd,hde->nphe", x[:, :, 2], attn.W_V) + attn.b_V
        z = iv.attention(q, k, v, attn.attn_scale, mask_rows)  # [V*b, p, H, dh]
        result = torch.einsum("nphe,hed->nphd", z, attn.W_O)  # [V*b, p, H, d]
        out[:, :, :, n_prev:n_prev + H] = result.view(V, b, p, H, d)
        mlp_prev = iv.prev_index(cfg, layer, mlp=True)
        if not cfg.parallel_attn_mlp:
            base = base + attn.b_O
        mlp_in = receiver_inputs(mlp_prev, slice(first + 3 * H, first + 3 * H + 1))[:, :, :, 0]  # [V, b, p, d]
        if cfg.parallel_attn_mlp:
            base = base + attn.b_O
        out[:, :, :, n_prev + H] = block.mlp(block.ln2(mlp_in))
    final = receiver_inputs(n_f, slice(iv.n_backward(cfg) - 1, iv.n_backward(cfg)))[:, :, :, 0]  # [V, b, p, d]
    return _logits(model, final, input_lengths, positions)


def _chunk_size(model, b: int, p: int, positions: str, memory_budget: int) -> int:
    cfg = model.cfg
    n_f = iv.n_forward(cfg)
    elem = torch.finfo(cfg.dtype).bits // 8
    per_variant = b * p * (n_f + 8 * cfg.n_heads + 4 * cfg.d_mlp // cfg.d_model + 8) * cfg.d_model * elem
    per_variant += b * cfg.n_heads * p * p * elem * 2
    per_variant += b * (1 if positions == "last" else p) * cfg.d_vocab_out * elem * 2
    return max(1, int(memory_budget // per_variant))


def _prepare_graph(graph, model) -> Tensor:
    cfg = model.cfg
    if getattr(graph, "neurons_in_graph", None) is not None:
        raise ValueError("Neuron-level circuits (graph.neurons_in_graph) are not supported by hooklens.circuits yet; "
                         "evaluate an edge-level graph (Graph.from_model(model) without neuron_level).")
    if graph.in_graph.shape != (iv.n_forward(cfg), iv.n_backward(cfg)):
        raise ValueError(f"graph.in_graph has shape {tuple(graph.in_graph.shape)} but this model's graph is "
                         f"{(iv.n_forward(cfg), iv.n_backward(cfg))}; build it with Graph.from_model(model).")
    graph.prune()  # as EAP-IG: the circuit is cleaned up (in place) before it is evaluated
    return graph.in_graph.to(device=cfg.device, dtype=cfg.dtype)


def evaluate_graphs(model, graphs: Sequence, dataloader: Iterable, metrics, quiet: bool = False,
                    intervention: str = "patching", intervention_dataloader: Optional[Iterable] = None,
                    skip_clean: bool = True, metric_positions: Optional[str] = None,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> List:
    """`[evaluate_graph(model, g, ...) for g in graphs]`, computed with all circuits of a chunk stacked in one
    forward per batch (e.g. the 10 sizes + empty + full circuits of MIB's faithfulness curve). Each graph is pruned
    in place, as `evaluate_graph` does. `metric_positions`: see `positions_plan`."""
    iv.check_supported(model)
    iv.check_intervention(intervention, intervention_dataloader)
    metrics = _as_list(metrics)
    graphs = list(graphs)
    if not graphs:
        return []
    in_graph = torch.stack([_prepare_graph(g, model) for g in graphs])  # [G, n_forward, n_backward]
    means = None
    if "mean" in intervention:
        means = iv.compute_means(model, intervention_dataloader, per_position=intervention == "mean-positional")
    results: List[List[List[Tensor]]] = [[[] for _ in metrics] for _ in graphs]
    states = [{} for _ in metrics]
    batches = dataloader if quiet else tqdm(dataloader, desc="evaluate_graphs")
    with torch.inference_mode():
        for clean, corrupted, labels in batches:
            clean_tokens, attention_mask, input_lengths, n_pos = iv.tokenize_plus(model, clean)
            corrupted_tokens = iv.tokenize_plus(model, corrupted)[0]
            _check_batch(clean, corrupted, clean_tokens, corrupted_tokens)
            replacement = iv.replacement_outputs(model, intervention, corrupted_tokens, attention_mask, means)
            clean_full = None if skip_clean else model(clean_tokens, attention_mask=attention_mask)
            probes = [model(clean_tokens, attention_mask=attention_mask)] if metric_positions is None else []
            if metric_positions is None:
                probes.append(model(corrupted_tokens, attention_mask=attention_mask))
            positions = positions_plan(metrics, probes, clean_full, input_lengths, labels, metric_positions)
            clean_arg = _gather_last(clean_full, input_lengths) if positions == "last" else clean_full
            lengths_arg = torch.ones_like(input_lengths) if positions == "last" else input_lengths
            embed = model.embed(clean_tokens)
            pos = model.pos_embed(clean_tokens, 0, attention_mask)
            chunk = _chunk_size(model, len(clean), n_pos, positions, memory_budget)
            for start in range(0, len(graphs), chunk):
                logits = circuits_forward(model, pos, embed, attention_mask, replacement,
                                          in_graph[start:start + chunk], input_lengths, positions)
                for i, metric in enumerate(metrics):
                    values = apply_metric(metric, logits, clean_arg, lengths_arg, labels, states[i]).cpu()  # [V, k]
                    for j, row in enumerate(values.unbind(0)):
                        results[start + j][i].append(row)
    return [_unwrap([torch.cat(r) for r in per_graph]) for per_graph in results]


def evaluate_graph(model, graph, dataloader: Iterable, metrics, quiet: bool = False,
                   intervention: str = "patching", intervention_dataloader: Optional[Iterable] = None,
                   skip_clean: bool = True, metric_positions: Optional[str] = None,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Union[Tensor, List[Tensor]]:
    """EAP-IG's `evaluate_graph`: the metric(s) of the circuit `graph` (pruned in place first) on `dataloader`,
    one value per example (or per batch for a scalar metric), concatenated over batches; a list of such tensors for
    a list of metrics. Absent edges carry the `intervention`'s replacement ('patching': the corrupted run's sender
    outputs; 'zero'; 'mean' / 'mean-positional' over `intervention_dataloader`). With `skip_clean=False` metrics
    get the clean run's logits as `clean_logits`, else None."""
    return evaluate_graphs(model, [graph], dataloader, metrics, quiet=quiet, intervention=intervention,
                           intervention_dataloader=intervention_dataloader, skip_clean=skip_clean,
                           metric_positions=metric_positions, memory_budget=memory_budget)[0]


def evaluate_baseline(model, dataloader: Iterable, metrics, run_corrupted: bool = False,
                      quiet: bool = False) -> Union[Tensor, List[Tensor]]:
    """EAP-IG's `evaluate_baseline`: metric(s) of the unmodified model on the clean prompts, given the corrupted
    run's logits as `clean_logits` (EAP-IG's argument order); with `run_corrupted=True`, of the corrupted prompts
    given the clean logits."""
    metrics = _as_list(metrics)
    results: List[List[Tensor]] = [[] for _ in metrics]
    batches = dataloader if quiet else tqdm(dataloader, desc="evaluate_baseline")
    with torch.inference_mode():
        for clean, corrupted, labels in batches:
            clean_tokens, attention_mask, input_lengths, _ = iv.tokenize_plus(model, clean)
            corrupted_tokens = iv.tokenize_plus(model, corrupted)[0]
            _check_batch(clean, corrupted, clean_tokens, corrupted_tokens)
            corrupted_logits = model(corrupted_tokens, attention_mask=attention_mask)
            logits = model(clean_tokens, attention_mask=attention_mask)
            for i, metric in enumerate(metrics):
                if run_corrupted:
                    r = metric(corrupted_logits, logits, input_lengths, labels)
                else:
                    r = metric(logits, corrupted_logits, input_lengths, labels)
                results[i].append(torch.as_tensor(r).detach().cpu().reshape(-1))
    return _unwrap([torch.cat(r) for r in results])
