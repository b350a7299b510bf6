"""Edge attribution scores with EAP-IG's `attribute` API: EAP, EAP-IG-inputs, EAP-IG-activations, clean-corrupted
(and 'exact', delegated to `hooklens.circuits.exact`).

An edge's score is, summed over batch and positions, `(intervened sender output - clean sender output) . d metric /
d receiver input`, divided by the number of examples (and by the number of integration steps for the IG methods),
exactly as EAP-IG 2.0 (hannamw/EAP-IG, MIT) defines it; its semantics are followed, its code is not copied.

How it is computed without per-node hooks (EAP-IG hooks every sender's output and every receiver's input, and does one
`einsum` over a `[batch, pos, n_forward, d_model]` difference tensor per receiver hook):

- One hand-written forward over the model's parameters gives every sender output (token embedding, per-head results
  `z @ W_O[h]`, MLP outputs) and keeps, per layer, the fused q/k/v projection output and the MLP input as tensors
  autograd can differentiate with respect to. One `torch.autograd.grad` call (no weight gradients) then gives all
  receiver gradients of a pass.
- A head's q/k/v input in EAP-IG is the residual stream before `ln1`, split per head. `ln1` is computed once here;
  the per-head gradient with respect to its input is recovered exactly as `LN-backward(d q_h @ W_Q[h]^T)` (LN's
  backward is linear in the output gradient, with that row's normalized input and scale), for q, k and v at once.
- The difference tensor is fixed for a batch, so gradients of several passes (integration steps, clean and
  corrupted) are summed first and contracted once: per layer one `[senders, b*p*d] x [b*p*d, receivers]` product.
- Integration steps run batched along the batch dimension (chunked to `max_batch_tokens`), the metric applied to each
  step's slice, so the sum of metrics has exactly the per-step gradients. EAP-IG-activations runs the clean prefix
  once ("trunk") and branches off it at each interpolated node, so layers before the node are not recomputed per
  step; autograd sums the branches' gradients into the trunk.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hooklens.attention import sdpa_attention
from hooklens.circuits import interventions as iv
from hooklens.components import ACTIVATIONS, LayerNorm, LayerNormPre, addmm_last_dim

METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")
AGGREGATIONS = ("sum", "mean")
# Tokens per pass of the batched integration steps: bounds the activations autograd keeps (GPT-2 small keeps about
# 0.5 MB per token for the backward, so the default is ~4 GB).
DEFAULT_MAX_BATCH_TOKENS = 8192


# -- argument checks (all before any forward) -------------------------------------------------------------------
def _check_args(model, graph, method, intervention, aggregation, ig_steps, intervention_dataloader, metric, neuron):
    if method not in METHODS:
        extra = (" ('information-flow-routes' is not implemented by hooklens)"
                 if method == "information-flow-routes" else "")
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}{extra}.")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be in {set(AGGREGATIONS)}, but got {aggregation!r}.")
    iv.check_intervention(intervention, intervention_dataloader)
    if method in ("EAP-IG-inputs", "clean-corrupted") and intervention != "patching":
        raise ValueError(f"intervention must be 'patching' for {method}, but got {intervention!r}.")
    if method in ("EAP-IG-inputs", "EAP-IG-activations"):
        if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
            raise ValueError(f"{method} needs ig_steps=<positive int> (EAP-IG's examples use 5; its default of None "
                             f"fails inside EAP-IG), got ig_steps={ig_steps!r}.")
    if neuron:
        raise ValueError("neuron=True: neuron-level scores are node attribution (EAP-IG's attribute_node); edge "
                         "attribution scores whole edges. Call attribute(..., neuron=False).")
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(logits, clean_logits, input_lengths, labels), got "
                        f"{type(metric).__name__}.")
    iv.check_supported(model)
    cfg = model.cfg
    gcfg = getattr(graph, "cfg", None)
    if gcfg is None or not hasattr(graph, "scores"):
        raise TypeError("graph must be a hooklens.circuits Graph (Graph.from_model(model)).")
    n_layers, n_heads = gcfg["n_layers"], gcfg["n_heads"]
    parallel = bool(gcfg.get("parallel_attn_mlp", False))
    if (n_layers, n_heads) != (cfg.n_layers, cfg.n_heads) or parallel != bool(cfg.parallel_attn_mlp):
        raise ValueError(f"graph was built for n_layers={n_layers}, n_heads={n_heads}, parallel_attn_mlp={parallel} "
                         f"but the model has n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, parallel_attn_mlp="
                         f"{bool(cfg.parallel_attn_mlp)}; build it with Graph.from_model(model).")
    if cfg.parallel_attn_mlp:
        raise ValueError("parallel_attn_mlp models are not supported by hooklens.circuits.attribute.")


# -- the hand-written forward -----------------------------------------------------------------------------------
def _layer_norm(module, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """hooklens's LayerNorm / LayerNormPre / Identity without their hook points: `(out, xhat, scale)` (xhat and
    scale None for Identity). Low-precision activations normalize in float32, as the model does."""
    if not isinstance(module, LayerNormPre):
        return x, None, None
    dtype = x.dtype
    xf = x.float() if dtype not in (torch.float32, torch.float64) else x
    centered = xf - xf.mean(-1, keepdim=True)
    scale = (centered.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()  # [n, p, 1]
    xhat = centered / scale
    out = xhat.to(dtype)
    if isinstance(module, LayerNorm):
        out = out * module.w + module.b
    return out, xhat, scale


def _layer_norm_backward(weight: Optional[Tensor], grad_out: Tensor, xhat: Optional[Tensor],
                         scale: Optional[Tensor]) -> Tensor:
    """The gradient at a LayerNorm's input from the gradient at its output, for each row's saved normalized input
    `xhat` and `scale`: `(g - mean(g) - xhat * mean(g * xhat)) / scale` with `g = grad_out * weight`. grad_out is
    `[k, rows, d]` (k receivers reading the same normalized rows), xhat / scale `[rows, d]` / `[rows, 1]`."""
    if xhat is None:  # no normalization
        return grad_out
    g = grad_out * weight if weight is not None else grad_out
    xhat = xhat.to(g.dtype)
    mean_g = g.mean(-1, keepdim=True)
    mean_gx = (g * xhat).mean(-1, keepdim=True)
    return (g - mean_g - xhat * mean_gx) / scale.to(g.dtype)


class _Weights:
    """Per-layer weights in the layouts the forward uses, prepared once per `attribute` call."""

    def __init__(self, model):
        cfg = model.cfg
        h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.model = model
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_qkv_flat, self.b_qkv, self.W_qkv_T, self.ln1_w = [], [], [], []
        for block in model.blocks:
            a = block.attn
            W = torch.stack([a.W_Q, a.W_K, a.W_V]).detach()  # [3, h, d, dh]
            W_T = W.permute(0, 1, 3, 2).reshape(3 * h, dh, d).contiguous()  # [3h, dh, d]
            self.W_qkv_T.append(W_T)
            self.W_qkv_flat.append(W_T.view(3 * h * dh, d))  # [3*h*dh, d] for F.linear
            self.b_qkv.append(torch.stack([a.b_Q, a.b_K, a.b_V]).detach().reshape(3 * h * dh))
            self.ln1_w.append(block.ln1.w.detach() if isinstance(block.ln1, LayerNorm) else None)


class _Recorder:
    """The tensors of one pass that receiver gradients are taken with respect to, per layer, with what turns their
    gradients into receiver-input gradients (ln1's saved rows for q/k/v)."""

    def __init__(self, n_layers: int):
        self.qkv: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(n_layers)]  # (qkv, xhat, scale)
        self.mlp_in: List[List[Tensor]] = [[] for _ in range(n_layers)]
        self.final: List[Tensor] = []

    def tensors(self) -> List[Tensor]:
        out = [t for layer in self.qkv for t, _, _ in layer] + [t for layer in self.mlp_in for t in layer]
        return out + self.final


