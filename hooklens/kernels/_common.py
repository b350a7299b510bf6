"""Launcher helpers shared by the attention kernels: input validation, block sizes, dot precision.

Importing this module imports Triton. `hooklens.attention` imports `hooklens.kernels` only when the Triton
backend is actually used, so `import hooklens` never imports Triton.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # Triton >= 3.0
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - very old Triton
    InterpretedFunction = ()  # type: ignore[assignment,misc]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 128
# On CUDA the grid's second dimension is limited to 65535 programs; batch * heads goes in the first.
_MAX_GRID_Y = 65535


def is_interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter (TRITON_INTERPRET=1 was set when it was decorated)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, t: Tensor) -> None:
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            "hooklens Triton kernels got CPU tensors, but Triton's interpreter is off. Either move the model to a "
            "CUDA device, use the torch backend (`with hooklens.attention_backend('torch'):`), or set "
            "TRITON_INTERPRET=1 in the environment before hooklens.kernels is first imported (slow; for testing)."
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"hooklens Triton kernels run on CUDA (or on CPU in the interpreter), not {t.device}.")


def check_qkv(
    kernel, q: Tensor, k: Tensor, v: Tensor, pos_offset: int, key_padding_mask: Optional[Tensor]
) -> Tuple[int, int, int, int, int]:
    """Validate q `[b, q, h, dh]`, k/v `[b, k, h, dh]` (any strides) and the mask; returns (b, tq, tk, h, dh)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, pos, head, d_head] (4-D), got shape {tuple(t.shape)}.")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton attention kernels support {SUPPORTED_DTYPES}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    check_device(kernel, q)
    b, tq, h, dh = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != dh:
        raise ValueError(
            f"k and v must be [batch={b}, key_pos, heads={h}, d_head={dh}] like q; got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}."
        )
    tk = k.shape[1]
    if not 1 <= dh <= MAX_HEAD_DIM:
        raise ValueError(f"d_head={dh} is not supported by the Triton kernels (1..{MAX_HEAD_DIM}).")
    if tk < 1:
        raise ValueError("k and v need at least one key position.")
    if int(pos_offset) != pos_offset or pos_offset < 0:
        raise ValueError(f"pos_offset must be a non-negative int, got {pos_offset!r}.")
    if triton.cdiv(max(tq, 1), 16) > _MAX_GRID_Y:
        raise ValueError(f"query length {tq} is too long for the kernels' grid.")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (b, tk):
            shape = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask)
            raise ValueError(f"key_padding_mask must be [batch={b}, key_pos={tk}] (1 = attend), got {shape}.")
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise TypeError(
                f"key_padding_mask must be bool or integer (nonzero = real token), not {key_padding_mask.dtype}."
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}.")
    return b, tq, tk, h, dh


def check_out(name: str, out: Optional[Tensor], shape: Tuple[int, ...], device: torch.device) -> None:
    """A caller-provided output buffer: exact shape, a supported dtype, same device; any strides."""
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}.")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}.")
    if out.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {out.dtype}; supported: {SUPPORTED_DTYPES}.")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, the inputs on {device}.")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad; the kernels write into it without autograd.")


def mask_arg(key_padding_mask: Optional[Tensor], q: Tensor) -> Tuple[Tensor, int, int]:
    """The mask as an int8 tensor plus its two strides (a 1-element dummy when there is no mask)."""
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.int8, device=q.device), 0, 0
    m = key_padding_mask if key_padding_mask.dtype == torch.int8 else (key_padding_mask != 0).to(torch.int8)
    return m, m.stride(0), m.stride(1)


def launch_config(kernel, q: Tensor, tq: int, tk: int, dh: int) -> dict:
    """Block sizes and flags: 64×64 tiles (smaller for short sequences; 64×32 for d_head > 64 on GPU), 4 warps, 3
    pipeline stages for 16-bit inputs and 2 for float32, IEEE float32 dots for float32 inputs unless PyTorch
    allows TF32 for matmuls, and INTERPRETED, which switches on two workarounds for Triton's interpreter: dot
    operands upcast to float32 (its bf16 dots are wrong and its fp16 dots accumulate in fp16) and
    round-to-nearest-even float32 -> bfloat16 casts (it truncates)."""
    interpreted = is_interpreted(kernel)
    block_d = max(16, triton.next_power_of_2(dh))
    block_m = min(64, max(16, triton.next_power_of_2(tq)))
    block_n = min(64 if block_d <= 64 or interpreted else 32, max(16, triton.next_power_of_2(tk)))
    tf32 = q.dtype == torch.float32 and q.is_cuda and not interpreted and torch.backends.cuda.matmul.allow_tf32
    cfg = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, INTERPRETED=interpreted,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
    )
    if not interpreted:
        # 16-bit inputs get a third pipeline stage, which hides more of the k/v tile loads; float32 tiles (twice
        # the bytes, IEEE dots) keep two. benchmarks/tune_attention.py re-tunes tiles, warps and stages for a GPU.
        cfg.update(num_warps=4, num_stages=3 if q.element_size() == 2 else 2)
    return cfg


