"""Linear algebra of a factored matrix ``M = A @ B`` without forming ``M``.

``A`` is ``[..., m, k]`` and ``B`` is ``[..., k, n]``, usually with ``k`` much smaller than ``m`` and ``n`` (an
OV circuit ``W_V @ W_O`` is ``[d_model, d_head] @ [d_head, d_model]``). Leading (batch) dimensions broadcast as
in ``torch.matmul``; float32 and float64 are supported.

- :func:`eigvals`: the ``k`` eigenvalues of ``B @ A`` -- the nonzero eigenvalues of ``A @ B`` plus zeros
  (needs ``m == n``), complex ``[..., k]``, sorted by descending magnitude (ties, such as conjugate pairs, by
  descending imaginary part). Computed in float64; complex64 output for float32 inputs.
- :func:`small_eigvals`: the eigenvalues of a batch of small square matrices ``C [..., k, k]`` with the same
  solver and ordering (what :func:`eigvals` runs on ``B @ A``; ``FactoredMatrix.eigenvalues`` calls it on ``BA``).
- :func:`svd` / :func:`topk_svd`: thin SVD ``A @ B = U diag(S) Vh`` with ``r = min(m, k, n)`` components: ``U``
  ``[..., m, r]``, ``S`` ``[..., r]`` descending, ``Vh`` ``[..., r, n]`` (V transposed, as torch.linalg.svd).
- :func:`fro_norm`: ``||A @ B||_F``, ``[...]``.
- :func:`trace`: ``trace(A @ B)`` (needs ``m == n``), ``[...]``.
- :func:`row_max`: ``torch.max(A @ B, dim=-1)`` -- ``values`` and (first) ``indices`` ``[..., m]`` -- without
  holding more than a cache-sized tile of ``A @ B`` (a 50257 x 50257 full circuit is 10 GB).

Each function takes ``backend=``:

- ``"cpp"``: the operators ``torch.ops.hooklens.lowrank_*`` of the C++ extension ``hooklens._C`` (built by
  ``pip install -e .``). Eigenvalues for ``k <= 128`` come from a batched host solver (balancing, Hessenberg
  reduction, Francis double-shift QR; eigenvalues only, in float64) run in parallel over the batch and, on CPUs
  with AVX2 + FMA, on four matrices at once in the SIMD lanes, where LAPACK solves one matrix at a time.
  The operators have fake (meta) kernels, so they work under ``torch.compile``, and all support autograd:
  ``trace`` and ``fro_norm`` by closed-form formulas; ``eigvals`` and ``svd`` recompute their result with
  ``torch.linalg`` in the backward pass and differentiate through that (the forward stays fast; a backward
  costs what the torch backend's would).
- ``"torch"``: the same math with ``torch.linalg`` (the reference implementation); supports autograd
  everywhere and any device.
- ``"auto"`` (default): ``"cpp"`` when the extension is available and the tensors are on CPU or CUDA (the
  devices the operators have kernels for); ``"torch"`` otherwise.

Every operator, and its fake kernel, refuses tensors on different devices (a CPU tensor mixed with a meta one
would otherwise reach the fake kernel and come back as uninitialised memory): ``RuntimeError`` naming both
devices, as from torch's own operators; the Python functions here raise ``ValueError`` before dispatching.

Device policy: each function with ``backend="cpp"`` calls its operator and nothing else, so
``hooklens.ops.X(...)`` and ``torch.ops.hooklens.X(...)`` take the same route on every device. Where the route
depends on the device it is decided in the C++ kernel: CUDA eigenvalues (``eigvals``, ``small_eigvals``) are
copied to the host solver and back (see ``eigvals_host_route`` in ``csrc/lowrank.cpp`` for why).

The extension is imported on first use (or by :func:`load_extension`), never when hooklens is imported.
"""
from __future__ import annotations

import importlib
import threading
from typing import NamedTuple

import torch

__all__ = [
    "SVDResult",
    "eigvals",
    "svd",
    "topk_svd",
    "fro_norm",
    "trace",
    "row_max",
    "RowMax",
    "small_eigvals",
    "load_extension",
    "extension_available",
]