def _attention_layer(w: _Weights, layer: int, resid: Tensor, mask: Tensor, rec: Optional[_Recorder],
                     per_head: bool) -> Tensor:
    """Attention of `layer` on `resid` `[n, p, d]`: the per-head results `[h, n, p, d]` (without b_O; head-major,
    the sender stack's layout) if `per_head`, else the summed output `[n, p, d]` with b_O."""
    cfg = w.model.cfg
    block = w.model.blocks[layer]
    attn = block.attn
    n, p, _ = resid.shape
    x, xhat, scale = _layer_norm(block.ln1, resid)
    qkv = F.linear(x, w.W_qkv_flat[layer], w.b_qkv[layer]).view(n, p, 3, cfg.n_heads, cfg.d_head)  # [n, p, 3, h, dh]
    if rec is not None:
        rows = (None, None) if xhat is None else (xhat.detach().reshape(n * p, -1), scale.detach().reshape(n * p, 1))
        rec.qkv[layer].append((qkv,) + rows)
    q, k, v = qkv.unbind(2)  # [n, p, h, dh] each
    z = sdpa_attention(q, k, v, attn.attn_scale, 0, mask)  # [n, p, h, dh]
    if per_head:
        return torch.bmm(z.permute(2, 0, 1, 3).reshape(cfg.n_heads, n * p, cfg.d_head), attn.W_O).view(
            cfg.n_heads, n, p, cfg.d_model)  # [h, n*p, dh] @ [h, dh, d] -> [h, n, p, d]
    return torch.addmm(attn.b_O, z.reshape(n * p, -1), attn.W_O.reshape(-1, cfg.d_model)).view(n, p, -1)


