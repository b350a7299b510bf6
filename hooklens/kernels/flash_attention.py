"""Flash attention for causal GPT-2 attention: z only, no T×T memory.

Op: for q `[b, q, h, dh]`, k/v `[b, k, h, dh]` (TL's hook_q/hook_k/hook_v layout, any strides)

    z[b, i, h] = sum_j softmax_j(q[b, i, h] . k[b, j, h] * scale over visible j) * v[b, j, h]

Key j is visible to query i when j <= i + pos_offset (causal; pos_offset = number of cached keys) and
key_padding_mask[b, j] != 0. A query that sees no key (a left-pad position) gets z = 0, as in TL (its NaN
pattern row is zeroed there). z is written as `[b, q, h, dh]` (TL's hook_z layout), optionally into a caller
buffer with any strides.

Algorithm: one program per (batch·head, block of BLOCK_M queries) streams over the visible key blocks keeping a
float32 running max, running sum and output accumulator (online softmax, base 2), and divides at the end.
Key blocks entirely above the diagonal are skipped. The same kernel optionally computes pattern statistics in
its epilogue (see `attention_stats.py`): with the row's log-sum-exp known, the pattern value at any single
(query, key) is `exp(q.k*scale - lse)`, one dot product, so chosen diagonals are reduced without writing the
pattern.

Supported: float32 / bfloat16 / float16 (q, k, v one dtype; z any of these), d_head 1..128 (padded to a power
of two >= 16 and masked), any lengths >= 1 (ragged edges masked, int64 offsets). CUDA tensors, or CPU tensors
when Triton's interpreter is on (TRITON_INTERPRET=1 before `hooklens.kernels` is imported).

Differences from the PyTorch reference (`hooklens.attention.reference_attention`, TL's eager computation, which
the tests hold the kernel to): float32 scores and softmax for every input dtype; the unnormalized `p` is rounded
to v's dtype before `p @ v` (as in FlashAttention); float32 dots use IEEE precision unless
`torch.backends.cuda.matmul.allow_tf32` is set; in the interpreter dot operands are upcast to float32. No autograd
inside the kernel: `hooklens.attention` wraps it in an autograd.Function whose backward recomputes the
attention with PyTorch ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hooklens.kernels._common import (
    check_out,
    check_qkv,
    is_interpreted,
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
def _flash_attention_kernel(
    Q, K, V, Mask, Z, StatSpec, StatOut,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_mb, stride_mt,
    stride_zb, stride_zt, stride_zh, stride_zd,
    n_heads, q_len, k_len, head_dim, pos_offset, sm_scale,
    HAS_MASK: tl.constexpr, N_STATS: tl.constexpr, INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    qk_scale2 = sm_scale * 1.4426950408889634
    hi = tl.minimum((pid_m + 1) * BLOCK_M + pos_offset, k_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        qk, valid, offs_n = qk_tile(q, k_base, mask_base, offs_m, start_n, offs_d, k_len, head_dim, pos_offset,
                                    stride_kt, stride_kd, stride_mt, HAS_MASK, INTERPRETED, INPUT_PRECISION, BLOCK_N)
        s2 = tl.where(valid, qk * qk_scale2, float("-inf"))
        m_i, alpha, p, l_i = online_softmax_step(m_i, l_i, s2)
        v = load_v_tile(v_base, offs_n, offs_d, k_len, head_dim, stride_vt, stride_vd, INTERPRETED)
        acc = acc * alpha[:, None] + pv_dot(p, v, V.dtype.element_ty, INTERPRETED, INPUT_PRECISION)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows with no visible key: acc is 0, z = 0
    store_z_tile(Z, acc, off_b, off_h, offs_m, offs_d, q_len, head_dim,
                 stride_zb, stride_zt, stride_zh, stride_zd, INTERPRETED)

    if N_STATS > 0:
        # Pattern statistics: for each requested (mode, value) pair, the pattern entry of every query row at key
        # `row + value` (mode 0: a diagonal of the [q, k] pattern) or at key `value` (mode 1: a column), summed
        # over this block's rows. One partial sum per (stat, batch·head, query block); the launcher adds them up.
        lse2 = row_lse2(m_i, l_i)
        qf = q.to(tl.float32)
        n_bh = tl.num_programs(0)
        n_mb = tl.num_programs(1)
        for j in tl.static_range(N_STATS):
            mode = tl.load(StatSpec + 2 * j)
            value = tl.load(StatSpec + 2 * j + 1)
            kidx = tl.where(mode == 1, value + offs_m * 0, offs_m + value)  # [BLOCK_M]
            kvalid = m_in & (kidx >= 0) & (kidx < k_len) & (kidx <= offs_m + pos_offset)
            if HAS_MASK:
                keep = tl.load(mask_base + kidx.to(tl.int64) * stride_mt, mask=kvalid, other=0)
                kvalid = kvalid & (keep != 0)
            kk = tl.load(k_base + kidx[:, None].to(tl.int64) * stride_kt + offs_d[None, :].to(tl.int64) * stride_kd,
                         mask=kvalid[:, None] & (offs_d[None, :] < head_dim), other=0.0).to(tl.float32)
            s2 = tl.sum(qf * kk, 1) * qk_scale2
            p = tl.where(kvalid, tl.exp2(s2 - lse2), 0.0)
            tl.store(StatOut + (j * n_bh + pid_bh) * n_mb + pid_m, tl.sum(p, 0))


def runs_interpreted() -> bool:
    """Whether the kernels were decorated under Triton's interpreter (TRITON_INTERPRET=1 at first import)."""
    return is_interpreted(_flash_attention_kernel)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    pos_offset: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    *,
    z_out: Optional[Tensor] = None,
) -> Tensor:
    """Causal attention output z `[b, q, h, dh]` without materializing the pattern.

    q `[b, q, h, dh]`, k/v `[b, k, h, dh]` (any strides); `scale` multiplies q.k (default 1/sqrt(dh));
    `key_padding_mask` `[b, k]` bool/int, nonzero = real token; `z_out` an optional `[b, q, h, dh]` buffer.
    """
    z, _ = launch_flash_kernel(q, k, v, scale, pos_offset, key_padding_mask, z_out, None)
    return z


