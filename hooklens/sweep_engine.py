"""The packed forward of the sweep engine: every variant of a chunk, of every layer, in one pass over the blocks.

A variant `(layer l, first affected position s)` changes nothing in blocks before `l` and nothing at positions
before `s` (causal attention), so its floor is blocks `l..` at positions `s..` only, reading the corrupted run's
keys and values at earlier positions. This module runs exactly that, for all variants of a chunk at once:

* Tokens are *packed*: every position-wise op (LayerNorms, the q/k/v/out projections, the MLP, the unembedding)
  runs on one `[tokens, d]` matrix holding only the live tokens — `(row, position)` pairs with `position >= s` of
  variants whose layer has been reached. Variants are sorted by layer, so the live tokens of block `j` are a prefix
  of one precomputed list, and block `j` appends the tokens of the variants starting there (read from the corrupted
  run's input of block `j`). One GEMM per weight per block serves every variant: the weights are read once per
  chunk, and no token is computed that a patch cannot change.
* Attention is the one op that needs each row whole: queries, keys and values are scattered into padded
  `[rows, positions, head, d_head]` tensors that start as the corrupted run's keys / values (so positions before a
  variant's start hold exactly what its patch cannot change), attention runs once per block on them (SDPA, the
  same call the model makes), and z is gathered back at the live tokens.
* Positions after the last one the metric reads cannot change its logits: they are never computed. In the last
  block only the metric's positions go through the attention output, the MLP and the unembedding.
* The patch is applied inside the pass (no hook points fire, nothing is per-variant on the host): at block `l` the
  tokens (or rows, for patterns) of the variants starting there take the clean values where their masks say.

`plan_chunk` builds every index tensor and mask of a chunk up front (on the host and in one transfer); the forward
(`packed_forward`) does no host sync and no Python work per variant: its number of ops depends on the number of
blocks, not of variants (tests/test_sweep_engine.py counts them). Models and activations it does not cover (split
q/k/v inputs, the "eager" attention backend, LayerNorm-internal hooks, ...) run on the hook-based path of
`hooklens.sweeps` instead (`packed_kind` says which).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from hooklens import attention as attn_ops
from hooklens.utils import get_act_name

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import HookedTransformer

# The hook points the packed forward patches, by the end of their name: kind -> hook name's tail.
_KINDS = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "q": "attn.hook_q", "k": "attn.hook_k",
    "v": "attn.hook_v", "z": "attn.hook_z", "attn_scores": "attn.hook_attn_scores", "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre", "post": "mlp.hook_post",
}
_PER_ROW = ("attn_scores", "pattern")  # [batch, head, query pos, key pos]: patched on padded rows, not tokens


def packed_kind(model: "HookedTransformer", activation_name: str, layer: int) -> Optional[str]:
    """Which hook point of the packed forward `activation_name` (a `get_act_name` shorthand) is, or None when the
    packed forward cannot run this sweep on this model (then the hook-based path does)."""
    cfg = model.cfg
    if (cfg.use_split_qkv_input or cfg.use_attn_in or cfg.positional_embedding_type != "standard"
            or cfg.attention_dir != "causal" or attn_ops.eager_backend()):
        return None
    full = get_act_name(activation_name, layer)
    for kind, tail in _KINDS.items():
        if full == f"blocks.{layer}.{tail}":
            if cfg.attn_only and kind in ("resid_mid", "mlp_out", "pre", "post"):
                return None
            return kind
    return None


@dataclass
class ChunkPlan:
    """Everything a chunk's forward indexes with, built before it runs. Variants are sorted by layer; variant v of
    the chunk owns rows v*b .. v*b+b-1 of every padded tensor. Live tokens are listed row by row, position by
    position, so those of block j are the prefix `[:tokens_upto[j]]`."""

    n: int  # variants
    batch: int
    length: int  # positions computed: up to the last one the metric reads
    first_query: int  # the chunk's earliest start: padded queries cover positions first_query..length-1
    first_layer: int
    rows_upto: List[int]  # per block j >= first_layer: rows (variants * batch) of variants with layer <= j
    tokens_upto: List[int]  # per block j: live tokens of those rows
    key_index: Tensor  # [tokens] row * length + position: a live token's place in padded keys / values
    query_index: Tensor  # [tokens] row * (length - first_query) + position - first_query: in padded queries
    source_index: Tensor  # [tokens] (row % batch) * length + position: in a [batch, length] activation
    out_tokens: Tensor  # [k] live tokens (of the last block) at the metric's positions
    out_rows_from: int  # out_tokens[out_rows_from:] belong to variants starting at the last block
    out_logit_index: Tensor  # [k] row * seq_len + position: where their logits go in [n*b, seq_len, vocab]
    # [n + 1] (host ints): variant v's tokens are out_tokens[out_variant_bounds[v]:out_variant_bounds[v + 1]]
    # (tokens are listed row by row), so the metric can run on a few variants' logits at a time
    out_variant_bounds: List[int]
    # block -> (mask or index, clean) for the variants starting there: a bool mask, or (scores / patterns of an
    # index sweep) the int64 coordinates along `patch_axes` for `index_patch_`
    patches: Dict[int, Tuple[Tensor, Tensor]]
    patch_axes: Optional[Tuple[int, ...]]
    attention_mask: Optional[Tensor]  # [n*b, length] for padded prompts


def _live_tokens(rows: Tensor, starts: Tensor, length: int) -> Tuple[Tensor, Tensor]:
    """(row, position) of every live token, row by row: positions start[r]..length-1 of each row r."""
    counts = (length - starts).clamp(min=0)  # [rows]
    row = torch.repeat_interleave(rows, counts)  # [tokens]
    first = torch.cumsum(counts, 0) - counts  # [rows] index of each row's first token
    position = torch.arange(len(row)) - torch.repeat_interleave(first, counts) + torch.repeat_interleave(starts,
                                                                                                           counts)
    return row, position


def plan_chunk(model: "HookedTransformer", layers: Tensor, starts: Tensor, indices: Tensor, sweep, kind: str,
               clean_of, act_shape: Tuple[int, ...], batch: int, seq_len: int, positions: Tensor,
               attention_mask: Optional[Tensor], device) -> ChunkPlan:
    """The plan of one chunk: `layers`, `starts` `[n]` (CPU, sorted by layer) and `indices` `[n, n_axes]` of its
    variants; `clean_of(layer)` gives the clean activation `[b, *act_shape]` at the patched hook of `layer`;
    `positions` (CPU) the metric's positions. Built on the host, moved to `device` once."""
    n, n_layers = len(layers), model.cfg.n_layers
    positions = positions.cpu()
    length = int(positions.max()) + 1  # later positions cannot change the metric's logits
    starts = starts.clamp(max=length)
    first_query = min(int(starts.min()), length - 1)
    row_layer = layers.repeat_interleave(batch)  # [n*b]
    row_start = starts.repeat_interleave(batch)
    row, position = _live_tokens(torch.arange(n * batch), row_start, length)
    per_row = (length - row_start).clamp(min=0)
    first_layer = int(layers[0])
    rows_upto, tokens_upto = [], []
    for j in range(first_layer, n_layers):  # per block, not per variant
        rows = int((row_layer <= j).sum())
        rows_upto.append(rows)
        tokens_upto.append(int(per_row[:rows].sum()))
    last_new_row = rows_upto[-2] if len(rows_upto) > 1 else 0
    wanted = torch.zeros(length, dtype=torch.bool)
    wanted[positions] = True
    out_tokens = torch.nonzero(wanted[position]).flatten()
    out_rows_from = int((row[out_tokens] < last_new_row).sum())
    out_variant_bounds = torch.searchsorted(row[out_tokens], torch.arange(n + 1) * batch).tolist()
    patches = {}
    patch_axes = _row_index_axes(kind, sweep, indices, act_shape, length, first_query)
    for j in layers.unique().tolist():
        members = torch.nonzero(layers == j).flatten()
        patches[j] = _patch_tensors(kind, sweep, indices[members], clean_of(j), act_shape, batch, length,
                                    first_query, row, position, int(members[0]) * batch, int(members[-1] + 1) * batch,
                                    patch_axes)
    to = dict(device=device)
    return ChunkPlan(
        n=n, batch=batch, length=length, first_query=first_query, first_layer=first_layer, rows_upto=rows_upto,
        tokens_upto=tokens_upto, key_index=(row * length + position).to(**to),
        query_index=(row * (length - first_query) + position - first_query).to(**to),
        source_index=((row % batch) * length + position).to(**to), out_tokens=out_tokens.to(**to),
        out_rows_from=out_rows_from, out_variant_bounds=out_variant_bounds,
        out_logit_index=(row[out_tokens] * seq_len + position[out_tokens]).to(**to),
        patches=patches, patch_axes=patch_axes,
        attention_mask=None if attention_mask is None else
        attention_mask[:, :length].repeat(n, 1).to(**to),  # [n*b, length], variant-major
    )


