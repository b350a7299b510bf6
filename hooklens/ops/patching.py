"""The patch step of the batched patching engine: every variant of a chunk patched at one hook in one call.

The engine stacks ``n`` patch variants of a batch of ``b`` prompts on the batch dimension, variant-major: variant
``v`` owns rows ``v*b .. v*b+b-1`` of an activation ``act [n*b, *S]`` (``S`` the activation's shape without its
batch dim, over the positions the chunk recomputes). ``clean [b, *S]`` is the clean run's activation.

- :func:`index_patch_` ``(act, clean, index, axes) -> act``, in place: variant ``v`` takes ``clean`` where its
  coordinates along ``axes`` (dims of ``S``) equal ``index[v]`` (``index`` int64 ``[n, len(axes)]``); every other
  axis is patched whole. E.g. ``axes=(0,)`` on ``[pos, d_model]`` patches one position, ``(1,)`` on
  ``[pos, head, d_head]`` one head at every position, ``(0, 1)`` one (pos, head). It writes only the patched
  elements (``n*b*prod(S)/prod(S[axes])`` of them) and reads only their clean values: no ``[n, *S]`` mask, no
  read or rewrite of the unpatched activation. Equal to :func:`masked_patch` with the mask
  ``hooklens.sweeps.index_mask`` builds (tests/test_ops_patching.py checks exactly that).
- :func:`masked_patch` ``(act, clean, mask) -> new tensor``: any per-variant bool mask ``[n, *S]`` (a
  ``torch.where``; for masks that are not an index pattern). No C++ op: one compiled ``where`` measured no faster
  than torch's (``benchmarks/ops_patching.py``), so the former ``hooklens::masked_patch`` was removed.

Implementations of :func:`index_patch_` (all equal element for element; copies, no arithmetic):

- the operator ``torch.ops.hooklens.index_patch_`` of the C++ extension ``hooklens._C``: on CPU an OpenMP
  loop over (row, patched slice) with any strides of ``act`` and ``clean`` (``clean`` may be a narrowed view or
  expanded from one prompt with stride 0; ``act`` must not overlap itself or ``clean``), every dtype; on CUDA a
  Triton kernel (``hooklens/kernels/patch.py``) registered for the operator's CUDA key from here on first use.
  A fake kernel (same checks) makes it traceable by ``torch.compile``. The op has no autograd (the engine
  patches without grad): with grad enabled and ``act`` or ``clean`` requiring grad, ``backend="auto"`` runs the
  reference (differentiable ``index_put_``) and ``backend="cpp"`` raises.
- :func:`index_patch_reference_`: PyTorch advanced indexing (``index_put_``), no loop over variants.
  :func:`use_reference` switches :func:`index_patch_` to it (benchmarks compare the engine both ways).

Index bounds: every coordinate must satisfy ``0 <= index[v, i] < S[axes[i]]``. The CPU operator and the reference
raise ``IndexError``/``RuntimeError`` naming the axis and its size. On CUDA a bounds check would be a host sync (and
break CUDA-graph capture), so the kernel skips (writes nothing for) a variant whose coordinate is out of range; the
engine checks its indices once per sweep on the host, where they are built.

The extension is loaded on first use, never when this module is imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator, Sequence, Tuple

import torch
from torch import Tensor

from hooklens.ops.lowrank import load_extension

__all__ = ["index_patch_", "index_patch_reference_", "masked_patch", "masked_patch_reference", "use_reference",
           "check_index_patch"]

BACKENDS = ("auto", "cpp", "torch")
_use_reference: contextvars.ContextVar[bool] = contextvars.ContextVar("hooklens_index_patch_reference", default=False)


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread / async context), ``index_patch_(..., backend="auto")`` runs the PyTorch
    reference instead of the operator: the switch benchmarks use to time the engine with and without the op."""
    token = _use_reference.set(bool(enabled))
    try:
        yield
    finally:
        _use_reference.reset(token)


# ---------------------------------------------------------------------------------------------------------------
# Checks (shared by both implementations and the fake kernel; no host sync)
# ---------------------------------------------------------------------------------------------------------------


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
    """IndexError naming the first axis with an out-of-range coordinate (one host sync: reference / CPU only)."""
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
# The reference
# ---------------------------------------------------------------------------------------------------------------