BACKENDS = ("auto", "cpp", "torch")


class SVDResult(NamedTuple):
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class RowMax(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Loading the extension
# ---------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_load_error: BaseException | None = None


@torch.compiler.disable
def load_extension(required: bool = False) -> bool:
    """Import ``hooklens._C`` (registering ``torch.ops.hooklens.*``) and its fake kernels / autograd rules.

    Returns whether the extension is available. With ``required=True`` a missing or broken extension raises
    ``RuntimeError`` saying why. Safe to call repeatedly and from several threads.
    """
    global _loaded, _load_error
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    importlib.import_module("hooklens._C")
                    _register_python_kernels()
                except Exception as e:  # ImportError; OSError or RuntimeError for a build against another torch
                    _load_error, _loaded = e, False
                else:
                    _loaded = True
    if required and not _loaded:
        raise RuntimeError(
            f"the hooklens C++ extension (hooklens._C) is not available: {_load_error!r}. It is built by "
            '`pip install -e .` against the installed torch (see setup.py); reinstall after changing torch. '
            "backend='torch' runs without it."
        ) from _load_error
    return bool(_loaded)


def extension_available() -> bool:
    """Whether ``hooklens._C`` can be loaded (loads it if it was not yet)."""
    return load_extension()


# ---------------------------------------------------------------------------------------------------------
# Input checks and small helpers (shared by both backends and the fake kernels)
# ---------------------------------------------------------------------------------------------------------


def _check(name: str, A, B, square: bool) -> torch.Size:
    """Validates ``A: [..., m, k]``, ``B: [..., k, n]``; returns the broadcast batch shape."""
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise TypeError(f"{name}: A and B must be tensors, got {type(A).__name__} and {type(B).__name__}")
    if A.dim() < 2:
        raise ValueError(f"{name}: A must have shape [..., m, k] (at least 2 dimensions), got {tuple(A.shape)}")
    if B.dim() < 2:
        raise ValueError(f"{name}: B must have shape [..., k, n] (at least 2 dimensions), got {tuple(B.shape)}")
    if A.device != B.device:
        raise ValueError(f"{name}: A and B must be on the same device, got A on {A.device} and B on {B.device}")
    if A.dtype != B.dtype:
        raise TypeError(f"{name}: A and B must have the same dtype, got A {A.dtype} and B {B.dtype}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: only float32 and float64 are supported, got {A.dtype}")
    if A.shape[-1] != B.shape[-2]:
        raise ValueError(
            f"{name}: inner dimensions must match: A is [..., m, k] with shape {tuple(A.shape)} and B is "
            f"[..., k, n] with shape {tuple(B.shape)} (k = {A.shape[-1]} vs {B.shape[-2]})"
        )
    if square and A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"{name}: A @ B must be square (m == n): A has shape {tuple(A.shape)} and B has shape "
            f"{tuple(B.shape)} (m = {A.shape[-2]}, n = {B.shape[-1]})"
        )
    try:
        return torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{name}: the batch (leading) dimensions of A and B do not broadcast: A has shape {tuple(A.shape)} "
            f"and B has shape {tuple(B.shape)}"
        ) from None


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex64 if dtype == torch.float32 else torch.complex128


def _use_cpp(backend: str, name: str, A: torch.Tensor, B: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "cpp":
        load_extension(required=True)
        return True
    if backend != "auto":
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    if A.device.type not in ("cpu", "cuda"):
        return False
    return load_extension()


def _gram_is_cheaper(m: int, k: int, n: int) -> bool:
    # ||A B||_F via the k x k Gram matrices costs ~(m + n) k^2; forming A @ B costs ~m n k.
    return m * n > k * (m + n)


def _sort_eigvals(ev: torch.Tensor) -> torch.Tensor:
    """|lambda| descending, ties by imaginary part descending (what the C++ kernel does)."""
    if ev.shape[-1] <= 1:
        return ev
    ev = ev.gather(-1, torch.sort(ev.imag, dim=-1, descending=True, stable=True).indices)
    return ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)