def _row_index_axes(kind: str, sweep, indices: Tensor, act_shape: Tuple[int, ...], length: int,
                    first_query: int) -> Optional[Tuple[int, ...]]:
    """The axes to patch scores / patterns by index along (`index_patch_`, which writes only the patched entries,
    where a mask would be `[variants, h, q, k]`): an index sweep's, when every coordinate lies in the computed
    `[h, q, k]` window (a variant whose query position was not computed changes nothing the metric reads, but its
    coordinate must still be in range); None: masks."""
    axes = getattr(sweep, "axes", None)
    if kind not in _PER_ROW or axes is None:
        return None
    window = (act_shape[0], (first_query, length), (0, length))  # head; query and key position ranges
    for column, axis in enumerate(axes, start=1):
        low, high = (0, window[0]) if axis == 0 else window[axis]
        values = indices[:, column]
        if len(values) and not (int(values.min()) >= low and int(values.max()) < high):
            return None
    return tuple(axes)


def _patch_tensors(kind: str, sweep, indices: Tensor, clean: Tensor, act_shape: Tuple[int, ...], batch: int,
                   length: int, first_query: int, row: Tensor, position: Tensor, row_lo: int, row_hi: int,
                   row_axes: Optional[Tuple[int, ...]]) -> Tuple[Tensor, Tensor]:
    """(mask or index, clean) of the variants starting at one block, laid out as the packed forward holds the
    activation there: per live token of rows row_lo..row_hi-1 (`[tokens, *rest]` mask and clean), or per row for
    scores / patterns (`[m, 1, h, queries, keys]` mask, or `[m, len(row_axes)]` coordinates relative to the
    window, and `[b, h, queries, keys]` clean)."""
    device = clean.device
    if kind in _PER_ROW:
        window = clean[:, :, first_query:length, :length]  # [b, h, q, k]
        if row_axes is not None:
            coords = indices[:, 1:].clone()
            for column, axis in enumerate(row_axes):
                if axis == 1:  # the query position, counted from the window's first query
                    coords[:, column] -= first_query
            return coords.to(device), window
        masks = sweep.build_masks(indices, act_shape)  # [m, h, seq, seq]
        return masks[:, :, first_query:length, :length].unsqueeze(1).to(device), window  # [m, 1, h, q, k]
    masks = sweep.build_masks(indices, act_shape)  # [m, *act_shape]
    live = (row >= row_lo) & (row < row_hi)
    variant, at = torch.div(row[live] - row_lo, batch, rounding_mode="floor"), position[live]
    # Advanced indexing, not reshape + index: the ops do not depend on whether a reshape could be a view (m == 1).
    token_masks = masks[variant, at]  # [tokens, *rest]
    token_clean = clean[(row[live] % batch).to(device), at.to(device)]  # [tokens, *rest]
    return token_masks.to(device), token_clean