def to_scale(scale: Optional[float], dh: int) -> float:
    s = 1.0 / (dh ** 0.5) if scale is None else float(scale)
    if not s > 0 or s != s or s == float("inf"):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}.")
    return s


# -- shared Triton device helpers -------------------------------------------------------------------------------


@triton.jit
def load_q_tile(Q, off_b, off_h, offs_m, offs_d, q_len, head_dim,
                stride_qb, stride_qt, stride_qh, stride_qd, INTERPRETED: tl.constexpr):
    """One `[BLOCK_M, BLOCK_D]` tile of q (rows past q_len and lanes past head_dim read as 0)."""
    ptrs = (Q + off_b * stride_qb + off_h * stride_qh
            + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :].to(tl.int64) * stride_qd)
    q = tl.load(ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim), other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    return q


@triton.jit
def qk_tile(q, k_base, mask_base, offs_m, start_n, offs_d, k_len, head_dim, pos_offset,
            stride_kt, stride_kd, stride_mt,
            HAS_MASK: tl.constexpr, INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """Raw float32 `q @ k^T` for keys [start_n, start_n + BLOCK_N) and the boolean `valid` tile
    (causal: key <= query + pos_offset; in range; key not padded)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_in = offs_n < k_len
    kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None].to(tl.int64) * stride_kd,
                 mask=n_in[None, :] & (offs_d[:, None] < head_dim), other=0.0)  # [BLOCK_D, BLOCK_N]
    if INTERPRETED:
        kt = kt.to(tl.float32)
    qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] float32
    valid = (offs_n[None, :] <= offs_m[:, None] + pos_offset) & n_in[None, :]
    if HAS_MASK:
        keep = tl.load(mask_base + offs_n.to(tl.int64) * stride_mt, mask=n_in, other=0)
        valid = valid & (keep != 0)[None, :]
    return qk, valid, offs_n


@triton.jit
def load_v_tile(v_base, offs_n, offs_d, k_len, head_dim, stride_vt, stride_vd, INTERPRETED: tl.constexpr):
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :].to(tl.int64) * stride_vd,
                mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < head_dim), other=0.0)  # [BLOCK_N, BLOCK_D]
    if INTERPRETED:
        v = v.to(tl.float32)
    return v


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 `x` -> `dtype`, rounding to nearest even (as compiled Triton does; the interpreter truncates to
    bfloat16, so round the float32 bits first there)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def online_softmax_step(m_i, l_i, s2):
    """One key tile of the streaming softmax (base 2): `s2` `[BLOCK_M, BLOCK_N]` scaled scores (-inf where not
    visible), `m_i`/`l_i` the running row max and row sum. Returns the new max, the factor `alpha` that rescales
    what was accumulated so far, the tile's unnormalized probabilities `p`, and the new row sum."""
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: avoid -inf - -inf
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s2 - m_use[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def row_lse2(m_i, l_i):
    """Base-2 log-sum-exp of each row from the streaming max and sum; +inf for rows that see no key, so every
    probability `exp2(s2 - lse2)` of such a row is 0 (TL's NaN -> 0)."""
    has_key = l_i > 0
    return tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))


@triton.jit
def pv_dot(p, v, V_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """`p @ v` in float32 with p rounded to v's dtype first, as a same-dtype PyTorch `pattern @ v` does."""
    p_v = cast_to(p, V_DTYPE, INTERPRETED)
    if INTERPRETED:
        p_v = p_v.to(tl.float32)
    return tl.dot(p_v, v, input_precision=INPUT_PRECISION)


@triton.jit
def store_z_tile(Z, acc, off_b, off_h, offs_m, offs_d, q_len, head_dim,
                 stride_zb, stride_zt, stride_zh, stride_zd, INTERPRETED: tl.constexpr):
    """Write the float32 `[BLOCK_M, BLOCK_D]` tile `acc` into z `[b, q, h, dh]` in z's dtype (ragged edges masked)."""
    ptrs = (Z + off_b * stride_zb + off_h * stride_zh
            + offs_m[:, None].to(tl.int64) * stride_zt + offs_d[None, :].to(tl.int64) * stride_zd)
    tl.store(ptrs, cast_to(acc, Z.dtype.element_ty, INTERPRETED),
             mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim))
