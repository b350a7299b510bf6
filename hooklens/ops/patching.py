"""The patch step of the batched patching engine: every variant of a chunk patched at one hook in one call.

The engine stacks ``n`` patch variants of a batch of ``b`` prompts on the batch dimension, variant-major: variant
``v`` owns rows ``v*b .. v*b+b-1`` of an activation ``act [n*b, *S]`` (``S`` the activation's shape without its
batch dim, over the positions the chunk recomputes). ``clean [b, *S]`` is the clean run's activation.

- :func:`index_patch_` ``(act, clean, index, axes) -> act``, in place: variant ``v`` takes ``clean`` where its
  coordinates along ``axes`` (dims of ``S``) equal ``index[v]`` (``index`` int64 ``[n, len(axes)]``); every other
  axis is patched whole. E.g. ``axes=(0,)`` on ``[pos, d_model]`` patches one position, ``(1,)`` on
  ``[pos, head, d_head]`` one head at every position, ``(0, 1)`` one (pos, head). One gather and one
  ``index_put_``: it writes only the patched elements and reads only their clean values (no ``[n, *S]`` mask, no
  rewrite of the unpatched activation), without a loop over variants, on any device, differentiable. Equal to
  :func:`masked_patch` with the mask ``hooklens.sweeps.index_mask`` builds (tests/test_ops_patching.py).
- :func:`masked_patch` ``(act, clean, mask) -> new tensor``: any per-variant bool mask ``[n, *S]`` (a
  ``torch.where``; for masks that are not an index pattern).

Both are plain PyTorch on purpose. The patch step is well under 1 % of a sweep's time (the sweeps are GEMM-bound),
so a compiled patch op, even one twice as fast as ``index_put_`` on the step alone, cannot make a sweep
measurably faster (the perf log has the measurement).

Index bounds: every coordinate must satisfy ``0 <= index[v, i] < S[axes[i]]``. :func:`index_patch_` checks them
(an IndexError naming the axis and its size, at the cost of one host sync) unless ``check_bounds=False``, which
the engine passes because it checks its coordinates once per sweep where it builds them.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["index_patch_", "masked_patch", "check_index_patch"]


# ---------------------------------------------------------------------------------------------------------------
# Patching by index
# ---------------------------------------------------------------------------------------------------------------


def index_patch_(act: Tensor, clean: Tensor, index: Tensor, axes: Sequence[int], *,
                 check_bounds: bool = True) -> Tensor:
    """Patch every variant of ``act`` in place and return it (see the module docstring)."""
    n, b, axes = check_index_patch(act, clean, index, axes)
    shape = tuple(act.shape[1:])
    if check_bounds:
        _check_bounds(index, shape, axes)
    rest = [d for d in range(len(shape)) if d not in axes]
    stacked = act.view((n, b) + shape)  # [n, b, *S]: splitting dim 0 is always a view, so writes reach act
    # Variant dim and patched axes first: [n, *S[axes], b, *S[rest]]; clean likewise [*S[axes], b, *S[rest]].
    act_p = stacked.permute([0] + [a + 2 for a in axes] + [1] + [d + 2 for d in rest])
    clean_p = clean.permute([a + 1 for a in axes] + [0] + [d + 1 for d in rest])
    coords = tuple(index[:, column] for column in range(len(axes)))  # k x [n]
    variants = torch.arange(n, device=act.device)
    values = clean_p[coords] if coords else clean_p.unsqueeze(0).expand((n,) + tuple(clean_p.shape))  # [n, b, *rest]
    act_p.index_put_((variants,) + coords, values)
    return act


def check_index_patch(act, clean, index, axes) -> Tuple[int, int, Tuple[int, ...]]:
    """Validates the arguments of :func:`index_patch_` (all but the index values); returns ``(n, b, axes)``.

    TypeError for a non-tensor, a dtype mismatch or a non-int64 index; ValueError for shapes, axes and devices."""
    for name, t in (("act", act), ("clean", clean), ("index", index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"index_patch_: {name} must be a tensor, got {type(t).__name__}")
    try:
        axes = tuple(int(a) for a in axes)
    except TypeError:
        raise TypeError(f"index_patch_: axes must be a sequence of ints, got {axes!r}") from None
    if act.device != clean.device or index.device != act.device:
        raise ValueError(f"index_patch_: act, clean and index must be on one device, got act on {act.device}, clean on "
                         f"{clean.device} and index on {index.device}; move them with .to(act.device)")
    if act.dtype != clean.dtype:
        raise TypeError(f"index_patch_: act and clean must have one dtype (act is patched in place), got act "
                        f"{act.dtype} and clean {clean.dtype}; convert clean with clean.to(act.dtype)")
    if index.dtype != torch.int64:
        raise TypeError(f"index_patch_: index must be int64, got {index.dtype}; convert it with index.long()")
    if act.dim() < 1 or act.dim() != clean.dim():
        raise ValueError(f"index_patch_: act [n*b, *S] and clean [b, *S] need the same number of dims (>= 1), got "
                         f"{tuple(act.shape)} and {tuple(clean.shape)}")
    if tuple(act.shape[1:]) != tuple(clean.shape[1:]):
        raise ValueError(f"index_patch_: act [n*b, *S] and clean [b, *S] must agree on S, got {tuple(act.shape)} and "
                         f"{tuple(clean.shape)}")
    ndim = act.dim() - 1
    if len(set(axes)) != len(axes) or any(not 0 <= a < ndim for a in axes):
        raise ValueError(f"index_patch_: axes must be distinct dims of S (0 .. {ndim - 1}, without the batch dim), "
                         f"got {axes} for act {tuple(act.shape)}")
    if index.dim() != 2 or index.shape[1] != len(axes):
        raise ValueError(f"index_patch_: index must be [n, len(axes)] = [n, {len(axes)}], got {tuple(index.shape)}")
    n, b = index.shape[0], clean.shape[0]
    if act.shape[0] != n * b:
        raise ValueError(f"index_patch_: act has {act.shape[0]} rows, expected n*b = {n}*{b} = {n * b} (n variants "
                         f"from index {tuple(index.shape)}, b prompts from clean {tuple(clean.shape)})")
    return n, b, axes


def _check_bounds(index: Tensor, shape: Sequence[int], axes: Sequence[int]) -> None:
    """IndexError naming the first axis with an out-of-range coordinate (one host sync)."""
    if index.numel() == 0:
        return
    sizes = torch.tensor([shape[a] for a in axes], dtype=torch.int64, device=index.device)
    bad = ((index < 0) | (index >= sizes)).any(0).tolist()  # [k]
    for column, axis in enumerate(axes):
        if bad[column]:
            values = index[:, column]
            raise IndexError(f"index_patch_: index[:, {column}] (axis {axis} of S, size {shape[axis]}) holds "
                             f"{int(values.min())} .. {int(values.max())}; coordinates must be in 0 .. "
                             f"{shape[axis] - 1}")


# ---------------------------------------------------------------------------------------------------------------
# Arbitrary masks
# ---------------------------------------------------------------------------------------------------------------


def masked_patch(act: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
    """A new ``[n*b, *S]`` tensor: variant ``v``'s rows of ``act`` with ``clean`` where ``mask[v]`` is true.

    ``mask`` is bool ``[n, *S]`` (any pattern; :func:`index_patch_` is faster for index patterns). One
    ``torch.where`` (dtypes promote as there; differentiable)."""
    for name, t in (("act", act), ("clean", clean), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"masked_patch: {name} must be a tensor, got {type(t).__name__}")
    if clean.device != act.device or mask.device != act.device:
        raise ValueError(f"masked_patch: act, clean and mask must be on one device, got act on {act.device}, clean on "
                         f"{clean.device} and mask on {mask.device}; move them with .to(act.device)")
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_patch: mask must be bool, got {mask.dtype}")
    if act.dim() < 1 or not act.dim() == clean.dim() == mask.dim():
        raise ValueError(f"masked_patch: act [n*b, ...], clean [b, ...] and mask [n, ...] need the same number of "
                         f"dimensions, got {tuple(act.shape)}, {tuple(clean.shape)}, {tuple(mask.shape)}")
    n, b = mask.shape[0], clean.shape[0]
    if act.shape[0] != n * b:
        raise ValueError(f"masked_patch: act has {act.shape[0]} rows, expected n*b = {n}*{b} = {n * b}")
    if not act.shape[1:] == clean.shape[1:] == mask.shape[1:]:
        raise ValueError(f"masked_patch: act, clean and mask differ after the first dim: {tuple(act.shape)}, "
                         f"{tuple(clean.shape)}, {tuple(mask.shape)}")
    stacked = act.reshape((n, b) + tuple(act.shape[1:]))  # [n, b, *S]
    return torch.where(mask.unsqueeze(1), clean.unsqueeze(0), stacked).reshape(act.shape)