def _mlp_layer(w: _Weights, layer: int, resid_mid: Tensor, rec: Optional[_Recorder]) -> Tensor:
    block = w.model.blocks[layer]
    mlp = block.mlp
    if rec is not None:
        # A view is its own autograd node: the gradient taken with respect to it is the MLP branch's only (what
        # EAP-IG's hook_mlp_in sees), not the residual stream's total.
        resid_mid = resid_mid.view_as(resid_mid)
        rec.mlp_in[layer].append(resid_mid)
    x, _, _ = _layer_norm(block.ln2, resid_mid)
    post = w.act(addmm_last_dim(mlp.b_in, mlp.W_in, x))  # [n, p, m]
    return addmm_last_dim(mlp.b_out, mlp.W_out, post)  # [n, p, d]


def _run(w: _Weights, resid: Tensor, mask: Tensor, rec: Optional[_Recorder], start_layer: int = 0,
         start_mid: bool = False, senders: Optional[Tensor] = None, keep: Optional[Dict[str, list]] = None) -> Tensor:
    """Run the blocks from `start_layer` (from its MLP if `start_mid`, `resid` then being the residual after its
    attention) to the end and return the final residual `[n, p, d]`. `senders` `[n_forward, n, p, d]`, if given,
    receives the detached head results and MLP outputs; `keep` collects the residuals before each attention
    ('pre') and before each MLP ('mid') for branching."""
    cfg = w.model.cfg
    h = cfg.n_heads
    for layer in range(start_layer, cfg.n_layers):
        first = 1 + layer * (h + 1)
        if not (start_mid and layer == start_layer):
            if keep is not None:
                keep["pre"].append(resid)
            if senders is not None:
                result = _attention_layer(w, layer, resid, mask, rec, per_head=True)  # [h, n, p, d]
                senders[first:first + h] = result.detach()
                resid = resid + (result.sum(0) + w.model.blocks[layer].attn.b_O)
            else:
                resid = resid + _attention_layer(w, layer, resid, mask, rec, per_head=False)
        if keep is not None:
            keep["mid"].append(resid)
        mlp_out = _mlp_layer(w, layer, resid, rec)
        if senders is not None:
            senders[first + h] = mlp_out.detach()
        resid = resid + mlp_out
    return resid


def _logits(w: _Weights, resid: Tensor) -> Tensor:
    """ln_final and unembed, `[..., d]` -> `[..., v]` (passes record the logits receiver in `_Reader.total`)."""
    model = w.model
    x, _, _ = _layer_norm(model.ln_final, resid) if model.cfg.normalization_type is not None else (resid, None, None)
    return addmm_last_dim(model.unembed.b_U, model.unembed.W_U, x)  # [n, p, v]


