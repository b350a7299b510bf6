"""The modules of a hooked GPT-2, with TransformerLens's parameter names, layouts and hook points.

Shapes use b = batch, p = position, h = head, dh = d_head, d = d_model, m = d_mlp, v = d_vocab.
Numerics follow TransformerLens 3.9 (see ../shared/reference/transformerlens-3.9.md), so activations match
TL's to float rounding.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hooklens import attention as attn_ops
from hooklens.config import HookedTransformerConfig
from hooklens.factored_matrix import FactoredMatrix
from hooklens.hook_points import HookPoint


# -- activation functions (TL's exact formulas) ----------------------------------------------------------------
def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU, written exactly as TL/HF write it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def solu(x: Tensor) -> Tensor:
    return x * F.softmax(x, dim=-1)


ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": gelu_new,
    "gelu_fast": gelu_fast,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "solu_ln": solu,
}


def addmm_last_dim(bias: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """`x @ weight + bias` over the last dim of x, as one fused addmm (this matches HF's Conv1D bit for bit)."""
    out_shape = x.shape[:-1] + (weight.shape[-1],)
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(out_shape)


# -- embeddings -------------------------------------------------------------------------------------------------
class Embed(nn.Module):
    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Tensor) -> Tensor:  # [b, p] -> [b, p, d]
        return self.W_E[tokens, :]


class PosEmbed(nn.Module):
    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Tensor, past_kv_pos_offset: int = 0, attention_mask: Optional[Tensor] = None) -> Tensor:
        """[b, p] tokens -> [b, p, d]. With a padding mask, positions count from each row's first real token and
        pad positions get a zero embedding (TL's convention, so left padding leaves logits unchanged)."""
        batch, length = tokens.shape
        if attention_mask is None:
            pos_embed = self.W_pos[past_kv_pos_offset : past_kv_pos_offset + length]  # [p, d]
            return pos_embed.unsqueeze(0).expand(batch, -1, -1).clone()  # [b, p, d]
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, past_kv_pos_offset:]  # [b, p]
        pos_embed = self.W_pos[position_ids]  # [b, p, d]
        is_pad = ~attention_mask.bool()[:, past_kv_pos_offset : past_kv_pos_offset + length, None]  # [b, p, 1]
        return torch.where(is_pad, 0, pos_embed)


