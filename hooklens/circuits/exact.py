"""EAP-IG's 'exact' attribution, batched: each edge's score is the metric of the full graph with that one edge
patched, minus the clean baseline, exactly as EAP-IG's `get_scores_exact` defines it

    score(e) = mean(evaluate_graph(full graph minus e)) - mean(evaluate_baseline())

(means over the concatenated per-batch metric values; EAP-IG's baseline passes the corrupted logits as
`clean_logits`, its edge runs pass None). EAP-IG runs one full evaluate_graph per edge. Here, with every other edge
present, a single absent edge s -> r changes only r's input, by (replacement - clean output) of s, and everything
upstream of r is the clean run: each edge's run starts at its receiver's layer from the cached clean run (a head
receiver recomputes just that head's q, k or v and attention), then the remaining blocks run as ordinary blocks,
many edges stacked on the batch dim, and logits are unembedded only where the metric reads (see
`evaluate.positions_plan`). Edges to one receiver layer share chunks, sized to a memory budget.

One deviation from EAP-IG's loop: EAP-IG prunes the shared graph in place inside its loop, so for models where a
single removed edge leaves a node without inputs (`parallel_attn_mlp`'s `input->m0`), later edges of its loop see a
graph missing that node's edges. Here every edge is scored against the full graph.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooklens.circuits import interventions as iv
from hooklens.circuits.evaluate import (
    DEFAULT_MEMORY_BUDGET,
    _check_batch,
    _logits,
    apply_metric,
    evaluate_baseline,
    positions_plan,
)


def attach_partial(exc: BaseException, scores: Tensor, done: Tensor) -> None:
    """Keep finished edge scores on the exception that stopped the run: `exc.partial_result` (the
    `[n_forward, n_backward]` score matrix, NaN where not done) and `exc.done`; the exception keeps its type."""
    try:
        exc.partial_result, exc.done = scores, done
    except AttributeError:  # an exception type with __slots__ takes no attributes
        return
    exc.add_note(f"hooklens: {int(done.sum())} of {int(done.numel())} edge scores had finished; they are in this "
                 "exception's .partial_result (NaN where not done; .done marks which).")


def _layer_groups(edges: Tensor, cfg) -> List[tuple]:
    """Edges `[E, 2]` (forward, backward index) -> [(layer or None for logits, edges of that receiver layer)]."""
    per_layer = 3 * cfg.n_heads + 1
    n_b = iv.n_backward(cfg)
    layer = torch.where(edges[:, 1] == n_b - 1, cfg.n_layers, edges[:, 1] // per_layer)
    groups = []
    for value in range(cfg.n_layers + 1):
        selected = edges[layer == value]
        if len(selected):
            groups.append((value if value < cfg.n_layers else None, selected))
    return groups


class _Batch:
    """Everything an edge chunk needs from one batch: the clean run's cache and (replacement - clean output) of
    every sender."""

    def __init__(self, model, clean, corrupted, labels, intervention, means, metric, metric_positions):
        tokens, mask, lengths, _ = iv.tokenize_plus(model, clean)
        corrupted_tokens = iv.tokenize_plus(model, corrupted)[0]
        _check_batch(clean, corrupted, tokens, corrupted_tokens)
        self.mask, self.lengths, self.labels = mask, lengths, labels
        self.cache = iv.run_cache(model, tokens, mask)
        replacement = iv.replacement_outputs(model, intervention, corrupted_tokens, mask, means)
        self.delta = replacement - self.cache["senders"]  # [b, p, n_forward, d]
        del self.cache["senders"]
        probes = []
        if metric_positions is None:
            probes = [model(tokens, attention_mask=mask), model(corrupted_tokens, attention_mask=mask)]
        self.positions = positions_plan([metric], probes, None, lengths, labels, metric_positions)
        self.metric_lengths = torch.ones_like(lengths) if self.positions == "last" else lengths


def _finish_blocks(model, resid: Tensor, first_layer: int, mask_rows: Tensor) -> Tensor:
    """Run blocks `first_layer..` on `[n, p, d]` residuals (ordinary blocks: every edge downstream is present)."""
    for block in model.blocks[first_layer:]:
        resid = block(resid, attention_mask=mask_rows)
    return resid


def _chunk_logits(model, batch: _Batch, layer: Optional[int], edges: Tensor) -> Tensor:
    """Logits `[C, b, p or 1, v]` of the full graph with each one of `edges` `[C, 2]` absent."""
    cfg = model.cfg
    H = cfg.n_heads
    cache = batch.cache
    C = edges.shape[0]
    b, p, _, d = batch.delta.shape
    delta = batch.delta[:, :, edges[:, 0]].permute(2, 0, 1, 3)  # [C, b, p, d]
    mask_rows = batch.mask.repeat(C, 1)  # [C*b, p]
    if layer is None:  # logits receiver: the final residual moves by the sender's difference, nothing to rerun
        return _logits(model, cache["resid_final"] + delta, batch.lengths, batch.positions)
    block, attn = model.blocks[layer], model.blocks[layer].attn
    resid_pre, resid_mid = cache["resid_pre"][layer], cache["resid_mid"][layer]
    resid_post = cache["resid_pre"][layer + 1] if layer + 1 < cfg.n_layers else cache["resid_final"]
    rem = edges[:, 1] - layer * (3 * H + 1)  # [C] receiver within the layer: q heads, k heads, v heads, MLP
    is_mlp = rem == 3 * H
    new_post = torch.empty(C, b, p, d, dtype=delta.dtype, device=delta.device)
    if (~is_mlp).any():
        a = (~is_mlp).nonzero()[:, 0]  # [A] attention-receiver edges of the chunk
        kind, head = rem[a] // H, rem[a] % H  # 0/1/2 = q/k/v, and the head
        x = block.ln1(resid_pre + delta[a])  # [A, b, p, d]
        W = torch.stack([attn.W_Q, attn.W_K, attn.W_V])[kind, head]  # [A, d, dh]
        bias = torch.stack([attn.b_Q, attn.b_K, attn.b_V])[kind, head]  # [A, dh]
        moved = torch.einsum("abpd,ade->abpe", x, W) + bias[:, None, None]  # [A, b, p, dh]
        clean_qkv = [cache[name][layer][:, :, head].permute(2, 0, 1, 3) for name in "qkv"]  # 3 x [A, b, p, dh]
        q, k, v = (torch.where((kind == i)[:, None, None, None], moved, clean_qkv[i]) for i in range(3))
        A = a.shape[0]
        rows = batch.mask.repeat(A, 1)  # [A*b, p]
        z = iv.attention(q.reshape(A * b, p, 1, -1), k.reshape(A * b, p, 1, -1), v.reshape(A * b, p, 1, -1),
                         attn.attn_scale, rows)  # [A*b, p, 1, dh]
        result = torch.einsum("abpe,aed->abpd", z.view(A, b, p, -1), attn.W_O[head])  # [A, b, p, d]
        change = result - cache["result"][layer][:, :, head].permute(2, 0, 1, 3)  # [A, b, p, d]
        if cfg.parallel_attn_mlp:
            new_post[a] = resid_post + change
        else:
            mid = resid_mid + change
            new_post[a] = mid + block.mlp(block.ln2(mid))
    if is_mlp.any():
        m = is_mlp.nonzero()[:, 0]
        mlp_in = (resid_pre if cfg.parallel_attn_mlp else resid_mid) + delta[m]  # [M, b, p, d]
        new_post[m] = resid_post + block.mlp(block.ln2(mlp_in)) - cache["mlp_out"][layer]
    final = _finish_blocks(model, new_post.view(C * b, p, d), layer + 1, mask_rows).view(C, b, p, d)
    return _logits(model, final, batch.lengths, batch.positions)


def _edges_per_chunk(model, batch: _Batch, memory_budget: int) -> int:
    cfg = model.cfg
    b, p = batch.mask.shape
    elem = torch.finfo(cfg.dtype).bits // 8
    per_edge = b * p * (12 * cfg.d_model + 2 * cfg.d_mlp + 2 * cfg.n_heads * p) * elem
    per_edge += b * (1 if batch.positions == "last" else p) * cfg.d_vocab_out * elem * 2
    return max(1, int(memory_budget // per_edge))


def exact(model, graph, dataloader: Iterable, metric, intervention: str = "patching",
          intervention_dataloader: Optional[Iterable] = None, quiet: bool = False,
          metric_positions: Optional[str] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Tensor:
    """EAP-IG's `get_scores_exact`: fills `graph.scores` with each real edge's exact patching score (see the module
    docstring), sets every real edge in the graph (as EAP-IG leaves it) and returns `graph.scores`.

    `metric_positions` None probes which logits the metric reads ('last' / 'all' say so). `memory_budget` bounds
    a chunk's activations in bytes. On an exception (including KeyboardInterrupt) the finished scores are attached
    to it (`exc.partial_result`, `exc.done`)."""
    iv.check_supported(model)
    iv.check_intervention(intervention, intervention_dataloader)
    if getattr(graph, "neurons_in_graph", None) is not None:
        raise ValueError("exact scores edges of an edge-level graph; build it with Graph.from_model(model) without "
                         "neuron_level.")
    dataloader = list(dataloader)
    if not dataloader:
        raise ValueError("The dataloader is empty; give at least one (clean, corrupted, labels) batch.")
    graph.in_graph |= graph.real_edge_mask
    edges = graph.real_edge_mask.nonzero()  # [E, 2] (forward, backward) index of every real edge
    baseline = evaluate_baseline(model, dataloader, metric, quiet=True).mean()
    means = None
    if "mean" in intervention:
        means = iv.compute_means(model, intervention_dataloader, per_position=intervention == "mean-positional")
    device = model.cfg.device
    # kept on the model's device (one transfer at the end, or on an exception), filled chunk by chunk
    scores = torch.full(graph.scores.shape, float("nan"), dtype=graph.scores.dtype, device=device)
    done = torch.zeros(graph.scores.shape, dtype=torch.bool, device=device)
    baseline = baseline.to(device)
    try:
        with torch.inference_mode():
            batches = [_Batch(model, c, x, y, intervention, means, metric, metric_positions) for c, x, y in dataloader]
            groups = _layer_groups(edges.to(model.cfg.device), model.cfg)
            state: dict = {}
            with tqdm(total=len(edges), disable=quiet, desc="exact") as bar:
                for layer, group in groups:
                    chunk = min(_edges_per_chunk(model, batch, memory_budget) for batch in batches)
                    for start in range(0, len(group), chunk):
                        part = group[start:start + chunk]  # [C, 2]
                        total, count = 0.0, 0
                        for batch in batches:
                            logits = _chunk_logits(model, batch, layer, part)
                            values = apply_metric(metric, logits, None, batch.metric_lengths, batch.labels,
                                                  state)  # [C, k]
                            total = total + values.sum(1)
                            count += values.shape[1]
                        scores[part[:, 0], part[:, 1]] = (total / count).to(scores.dtype) - baseline
                        done[part[:, 0], part[:, 1]] = True
                        bar.update(len(part))
    except BaseException as exc:
        attach_partial(exc, scores.cpu(), done.cpu())
        raise
    scores, done = scores.cpu(), done.cpu()
    graph.scores[done] = scores[done]
    return graph.scores