def _embed(w: _Weights, tokens: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """(token embedding, positional embedding) `[b, p, d]` each, as the model computes them with a padding mask."""
    model = w.model
    with torch.no_grad():  # constants of every pass: gradients start at the residual stream
        return model.embed.W_E[tokens], model.pos_embed(tokens, 0, mask)


def _clean_run(w: _Weights, tokens: Tensor, mask: Tensor, logits: bool = True) -> Tuple[Optional[Tensor], Tensor]:
    """A no-grad forward: (logits `[b, p, v]` or None without `logits`, sender outputs `[n_forward, b, p, d]`)."""
    with torch.no_grad():
        embed, pos = _embed(w, tokens, mask)
        senders = _sender_buffer(w, embed)
        resid = _run(w, embed + pos, mask, None, senders=senders)
        return (_logits(w, resid) if logits else None), senders


def _sender_buffer(w: _Weights, embed: Tensor) -> Tensor:
    """`[n_forward, b, p, d]` sender outputs, the token embedding (the `input` sender) written."""
    senders = embed.new_empty((iv.n_forward(w.model.cfg),) + tuple(embed.shape))
    senders[0] = embed.detach()
    return senders


# -- receiver gradients and the contraction ---------------------------------------------------------------------
class _GradSums:
    """Receiver-input gradients of one batch, summed over the passes (steps, clean/corrupted) that share its
    difference tensor, receiver-major so the contraction is a plain GEMM: per layer `[3h, b*p, d]` for the heads'
    q/k/v inputs (q heads, k heads, v heads: the graph's backward order) and `[b*p, d]` for the MLP input, and
    `[b*p, d]` for the logits' input. None until a pass reaches them."""

    def __init__(self, w: _Weights, b: int, p: int):
        n_layers = w.model.cfg.n_layers
        self.w = w
        self.rows = b * p
        self.attn: List[Optional[Tensor]] = [None] * n_layers
        self.mlp: List[Optional[Tensor]] = [None] * n_layers
        self.final: Optional[Tensor] = None

    def _fold(self, grad: Tensor) -> Tensor:
        # `[..., copies * b * p, d]` rows (copy-major: steps, or clean / corrupted) -> `[..., b * p, d]`, each
        # example's copies summed
        return grad.reshape(grad.shape[:-2] + (-1, self.rows, grad.shape[-1])).sum(-3)

    @staticmethod
    def _acc(total: Optional[Tensor], part: Tensor) -> Tensor:
        return part if total is None else total.add_(part)

    def add(self, total: Tensor, rec: _Recorder, retain_graph: bool = False) -> None:
        tensors = rec.tensors()
        grads = torch.autograd.grad(total, tensors, allow_unused=True, retain_graph=retain_graph)
        w = self.w
        it = iter(grads)
        with torch.no_grad():
            for layer, entries in enumerate(rec.qkv):
                for (qkv, xhat, scale), g in zip(entries, it):
                    if g is None:
                        continue
                    n, p, three, h, dh = g.shape
                    g = g.permute(2, 3, 0, 1, 4).reshape(three * h, n * p, dh)  # [3h, n*p, dh]
                    g_ln = torch.bmm(g, w.W_qkv_T[layer])  # [3h, n*p, d]: the gradient at ln1's output, per head
                    g_in = _layer_norm_backward(w.ln1_w[layer], g_ln, xhat, scale)
                    self.attn[layer] = self._acc(self.attn[layer], self._fold(g_in))
            for layer, entries in enumerate(rec.mlp_in):
                for _, g in zip(entries, it):
                    if g is not None:
                        self.mlp[layer] = self._acc(self.mlp[layer], self._fold(g.reshape(-1, g.shape[-1])))
            for _, g in zip(rec.final, it):
                if g is not None:
                    self.final = self._acc(self.final, self._fold(g.reshape(-1, g.shape[-1])))


def _contract(scores: Tensor, diff: Tensor, grads: _GradSums, cfg) -> None:
    """scores[f, r] += sum over batch, pos, d of diff[f] * grad[r], for the senders before each receiver (EAP-IG's
    prev_index): per layer one `[senders, b*p*d] x [b*p*d, 3h]` GEMM and one matrix-vector product."""
    h = cfg.n_heads
    flat = diff.reshape(diff.shape[0], -1)  # [n_forward, b*p*d]
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            col = layer * (3 * h + 1)
            if grads.attn[layer] is not None:
                n_attn = iv.prev_index(cfg, layer, mlp=False)
                g = grads.attn[layer].reshape(3 * h, -1)  # [3h, b*p*d]
                scores[:n_attn, col:col + 3 * h] += (flat[:n_attn] @ g.T).to(scores.dtype)
            if grads.mlp[layer] is not None:
                n_mlp = iv.prev_index(cfg, layer, mlp=True)
                scores[:n_mlp, col + 3 * h] += (flat[:n_mlp] @ grads.mlp[layer].reshape(-1)).to(scores.dtype)
        if grads.final is not None:
            scores[:, -1] += (flat @ grads.final.reshape(-1)).to(scores.dtype)


# -- per-method passes ------------------------------------------------------------------------------------------
def _metric_sum(metric, logits: Tensor, copies: int, clean_logits, input_lengths, labels) -> Tensor:
    """Sum of `metric` over `copies` stacked copies of the batch (`logits` `[copies * b, p, v]`): the gradient of
    the sum is the sum of each copy's gradient, as EAP-IG's one-backward-per-step loop accumulates."""
    total = None
    for part in logits.chunk(copies, dim=0):
        value = _check_scalar(metric(part, clean_logits, input_lengths, labels))
        total = value if total is None else total + value
    return total


def _check_scalar(value):
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor (it is backpropagated), got {shape}; reduce it "
                         "over the batch (e.g. mean=True).")
    return value