# -- normalization ----------------------------------------------------------------------------------------------
class LayerNormPre(nn.Module):
    """LayerNorm without weight and bias (what LN becomes once its w, b are folded into the next layer)."""

    def __init__(self, cfg: HookedTransformerConfig, length: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.eps = cfg.eps
        self.length = cfg.d_model if length is None else length
        self.hook_scale = HookPoint()  # [b, p, 1]
        self.hook_normalized = HookPoint()  # [b, p, length]

    def _normalize(self, x: Tensor) -> Tensor:
        if self.cfg.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)  # TL normalizes low-precision activations in float32
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale).to(self.cfg.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._normalize(x)


class LayerNorm(LayerNormPre):
    """LayerNorm with weight `w` and bias `b`; note TL's `hook_normalized` fires before `w`, `b` are applied."""

    def __init__(self, cfg: HookedTransformerConfig, length: Optional[int] = None):
        super().__init__(cfg, length)
        self.w = nn.Parameter(torch.ones(self.length, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(self.length, dtype=cfg.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self._normalize(x) * self.w + self.b


def make_norm(cfg: HookedTransformerConfig, length: Optional[int] = None) -> nn.Module:
    if cfg.normalization_type == "LN":
        return LayerNorm(cfg, length)
    if cfg.normalization_type == "LNPre":
        return LayerNormPre(cfg, length)
    return nn.Identity()


# -- attention --------------------------------------------------------------------------------------------------
def _head_major(h: int, d: int, dh: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised [h, d, dh] tensor (TL's shape for W_Q/W_K/W_V) stored as [h, dh, d]: F.linear's [h*dh, d]
    weight is then a view (`W.permute(0, 2, 1).reshape(h * dh, d)`), not a 2.4 MB copy per projection per
    forward (GPT-2 small), which would dominate the cost of a 1-token forward. Values, shapes, state-dict keys and the
    numerics are unchanged; only the strides differ. `state_dict()` hands out TL's contiguous layout (see
    `Attention._save_to_state_dict`)."""
    return torch.empty(h, dh, d, dtype=dtype).transpose(1, 2)


def _run_hook(hook_point: HookPoint, activation: Tensor) -> Tuple[Tensor, bool]:
    """`hook_point(activation)` and whether a hook edited it: returned another tensor, or changed it in place (its
    `_version` moved). A write through `.data` or a NumPy view moves neither, so when a hook other than a caching
    hook is attached the values are also compared with a copy taken before the hooks ran (one extra pass; caching
    hooks alone cost nothing). An inference tensor has no version counter, so it counts as edited (only the eager
    backend passes such tensors, and it recomputes nothing either way)."""
    if activation.is_inference():
        return hook_point(activation), True
    before = activation.detach().clone() if hook_point.may_edit() else None
    version = activation._version
    hooked = hook_point(activation)
    edited = hooked is not activation or activation._version != version
    if not edited and before is not None:
        edited = not torch.equal(before, activation.detach())
    return hooked, edited


class Attention(nn.Module):
    def __init__(self, cfg: HookedTransformerConfig, layer_id: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        # Registration order is TL's, so a seeded init_weights() draws the same weights as TL does.
        self.W_Q = nn.Parameter(_head_major(h, d, dh, cfg.dtype))
        self.W_O = nn.Parameter(torch.empty(h, dh, d, dtype=cfg.dtype))
        self.b_Q = nn.Parameter(torch.zeros(h, dh, dtype=cfg.dtype))
        self.b_O = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
        self.W_K = nn.Parameter(_head_major(h, d, dh, cfg.dtype))
        self.W_V = nn.Parameter(_head_major(h, d, dh, cfg.dtype))
        self.b_K = nn.Parameter(torch.zeros(h, dh, dtype=cfg.dtype))
        self.b_V = nn.Parameter(torch.zeros(h, dh, dtype=cfg.dtype))
        # TL keeps these two (unused here) buffers in its state dict; holding them too lets state dicts
        # move between the libraries unchanged.
        self.register_buffer("mask", torch.empty((0, 0), dtype=torch.bool))
        self.register_buffer("IGNORE", torch.tensor(-torch.inf))
        self.attn_scale = cfg.attn_scale
        self.hook_k = HookPoint()  # [b, p, h, dh]
        self.hook_q = HookPoint()  # [b, p, h, dh]
        self.hook_v = HookPoint()  # [b, p, h, dh]
        self.hook_z = HookPoint()  # [b, p, h, dh]
        self.hook_attn_scores = HookPoint()  # [b, h, q, k]
        self.hook_pattern = HookPoint()  # [b, h, q, k]
        self.hook_result = HookPoint()  # [b, p, h, d]

    def _save_to_state_dict(self, destination: Dict[str, Tensor], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            # Head-major W_Q/W_K/W_V go out in TL's contiguous layout, so safetensors.save_file (which refuses
            # strided tensors) and .view work on a state dict as on TL's. A copy per call: state dicts are rare.
            for name in ("W_Q", "W_K", "W_V"):
                destination[prefix + name] = destination[prefix + name].contiguous()

    @staticmethod
    def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """[b, p, d] (shared input) or [b, p, h, d] (per-head input) -> [b, p, h, dh]."""
        h, d, dh = W.shape
        if x.dim() == 4:
            if attn_ops.eager_backend():
                W = W.contiguous()  # TL's layout: the einsum's GEMM rounds differently on head-major strides
            return torch.einsum("bphd,hde->bphe", x, W) + b
        W_flat = W.permute(0, 2, 1).reshape(h * dh, d)  # [h*dh, d], TL's F.linear layout (a view: _head_major)
        return F.linear(x, W_flat, b.reshape(h * dh)).view(x.shape[0], x.shape[1], h, dh)

    def forward(
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        past_kv_cache_entry=None,
        attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        q = self.hook_q(self._project(query_input, self.W_Q, self.b_Q))  # [b, p, h, dh]
        k = self.hook_k(self._project(key_input, self.W_K, self.b_K))  # [b, p, h, dh]
        v = self.hook_v(self._project(value_input, self.W_V, self.b_V))  # [b, p, h, dh]
        pos_offset = 0
        if past_kv_cache_entry is not None:
            pos_offset = past_kv_cache_entry.past_keys.shape[1]
            k, v = past_kv_cache_entry.append(k, v)  # [b, past + p, h, dh]
        if attention_mask is not None:
            attention_mask = attention_mask[:, : k.shape[1]]  # [b, past + p]
        scale = self.cfg.attn_scale
        use_triton = attn_ops.uses_triton(q.device, q.dtype, q.shape[-1])  # the backend (attention.py)
        eager = attn_ops.eager_backend()  # attention_backend("eager"): TL's steps on every path
        stats = attn_ops.pattern_stats_request()  # set by `with pattern_stats(...)` (head_scores), else None
        pattern_hooked = self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()
        if not pattern_hooked and stats is None and not eager:
            # Nothing reads or edits the scores / pattern: one fused op, no [q, k] tensor is made.
            z = attn_ops.attention_without_pattern(q, k, v, scale, pos_offset, attention_mask, use_triton)
            return self._project_out(self.hook_z(z))
        if not pattern_hooked and use_triton and not attn_ops.grad_recording(q, k, v):
            # Only pattern statistics: the flash kernel sums the requested pattern lines, no pattern is made.
            z, sums = attn_ops.triton_attention_stats(q, k, v, stats.specs, scale, pos_offset, attention_mask)
            stats.add(self.layer_id, sums, from_kernel=True)
            return self._project_out(self.hook_z(z))

        # TL's sequence: scores -> hook_attn_scores -> pattern -> hook_pattern -> z -> hook_z. Unless the backend
        # is "eager", `fused` is one call that has z ready: on the triton backend the pattern kernel, which has also
        # written scores (only if hooked) and pattern into fresh buffers the hooks receive and run_with_cache keeps
        # without a copy; on the torch backend the reference steps for scores and pattern, and z from the same
        # SDPA call un-hooked attention makes (so read-only hooks leave every bit of the output unchanged). A hook
        # that returns another tensor or edits one in place makes `fused`'s later outputs stale (`fused = None`):
        # from there on the reference steps recompute from the edited tensor. Hooks that only read cost nothing.
        with_scores = self.hook_attn_scores.has_hooks()
        if use_triton:
            fused = attn_ops.triton_pattern_attention(q, k, v, scale, pos_offset, attention_mask, with_scores)
        elif not eager:
            fused = attn_ops.SdpaPatternOutputs(q, k, v, scale, pos_offset, attention_mask, with_scores)
        else:
            fused = None
        if fused is None:
            scores = attn_ops.attention_scores(q, k, scale, pos_offset, attention_mask)  # [b, h, q, k]
        else:
            scores = fused.scores  # None when hook_attn_scores has no hooks (nothing would see it)
        if scores is not None:
            scores, edited = _run_hook(self.hook_attn_scores, scores)  # [b, h, q, k]
            fused = None if edited else fused
        pattern = fused.pattern_after(scores) if fused is not None else attn_ops.softmax_pattern(scores)
        pattern, edited = _run_hook(self.hook_pattern, pattern)  # [b, h, q, k]
        fused = None if edited else fused
        z = fused.z_after(pattern) if fused is not None else attn_ops.z_from_pattern(pattern, v)  # [b, p, h, dh]
        if stats is not None:
            stats.add(self.layer_id, attn_ops.pattern_line_sums(pattern.detach(), stats.specs), from_kernel=False)
        return self._project_out(self.hook_z(z))

    def _project_out(self, z: Tensor) -> Tensor:
        """z `[b, p, h, dh]` -> `[b, p, d]` through W_O, b_O (per head through `hook_result` when enabled)."""
        batch, pos, h, dh = z.shape
        eager = attn_ops.eager_backend()
        if self.cfg.use_attn_result:
            if eager:  # TL's formula, bit for bit: a broadcast product summed over d_head
                result = (z.unsqueeze(-1) * self.W_O).sum(-2)  # [b, p, h, dh, 1] * [h, dh, d] -> [b, p, h, d]
            else:
                result = torch.einsum("bphe,hed->bphd", z, self.W_O)  # [b, p, h, d], without b_O
            return self.hook_result(result).sum(dim=-2) + self.b_O
        z_flat = z.reshape(batch * pos, h * dh)  # [b*p, h*dh]
        if eager:  # TL's GEMM: F.linear with W_O as a contiguous [d, h*dh] matrix (rounds unlike addmm's)
            W_O_rows = self.W_O.permute(2, 0, 1).reshape(-1, h * dh).contiguous()  # [d, h*dh]
            return F.linear(z_flat, W_O_rows, self.b_O).view(batch, pos, -1)  # [b, p, d]
        return torch.addmm(self.b_O, z_flat, self.W_O.reshape(h * dh, -1)).view(batch, pos, -1)  # [b, p, d]

    @property
    def OV(self) -> FactoredMatrix:
        """`FactoredMatrix` W_V @ W_O, `[n_heads, d_model, d_model]`."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """`FactoredMatrix` W_Q @ W_K^T, `[n_heads, d_model, d_model]`."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))


# -- MLP --------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.act_fn = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [b, p, m]
        self.hook_post = HookPoint()  # [b, p, m]
        if cfg.act_fn == "solu_ln":
            self.hook_mid = HookPoint()  # [b, p, m]
            # As in TL, SoLU's LayerNorm keeps w, b only when the model's norms do ("LN"); otherwise LNPre.
            self.ln = LayerNorm(cfg, cfg.d_mlp) if cfg.normalization_type == "LN" else LayerNormPre(cfg, cfg.d_mlp)

    def forward(self, x: Tensor) -> Tensor:  # [b, p, d] -> [b, p, d]
        pre = self.hook_pre(addmm_last_dim(self.b_in, self.W_in, x))  # [b, p, m]
        if self.cfg.act_fn == "solu_ln":
            post = self.hook_post(self.ln(self.hook_mid(self.act_fn(pre))))
        else:
            post = self.hook_post(self.act_fn(pre))
        return addmm_last_dim(self.b_out, self.W_out, post)


# -- block ------------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    def __init__(self, cfg: HookedTransformerConfig, block_index: int):
        super().__init__()
        self.cfg = cfg
        self.ln1 = make_norm(cfg)
        if not cfg.attn_only:
            self.ln2 = make_norm(cfg)
        self.attn = Attention(cfg, block_index)
        if not cfg.attn_only:
            self.mlp = MLP(cfg)
        self.hook_attn_in = HookPoint()  # [b, p, h, d]
        self.hook_q_input = HookPoint()  # [b, p, h, d]
        self.hook_k_input = HookPoint()  # [b, p, h, d]
        self.hook_v_input = HookPoint()  # [b, p, h, d]
        self.hook_mlp_in = HookPoint()  # [b, p, d]
        self.hook_attn_out = HookPoint()  # [b, p, d]
        self.hook_mlp_out = HookPoint()  # [b, p, d]
        self.hook_resid_pre = HookPoint()  # [b, p, d]
        if not cfg.attn_only:
            self.hook_resid_mid = HookPoint()  # [b, p, d]
        self.hook_resid_post = HookPoint()  # [b, p, d]

    def forward(self, resid_pre: Tensor, past_kv_cache_entry=None, attention_mask: Optional[Tensor] = None) -> Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)  # [b, p, d]
        attn_out = self.hook_attn_out(self._attention(resid_pre, past_kv_cache_entry, attention_mask))
        if self.cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)  # [b, p, d]
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))  # [b, p, d]
        return self.hook_resid_post(resid_mid + mlp_out)

    def _attention(self, resid_pre: Tensor, past_kv_cache_entry, attention_mask: Optional[Tensor]) -> Tensor:
        if not (self.cfg.use_split_qkv_input or self.cfg.use_attn_in):
            if attn_ops.eager_backend():
                # TL's graph: ln1 once per q, k and v input (its hooks fire three times), so gradients summed into
                # resid_pre round as TL's do.
                q_in, k_in, v_in = self.ln1(resid_pre), self.ln1(resid_pre), self.ln1(resid_pre)
                return self.attn(q_in, k_in, v_in, past_kv_cache_entry, attention_mask)
            # One LayerNorm call feeds q, k and v (TL calls ln1 three times on the same input; the values are
            # identical, so ln1's hooks fire once here instead of three times).
            x = self.ln1(resid_pre)
            return self.attn(x, x, x, past_kv_cache_entry, attention_mask)
        per_head = resid_pre.unsqueeze(2).expand(-1, -1, self.cfg.n_heads, -1)  # [b, p, h, d]
        if self.cfg.use_attn_in and self.cfg.use_split_qkv_input:
            # TL fires (and caches) hook_attn_in here too, but q/k/v inputs come from the split hooks only.
            self.hook_attn_in(per_head.clone())
        if self.cfg.use_split_qkv_input:
            q_in = self.hook_q_input(per_head.clone())
            k_in = self.hook_k_input(per_head.clone())
            v_in = self.hook_v_input(per_head.clone())
        else:
            q_in = k_in = v_in = self.hook_attn_in(per_head.clone())
        return self.attn(self.ln1(q_in), self.ln1(k_in), self.ln1(v_in), past_kv_cache_entry, attention_mask)


class Unembed(nn.Module):
    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype))
        self.hook_in = HookPoint()  # [b, p, d]
        self.hook_out = HookPoint()  # [b, p, v]

    def forward(self, residual: Tensor) -> Tensor:  # [b, p, d] -> [b, p, v]
        residual = self.hook_in(residual)
        if attn_ops.eager_backend():  # TL's GEMM: F.linear with a contiguous W_U^T (rounds unlike addmm's)
            return self.hook_out(F.linear(residual, self.W_U.T.contiguous(), self.b_U))
        return self.hook_out(addmm_last_dim(self.b_U, self.W_U, residual))
