"""Pattern-emitting causal attention: writes TransformerLens's `pattern` (and optionally `attn_scores`) and `z`.

Op: for q `[b, q, h, dh]`, k/v `[b, k, h, dh]` (TL's hook_q/hook_k/hook_v layout, any strides)

    scores[b, h, i, j] = (q[b, i, h] . k[b, j, h]) * scale     where key j is visible to query i, else -inf
    pattern            = softmax(scores, -1), with rows that see no key set to 0 (TL's NaN -> 0)
    z[b, i, h]         = sum_j pattern[b, h, i, j] * v[b, j, h]

Key j is visible to query i when j <= i + pos_offset (causal; pos_offset = number of cached keys before the
first query) and key_padding_mask[b, j] != 0 (left padding). Layouts are TL's: `pattern`/`attn_scores`
`[b, h, q, k]`, `z` `[b, q, h, dh]`; outputs may be caller-provided buffers with any strides (e.g. the tensors
a cache will keep), so nothing is copied afterwards.

Algorithm (exact probabilities, not flash's rescaled running sums): per block of BLOCK_M queries, pass 1 streams
over the visible keys and computes each row's log-sum-exp in float32 (online max + sum); pass 2 recomputes the
scores, writes `p = exp(s - lse)` (and the scores), accumulates `z += p @ v` in float32 and writes zeros
(scores: -inf) for key blocks entirely above the diagonal. Rows are then normalized by construction: each
pattern row sums to 1 over its visible keys up to float32 rounding, and entries above the diagonal are exactly 0.

Supported: float32 / bfloat16 / float16 inputs (q, k, v one dtype; outputs any of these dtypes, written by
rounding the float32 result), d_head 1..128 (tiles are padded to a power of two >= 16 and masked), any
q / k length >= 1 (ragged edges masked; offsets are int64 so `b*h*q*k` may exceed 2**31). CUDA tensors, or CPU
tensors when Triton's interpreter is on (TRITON_INTERPRET=1 before `hooklens.kernels` is imported).

Differences from the PyTorch reference (`hooklens.attention.reference_attention`, TL's computation): scores are
accumulated and softmaxed in float32 even for bf16/fp16 inputs (the reference rounds scores and pattern to the
input dtype), so low-precision results are closer to the float64 truth than the reference is; `p` is rounded to
v's dtype before `p @ v` (as flash kernels and the reference do). float32 dots use IEEE precision unless
`torch.backends.cuda.matmul.allow_tf32` is set. In the interpreter, dot operands are upcast to float32 (its
low-precision dots do not accumulate in float32). No autograd: inputs are read as constants.
"""
from __future__ import annotations

from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from hooklens.kernels._common import (
    cast_to,
    check_out,
    check_qkv,
    launch_config,
    load_q_tile,
    load_v_tile,
    mask_arg,
    online_softmax_step,
    pv_dot,
    qk_tile,
    row_lse2,
    store_z_tile,
    to_scale,
)