def _last_rows(x: Tensor, lengths: Tensor) -> Tensor:
    """`[n, p, ...]` -> `[n, 1, ...]`: each row's position `lengths - 1` (its last real token under right padding)."""
    index = (lengths - 1).view((-1, 1) + (1,) * (x.dim() - 2)).expand((-1, 1) + tuple(x.shape[2:]))
    return x.gather(1, index)


def _reads_last_token_only(metric, clean_logits: Tensor, input_lengths: Tensor, labels) -> bool:
    """Whether `metric` reads the logits only at each prompt's last token, so the passes can unembed just those:
    on a probe unlike the clean logits (their vocabulary reversed, so a metric comparing the two has a non-zero
    gradient wherever it reads) the metric's gradient must be zero at every other position, and on the probe and
    on the clean logits the metric of the `[b, 1, v]` last-token logits with input_lengths all 1 must equal the full
    one. One probe per batch (its host sync is per batch, not per pass); a metric failing on `[b, 1, v]` logits
    reads more."""
    ones = torch.ones_like(input_lengths)
    others = torch.ones(clean_logits.shape[:2], dtype=torch.bool, device=clean_logits.device)  # [b, p]
    others[torch.arange(others.shape[0], device=others.device), input_lengths - 1] = False
    clean_logits = clean_logits.detach()
    clean_last = _last_rows(clean_logits, input_lengths)
    probe = clean_logits.flip(-1).requires_grad_(True)  # a new leaf [b, p, v]
    with torch.enable_grad():
        full = _check_scalar(metric(probe, clean_logits, input_lengths, labels))
        (grad,) = torch.autograd.grad(full, probe, allow_unused=True)
    if grad is not None and bool((grad.abs().amax(-1) * others).any()):  # [b, p]: read somewhere else
        return False
    with torch.no_grad():
        pairs = [(full.detach(), probe.detach()),
                 (metric(clean_logits, clean_logits, input_lengths, labels), clean_logits)]
        for value, logits in pairs:
            try:
                last = metric(_last_rows(logits, input_lengths), clean_last, ones, labels)
            except Exception:  # noqa: BLE001 - any failure on [b, 1, v] logits means the metric needs more
                return False
            value, last = torch.as_tensor(value).double(), torch.as_tensor(last).double()
            if value.shape != last.shape or not torch.allclose(value, last, rtol=1e-5, atol=1e-6, equal_nan=True):
                return False
    return True


class _Reader:
    """How a batch's passes turn their final residual into the metric: every position unembedded (as EAP-IG), or,
    when the metric reads only each prompt's last token, just those rows (the unembedding is most of a small
    model's forward and backward); the metric then gets `[n, 1, v]` logits, clean logits alike and input_lengths
    all 1, which the probe has checked give the same value and gradient."""

    def __init__(self, metric, labels, input_lengths: Tensor, clean_logits: Optional[Tensor], last: bool):
        self.metric, self.labels, self.input_lengths, self.last = metric, labels, input_lengths, last
        if last:
            self.clean = None if clean_logits is None else (
                clean_logits if clean_logits.shape[1] == 1 else _last_rows(clean_logits, input_lengths))
            self.lengths = torch.ones_like(input_lengths)
        else:
            self.clean, self.lengths = clean_logits, input_lengths

    def total(self, w: _Weights, resid: Tensor, rec: _Recorder, copies: int) -> Tensor:
        """Sum over the `copies` stacked copies of the batch in `resid` `[copies * b, p, d]` of the metric."""
        resid = resid.view_as(resid)  # the logits receiver's input (EAP-IG: the last block's hook_resid_post)
        rec.final.append(resid)
        if self.last:
            resid = _last_rows(resid, self.input_lengths.repeat(copies))  # [copies * b, 1, d]
        logits = _logits(w, resid)
        clean = logits.detach() if self.clean is None else self.clean  # EAP: the pass is the clean run
        return _metric_sum(self.metric, logits, copies, clean, self.lengths, self.labels)


