"""Custom operators of hooklens.

``hooklens.ops.lowrank``: eigenvalues, SVD, Frobenius norm, trace and row maxima of a factored matrix ``A @ B``
without forming it (e.g. an OV or QK circuit ``W_V @ W_O``), and eigenvalues of batches of small square matrices.
``hooklens.ops.patching``: ``index_patch_``, the patch step of the batched patching engine (every variant of a chunk
patched in place in one gather + ``index_put_``, writing only the patched elements), and ``masked_patch``
(torch.where, for arbitrary per-variant masks); plain PyTorch, no compiled op (its module docstring says why).
The C++ extension ``hooklens._C`` is loaded on first use, never at import time; without it the pure-PyTorch
implementations run.
"""
from .lowrank import (
    eigvals,
    extension_available,
    fro_norm,
    load_extension,
    row_max,
    small_eigvals,
    svd,
    topk_svd,
    trace,
)

__all__ = ["eigvals", "svd", "topk_svd", "fro_norm", "trace", "row_max", "small_eigvals", "load_extension",
           "extension_available"]