def index_patch_reference_(act: Tensor, clean: Tensor, index: Tensor, axes: Sequence[int]) -> Tensor:
    """:func:`index_patch_` with PyTorch advanced indexing (one ``index_put_``, no loop over variants)."""
    n, b, axes = check_index_patch(act, clean, index, axes)
    shape = tuple(act.shape[1:])
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


# ---------------------------------------------------------------------------------------------------------------
# The operator (C++ on CPU, Triton on CUDA)
# ---------------------------------------------------------------------------------------------------------------

_register_lock = threading.Lock()
_registered = False
_library = None  # the torch.library.Library holding the Python registrations (kept alive here)


def _ensure_operator(required: bool) -> bool:
    """Loads ``hooklens._C`` and registers index_patch_'s fake kernel and CUDA (Triton) kernel, once."""
    global _registered, _library
    if not load_extension(required=required):
        return False
    if not _registered:
        with _register_lock:
            if not _registered:
                if not hasattr(torch.ops.hooklens, "index_patch_"):
                    # An extension built before the op existed: rebuild (pip install -e .).
                    if required:
                        raise RuntimeError("hooklens._C has no index_patch_ operator: it was built from older "
                                           "sources; rebuild it with `pip install --no-build-isolation -e .`")
                    return False
                torch.library.register_fake("hooklens::index_patch_", _index_patch_fake)
                library = torch.library.Library("hooklens", "IMPL")
                library.impl("index_patch_", _index_patch_cuda, "CUDA")
                _library = library
                _registered = True
    return True


def _index_patch_fake(act, clean, index, axes) -> None:
    # The C++ kernel's checks with its exception types: RuntimeError for mixed devices (a CPU tensor mixed with a
    # meta one dispatches here), TypeError / ValueError for the rest. Index values are data: bounds are the real
    # kernels' business.
    if act.device != clean.device or index.device != act.device:
        raise RuntimeError(f"index_patch_: act, clean and index must be on one device, got act on {act.device}, clean "
                           f"on {clean.device} and index on {index.device}; move them with .to(act.device)")
    check_index_patch(act, clean, index, axes)


def _index_patch_cuda(act, clean, index, axes) -> None:
    from hooklens.kernels.patch import index_patch_triton  # lazy: imports Triton

    index_patch_triton(act, clean, index, axes)


def index_patch_(act: Tensor, clean: Tensor, index: Tensor, axes: Sequence[int], *, backend: str = "auto") -> Tensor:
    """Patch every variant of ``act`` in place and return it (see the module docstring).

    ``backend``: ``"auto"`` (the operator where ``hooklens._C`` is built and the tensors are on CPU or CUDA, else
    the reference; the reference inside :func:`use_reference`), ``"cpp"`` (the operator; errors without it) or
    ``"torch"`` (the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"index_patch_: backend must be one of {BACKENDS}, got {backend!r}")
    _, _, axes = check_index_patch(act, clean, index, axes)
    needs_grad = torch.is_grad_enabled() and (act.requires_grad or clean.requires_grad)
    if backend == "cpp" and needs_grad:
        raise ValueError("index_patch_: the operator has no autograd (the engine patches without grad); use "
                         "backend='torch' (index_put_) or masked_patch to differentiate through a patch, or run "
                         "under torch.no_grad()")
    use_op = backend == "cpp" or (backend == "auto" and not needs_grad and not _use_reference.get()
                                  and act.device.type in ("cpu", "cuda"))
    if use_op and _ensure_operator(required=backend == "cpp"):
        torch.ops.hooklens.index_patch_(act, clean, index, list(axes))
        return act
    return index_patch_reference_(act, clean, index, axes)


# ---------------------------------------------------------------------------------------------------------------
# Arbitrary masks
# ---------------------------------------------------------------------------------------------------------------


def masked_patch(act: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
    """A new ``[n*b, *S]`` tensor: variant ``v``'s rows of ``act`` with ``clean`` where ``mask[v]`` is true.

    ``mask`` is bool ``[n, *S]`` (any pattern; :func:`index_patch_` is the faster op for index patterns). One
    ``torch.where`` (dtypes promote as there; differentiable). There is deliberately no C++ version: a compiled
    ``where`` measured no faster than torch's (``benchmarks/ops_patching.py``)."""
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


# The name the engine's tests and benchmarks use for the mask reference (it is the same function).
masked_patch_reference = masked_patch