def _make_reader(w: _Weights, metric_positions: Optional[str], metric, labels, input_lengths: Tensor,
                 clean_logits: Optional[Tensor], clean_resid: Optional[Tensor] = None) -> _Reader:
    """The batch's `_Reader`. `clean_logits` (full) or, for EAP, whose pass is the clean run, `clean_resid`."""
    if metric_positions == "all":
        return _Reader(metric, labels, input_lengths, clean_logits, last=False)
    with torch.no_grad():
        if metric_positions == "last":
            if clean_logits is None:
                clean_logits = _logits(w, _last_rows(clean_resid.detach(), input_lengths))  # [b, 1, v]
            return _Reader(metric, labels, input_lengths, clean_logits, last=True)
        if clean_logits is None:
            clean_logits = _logits(w, clean_resid.detach())  # [b, p, v], for the probe
    last = _reads_last_token_only(metric, clean_logits, input_lengths, labels)
    return _Reader(metric, labels, input_lengths, clean_logits, last=last)


def _chunks(n_items: int, rows_per_item: int, max_tokens: int, p: int) -> List[range]:
    per = max(1, max_tokens // max(1, rows_per_item * p))
    return [range(s, min(s + per, n_items)) for s in range(0, n_items, per)]


def _leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_(True)


def attribute(
    model,
    graph,
    dataloader,
    metric: Callable[..., Tensor],
    method: str,
    intervention: str = "patching",
    aggregation: str = "sum",
    ig_steps: Optional[int] = None,
    intervention_dataloader=None,
    quiet: bool = False,
    neuron: bool = False,
    *,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    metric_positions: Optional[str] = None,
) -> None:
    """EAP-IG's `attribute`: writes edge scores into `graph.scores` (`[n_forward, n_backward]`, zero for pairs that
    are not edges) in place.

    dataloader yields `(clean: list[str], corrupted: list[str], labels)`; `metric(logits, clean_logits,
    input_lengths, labels)` returns a scalar. method: 'EAP', 'EAP-IG-inputs' (needs ig_steps; interpolates the
    token embeddings from corrupted to clean), 'EAP-IG-activations' (needs ig_steps; interpolates each layer's
    attention / MLP output and the embeddings in turn), 'clean-corrupted' (gradients at the clean and the corrupted
    input, averaged), 'exact' (each edge patched alone). intervention: 'patching' (corrupted outputs), 'zero',
    'mean', 'mean-positional' (means over intervention_dataloader, EAP-IG's arithmetic); EAP-IG-inputs and
    clean-corrupted take 'patching' only. aggregation 'mean' divides the scores by d_model.

    hooklens's additions: max_batch_tokens bounds the tokens of one batched pass of integration steps.
    metric_positions: None probes per batch whether the metric reads only each prompt's last token
    (`input_lengths - 1`, as EAP-IG's metrics do) and then unembeds only those; 'last' asserts it, 'all' unembeds
    every position. Either way the scores are EAP-IG's.
    """
    _check_args(model, graph, method, intervention, aggregation, ig_steps, intervention_dataloader, metric, neuron)
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}.")
    if metric_positions not in (None, "last", "all"):
        raise ValueError(f"metric_positions must be None (probe), 'last' or 'all', got {metric_positions!r}.")
    if method == "exact":
        _attribute_exact(model, graph, dataloader, metric, intervention, aggregation, intervention_dataloader, quiet,
                         metric_positions)
        return None

    cfg = model.cfg
    device = next(model.parameters()).device
    acc_dtype = torch.float64 if cfg.dtype == torch.float64 else torch.float32
    scores = torch.zeros(iv.n_forward(cfg), iv.n_backward(cfg), dtype=acc_dtype, device=device)
    means = None
    if "mean" in intervention:
        means = iv.compute_means(model, intervention_dataloader, per_position=intervention == "mean-positional")

    if not quiet:
        from tqdm.auto import tqdm

        dataloader = tqdm(dataloader, desc=f"attribute ({method})")
    w = _Weights(model)
    total_items = 0
    with torch.enable_grad():
        for batch in dataloader:
            clean, corrupted, labels = batch
            total_items += len(clean)
            _attribute_batch(w, scores, method, intervention, ig_steps, means, clean, corrupted, labels, metric,
                             max_batch_tokens, metric_positions)
    if total_items == 0:
        raise ValueError("dataloader yielded no examples; give at least one (clean, corrupted, labels) batch.")
    _normalize_scores(scores, cfg, method, aggregation, ig_steps, total_items)
    graph.scores[:] = scores.to(device=graph.scores.device, dtype=graph.scores.dtype)
    return None


def _attribute_exact(model, graph, dataloader, metric, intervention: str, aggregation: str, intervention_dataloader,
                     quiet: bool, metric_positions: Optional[str]) -> None:
    """attribute(method='exact'): each edge patched alone (`hooklens.circuits.exact`)."""
    # imported here so the gradient methods never need it; by module path, as the package may bind `exact` to
    # the function
    from hooklens.circuits.exact import exact as exact_scores

    scores = exact_scores(model, graph, dataloader, metric, intervention=intervention,
                          intervention_dataloader=intervention_dataloader, quiet=quiet,
                          metric_positions=metric_positions)
    if aggregation == "mean":
        scores = scores / model.cfg.d_model
    graph.scores[:] = scores.to(graph.scores.device)