def launch_flash_kernel(q, k, v, scale, pos_offset, key_padding_mask, z_out, stat_spec: Optional[Tensor]):
    """Validate and launch the flash kernel (shared by `flash_attention` and `attention_stats`, which adds the
    pattern-line sums of `stat_spec` in the epilogue). Returns (z, per-block partial sums or None)."""
    b, tq, tk, h, dh = check_qkv(_flash_attention_kernel, q, k, v, pos_offset, key_padding_mask)
    sm_scale = to_scale(scale, dh)
    check_out("z_out", z_out, (b, tq, h, dh), q.device)
    z = z_out if z_out is not None else q.new_empty((b, tq, h, dh))
    cfg = launch_config(_flash_attention_kernel, q, tq, tk, dh)
    n_mb = triton.cdiv(tq, cfg["BLOCK_M"]) if tq > 0 else 0
    n_stats = 0 if stat_spec is None else stat_spec.shape[0]
    partial = torch.zeros((n_stats, b * h, n_mb), dtype=torch.float32, device=q.device)
    if tq == 0 or b * h == 0:
        return z, partial
    mask, smb, smt = mask_arg(key_padding_mask, q)
    spec = stat_spec if stat_spec is not None else torch.zeros(2, dtype=torch.int32, device=q.device)
    _flash_attention_kernel[(b * h, n_mb)](
        q, k, v, mask, z, spec, partial,
        *q.stride(), *k.stride(), *v.stride(), smb, smt, *z.stride(),
        h, tq, tk, dh, int(pos_offset), sm_scale,
        HAS_MASK=key_padding_mask is not None, N_STATS=n_stats, **cfg,
    )
    return z, partial
