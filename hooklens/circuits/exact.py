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

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hooklens import sharding
from hooklens.attention import sdpa_attention
from hooklens.circuits import interventions as iv
from hooklens.circuits.evaluate import (
    DEFAULT_MEMORY_BUDGET,
    _check_batch,
    _gather_last,
    apply_metric,
    columns_plan,
    evaluate_baseline,
    positions_plan,
    width_plan,
)
from hooklens.components import LayerNormPre
from hooklens.progress import bar_disabled


def attach_partial(exc: BaseException, scores: Tensor, done: Tensor) -> None:
    """Keep finished edge scores on the exception that stopped the run: `exc.partial_result` (the
    `[n_forward, n_backward]` score matrix, NaN where not done) and `exc.done`; the exception keeps its type."""
    try:
        exc.partial_result, exc.done = scores, done
    except AttributeError:  # an exception type with __slots__ takes no attributes
        return
    exc.add_note(f"hooklens: {int(done.sum())} of {int(done.numel())} edge scores had finished; they are in this "
                 "exception's .partial_result (NaN where not done; .done marks which).")


_KINDS = ("q", "k", "v")


def _receiver_groups(edges: Tensor, cfg) -> List[tuple]:
    """Edges `[E, 2]` (forward, backward index) -> [(layer or None for logits, kind, edges)], kind 'q' / 'k' / 'v'
    / 'mlp' / 'logits': a chunk holds edges into one kind of receiver of one layer, so it runs one code path."""
    per_layer = 3 * cfg.n_heads + 1
    n_b = iv.n_backward(cfg)
    last = edges[:, 1] == n_b - 1
    layer = torch.where(last, cfg.n_layers, edges[:, 1] // per_layer)
    kind = torch.where(last, 4, torch.clamp((edges[:, 1] % per_layer) // cfg.n_heads, max=3))  # 0..2 q/k/v, 3 mlp
    groups = []
    for value in range(cfg.n_layers + 1):
        for k, name in enumerate(_KINDS + ("mlp", "logits")):
            selected = edges[(layer == value) & (kind == k)]
            if len(selected):
                groups.append((value if value < cfg.n_layers else None, name, selected))
    return groups


# -- the forward from a receiver on, written over the model's weights (no hooks run on this path) ---------------
def _norm(module, x: Tensor) -> Tensor:
    """The model's LayerNorm / LayerNormPre as one fused `F.layer_norm` (same formula, a few ULPs apart) in float32
    / float64, where the model's module makes ~9 memory-bound passes; anything else runs the module itself."""
    if isinstance(module, LayerNormPre) and x.dtype in (torch.float32, torch.float64):
        return F.layer_norm(x, (x.shape[-1],), getattr(module, "w", None), getattr(module, "b", None), module.eps)
    return module(x)


def _gelu_new_(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU in place: `components.gelu_new`'s formula as PyTorch's fused tanh-approximate GELU (the
    same function; in float32 both are within 4.4e-7 of a float64 evaluation). On CPU the formula's seven
    memory-bound passes over the MLP's hidden activations cost about as much as the GEMMs around them."""
    return torch.ops.aten.gelu_(x, approximate="tanh")


def _mlp(block, x: Tensor) -> Tensor:
    """`block.mlp(x)` on `[..., d]`: two addmm's and the activation (in place for gelu_new)."""
    mlp = block.mlp
    shape = x.shape
    pre = torch.addmm(mlp.b_in, x.reshape(-1, shape[-1]), mlp.W_in)  # [rows, d_mlp]
    post = _gelu_new_(pre) if block.cfg.act_fn == "gelu_new" else mlp.act_fn(pre)
    return torch.addmm(mlp.b_out, post, mlp.W_out).view(shape)


class _Weights:
    """Per layer, q/k/v as one `[d, 3*H*dh]` matrix (one GEMM for all heads) and W_O as `[H*dh, d]`."""

    def __init__(self, model):
        self.qkv, self.b_qkv, self.W_O = [], [], []
        for block in model.blocks:
            attn = block.attn
            W = torch.cat([attn.W_Q, attn.W_K, attn.W_V])  # [3H, d, dh]
            self.qkv.append(W.permute(1, 0, 2).reshape(W.shape[1], -1).contiguous())  # [d, 3H*dh]
            self.b_qkv.append(torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(-1))  # [3H*dh]
            self.W_O.append(attn.W_O.reshape(-1, attn.W_O.shape[-1]))  # [H*dh, d]


def _attend_last(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor) -> Tensor:
    """Attention of one query per row (its last real token, so every real key is visible and causality holds):
    q `[n, 1, h, dh]`, k, v `[n, p, h, dh]`, key_mask `[n, p]` -> z `[n, 1, h, dh]`."""
    mask = key_mask.bool()[:, None, None, :]  # [n, 1, 1, p]
    z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=1.0 / scale)  # [n, h, 1, dh]
    return z.transpose(1, 2)


def _block(model, w: _Weights, layer: int, resid: Tensor, prefix_kv, mask_rows: Tensor,
           last: Optional[Tensor]) -> Tensor:
    """One ordinary block on the changed positions `[n, s, d]` (positions p0.. of p; the prompts' keys and values
    at positions < p0 are the clean run's, `prefix_kv` `[b, p0, H, dh]` x 2, repeated over the n // b variants).
    With `last` (`[n]` index of each row's last real token within the s positions), only those tokens' outputs
    `[n, 1, d]` are computed (keys and values still at every position)."""
    cfg = model.cfg
    block = model.blocks[layer]
    n, s, d = resid.shape
    H, dh = cfg.n_heads, cfg.d_head
    x = _norm(block.ln1, resid)
    qkv = torch.addmm(w.b_qkv[layer], x.view(n * s, d), w.qkv[layer]).view(n, s, 3, H, dh)
    q, k, v = qkv.unbind(2)  # [n, s, H, dh] each
    p0 = prefix_kv[0].shape[1]
    if p0:
        k, v = (torch.cat([pre.repeat(n // pre.shape[0], 1, 1, 1), new], 1) for pre, new in zip(prefix_kv, (k, v)))
    if last is None:
        z = sdpa_attention(q, k, v, block.attn.attn_scale, p0, mask_rows)  # [n, s, H, dh]
    else:
        rows = torch.arange(n, device=resid.device)
        q = q[rows, last].unsqueeze(1)  # [n, 1, H, dh]
        resid = resid[rows, last].unsqueeze(1)  # [n, 1, d]
        z = _attend_last(q, k, v, block.attn.attn_scale, mask_rows)
    t = z.shape[1]
    attn_out = torch.addmm(block.attn.b_O, z.reshape(n * t, H * dh), w.W_O[layer]).view(n, t, d)
    if cfg.parallel_attn_mlp:
        return resid + attn_out + _mlp(block, _norm(block.ln2, resid))
    mid = resid + attn_out
    return mid + _mlp(block, _norm(block.ln2, mid))


def _at_last(t: Tensor, last: Tensor) -> Tensor:
    """`[..., b, s, x]` -> `[..., b, 1, x]`: each prompt's entry at `last` (its last real token)."""
    return t[..., torch.arange(t.shape[-3], device=t.device), last, :].unsqueeze(-2)


def _first_change(delta: Tensor, last: Tensor) -> int:
    """The first position where some sender's (replacement - clean) output is nonzero, `delta` `[n_f, b, p, d]`.
    Every run of exact differs from the clean run only there and after (causal attention), so the positions before
    are not recomputed. Patching with counterfactuals that share a prefix (IOI's ABC prompts differ from the second
    name on) leaves most positions unchanged; 'zero' / 'mean' change every position (p0 = 0). Capped at the
    earliest last token, so every prompt's metric position is computed."""
    changed = (delta != 0).any(3).any(1).any(0)  # [p]
    first = int(changed.float().argmax()) if bool(changed.any()) else delta.shape[2]
    return min(first, int(last.min()))


class _Batch:
    """Everything an edge chunk needs from one batch: the clean run's activations at the positions the runs change
    (p0.., see `_first_change`; head-major, so a chunk's heads are one contiguous gather), the clean keys and values
    before p0, (replacement - clean output) of every sender `[n_forward, b, s, d]` (s = p - p0), and, for metrics
    that read only the last tokens, the same at those tokens (`[..., b, 1, ...]`)."""

    def __init__(self, model, clean, corrupted, labels, intervention, means, metric, metric_positions,
                 metric_columns):
        cfg = model.cfg
        tokens, mask, lengths, _ = iv.tokenize_plus(model, clean)
        corrupted_tokens = iv.tokenize_plus(model, corrupted)[0]
        _check_batch(clean, corrupted, tokens, corrupted_tokens)
        self.mask, self.lengths, self.labels = mask, lengths, labels
        cache = iv.run_cache(model, tokens, mask)
        replacement = iv.replacement_outputs(model, intervention, corrupted_tokens, mask, means)
        delta = (replacement - cache.pop("senders")).permute(2, 0, 1, 3)  # [n_forward, b, p, d]
        del replacement
        p0 = self.p0 = _first_change(delta, lengths - 1)
        self.delta = delta[:, :, p0:].contiguous()  # [n_forward, b, s, d]
        del delta
        probes = []
        if metric_positions is None or metric_columns is None:
            probes = [model(tokens, attention_mask=mask), model(corrupted_tokens, attention_mask=mask)]
        self.positions = positions_plan([metric], probes, None, lengths, labels, metric_positions)
        self.metric_lengths = torch.ones_like(lengths) if self.positions == "last" else lengths
        if self.positions == "last":
            probes = [_gather_last(logits, lengths) for logits in probes]
        self.columns = columns_plan(metric, probes, self.metric_lengths, labels, metric_columns, cfg.d_vocab_out)
        # the logits' vocabulary width the metric gets (only with a column plan; see evaluate.width_plan)
        self.width = cfg.d_vocab_out
        if self.columns is not None and metric_columns is None:
            self.width = width_plan(metric, probes, self.metric_lengths, labels, self.columns)
        self.last = lengths - 1 - p0  # [b] last real token, counted from p0
        self.logits_buffer: Optional[Tensor] = None  # see _unembed
        # clean activations from p0 on: residuals [b, s, d] per layer; q, z head-major [H, b, s, dh] per layer;
        # k, v head-major at every position [H, b, p, dh]; every head's k, v before p0 [b, p0, H, dh]
        self.resid_pre = [t[:, p0:] for t in cache["resid_pre"] + [cache["resid_final"]]]  # [l + 1]: l's output
        self.resid_mid = [t[:, p0:] for t in cache["resid_mid"]]
        self.mlp_out = [t[:, p0:] for t in cache["mlp_out"]]
        self.heads = {name: [t[:, p0:].permute(2, 0, 1, 3).contiguous() for t in cache[name]] for name in "qz"}
        self.heads.update({name: [t.permute(2, 0, 1, 3).contiguous() for t in cache[name]] for name in "kv"})
        self.prefix_kv = [(k[:, :p0].contiguous(), v[:, :p0].contiguous()) for k, v in zip(cache["k"], cache["v"])]
        self.prefix_logits = None  # metrics reading every position get the clean logits before p0
        if self.positions == "all" and p0:
            self.prefix_logits = _unembed(model, cache["resid_final"][:, :p0], self)  # [b, p0, width]
            self.logits_buffer = None
        if self.positions == "last":  # the last layer and the logits are only needed at the last tokens
            top = cfg.n_layers - 1
            self.at_last = {
                "resid_pre": _at_last(self.resid_pre[top], self.last),  # [b, 1, d]
                "resid_mid": _at_last(self.resid_mid[top], self.last),
                "resid_post": _at_last(self.resid_pre[top + 1], self.last),
                "mlp_out": _at_last(self.mlp_out[top], self.last),
                "q": _at_last(self.heads["q"][top], self.last),  # [H, b, 1, dh]
                "z": _at_last(self.heads["z"][top], self.last),
                "delta": _at_last(self.delta, self.last),  # [n_forward, b, 1, d]
            }

    def nbytes(self) -> int:
        """Bytes this batch keeps for the whole run (its share of the persistent memory, see `memory_plan`)."""
        tensors = [self.delta, *self.resid_pre, *self.resid_mid, *self.mlp_out]
        tensors += [t for ts in self.heads.values() for t in ts] + [t for kv in self.prefix_kv for t in kv]
        tensors += list(getattr(self, "at_last", {}).values())
        if self.prefix_logits is not None:
            tensors.append(self.prefix_logits)
        return sum(t.numel() * t.element_size() for t in tensors)


def _unembed(model, final: Tensor, batch: _Batch) -> Tensor:
    """Final residual `[..., t, d]` -> logits `[..., t, v]`; with `batch.columns`, only those vocabulary columns
    are computed (the metric reads no other, see `columns_plan`) and written into a zero buffer kept across chunks
    (re-zeroing C x b x 50,257 floats per chunk would cost more than the columns' GEMM), `batch.width` columns
    wide (`width_plan`: the metric cannot tell)."""
    x = _norm(model.ln_final, final)
    W_U, b_U = model.unembed.W_U, model.unembed.b_U
    rows = x.shape[:-1].numel()
    if batch.columns is None:
        return torch.addmm(b_U, x.reshape(rows, -1), W_U).view(*x.shape[:-1], -1)
    part = torch.addmm(b_U[batch.columns], x.reshape(rows, -1), W_U[:, batch.columns])  # [rows, n_columns]
    if batch.logits_buffer is None or batch.logits_buffer.shape[0] < rows:
        batch.logits_buffer = x.new_zeros(rows, batch.width)
    logits = batch.logits_buffer[:rows]  # [rows, width], zero outside `columns`
    logits.index_copy_(1, batch.columns, part)
    return logits.view(*x.shape[:-1], -1)


def _chunk_logits(model, w: _Weights, batch: _Batch, layer: Optional[int], kind: str, edges: Tensor) -> Tensor:
    """Logits `[C, b, p or 1, v]` of the full graph with each one of `edges` `[C, 2]` (all into `kind` receivers of
    `layer`) absent: the receiver's layer is recomputed from the clean activations with the one changed input,
    then the later blocks run as ordinary blocks (every edge downstream is present), all at positions p0.. only."""
    cfg = model.cfg
    H, L = cfg.n_heads, cfg.n_layers
    C = edges.shape[0]
    b, p = batch.mask.shape
    p0 = batch.p0
    last_only = batch.positions == "last"
    # the receiver's own layer at the last tokens only when it is the last layer and the metric reads only those
    short = last_only and (layer is None or layer == L - 1)

    def clean(name: str, index: Optional[Tensor] = None) -> Tensor:
        if short and name in batch.at_last:
            t = batch.at_last[name]
        elif name == "resid_post":
            t = batch.resid_pre[L if layer is None else layer + 1]
        elif name in ("q", "z"):
            t = batch.heads[name][layer]
        else:
            t = getattr(batch, name)[layer] if name != "delta" else batch.delta
        return t if index is None else t.index_select(0, index)

    delta = clean("delta", edges[:, 0])  # [C, b, t, d], t = 1 (short) or s = p - p0
    if layer is None:  # logits receiver: the final residual moves by the sender's difference, nothing to rerun
        post = clean("resid_post") + delta
    elif kind == "mlp":
        block = model.blocks[layer]
        mlp_in = (clean("resid_pre") if cfg.parallel_attn_mlp else clean("resid_mid")) + delta  # [C, b, t, d]
        post = clean("resid_post") + (_mlp(block, _norm(block.ln2, mlp_in)) - clean("mlp_out"))
    else:
        block, attn = model.blocks[layer], model.blocks[layer].attn
        head = (edges[:, 1] - layer * (3 * H + 1)) % H  # [C]
        which = _KINDS.index(kind)
        W = (attn.W_Q, attn.W_K, attn.W_V)[which].index_select(0, head)  # [C, d, dh]
        bias = (attn.b_Q, attn.b_K, attn.b_V)[which].index_select(0, head)  # [C, dh]
        if kind == "q" or not short:
            x = _norm(block.ln1, clean("resid_pre") + delta)  # [C, b, t, d]
        else:  # a key / value edge of the last layer changes k or v at every position from p0
            full_delta = batch.delta.index_select(0, edges[:, 0])  # [C, b, s, d]
            x = _norm(block.ln1, batch.resid_pre[layer] + full_delta)  # [C, b, s, d]
        moved = torch.baddbmm(bias[:, None], x.reshape(C, -1, x.shape[-1]), W)  # [C, b*t', dh]
        moved = moved.view(C, b, -1, cfg.d_head)
        q = moved if kind == "q" else clean("q", head)  # [C, b, t, dh]
        k, v = (batch.heads[name][layer].index_select(0, head) for name in "kv")  # [C, b, p, dh] clean
        if kind in "kv":  # the head's keys or values move from p0 on
            k, v = (torch.cat([t[:, :, :p0], moved], 2) if kind == name else t for name, t in zip("kv", (k, v)))
        t = q.shape[2]
        one = (C * b, -1, 1, cfg.d_head)  # one head per (edge, prompt) row
        rows = batch.mask.repeat(C, 1)  # [C*b, p]
        if short:
            z = _attend_last(q.reshape(one), k.reshape(one), v.reshape(one), attn.attn_scale, rows)
        else:
            z = sdpa_attention(q.reshape(one), k.reshape(one), v.reshape(one), attn.attn_scale, p0, rows)
        dz = z.reshape(C, b * t, cfg.d_head) - clean("z", head).reshape(C, b * t, cfg.d_head)  # [C, b*t, dh]
        change = torch.bmm(dz, attn.W_O.index_select(0, head)).view(C, b, t, -1)  # this head's result moves
        if cfg.parallel_attn_mlp:  # the MLP reads resid_pre, which an attention edge leaves unchanged
            post = clean("resid_post") + change
        else:
            mid = clean("resid_mid") + change
            post = mid + _mlp(block, _norm(block.ln2, mid))
    if not short and layer is not None:
        d = post.shape[-1]
        resid, mask_rows = post.view(C * b, -1, d), batch.mask.repeat(C, 1)  # [C*b, s, d]
        last = batch.last.repeat(C) if last_only else None  # [C*b]
        for later in range(layer + 1, L):
            resid = _block(model, w, later, resid, batch.prefix_kv[later], mask_rows,
                           last if later == L - 1 else None)
        post = resid.view(C, b, -1, d)
    logits = _unembed(model, post, batch)  # [C, b, t, width]
    if batch.prefix_logits is not None:  # a metric reading every position: the clean logits before p0
        logits = torch.cat([batch.prefix_logits.expand(C, -1, -1, -1), logits], 2)  # [C, b, p, width]
    return logits


def chunk_bytes(cfg, n_prompts: int, n_pos: int, n_changed: Optional[int] = None, positions: str = "last",
                width: Optional[int] = None) -> int:
    """Peak bytes one edge adds to a chunk (an upper estimate). A block on `n_changed` (default `n_pos`) positions
    of `n_prompts` prompts: residual, LayerNorm output, q/k/v, z, attention output, the next residual (~8 x
    d_model), two MLP-wide tensors, two d_model-wide temporaries; keys / values with the clean prefix at `n_pos`
    positions (2 x d_model), attention scores if the kernel makes them; the logits at the metric's positions,
    `width` columns wide (default: the vocabulary, unembedded plus a copy), plus, for metrics reading every
    position, the logits concatenated with the clean prefix."""
    elem = torch.finfo(cfg.dtype).bits // 8
    s = n_pos if n_changed is None else n_changed
    per_edge = n_prompts * s * (12 * cfg.d_model + 2 * cfg.d_mlp + 2 * cfg.n_heads * n_pos) * elem
    per_edge += n_prompts * n_pos * 2 * cfg.d_model * elem
    if positions == "last":
        t = 1
    else:
        t = s + n_pos
    per_edge += n_prompts * t * (width or 2 * cfg.d_vocab_out) * elem
    return per_edge


def edges_per_chunk(cfg, n_prompts: int, n_pos: int, memory_budget: int, n_changed: Optional[int] = None,
                    positions: str = "last", width: Optional[int] = None) -> int:
    """Edges stacked in one forward: as many as `memory_budget` bytes of activations hold (at least 1)."""
    return max(1, int(memory_budget // chunk_bytes(cfg, n_prompts, n_pos, n_changed, positions, width)))


def batch_bytes(cfg, n_prompts: int, n_pos: int, n_changed: Optional[int] = None, last_only: bool = True) -> int:
    """Bytes one batch keeps for the whole run (`_Batch`): (replacement - clean) of every sender and the clean
    residuals, MLP outputs, q and z at the changed positions; every head's k, v at every position; the last
    layer's tensors at the last tokens."""
    elem = torch.finfo(cfg.dtype).bits // 8
    s = n_pos if n_changed is None else n_changed
    L, d, a = cfg.n_layers, cfg.d_model, cfg.n_heads * cfg.d_head
    n = iv.n_forward(cfg) * s * d + (3 * L + 1) * s * d + 2 * L * s * a + 2 * L * n_pos * a + 2 * L * n_pos * a
    if last_only:
        n += iv.n_forward(cfg) * d + 4 * d + 2 * a
    return n_prompts * n * elem


def build_bytes(cfg, n_prompts: int, n_pos: int) -> int:
    """Transient peak while one batch is prepared: the clean run's cache (`run_cache`: per layer the residuals,
    q, k, v, z and the per-head results, `[b, p, H, d_model]`), the clean and replacement sender outputs and their
    difference (`[b, p, n_forward, d_model]` each), and the two probe runs' logits."""
    elem = torch.finfo(cfg.dtype).bits // 8
    L, d, a = cfg.n_layers, cfg.d_model, cfg.n_heads * cfg.d_head
    cache = L * (3 * d + 4 * a + cfg.n_heads * d) + d
    senders = 3 * iv.n_forward(cfg) * d
    logits = 2 * cfg.d_vocab_out
    return n_prompts * n_pos * (cache + senders + logits) * elem


def memory_plan(cfg, batch_shapes: Sequence[tuple], memory_budget: int = DEFAULT_MEMORY_BUDGET,
                positions: str = "last", width: Optional[int] = None) -> dict:
    """The memory an `exact` run needs, before running it: `batch_shapes` is `[(n_prompts, n_pos, n_changed)]`
    per batch of the dataloader (n_changed: positions from the first one a patch changes, `n_pos` for 'zero' /
    'mean'). Returns bytes: `weights`, `batches` (kept all run), `build` (the largest transient while a batch is
    prepared), `chunk` (one chunk at `edges_per_chunk` edges, which is at most `memory_budget`), and `peak` =
    weights + batches + max(build, chunk): what the process needs beyond PyTorch itself, however many edges."""
    elem = torch.finfo(cfg.dtype).bits // 8
    L, d, m = cfg.n_layers, cfg.d_model, cfg.d_mlp
    a = cfg.n_heads * cfg.d_head
    # the model's weights plus exact's own [d, 3a] copy of q/k/v per layer (`_Weights`)
    weights = (L * (7 * d * a + 2 * d * m) + cfg.d_vocab * d + cfg.n_ctx * d + d * cfg.d_vocab_out) * elem
    edges = min(edges_per_chunk(cfg, b, p, memory_budget, s, positions, width) for b, p, s in batch_shapes)
    kept = sum(batch_bytes(cfg, b, p, s, positions == "last") for b, p, s in batch_shapes)
    if width is not None:  # each batch keeps its zero-filled logits buffer (`_unembed`)
        kept += sum(edges * b * (1 if positions == "last" else s) * width * elem for b, p, s in batch_shapes)
    build = max(build_bytes(cfg, b, p) for b, p, _ in batch_shapes)
    # batches run one after another within a chunk: the largest batch's activations are the chunk's peak
    chunk = max(edges * chunk_bytes(cfg, b, p, s, positions, width) for b, p, s in batch_shapes)
    return {"weights": weights, "batches": kept, "build": build, "chunk": chunk, "edges_per_chunk": edges,
            "peak": weights + kept + max(build, chunk)}


def _edges_per_chunk(model, batch: _Batch, memory_budget: int) -> int:
    b, p = batch.mask.shape
    width = None if batch.columns is None else batch.width
    return edges_per_chunk(model.cfg, b, p, memory_budget, p - batch.p0, batch.positions, width)


def exact(model, graph, dataloader: Iterable, metric, intervention: str = "patching",
          intervention_dataloader: Optional[Iterable] = None, quiet: bool = False,
          metric_positions: Optional[str] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
          metric_columns=None, *, shard: Optional[Tuple[int, int]] = None, results_dir=None,
          unit_size: Optional[int] = None) -> Tensor:
    """EAP-IG's `get_scores_exact`: fills `graph.scores` with each real edge's exact patching score (see the module
    docstring), sets every real edge in the graph (as EAP-IG leaves it) and returns `graph.scores`.

    `metric_positions` None probes which logits the metric reads ('last' / 'all' say so); `metric_columns` None
    probes which vocabulary columns it reads (e.g. logit_diff: the label columns), 'all' turns that off, a list of
    token ids says so (see `evaluate.columns_plan`). `memory_budget` bounds a chunk's activations in bytes (the
    cached clean run comes on top: `memory_plan` estimates both). On an exception (including KeyboardInterrupt)
    the finished scores are attached to it (`exc.partial_result`, `exc.done`).

    `shard=(i, n)` / `results_dir=` / an initialized `torch.distributed` process group: the edges, in receiver
    order, are cut into work units of `unit_size` edges (default `sharding.default_unit_size`) and run as
    `hooklens.sharding` describes: this process's share, finished units kept in `results_dir/circuits-exact-
    <intervention>` (resumable, refused for another model, graph, data, intervention or metric), every rank
    scored in full under a process group. A shard without a process group leaves the other shards' scores as they
    were in `graph.scores` (a merge run, same call without `shard`, fills them)."""
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
    device = model.cfg.device
    groups = _receiver_groups(edges.to(device), model.cfg)
    order, plan = None, None  # with units: [E, 2] the edges in receiver order, and which units this process runs
    if sharding.wants_units(shard, results_dir):
        if "mean" in intervention:  # digested for the fingerprint, then averaged
            intervention_dataloader = list(intervention_dataloader)
        order = torch.cat([group for *_, group in groups])
        plan = _plan_units(model, order, dataloader, intervention_dataloader, metric, intervention, metric_positions,
                           metric_columns, unit_size, shard, results_dir)  # a mismatching results_dir: before work
    # kept on the model's device (one transfer at the end, or on an exception), filled chunk by chunk
    scores = torch.full(graph.scores.shape, float("nan"), dtype=graph.scores.dtype, device=device)
    done = torch.zeros(graph.scores.shape, dtype=torch.bool, device=device)
    runner: List[_EdgeRunner] = []

    def get_runner() -> _EdgeRunner:  # the baseline, means and clean / corrupted runs: only once an edge is computed
        if not runner:
            runner.append(_make_runner(model, dataloader, intervention_dataloader, metric, intervention,
                                       metric_positions, metric_columns, memory_budget, scores.dtype))
        return runner[0]

    try:
        with torch.inference_mode():
            with tqdm(total=len(edges), disable=bar_disabled(not quiet), desc="exact") as bar:
                if plan is not None:  # a run that finds every unit of its share finished makes no forward at all
                    _run_units(get_runner, order, plan, bar, scores, done)
                else:
                    run = get_runner()
                    for layer, kind, group in groups:
                        for start in range(0, len(group), run.chunk_size):
                            part = group[start:start + run.chunk_size]  # [C, 2]
                            scores[part[:, 0], part[:, 1]] = run.chunk(layer, kind, part)
                            done[part[:, 0], part[:, 1]] = True
                            bar.update(len(part))
    except BaseException as exc:
        flat, flat_done = getattr(exc, "partial_result", None), getattr(exc, "done", None)
        if order is not None and flat is not None and flat_done is not None and flat.shape == (len(order),):
            # the units' finished scores (run_units attached them in receiver order)
            flat_done = flat_done.to(device)
            finished = order[flat_done]
            scores[finished[:, 0], finished[:, 1]] = flat.to(device, scores.dtype)[flat_done]
            done[finished[:, 0], finished[:, 1]] = True
        attach_partial(exc, scores.cpu(), done.cpu())
        raise
    scores, done = scores.cpu(), done.cpu()
    graph.scores[done] = scores[done]
    return graph.scores


def _make_runner(model, dataloader, intervention_dataloader, metric, intervention: str, metric_positions,
                 metric_columns, memory_budget: int, dtype: torch.dtype) -> "_EdgeRunner":
    """The baseline, the intervention's means and every batch's clean / corrupted runs, ready to score chunks."""
    with torch.inference_mode(False):  # as a plain call: evaluate_baseline and compute_means run their own modes
        baseline = evaluate_baseline(model, dataloader, metric, quiet=True).mean().to(model.cfg.device)
        means = None
        if "mean" in intervention:
            means = iv.compute_means(model, intervention_dataloader, per_position=intervention == "mean-positional")
    with torch.inference_mode():
        batches = [_Batch(model, c, x, y, intervention, means, metric, metric_positions, metric_columns)
                   for c, x, y in dataloader]
    chunk = min(_edges_per_chunk(model, batch, memory_budget) for batch in batches)
    return _EdgeRunner(model, batches, metric, chunk, baseline, dtype)


class _EdgeRunner:
    """Scores of edge chunks: the metric of each edge's patched run (mean over the batches' prompts) minus the
    baseline."""

    def __init__(self, model, batches: List[_Batch], metric, chunk: int, baseline: Tensor, dtype: torch.dtype):
        self.model, self.batches, self.metric, self.chunk_size = model, batches, metric, chunk
        self.baseline, self.dtype = baseline, dtype
        self.weights = _Weights(model)
        self.state: dict = {}

    def chunk(self, layer: Optional[int], kind: str, part: Tensor) -> Tensor:
        """[C] scores of the edges `part` [C, 2], all into one receiver kind of one layer."""
        total, count = 0.0, 0
        for batch in self.batches:
            logits = _chunk_logits(self.model, self.weights, batch, layer, kind, part)
            values = apply_metric(self.metric, logits, None, batch.metric_lengths, batch.labels, self.state)  # [C, k]
            total = total + values.sum(1)
            count += values.shape[1]
        return (total / count).to(self.dtype) - self.baseline

    def edges(self, part: Tensor) -> Tensor:
        """[E'] scores of any edges `part` [E', 2] sorted by receiver (a work unit), in `part`'s order: its receiver
        groups (consecutive in `part`) in chunks of at most `chunk_size`."""
        out = []
        for layer, kind, group in _receiver_groups(part, self.model.cfg):
            out.extend(self.chunk(layer, kind, group[start:start + self.chunk_size])
                       for start in range(0, len(group), self.chunk_size))
        return torch.cat(out)


def _plan_units(model, order: Tensor, dataloader, intervention_dataloader, metric, intervention: str,
                metric_positions, metric_columns, unit_size: Optional[int], shard, results_dir) -> "sharding.UnitPlan":
    """The `hooklens.sharding` units of `order` (edges in receiver order) this process runs, checked against the
    results directory and the process group before any forward."""
    unit_size = int(unit_size) if unit_size is not None else sharding.default_unit_size(len(order))

    def fingerprint():
        return {"model": sharding.model_fingerprint(model), "sweep": {
            "method": "circuits.exact", "edges": sharding.digest(order), "data": sharding.digest(dataloader),
            "intervention": intervention, "intervention_data": sharding.digest(intervention_dataloader),
            "metric": sharding.callable_name(metric), "metric_positions": str(metric_positions),
            "metric_columns": sharding.digest(metric_columns), "n_variants": str(len(order)),
            "unit_size": str(unit_size), "format": str(sharding.FORMAT)}}

    return sharding.plan_units(len(order), fingerprint, unit_size=unit_size, shard=shard, results_dir=results_dir,
                               key=f"circuits-exact-{intervention}")


def _run_units(get_runner: Callable[[], _EdgeRunner], order: Tensor, plan, bar, scores: Tensor,
               done: Tensor) -> None:
    """exact by the work units of `plan`: fills `scores` / `done` at the units this process ran, loaded or, under
    a process group, gathered. `get_runner()` is called only for a unit to compute."""
    def compute(start: int, stop: int) -> Tensor:
        values = get_runner().edges(order[start:stop])
        bar.update(stop - start)
        return values

    values, unit_done = sharding.run_units(compute, plan, scores.device, progress=False, stacklevel=4)
    finished = order[unit_done.to(order.device)]
    scores[finished[:, 0], finished[:, 1]] = values.to(scores.device, scores.dtype)[unit_done.to(scores.device)]
    done[finished[:, 0], finished[:, 1]] = True