# ---------------------------------------------------------------------------------------------------------
# Pure-PyTorch reference implementations (the "torch" backend; same math and conventions as csrc/)
# ---------------------------------------------------------------------------------------------------------


def _eigvals_torch(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    # LAPACK's result for NaN/inf input is unspecified: _small_eigvals_torch NaNs it.
    return _small_eigvals_torch(B.to(torch.float64) @ A.to(torch.float64)).to(_complex_of(A.dtype))


def _svd_torch(A: torch.Tensor, B: torch.Tensor, batch: torch.Size) -> SVDResult:
    Qa, Ra = torch.linalg.qr(A)  # A = Qa Ra
    Qb, Rb = torch.linalg.qr(B.mT)  # B^T = Qb Rb
    Uc, S, Vch = torch.linalg.svd(Ra @ Rb.mT, full_matrices=False)
    U, Vh = Qa @ Uc, Vch @ Qb.mT
    return SVDResult(
        U.expand(*batch, *U.shape[-2:]), S.expand(*batch, S.shape[-1]), Vh.expand(*batch, *Vh.shape[-2:])
    )


def _fro_norm_torch(A: torch.Tensor, B: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    if _gram_is_cheaper(m, k, n):
        out = ((A.mT @ A) * (B @ B.mT)).sum((-2, -1)).clamp_min(0).sqrt()
    else:
        out = torch.linalg.vector_norm(A @ B, dim=(-2, -1))
    return out.expand(batch)


def _trace_torch(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (A * B.mT).sum((-2, -1))


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def eigvals(A: torch.Tensor, B: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Eigenvalues of the k x k matrix ``B @ A``: the nonzero eigenvalues of ``A @ B`` (``m == n``), plus zeros.

    Returns complex ``[..., k]`` sorted by descending magnitude (ties by descending imaginary part); complex64
    for float32 inputs, complex128 for float64 (computed in float64 either way).
    """
    _check("hooklens.ops.eigvals", A, B, square=True)
    if _use_cpp(backend, "hooklens.ops.eigvals", A, B):
        return torch.ops.hooklens.lowrank_eigvals(A, B)
    return _eigvals_torch(A, B)


SOLVERS = ("auto", "lanes", "scalar", "lapack")


def small_eigvals(C: torch.Tensor, *, solver: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Eigenvalues of the square matrices ``C [..., k, k]``: complex ``[..., k]``, sorted like :func:`eigvals`
    (descending magnitude, ties by descending imaginary part); complex64 for float32 ``C``, computed in float64.

    ``solver`` picks the C++ host solver: ``"auto"`` (the SIMD-lane solver where the CPU has AVX2 + FMA, else
    the scalar one; LAPACK for ``k > 128``), ``"lanes"``, ``"scalar"`` or ``"lapack"`` (torch.linalg on the
    matrices' device). CUDA matrices are copied to the host solver (except with ``"lapack"``) and the
    eigenvalues copied back, by the operator itself; with ``backend="torch"``, torch.linalg computes them on the
    matrices' device. A matrix with a NaN or
    inf entry gets all-NaN eigenvalues. Differentiable (the backward pass recomputes with torch.linalg).
    """
    name = "hooklens.ops.small_eigvals"
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"{name}: C must be a tensor, got {type(C).__name__}")
    if C.dim() < 2 or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{name}: C must be a batch of square matrices [..., k, k], got shape {tuple(C.shape)}")
    if C.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: only float32 and float64 are supported, got {C.dtype}")
    if solver not in SOLVERS:
        raise ValueError(f"{name}: solver must be one of {SOLVERS}, got {solver!r}")
    if _use_cpp(backend, name, C, C):
        return torch.ops.hooklens.small_eigvals(C, solver)
    return _small_eigvals_torch(C)


def _small_eigvals_torch(C: torch.Tensor) -> torch.Tensor:
    C64 = C.to(torch.float64)
    finite = torch.isfinite(C64).all(-1).all(-1)
    ev = torch.linalg.eigvals(torch.where(finite[..., None, None], C64, 0.0))
    ev = torch.where(finite[..., None], ev, torch.full((), complex(float("nan"), float("nan")), dtype=ev.dtype))
    return _sort_eigvals(ev).to(_complex_of(C.dtype))


def svd(A: torch.Tensor, B: torch.Tensor, *, backend: str = "auto") -> SVDResult:
    """Thin SVD of ``A @ B`` from QRs of the factors: ``U [..., m, r]``, ``S [..., r]``, ``Vh [..., r, n]``.

    ``r = min(m, k, n)``; ``S`` is descending and ``A @ B == U @ diag(S) @ Vh`` (``Vh`` is V transposed).
    """
    batch = _check("hooklens.ops.svd", A, B, square=False)
    if _use_cpp(backend, "hooklens.ops.svd", A, B):
        return SVDResult(*torch.ops.hooklens.lowrank_svd(A, B))
    return _svd_torch(A, B, batch)


def topk_svd(A: torch.Tensor, B: torch.Tensor, k: int, *, backend: str = "auto") -> SVDResult:
    """The ``k`` leading singular triplets of ``A @ B``: ``U [..., m, k]``, ``S [..., k]``, ``Vh [..., k, n]``."""
    _check("hooklens.ops.topk_svd", A, B, square=False)
    r = min(A.shape[-2], A.shape[-1], B.shape[-1])
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= r:
        raise ValueError(f"hooklens.ops.topk_svd: k must be an int in [0, min(m, k, n)] = [0, {r}], got {k!r}")
    U, S, Vh = svd(A, B, backend=backend)
    return SVDResult(U[..., :k], S[..., :k], Vh[..., :k, :])


def fro_norm(A: torch.Tensor, B: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``||A @ B||_F`` as ``sqrt(sum((A^T A) * (B B^T)))`` (or via ``A @ B`` when that is cheaper), ``[...]``."""
    batch = _check("hooklens.ops.fro_norm", A, B, square=False)
    if _use_cpp(backend, "hooklens.ops.fro_norm", A, B):
        return torch.ops.hooklens.lowrank_fro_norm(A, B)
    return _fro_norm_torch(A, B, batch)


def trace(A: torch.Tensor, B: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``trace(A @ B) = sum(A * B^T)``, ``[...]`` (needs ``m == n``)."""
    _check("hooklens.ops.trace", A, B, square=True)
    if _use_cpp(backend, "hooklens.ops.trace", A, B):
        return torch.ops.hooklens.lowrank_trace(A, B)
    return _trace_torch(A, B)


def row_max(A: torch.Tensor, B: torch.Tensor, *, backend: str = "auto") -> RowMax:
    """``torch.max(A @ B, dim=-1)``: ``values [..., m]`` and ``indices [..., m]`` (int64, the first column
    attaining the maximum; a NaN counts as the maximum), without forming ``A @ B``.

    The C++ kernel multiplies row blocks of ``A`` by column blocks of ``B`` and scans each tile while it is in
    cache; the torch backend reduces row chunks of ``A @ B`` (at most ~256 MiB each). ``values`` is
    differentiable. The products are computed tile by tile, so an entry may differ from the dense
    ``A @ B`` in the last bit, which can flip an exact or near-exact tie.
    """
    _check("hooklens.ops.row_max", A, B, square=False)
    if A.shape[-2] > 0 and B.shape[-1] == 0:
        raise ValueError(
            f"hooklens.ops.row_max: A @ B has no columns (A {tuple(A.shape)}, B {tuple(B.shape)}), so its rows "
            "have no maximum"
        )
    if _use_cpp(backend, "hooklens.ops.row_max", A, B):
        return RowMax(*torch.ops.hooklens.lowrank_max(A, B))
    return _row_max_torch(A, B)


def _row_max_torch(A: torch.Tensor, B: torch.Tensor) -> RowMax:
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    m, n = A.shape[-2], B.shape[-1]
    rows = max(1, (256 << 20) // (A.element_size() * max(n, 1) * max(batch.numel(), 1)))
    chunks = [(A[..., r0 : r0 + rows, :] @ B).max(-1) for r0 in range(0, m, rows)]
    if not chunks:
        empty = A.new_empty((*batch, 0))
        return RowMax(empty, empty.long())
    return RowMax(torch.cat([c.values for c in chunks], -1), torch.cat([c.indices for c in chunks], -1))


# ---------------------------------------------------------------------------------------------------------
# Fake kernels (torch.compile / meta tensors) and autograd rules for torch.ops.hooklens.*; registered by
# load_extension() right after hooklens._C is imported (csrc/lowrank.cpp names this module with
# m.set_python_module, so the registrations must be made from here).
# ---------------------------------------------------------------------------------------------------------


def _fake_batch(name: str, A: torch.Tensor, B: torch.Tensor, square: bool) -> torch.Size:
    """The checks of check_factors in csrc/lowrank.cpp, for the fake kernels. The device check matters beyond
    torch.compile: a real tensor mixed with a meta one dispatches here, and without it the op would return
    uninitialised memory shaped like the answer."""
    torch._check(A.device == B.device, lambda: f"{name}: A and B must be on the same device, got A on {A.device} "
                 f"and B on {B.device}; move one with B.to(A.device)")
    torch._check(A.dim() >= 2 and B.dim() >= 2, lambda: f"{name}: A [..., m, k] and B [..., k, n] need at least "
                 f"2 dimensions, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    torch._check(A.dtype == B.dtype, lambda: f"{name}: A and B must have the same dtype, got A {A.dtype} and B "
                 f"{B.dtype}; convert one with B.to(A.dtype)")
    torch._check(A.dtype in (torch.float32, torch.float64),
                 lambda: f"{name}: only float32 and float64 are supported, got {A.dtype}")
    torch._check(A.layout == torch.strided and B.layout == torch.strided,
                 lambda: f"{name}: only dense (strided) tensors are supported")
    torch._check(A.shape[-1] == B.shape[-2], lambda: f"{name}: inner dimensions must match: A {tuple(A.shape)}, "
                 f"B {tuple(B.shape)}")
    if square:
        torch._check(A.shape[-2] == B.shape[-1], lambda: f"{name}: A @ B must be square (m == n): A "
                     f"{tuple(A.shape)}, B {tuple(B.shape)}")
    return torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])


def _eigvals_fake(A, B):
    batch = _fake_batch("hooklens::lowrank_eigvals", A, B, square=True)
    return A.new_empty((*batch, A.shape[-1]), dtype=_complex_of(A.dtype))


def _svd_fake(A, B):
    batch = _fake_batch("hooklens::lowrank_svd", A, B, square=False)
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    r = torch.sym_min(torch.sym_min(m, k), n)
    return A.new_empty((*batch, m, r)), A.new_empty((*batch, r)), A.new_empty((*batch, r, n))


def _fro_norm_fake(A, B):
    return A.new_empty(_fake_batch("hooklens::lowrank_fro_norm", A, B, square=False))


def _trace_fake(A, B):
    return A.new_empty(_fake_batch("hooklens::lowrank_trace", A, B, square=True))


def _small_eigvals_fake(C, solver="auto"):
    name = "hooklens::small_eigvals"
    torch._check(C.dim() >= 2 and C.shape[-1] == C.shape[-2],
                 lambda: f"{name}: C must be a batch of square matrices [..., k, k], got shape {tuple(C.shape)}")
    torch._check(C.dtype in (torch.float32, torch.float64),
                 lambda: f"{name}: only float32 and float64 are supported, got {C.dtype}")
    torch._check(C.layout == torch.strided, lambda: f"{name}: only dense (strided) tensors are supported")
    torch._check(solver in SOLVERS, lambda: f"{name}: solver must be 'auto', 'lanes', 'scalar' or 'lapack', got "
                 f"'{solver}'")
    return C.new_empty(C.shape[:-1], dtype=_complex_of(C.dtype))


def _max_fake(A, B, name="hooklens::lowrank_max"):
    batch = _fake_batch(name, A, B, square=False)
    m, n = A.shape[-2], B.shape[-1]
    torch._check((n > 0) | (m == 0), lambda: f"{name}: the maximum of an empty row (A @ B has 0 columns) is not "
                 f"defined; shapes were A {tuple(A.shape)}, B {tuple(B.shape)}")
    return A.new_empty((*batch, m)), A.new_empty((*batch, m), dtype=torch.int64)


def _max_chunked_fake(A, B, chunk_bytes=256 << 20):
    torch._check(chunk_bytes > 0, lambda: f"hooklens::_lowrank_max_chunked: chunk_bytes must be positive, got "
                 f"{chunk_bytes}")
    return _max_fake(A, B, name="hooklens::_lowrank_max_chunked")


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _save_inputs_and_output(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _trace_backward(ctx, grad):
    A, B = ctx.saved_tensors
    g = grad[..., None, None]
    gA = (g * B.mT).sum_to_size(A.shape) if ctx.needs_input_grad[0] else None
    gB = (g * A.mT).sum_to_size(B.shape) if ctx.needs_input_grad[1] else None
    return gA, gB


def _fro_norm_backward(ctx, grad):
    # d||AB||/dA = A B B^T / ||AB||, d||AB||/dB = A^T A B / ||AB|| (0 where the norm is 0, like torch.linalg).
    A, B, out = ctx.saved_tensors
    scale = torch.where(out == 0, torch.zeros_like(grad), grad / out)[..., None, None]
    gA = (scale * (A @ (B @ B.mT))).sum_to_size(A.shape) if ctx.needs_input_grad[0] else None
    gB = (scale * ((A.mT @ A) @ B)).sum_to_size(B.shape) if ctx.needs_input_grad[1] else None
    return gA, gB


def _differentiable_inputs(ctx, n_inputs: int, create_graph: bool):
    """The first `n_inputs` saved tensors (the operator's inputs) to recompute from: detached copies that require
    grad where the forward's inputs did, or (for a differentiable backward, `create_graph=True`) the saved tensors
    themselves, keeping their history."""
    inputs = ctx.saved_tensors[:n_inputs]
    if create_graph:
        return inputs
    return tuple(x.detach().requires_grad_(needs) for x, needs in zip(inputs, ctx.needs_input_grad))


def _grads(ctx, outputs, inputs, grads, create_graph: bool):
    """Gradients of the recomputed `outputs` w.r.t. the `inputs` the forward's inputs needed them for."""
    outputs, grads = (outputs,), (grads,)
    if isinstance(outputs[0], (tuple, list)):
        outputs, grads = outputs[0], grads[0]
    used = [(out, g) for out, g in zip(outputs, grads) if g is not None]
    needed = [x for x, needs in zip(inputs, ctx.needs_input_grad) if needs]
    found = iter(torch.autograd.grad([o for o, _ in used], needed, [g for _, g in used], allow_unused=True,
                                     materialize_grads=True, create_graph=create_graph))
    return tuple(next(found) if needs else None for needs in ctx.needs_input_grad[:len(inputs)])


def _match_eigvals(out: torch.Tensor, ev: torch.Tensor) -> torch.Tensor:
    """`ev` (differentiable, any order) permuted so entry i is the one nearest the forward's `out[..., i]`."""
    distance = (out.to(ev.dtype)[..., :, None] - ev.detach()[..., None, :]).abs()  # [..., k (out), k (ev)]
    return ev.gather(-1, distance.argmin(-1)).to(out.dtype)


def _small_eigvals_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _small_eigvals_backward(ctx, grad):
    out = ctx.saved_tensors[1]
    create_graph = torch.is_grad_enabled()
    (C,) = _differentiable_inputs(ctx, 1, create_graph)
    with torch.enable_grad():
        matched = _match_eigvals(out, torch.linalg.eigvals(C.to(torch.float64)))
    return (*_grads(ctx, matched, (C,), grad, create_graph), None)  # no gradient for `solver`


def _eigvals_backward(ctx, grad):
    # The C++ solver has no eigenvectors, so the backward recomputes the eigenvalues with torch.linalg (which
    # differentiates through them) and pairs each recomputed eigenvalue with the nearest one the forward
    # returned, so the gradient of eigenvalue i goes to the forward's entry i whatever order LAPACK finds
    # them in. Like torch.linalg.eigvals, gradients of repeated eigenvalues are not defined.
    out = ctx.saved_tensors[2]
    create_graph = torch.is_grad_enabled()  # backward(create_graph=True): make the gradient differentiable
    A, B = _differentiable_inputs(ctx, 2, create_graph)
    with torch.enable_grad():
        ev = torch.linalg.eigvals(B.to(torch.float64) @ A.to(torch.float64))  # [..., k], LAPACK order
        matched = _match_eigvals(out, ev)
    return _grads(ctx, matched, (A, B), grad, create_graph)


def _svd_backward(ctx, grad_U, grad_S, grad_Vh):
    # Recompute with the torch reference (the same factorisations the C++ operator runs) and align the sign
    # of each singular pair with the forward's, then differentiate through torch.linalg.
    U0 = ctx.saved_tensors[2]
    create_graph = torch.is_grad_enabled()  # backward(create_graph=True): make the gradient differentiable
    A, B = _differentiable_inputs(ctx, 2, create_graph)
    with torch.enable_grad():
        U, S, Vh = _svd_torch(A, B, torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]))
        sign = torch.where((U.detach() * U0).sum(-2) < 0, -1.0, 1.0).to(U.dtype)  # [..., r]
        U, Vh = U * sign[..., None, :], Vh * sign[..., :, None]
    return _grads(ctx, (U, S, Vh), (A, B), (grad_U, grad_S, grad_Vh), create_graph)


def _max_backward(ctx, grad_values, grad_indices):
    # values[i] = A[i] . B[:, j_i]:  dA[i] = g_i B[:, j_i],  dB[:, j_i] += g_i A[i].
    A, B, indices = ctx.saved_tensors
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    k = A.shape[-1]
    Bt = B.mT.broadcast_to((*batch, B.shape[-1], k))  # [..., n, k]
    picked = Bt.gather(-2, indices[..., None].expand(*indices.shape, k))  # [..., m, k]
    g = grad_values[..., None]
    gA = (g * picked).sum_to_size(A.shape) if ctx.needs_input_grad[0] else None
    gB = None
    if ctx.needs_input_grad[1]:
        gBt = torch.zeros_like(Bt).scatter_add(-2, indices[..., None].expand(*indices.shape, k),
                                               g * A.broadcast_to((*batch, *A.shape[-2:])))
        gB = gBt.mT.sum_to_size(B.shape)
    return gA, gB


def _save_max_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])  # A, B, indices (not _lowrank_max_chunked's int)