@triton.jit
def _pattern_attention_kernel(
    Q, K, V, Mask, Z, P, S,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_mb, stride_mt,
    stride_zb, stride_zt, stride_zh, stride_zd,
    stride_pb, stride_ph, stride_pq, stride_pk,
    stride_sb, stride_sh, stride_sq, stride_sk,
    n_heads, q_len, k_len, head_dim, pos_offset, sm_scale,
    HAS_MASK: tl.constexpr, WRITE_SCORES: tl.constexpr, INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < q_len
    q = load_q_tile(Q, off_b, off_h, offs_m, offs_d, q_len, head_dim,
                    stride_qb, stride_qt, stride_qh, stride_qd, INTERPRETED)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    mask_base = Mask + off_b * stride_mb
    p_base = P + off_b * stride_pb + off_h * stride_ph + offs_m[:, None].to(tl.int64) * stride_pq
    s_base = S + off_b * stride_sb + off_h * stride_sh + offs_m[:, None].to(tl.int64) * stride_sq
    qk_scale2 = sm_scale * 1.4426950408889634  # softmax in base 2
    # keys at or past `hi` are invisible to every query of this block
    hi = tl.minimum((pid_m + 1) * BLOCK_M + pos_offset, k_len)

    # pass 1: row log-sum-exp (base 2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        qk, valid, offs_n = qk_tile(q, k_base, mask_base, offs_m, start_n, offs_d, k_len, head_dim, pos_offset,
                                    stride_kt, stride_kd, stride_mt, HAS_MASK, INTERPRETED, INPUT_PRECISION, BLOCK_N)
        s2 = tl.where(valid, qk * qk_scale2, float("-inf"))
        m_i, _, _, l_i = online_softmax_step(m_i, l_i, s2)
    lse2 = row_lse2(m_i, l_i)  # +inf for rows that see no key: every p below is 0

    # pass 2: exact probabilities, scores, z
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        qk, valid, offs_n = qk_tile(q, k_base, mask_base, offs_m, start_n, offs_d, k_len, head_dim, pos_offset,
                                    stride_kt, stride_kd, stride_mt, HAS_MASK, INTERPRETED, INPUT_PRECISION, BLOCK_N)
        p = tl.where(valid, tl.exp2(qk * qk_scale2 - lse2[:, None]), 0.0)
        out_mask = m_in[:, None] & (offs_n[None, :] < k_len)
        tl.store(p_base + offs_n[None, :].to(tl.int64) * stride_pk, cast_to(p, P.dtype.element_ty, INTERPRETED),
                 mask=out_mask)
        if WRITE_SCORES:
            s = tl.where(valid, qk * sm_scale, float("-inf"))
            tl.store(s_base + offs_n[None, :].to(tl.int64) * stride_sk, cast_to(s, S.dtype.element_ty, INTERPRETED),
                     mask=out_mask)
        v = load_v_tile(v_base, offs_n, offs_d, k_len, head_dim, stride_vt, stride_vd, INTERPRETED)
        acc += pv_dot(p, v, V.dtype.element_ty, INTERPRETED, INPUT_PRECISION)
    # key blocks above the diagonal: pattern 0, scores -inf
    for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, k_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        out_mask = m_in[:, None] & (offs_n[None, :] < k_len)
        zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        tl.store(p_base + offs_n[None, :].to(tl.int64) * stride_pk, zeros.to(P.dtype.element_ty), mask=out_mask)
        if WRITE_SCORES:
            tl.store(s_base + offs_n[None, :].to(tl.int64) * stride_sk,
                     (zeros + float("-inf")).to(S.dtype.element_ty), mask=out_mask)
    store_z_tile(Z, acc, off_b, off_h, offs_m, offs_d, q_len, head_dim,
                 stride_zb, stride_zt, stride_zh, stride_zd, INTERPRETED)


def pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    pos_offset: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    *,
    return_scores: bool = False,
    pattern_out: Optional[Tensor] = None,
    scores_out: Optional[Tensor] = None,
    z_out: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """Causal attention that also writes the full pattern. Returns `(scores or None, pattern, z)`.

    q `[b, q, h, dh]`, k/v `[b, k, h, dh]` (any strides); `scale` multiplies q.k (default 1/sqrt(dh); TL's is
    1/attn_scale); `key_padding_mask` `[b, k]` bool/int, nonzero = real token. `pattern_out` / `scores_out`
    (`[b, h, q, k]`) and `z_out` (`[b, q, h, dh]`) are optional caller buffers (any strides, any supported dtype);
    by default outputs are new contiguous tensors of q's dtype. `scores_out` implies `return_scores=True`.
    """
    b, tq, tk, h, dh = check_qkv(_pattern_attention_kernel, q, k, v, pos_offset, key_padding_mask)
    sm_scale = to_scale(scale, dh)
    return_scores = return_scores or scores_out is not None
    for name, out, shape in (("pattern_out", pattern_out, (b, h, tq, tk)), ("scores_out", scores_out, (b, h, tq, tk)),
                             ("z_out", z_out, (b, tq, h, dh))):
        check_out(name, out, shape, q.device)
    pattern = pattern_out if pattern_out is not None else q.new_empty((b, h, tq, tk))
    scores = scores_out if scores_out is not None else (q.new_empty((b, h, tq, tk)) if return_scores else None)
    z = z_out if z_out is not None else q.new_empty((b, tq, h, dh))
    if tq == 0 or b * h == 0:
        return scores, pattern, z
    mask, smb, smt = mask_arg(key_padding_mask, q)
    s_arg = scores if scores is not None else pattern  # unused when WRITE_SCORES is off
    cfg = launch_config(_pattern_attention_kernel, q, tq, tk, dh)
    grid = (b * h, triton.cdiv(tq, cfg["BLOCK_M"]))
    _pattern_attention_kernel[grid](
        q, k, v, mask, z, pattern, s_arg,
        *q.stride(), *k.stride(), *v.stride(), smb, smt, *z.stride(), *pattern.stride(), *s_arg.stride(),
        h, tq, tk, dh, int(pos_offset), sm_scale,
        HAS_MASK=key_padding_mask is not None, WRITE_SCORES=scores is not None, **cfg,
    )
    return scores, pattern, z
