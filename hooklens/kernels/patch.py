"""The CUDA kernel of ``hooklens::index_patch_`` (op and reference: ``hooklens/ops/patching.py``).

Op, in place: ``act [n*b, *S]`` holds n variants of b prompts (variant-major); variant v's rows take
``clean [b, *S]`` where their coordinates along ``axes`` equal ``index[v]`` (int64 ``[n, len(axes)]``), every other
axis whole. Only the patched elements are read from ``clean`` and written to ``act``.

One program per (row of act, block of the row's patched slice). The slice's kept dims (size-1 dims dropped,
mergeable neighbours merged) are at most four; each element's offsets in act and clean come from its coordinates
and the two tensors' strides, so any strides work (clean narrowed along positions, or expanded from one prompt with
stride 0). The kernel copies bits: act and clean are viewed as same-width integers, so every 1/2/4/8-byte dtype
takes the same path.

Bounds: a host-side check of ``index`` would be a device sync and would break CUDA-graph capture, so the kernel
checks each coordinate on the device and writes nothing for a variant whose coordinate is outside its axis. Callers
validate indices on the host where they build them (the patching engine does, once per sweep).

No host sync, no allocation (``index.contiguous()`` copies only a non-contiguous index): capturable in a CUDA graph.
Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 when Triton first decorates
this module's kernel; how the CPU tests run it).
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hooklens.kernels._common import check_device

MAX_PATCHED_AXES = 4
MAX_KEPT_DIMS = 4
_MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _index_patch_kernel(
    Act, Clean, Index, b, slice_numel, stride_act_row, stride_clean_row,
    # patched axes: size, act stride, clean stride (unused ones: size 1, strides 0)
    ps0, pa0, pc0, ps1, pa1, pc1, ps2, pa2, pc2, ps3, pa3, pc3,
    # kept dims, outermost first (unused leading ones: size 1, strides 0)
    ks1, ks2, ks3, ka0, ka1, ka2, ka3, kc0, kc1, kc2, kc3,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    v = row // b
    a_off = row * stride_act_row
    c_off = (row - v * b) * stride_clean_row
    ok = True
    for i in tl.static_range(K):  # K <= 4; the branches resolve at compile time
        coord = tl.load(Index + v * K + i)
        if i == 0:
            size, sa, sc = ps0, pa0, pc0
        elif i == 1:
            size, sa, sc = ps1, pa1, pc1
        elif i == 2:
            size, sa, sc = ps2, pa2, pc2
        else:
            size, sa, sc = ps3, pa3, pc3
        ok = ok & (coord >= 0) & (coord < size)
        a_off += coord * sa
        c_off += coord * sc
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = (offs < slice_numel) & ok
    # offs -> coordinates of the kept dims (innermost ks3 first).
    r3 = offs % ks3
    t = offs // ks3
    r2 = t % ks2
    t = t // ks2
    r1 = t % ks1
    r0 = t // ks1
    src = Clean + c_off + r0 * kc0 + r1 * kc1 + r2 * kc2 + r3 * kc3
    dst = Act + a_off + r0 * ka0 + r1 * ka1 + r2 * ka2 + r3 * ka3
    tl.store(dst, tl.load(src, mask=keep), mask=keep)


def _kept_dims(act: Tensor, clean: Tensor, axes: Sequence[int]) -> Tuple[List[int], List[int], List[int]]:
    """Sizes and act/clean strides of the dims of S not in `axes`, outermost first, size-1 dims dropped and a dim
    merged into its outer neighbour where both tensors lay them out as one."""
    sizes: List[int] = []
    act_strides: List[int] = []
    clean_strides: List[int] = []
    for d in range(act.dim() - 1):
        size = act.shape[d + 1]
        if d in axes or size == 1:
            continue
        sa, sc = act.stride(d + 1), clean.stride(d + 1)
        if sizes and act_strides[-1] == sa * size and clean_strides[-1] == sc * size:
            sizes[-1] *= size
            act_strides[-1], clean_strides[-1] = sa, sc
        else:
            sizes.append(size)
            act_strides.append(sa)
            clean_strides.append(sc)
    return sizes, act_strides, clean_strides


def index_patch_triton(act: Tensor, clean: Tensor, index: Tensor, axes: Sequence[int]) -> None:
    """Launch the kernel (arguments as ``hooklens.ops.patching.index_patch_``, already checked there, or by the
    operator's fake kernel under tracing: shapes, dtypes, devices, axes). Out-of-range coordinates: see the module
    docstring."""
    axes = [int(a) for a in axes]
    check_device(_index_patch_kernel, act)
    if len(axes) > MAX_PATCHED_AXES:
        raise ValueError(f"index_patch_: the CUDA kernel patches along at most {MAX_PATCHED_AXES} axes, got {axes}")
    if act.element_size() not in _BITS:
        raise TypeError(f"index_patch_: the CUDA kernel copies 1-, 2-, 4- or 8-byte elements, not {act.dtype}")
    if torch._debug_has_internal_overlap(act) == 1:  # 1: overlapping for sure (e.g. expanded); metadata only
        raise RuntimeError("index_patch_: act has overlapping elements (e.g. an expanded tensor); patch a .clone()")
    n, b = index.shape[0], clean.shape[0]
    sizes, act_strides, clean_strides = _kept_dims(act, clean, axes)
    if len(sizes) > MAX_KEPT_DIMS:
        raise ValueError(f"index_patch_: the CUDA kernel handles at most {MAX_KEPT_DIMS} kept dims after merging, "
                         f"got sizes {sizes} for act {tuple(act.shape)} (axes {axes}); make act and clean contiguous")
    slice_numel = 1
    for s in sizes:
        slice_numel *= s
    if n * b == 0 or slice_numel == 0:
        return
    pad = MAX_KEPT_DIMS - len(sizes)
    sizes, act_strides, clean_strides = [1] * pad + sizes, [0] * pad + act_strides, [0] * pad + clean_strides
    patched = []
    for a in axes:
        patched += [act.shape[a + 1], act.stride(a + 1), clean.stride(a + 1)]
    patched += [1, 0, 0] * (MAX_PATCHED_AXES - len(axes))
    block = min(1024, triton.next_power_of_2(slice_numel))
    grid_y = triton.cdiv(slice_numel, block)
    if grid_y > _MAX_GRID_Y:
        raise ValueError(f"index_patch_: a patched slice of {slice_numel} elements is too large for the kernel's grid "
                         f"(at most {_MAX_GRID_Y * block})")
    bits = _BITS[act.element_size()]
    act_bits, clean_bits = act.view(bits), clean.view(bits)  # same strides, same width: a bit copy of any dtype
    idx = index.contiguous() if len(axes) else act_bits  # K = 0 never reads Index
    with torch.cuda.device(act.device) if act.is_cuda else contextlib.nullcontext():
        _index_patch_kernel[(n * b, grid_y)](
            act_bits, clean_bits, idx, b, slice_numel, act.stride(0), clean.stride(0), *patched,
            sizes[1], sizes[2], sizes[3], *act_strides, *clean_strides, K=len(axes), BLOCK=block,
        )