def _normalize_scores(scores: Tensor, cfg, method: str, aggregation: str, ig_steps: Optional[int],
                      total_items: int) -> None:
    """EAP-IG's normalization, in place: mean over examples, over integration steps x interpolated nodes, over the
    two gradients of clean-corrupted, and over d_model for aggregation 'mean'."""
    scores /= total_items
    if method in ("EAP-IG-inputs", "EAP-IG-activations"):
        n_nodes = 1 if method == "EAP-IG-inputs" else 1 + 2 * cfg.n_layers
        scores /= ig_steps * n_nodes
    elif method == "clean-corrupted":
        scores /= 2
    if aggregation == "mean":
        scores /= cfg.d_model


def _attribute_batch(w: _Weights, scores: Tensor, method: str, intervention: str, ig_steps: Optional[int], means,
                     clean: List[str], corrupted: List[str], labels: Any, metric, max_batch_tokens: int,
                     metric_positions: Optional[str]) -> None:
    model = w.model
    cfg = model.cfg
    clean_tokens, mask, input_lengths, n_pos = iv.tokenize_plus(model, clean)
    corrupted_tokens, _, _, n_pos_corrupted = iv.tokenize_plus(model, corrupted)
    b = clean_tokens.shape[0]
    if n_pos != n_pos_corrupted and intervention == "patching":
        raise ValueError(f"Number of positions must match, but do not: {n_pos} (clean) != {n_pos_corrupted} "
                         "(corrupted); give corrupted prompts of the clean prompts' token lengths.")
    if corrupted_tokens.shape[0] != b and intervention == "patching":
        raise ValueError(f"a batch has {b} clean but {corrupted_tokens.shape[0]} corrupted prompts; pair them.")
    with torch.no_grad():
        # what replaces a sender's clean output, broadcastable to [n_forward, b, p, d]: the corrupted run's outputs
        # (with the clean attention mask, as EAP-IG runs it), zeros or EAP-IG's means
        if intervention == "patching":
            replacement = _clean_run(w, corrupted_tokens, mask, logits=False)[1]
        else:
            replacement = iv.replacement_outputs(model, intervention, corrupted_tokens, mask, means).permute(2, 0, 1, 3)
    grads = _GradSums(w, b, n_pos)
    embed, pos = _embed(w, clean_tokens, mask)

    if method == "EAP":
        rec = _Recorder(cfg.n_layers)
        clean_senders = _sender_buffer(w, embed)
        resid = _run(w, _leaf(embed) + pos, mask, rec, senders=clean_senders)
        reader = _make_reader(w, metric_positions, metric, labels, input_lengths, None, clean_resid=resid)
        grads.add(reader.total(w, resid, rec, 1), rec)
    elif method == "clean-corrupted":
        clean_logits, clean_senders = _clean_run(w, clean_tokens, mask)
        corrupted_embed, _ = _embed(w, corrupted_tokens, mask)
        reader = _make_reader(w, metric_positions, metric, labels, input_lengths, clean_logits)
        rec = _Recorder(cfg.n_layers)
        both = torch.cat([embed, corrupted_embed]) + pos.repeat(2, 1, 1)  # [2b, p, d]: clean rows, corrupted rows
        grads.add(reader.total(w, _run(w, _leaf(both), mask.repeat(2, 1), rec), rec, 2), rec)
    elif method == "EAP-IG-inputs":
        clean_logits, clean_senders = _clean_run(w, clean_tokens, mask)
        corrupted_embed = replacement[0]  # [b, p, d]
        delta = clean_senders[0] - corrupted_embed
        reader = _make_reader(w, metric_positions, metric, labels, input_lengths, clean_logits)
        for steps in _chunks(ig_steps, b, max_batch_tokens, n_pos):
            alphas = torch.arange(steps.start, steps.stop, device=embed.device, dtype=embed.dtype) / ig_steps
            interp = corrupted_embed + alphas.view(-1, 1, 1, 1) * delta  # [k, b, p, d]
            k = len(steps)
            rec = _Recorder(cfg.n_layers)
            resid = _leaf(interp.reshape(k * b, n_pos, -1)) + pos.repeat(k, 1, 1)  # [k*b, p, d]
            grads.add(reader.total(w, _run(w, resid, mask.repeat(k, 1), rec), rec, k), rec)
    else:  # EAP-IG-activations
        clean_senders = _ig_activations(w, grads, embed, pos, mask, replacement, intervention, ig_steps, metric,
                                        input_lengths, labels, max_batch_tokens, metric_positions)
    with torch.no_grad():
        # corrupted (or intervened) - clean: EAP-IG's activation difference, [n_forward, b, p, d]
        diff = torch.sub(replacement, clean_senders, out=torch.empty_like(clean_senders))
    _contract(scores, diff, grads, cfg)