def _patch_tokens(act: Tensor, start: int, patch: Tuple[Tensor, Tensor]) -> Tensor:
    """Tokens `start:` of `act` take the clean values where masked (in the activation's own dtype, which autocast
    may have made differ from the clean run's)."""
    mask, clean = patch
    patched = torch.where(mask, clean.to(act.dtype), act[start:])
    return torch.cat([act[:start], patched]) if start else patched


def _select_patch(patch: Tuple[Tensor, Tensor], which: Tensor) -> Tuple[Tensor, Tensor]:
    return patch[0][which], patch[1][which]


@torch.no_grad()
def packed_forward(model: "HookedTransformer", plan: ChunkPlan, kind: str, block_inputs: List[Tensor],
                   keys: List[Tensor], values: List[Tensor]) -> Tensor:
    """The final residual stream `[k, d_model]` of every variant of the chunk at its metric-position tokens
    (`plan.out_tokens`). `block_inputs[j]`, `keys[j]`, `values[j]`: the corrupted run's input of block j
    `[b, seq, d]` and its keys / values `[b, seq, h, dh]`."""
    cfg, length, batch = model.cfg, plan.length, plan.batch
    n_layers = cfg.n_layers
    resid: Optional[Tensor] = None
    last_new = 0  # first token of the variants starting at the current block
    for step, j in enumerate(range(plan.first_layer, n_layers)):
        block = model.blocks[j]
        rows, tokens = plan.rows_upto[step], plan.tokens_upto[step]
        before = plan.tokens_upto[step - 1] if step else 0
        new = block_inputs[j][:, :length].reshape(batch * length, -1).index_select(
            0, plan.source_index[before:tokens])  # [new tokens, d]
        resid = new if resid is None else torch.cat([resid, new])  # [tokens, d]
        last_new = before
        patch = plan.patches.get(j)
        last = j == n_layers - 1

        def patched(name: str, act: Tensor, start: int, which: Optional[Tensor] = None) -> Tensor:
            if patch is None or name != kind:
                return act
            return _patch_tokens(act, start, patch if which is None else _select_patch(patch, which))

        resid = patched("resid_pre", resid, last_new)
        normed = block.ln1(resid)
        if last:  # only the metric's positions need queries, the attention output and the MLP
            out = plan.out_tokens
            out_patch = out[plan.out_rows_from:] - last_new  # their indices among the new tokens
            q_in, q_tokens, q_from = normed.index_select(0, out), out, plan.out_rows_from
        else:
            out_patch, q_in, q_tokens, q_from = None, normed, None, last_new
        attn = block.attn
        q = patched("q", _project(q_in, attn.W_Q, attn.b_Q), q_from, out_patch)  # [queries, h, dh]
        k = patched("k", _project(normed, attn.W_K, attn.b_K), last_new)  # [tokens, h, dh]
        v = patched("v", _project(normed, attn.W_V, attn.b_V), last_new)
        z = _attention(block, plan, rows, tokens, q, k, v, keys[j], values[j], q_tokens,
                       patch if kind in _PER_ROW else None, kind, rows - (plan.rows_upto[step - 1] if step else 0))
        z = patched("z", z, q_from, out_patch)  # [queries, h, dh]
        h, dh = z.shape[-2:]
        attn_out = torch.addmm(attn.b_O, z.reshape(-1, h * dh), attn.W_O.reshape(h * dh, -1))  # [queries, d]
        attn_out = patched("attn_out", attn_out, q_from, out_patch)
        resid = resid.index_select(0, q_tokens) if last else resid
        resid = patched("resid_mid", resid + attn_out, q_from, out_patch)
        if not cfg.attn_only:
            mlp = block.mlp
            pre = patched("pre", torch.addmm(mlp.b_in, block.ln2(resid), mlp.W_in), q_from, out_patch)
            post = _gelu_new_(pre) if cfg.act_fn == "gelu_new" else mlp.act_fn(pre)
            if cfg.act_fn == "solu_ln":
                post = mlp.ln(post)
            post = patched("post", post, q_from, out_patch)
            mlp_out = patched("mlp_out", torch.addmm(mlp.b_out, post, mlp.W_out), q_from, out_patch)
            resid = resid + mlp_out
        resid = patched("resid_post", resid, q_from, out_patch)
    return resid