def _max_chunked_backward(ctx, grad_values, grad_indices):
    return (*_max_backward(ctx, grad_values, grad_indices), None)  # no gradient for chunk_bytes


def _save_svd_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[0])


def _register_python_kernels() -> None:
    torch.library.register_fake("hooklens::lowrank_eigvals", _eigvals_fake)
    torch.library.register_fake("hooklens::lowrank_svd", _svd_fake)
    torch.library.register_fake("hooklens::lowrank_fro_norm", _fro_norm_fake)
    torch.library.register_fake("hooklens::lowrank_trace", _trace_fake)
    torch.library.register_autograd(
        "hooklens::lowrank_trace", _trace_backward, setup_context=_save_inputs
    )
    torch.library.register_autograd(
        "hooklens::lowrank_fro_norm", _fro_norm_backward, setup_context=_save_inputs_and_output
    )
    torch.library.register_autograd(
        "hooklens::lowrank_eigvals", _eigvals_backward, setup_context=_save_inputs_and_output
    )
    torch.library.register_autograd("hooklens::lowrank_svd", _svd_backward, setup_context=_save_svd_context)
    torch.library.register_fake("hooklens::lowrank_max", _max_fake)
    torch.library.register_fake("hooklens::_lowrank_max_chunked", _max_chunked_fake)
    torch.library.register_autograd("hooklens::_lowrank_max_chunked", _max_chunked_backward,
                                    setup_context=_save_max_context)
    torch.library.register_fake("hooklens::small_eigvals", _small_eigvals_fake)
    torch.library.register_autograd(
        "hooklens::small_eigvals", _small_eigvals_backward, setup_context=_small_eigvals_setup
    )
    torch.library.register_autograd("hooklens::lowrank_max", _max_backward, setup_context=_save_max_context)