def _ig_activations(w: _Weights, grads: _GradSums, embed: Tensor, pos: Tensor, mask: Tensor, replacement: Tensor,
                    intervention: str, ig_steps: int, metric, input_lengths, labels, max_batch_tokens: int,
                    metric_positions: Optional[str]) -> Tensor:
    """EAP-IG-activations: for each node of [input, attention layer 0, MLP 0, attention layer 1, ...] and step
    k = 1..steps, the clean run with that node's output replaced by `a * clean + (1 - a) * corrupted` (a = k/steps;
    'corrupted' is the corrupted run's output for 'patching' and zero otherwise, as in EAP-IG). Returns the clean
    sender outputs. The clean trunk runs once with gradients; each node's steps branch off it."""
    model = w.model
    cfg = model.cfg
    b, p, _ = embed.shape
    h = cfg.n_heads
    rec_trunk = _Recorder(cfg.n_layers)
    keep: Dict[str, list] = {"pre": [], "mid": []}
    senders = _sender_buffer(w, embed)
    trunk_end = _run(w, _leaf(embed) + pos, mask, rec_trunk, senders=senders, keep=keep)
    reader = _make_reader(w, metric_positions, metric, labels, input_lengths, None, clean_resid=trunk_end)
    reader.clean = reader.clean if reader.clean is not None else _logits(w, trunk_end.detach())
    corrupted = replacement if intervention == "patching" else None  # None: zeros, as EAP-IG interpolates

    # (node rows of the sender stack, how a branch resumes, layer) in EAP-IG's node order
    nodes: List[Tuple[slice, str, int]] = [(slice(0, 1), "input", 0)]
    for layer in range(cfg.n_layers):
        first = 1 + layer * (h + 1)
        nodes.append((slice(first, first + h), "attn", layer))
        nodes.append((slice(first + h, first + h + 1), "mlp", layer))
    for index, (node, kind, layer) in enumerate(nodes):
        clean_out = senders[node]  # [n_node, b, p, d]
        corrupted_out = corrupted[node] if corrupted is not None else torch.zeros_like(clean_out)
        for steps in _chunks(ig_steps, b, max_batch_tokens, p):
            k = len(steps)
            alphas = torch.arange(steps.start + 1, steps.stop + 1, device=embed.device, dtype=embed.dtype) / ig_steps
            a = alphas.view(-1, 1, 1, 1, 1)
            with torch.no_grad():
                out = a * clean_out + (1 - a) * corrupted_out  # [k, n_node, b, p, d]
                out = out.sum(1) if kind == "attn" else out[:, 0]  # [k, b, p, d]: the layer's summed heads
                out = out.reshape(k * b, p, cfg.d_model)  # [k*b, p, d]
            rec = _Recorder(cfg.n_layers)
            rows = mask.repeat(k, 1)
            if kind == "input":
                # a leaf: the branch starts from constants, yet its receivers need gradients
                resid = _run(w, _leaf(out + pos.repeat(k, 1, 1)), rows, rec)
            elif kind == "attn":
                resid_mid = keep["pre"][layer].repeat(k, 1, 1) + out + model.blocks[layer].attn.b_O
                resid = _run(w, resid_mid, rows, rec, start_layer=layer, start_mid=True)
            else:
                resid = _run(w, keep["mid"][layer].repeat(k, 1, 1) + out, rows, rec, start_layer=layer + 1)
            total = reader.total(w, resid, rec, k)
            # the trunk's recorded tensors join the branch's, so the gradient reaching the trunk is captured too
            for layer_index in range(cfg.n_layers):
                rec.qkv[layer_index] = rec_trunk.qkv[layer_index] + rec.qkv[layer_index]
                rec.mlp_in[layer_index] = rec_trunk.mlp_in[layer_index] + rec.mlp_in[layer_index]
            last = index == len(nodes) - 1 and steps.stop == ig_steps
            grads.add(total, rec, retain_graph=not last)
    return senders
