"""The attention seam: which attention computation runs for this call.

`Attention.forward` computes q, k, v and then asks `attend(...)` for `z`. Only this module decides how:

* **reference** (`reference_attention`): TransformerLens's eager computation, step by step, firing
  `hook_attn_scores` and `hook_pattern`. Used whenever a hook (including a caching hook) is attached to either,
  so hooks see exactly TL's tensors and may edit them.
* **sdpa** (`sdpa_attention`): `torch.nn.functional.scaled_dot_product_attention`, which never materializes the
  T×T pattern. Used when nothing needs the pattern. It differs from the reference only by float rounding.

The fused Triton kernels (pattern-emitting, flash, in-kernel statistics) plug in here as further choices.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from hooklens.model import Attention


def causal_mask(
    query_len: int, key_len: int, pos_offset: int, attention_mask: Optional[Tensor], device: torch.device
) -> Tensor:
    """Boolean mask, True where query i may attend key j: `[1, 1, q, k]`, or `[b, 1, q, k]` with padding."""
    query_pos = torch.arange(pos_offset, pos_offset + query_len, device=device)
    key_pos = torch.arange(key_len, device=device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, q, k]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_len].bool().to(device)  # [b, 1, q, k]
    return mask


def reference_attention(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """TL 3.9's eager attention. q: [b, q, h, dh], k/v: [b, k, h, dh] -> z: [b, q, h, dh] (a permuted view)."""
    q_ = q.permute(0, 2, 1, 3)  # [b, h, q, dh]
    k_ = k.permute(0, 2, 3, 1)  # [b, h, dh, k]
    scores = q_ @ k_ / attn.cfg.attn_scale  # [b, h, q, k]
    mask = causal_mask(q.shape[1], k.shape[1], pos_offset, attention_mask, scores.device)
    scores = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
    scores = attn.hook_attn_scores(scores)
    pattern = F.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)  # fully masked rows -> 0
    pattern = attn.hook_pattern(pattern)  # [b, h, q, k]
    pattern = pattern.to(dtype=v.dtype)
    return (pattern @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # [b, h, q, dh] -> [b, q, h, dh]


def sdpa_attention(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """Fused attention without a pattern. Same shapes and (up to rounding) values as `reference_attention`."""
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, t, dh]
    scale = 1.0 / attn.cfg.attn_scale
    if attention_mask is None and pos_offset == 0 and q.shape[1] == k.shape[1]:
        z = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale)
        return z.transpose(1, 2)  # [b, q, h, dh]
    mask = causal_mask(q.shape[1], k.shape[1], pos_offset, attention_mask, q.device)  # [b|1, 1, q, k]
    # A query whose every key is masked (a left-pad position) gets z = 0 in the reference (its NaN pattern row
    # is zeroed). SDPA would return NaN there, so give such rows one dummy key and zero their output after.
    row_has_key = mask.any(dim=-1, keepdim=True)  # [b|1, 1, q, 1]
    safe_mask = mask | ~row_has_key
    z = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=safe_mask, scale=scale)  # [b, h, q, dh]
    z = torch.where(row_has_key, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z.transpose(1, 2)


def needs_pattern(attn: "Attention") -> bool:
    """Whether any hook (a user hook or a caching hook) reads or edits the scores or the pattern."""
    return attn.hook_attn_scores.has_hooks() or attn.hook_pattern.has_hooks()


def attend(
    attn: "Attention", q: Tensor, k: Tensor, v: Tensor, pos_offset: int, attention_mask: Optional[Tensor]
) -> Tensor:
    """Compute z for one layer with the cheapest op that still serves every active hook."""
    if needs_pattern(attn):
        return reference_attention(attn, q, k, v, pos_offset, attention_mask)
    return sdpa_attention(attn, q, k, v, pos_offset, attention_mask)
