"""The suite's one tolerance table: `TOLERANCES[kind][dtype]` is `dict(rtol=..., atol=...)`, as
`torch.testing.assert_close` takes them (`tolerance(kind, dtype)` returns a copy to splat into the call).

A kind names one kind of comparison; its entries say how close two tensors of that dtype must be. A test that needs
a tighter bound than an existing kind gets its own kind here, never a looser reading of another's. Literal
tolerances stay inline only where they are specific to one check (finite differences, Riemann sums, bounds scaled by
a matrix norm) and say why there.
"""
from __future__ import annotations

from typing import Dict

import torch

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

TOLERANCES: Dict[str, Dict[torch.dtype, Dict[str, float]]] = {
    # An activation, logit or score against a reference computed in the same dtype by the same math in another way
    # (a TL 3.9 twin, a naive loop of run_with_hooks, the library in another mode): only rounding differs.
    "same_dtype": {
        F64: dict(rtol=1e-9, atol=1e-10),
        F32: dict(rtol=1e-5, atol=1e-5),
        BF16: dict(rtol=2e-2, atol=2e-2),
        F16: dict(rtol=2e-3, atol=2e-3),
    },
    # As "same_dtype" where the quantity is a mean of attention probabilities (head scores, pattern line means):
    # values in [0, 1] whose rounding error is far below the activation bound.
    "pattern_mean": {F32: dict(rtol=1e-5, atol=1e-6)},
    # The same against a closed-form value (uniform attention): no relative slack.
    "pattern_mean_abs": {F32: dict(rtol=0, atol=1e-6)},
    # As "same_dtype" for O(1)-sized values with no relative slack: one forward split into pieces (KV-cached
    # generation) against the whole forward, a model against a reloaded copy, orthonormality of factors.
    "same_dtype_abs": {F32: dict(rtol=0, atol=1e-5)},
    # Gradient sums (integrated gradients) against a step-by-step reference: entries far below 1, so the absolute
    # floor is lower than "same_dtype"'s.
    "small_grads": {F64: dict(rtol=1e-9, atol=1e-12)},
    # Same math with one float32 accumulation in another order. Short: a sum over heads, a d_head-sized product.
    "reordered_short_sum": {F32: dict(rtol=1e-4, atol=1e-5)},
    # Long: the residual stream rebuilt as a sum of every component, d_model-sized products, batched patching.
    "reordered_sum": {F32: dict(rtol=1e-4, atol=1e-4)},
    # Whole-model logits against another implementation (HF GPT-2, unprocessed weights, refactored factors): the
    # centered or log-softmaxed logits agree absolutely; no relative slack.
    "logits_cross_impl": {F32: dict(rtol=0, atol=1e-4)},
    # Whole-model logits against the TL 3.9 twin where weight processing reorders sums (refactor, fold variants,
    # start_at_layer).
    "logits_tl_twin": {F32: dict(rtol=1e-5, atol=1e-4)},
    # A model's activations / gradients through the fused (Triton) attention against the torch backend: the
    # softmax is accumulated block by block, so the float32 sums are reordered.
    "fused_vs_eager": {F32: dict(rtol=1e-4, atol=2e-5)},
    "fused_vs_eager_grads": {F32: dict(rtol=1e-4, atol=1e-5)},
    # The gradients backward hooks see on hook_attn_scores / hook_pattern there: entries of softmax-sized values.
    "fused_vs_eager_hook_grads": {F32: dict(rtol=1e-5, atol=1e-6)},
    # Attention kernels against the float64 reference (`reference_attention`): max abs error per output.
    "kernel_pattern": {F32: dict(rtol=0, atol=2e-6), BF16: dict(rtol=0, atol=1e-2), F16: dict(rtol=0, atol=2e-3)},
    "kernel_scores": {F32: dict(rtol=0, atol=5e-5), BF16: dict(rtol=0, atol=1e-1), F16: dict(rtol=0, atol=2e-2)},
    "kernel_z": {F32: dict(rtol=0, atol=2e-5), BF16: dict(rtol=0, atol=5e-2), F16: dict(rtol=0, atol=1e-2)},
    "kernel_stats": {F32: dict(rtol=0, atol=1e-6), BF16: dict(rtol=0, atol=2e-3), F16: dict(rtol=0, atol=5e-4)},
    # Rows of an attention pattern sum to 1 (pattern kernels, any dtype; low precision rounds every entry).
    "pattern_row_sum": {F32: dict(rtol=0, atol=1e-5), BF16: dict(rtol=0, atol=2e-2), F16: dict(rtol=0, atol=2e-2)},
    # Low-precision kernels, also: error vs float64 <= rtol * (the same computation's error with torch ops in that
    # dtype) + atol. The atol floor covers cases where torch happens to be exact. float32 has no such check.
    "kernel_vs_torch": {BF16: dict(rtol=2.0, atol=1e-6), F16: dict(rtol=2.0, atol=1e-6)},
    # Low-rank routines (C++ solvers, the LAPACK route) against dense torch.linalg on A @ B.
    "lowrank": {F64: dict(rtol=1e-9, atol=1e-9), F32: dict(rtol=1e-5, atol=1e-5)},
    # The same routine run twice in float64 with another thread split: only the reduction order differs.
    "lowrank_threads": {F64: dict(rtol=1e-12, atol=1e-12)},
    # FactoredMatrix in float64 (SVD, eigenvalues, products of the factors) against dense torch.linalg on A @ B.
    "factored_float64": {F64: dict(rtol=1e-6, atol=1e-8)},
    # Row maxima of A @ B against the dense product's: one dot product per entry, no solver.
    "lowrank_row_max": {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5)},
    # Eigenvalues from LAPACK on the device against the torch backend (the same LAPACK algorithm).
    "lowrank_lapack": {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=1e-5, atol=1e-5)},
    # Eigenvalues of A @ B in the inputs' dtype through any device's route (float64 cores, cast to complex64 for
    # float32 inputs) against the CPU torch reference, and their gradients (complex64 outputs for float32).
    "eigvals_route": {F64: dict(rtol=1e-10, atol=1e-5), F32: dict(rtol=1e-5, atol=1e-5)},
    "eigvals_route_grads": {F64: dict(rtol=1e-8, atol=1e-10), F32: dict(rtol=1e-4, atol=1e-6)},
}


def tolerance(kind: str = "same_dtype", dtype: torch.dtype = F32) -> Dict[str, float]:
    """`dict(rtol=..., atol=...)` of one table entry (a copy: callers may splat or edit it)."""
    try:
        return dict(TOLERANCES[kind][dtype])
    except KeyError:
        raise KeyError(f"no tolerance for kind {kind!r} and dtype {dtype}; add one to tests/tolerances.py") from None