def _gelu_new_(x: Tensor) -> Tensor:
    """`components.gelu_new(x)` (GPT-2's tanh GELU) in one temporary instead of seven, reusing `x` (which the
    caller no longer needs): the same ops in the same order, bit for bit equal, ~2.7x faster on CPU where the
    elementwise passes are memory-bound."""
    t = x * x
    t.mul_(x).mul_(0.044715).add_(x).mul_(math.sqrt(2.0 / math.pi)).tanh_().add_(1.0)
    return t.mul_(x).mul_(0.5)


def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """`[tokens, d]` -> `[tokens, h, dh]`, as `Attention._project` computes it (F.linear on the head-major view)."""
    h, d, dh = W.shape
    return torch.nn.functional.linear(x, W.permute(0, 2, 1).reshape(h * dh, d), b.reshape(h * dh)).view(-1, h, dh)


def _attention(block, plan: ChunkPlan, rows: int, tokens: int, q: Tensor, k: Tensor, v: Tensor, keys: Tensor,
               values: Tensor, q_tokens: Optional[Tensor], patch, kind: str, new_rows: int) -> Tensor:
    """z `[queries, h, dh]` of the live queries: padded per row, keys / values the corrupted run's where a row has
    no live token, the row's own elsewhere."""
    length, first_query, batch = plan.length, plan.first_query, plan.batch
    n_queries = length - first_query
    h, dh = k.shape[-2:]
    n_variants = rows // batch

    def padded(corrupted: Tensor, live: Tensor) -> Tensor:  # [b, seq, h, dh] -> [rows * length, h, dh]
        # One copy of the corrupted values per variant, then the live tokens scattered in place (the same ops for
        # any number of variants: an expand + reshape would skip its copy for one variant).
        full = live.new_empty(rows * length, h, dh)
        full.view(n_variants, batch, length, h, dh).copy_(corrupted[:, :length].unsqueeze(0))
        return full.index_copy_(0, plan.key_index[:tokens], live)

    k_rows = padded(keys, k).view(rows, length, h, dh)
    v_rows = padded(values, v).view(rows, length, h, dh)
    query_index = plan.query_index[:tokens] if q_tokens is None else plan.query_index.index_select(0, q_tokens)
    q_rows = q.new_zeros(rows * n_queries, h, dh).index_copy(0, query_index, q).view(rows, n_queries, h, dh)
    mask = None if plan.attention_mask is None else plan.attention_mask[:rows]
    scale = block.attn.cfg.attn_scale
    if patch is None:
        z = attn_ops.sdpa_attention(q_rows, k_rows, v_rows, scale, first_query, mask)  # [rows, queries, h, dh]
    else:  # scores / pattern patched: TL's reference steps, the new rows patched between them
        scores = attn_ops.attention_scores(q_rows, k_rows, scale, first_query, mask)  # [rows, h, queries, keys]
        if kind == "attn_scores":
            scores = _patch_rows(scores, patch, new_rows, batch, plan.patch_axes)
        pattern = attn_ops.softmax_pattern(scores)
        if kind == "pattern":
            pattern = _patch_rows(pattern, patch, new_rows, batch, plan.patch_axes)
        z = attn_ops.z_from_pattern(pattern, v_rows)
    return z.reshape(rows * n_queries, h, dh).index_select(0, query_index)


def _patch_rows(act: Tensor, patch: Tuple[Tensor, Tensor], new_rows: int, batch: int,
                axes: Optional[Tuple[int, ...]]) -> Tensor:
    """The last `new_rows` rows of a `[rows, h, q, k]` activation take the clean values where masked, or at their
    coordinates (`index_patch_`, in place: `act` is this forward's own tensor)."""
    where, clean = patch  # [m, 1, h, q, k] bool or [m, len(axes)] int64; [b, h, q, k]
    if axes is not None:
        from hooklens.ops.patching import index_patch_  # lazy: keeps hooklens.ops off `import hooklens`

        # Bounds were checked where the coordinates were built (`_row_index_axes`): no host sync per chunk here.
        index_patch_(act[act.shape[0] - new_rows:], clean.to(act.dtype), where, axes, check_bounds=False)
        return act
    old = act[: act.shape[0] - new_rows]
    new = act[act.shape[0] - new_rows:].view((where.shape[0], batch) + tuple(act.shape[1:]))
    new = torch.where(where, clean.to(act.dtype).unsqueeze(0), new).reshape((-1,) + tuple(act.shape[1:]))
    return torch.cat([old, new])
