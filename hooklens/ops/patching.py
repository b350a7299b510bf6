"""`masked_patch`: the patching engine's one op per chunk of variants (C++ `hooklens::masked_patch`, PyTorch
reference beside it; both give identical results).

act `[n*b, ...]` (n variants of b prompts, variant-major), clean `[b, ...]`, mask `[n, ...]` bool -> `[n*b, ...]`
with each variant's masked elements taken from `clean`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hooklens.ops.lowrank import load_extension


def masked_patch_reference(act: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
    n, b = mask.shape[0], clean.shape[0]
    stacked = act.reshape((n, b) + tuple(act.shape[1:]))  # [n, b, ...]
    return torch.where(mask.unsqueeze(1), clean.unsqueeze(0), stacked).reshape(act.shape)


def masked_patch(act: Tensor, clean: Tensor, mask: Tensor, *, backend: str = "auto") -> Tensor:
    """Patch every variant at once (see the module docstring). `backend`: "auto" | "cpp" | "torch"."""
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    if backend != "torch" and load_extension(required=backend == "cpp"):
        return torch.ops.hooklens.masked_patch(act, clean, mask)
    return masked_patch_reference(act, clean, mask)
