"""hooklens.ops.lowrank: eigenvalues / SVD / norms of A @ B without forming it, C++ (hooklens._C) and torch backends.

Everything is checked against dense float64 torch.linalg on A @ B, computed on the CPU. The C++ extension is built by
the README's install command (`pip install -e ".[test]"`); if it did not build or load, these tests fail (they do
not skip). The operator tests run on every device in DEVICES: their CUDA twins are skipped where CUDA is absent and
run wherever it is present (the C++ CUDA kernels, including the eigenvalue ops' host route, have no other tests).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICES, requires_cuda
from tolerances import tolerance

from hooklens import ops
from hooklens.ops import lowrank as L

BACKENDS = ["cpp", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # Fails (not skips) every test of this file when hooklens._C is missing or broken.
    L.load_extension(required=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def factors(batch, m, k, n, dtype=torch.float64, rank=None, seed=0):
    """Random A [*batch, m, k], B [*batch, k, n]; with `rank`, A has that rank (so A @ B and B @ A do too)."""
    g = _gen(seed)
    if rank is None:
        A = torch.randn(*batch, m, k, generator=g, dtype=torch.float64)
    else:
        A = torch.randn(*batch, m, rank, generator=g, dtype=torch.float64) @ torch.randn(
            *batch, rank, k, generator=g, dtype=torch.float64
        )
    B = torch.randn(*batch, k, n, generator=g, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def dense(A, B):
    return A.double() @ B.double()


def match_eigvals(got: torch.Tensor, want: torch.Tensor, tol: float):
    """Asserts two 1-D eigenvalue lists are the same multiset within `tol` (the shorter one padded with
    zeros: A @ B has m - k more zero eigenvalues than B @ A). Greedy nearest matching, largest first: robust
    to the order of conjugate pairs and to clusters narrower than `tol` (such as the zeros)."""
    got = got.detach().to(torch.complex128).numpy()
    want = want.detach().to(torch.complex128).numpy()
    size = max(len(got), len(want))
    got = np.concatenate([got, np.zeros(size - len(got))])
    want = np.concatenate([want, np.zeros(size - len(want))])
    free = np.ones(size, dtype=bool)
    for value in got[np.argsort(-np.abs(got), kind="stable")]:
        dist = np.where(free, np.abs(want - value), np.inf)
        j = int(np.argmin(dist))
        assert dist[j] <= tol, f"eigenvalue {value} has no match within {tol:g}: nearest unmatched {want[j]}"
        free[j] = False


def eig_tol(C: torch.Tensor, dtype) -> float:
    scale = float(torch.linalg.matrix_norm(C, ord=2).max()) + 1e-300
    return scale * (1e-9 if dtype == torch.float64 else 2e-5)


# ---------------------------------------------------------------------------------------------------------
# eigvals
# ---------------------------------------------------------------------------------------------------------

EIG_CASES = [
    # batch, m, k, rank
    ((), 5, 1, None),
    ((3,), 9, 7, None),
    ((2,), 7, 7, 4),  # rank-deficient: 3 zero eigenvalues
    ((2, 2), 70, 64, None),
    ((), 64, 64, 50),
    ((), 5, 7, None),  # m < k: B @ A has k - m zero eigenvalues
    ((2,), 133, 130, None),  # k > 128: LAPACK fallback path
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,m,k,rank", EIG_CASES)
def test_eigvals_match_dense(batch, m, k, rank, dtype, backend, device):
    A, B = factors(batch, m, k, m, dtype=dtype, rank=rank, seed=k)
    ev = ops.eigvals(A.to(device), B.to(device), backend=backend)
    assert ev.device.type == device
    ev = ev.cpu()
    assert ev.shape == (*batch, k)
    assert ev.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    C = dense(A, B)
    want = torch.linalg.eigvals(C)
    tol = eig_tol(C, dtype)
    for idx in np.ndindex(*batch):
        match_eigvals(ev[idx], want[idx], tol)
    mags = ev.abs()
    assert (mags[..., :-1] >= mags[..., 1:] * (1 - 1e-6) - 1e-30).all(), "not sorted by descending magnitude"


def test_eigvals_conjugate_pairs_and_backends_agree_elementwise():
    # Distinct magnitudes except exact conjugate pairs: both backends return the same order
    # (|lambda| descending, the positive imaginary part first within a pair).
    A, B = factors((4,), 12, 9, 12, seed=3)
    cpp = ops.eigvals(A, B, backend="cpp")
    ref = ops.eigvals(A, B, backend="torch")
    torch.testing.assert_close(cpp, ref, **tolerance("lowrank", torch.float64))
    pairs = (cpp.imag > 0).nonzero()
    assert len(pairs) > 0, "test needs complex eigenvalues"
    for b, i in pairs.tolist():
        assert cpp[b, i + 1] == cpp[b, i].conj()


def test_eigvals_special_matrices():
    # Zero matrix, a rotation (purely imaginary pair), a nilpotent Jordan block, 1x1 and 2x2.
    cases = [
        (torch.zeros(4, 3), torch.zeros(3, 4)),
        (torch.eye(2), torch.tensor([[0.0, -1.0], [1.0, 0.0]])),
        (torch.eye(5), torch.diag(torch.ones(4), 1)),
        (torch.tensor([[2.0]]), torch.tensor([[-3.0]])),
        (torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])),
        # A cyclic permutation: plain shifted QR stalls on it, the exceptional shifts have to kick in.
        (torch.eye(8), torch.roll(torch.eye(8), 1, dims=0)),
        (torch.roll(torch.eye(5), 2, dims=1), torch.eye(5)),
    ]
    for A, B in cases:
        A, B = A.double(), B.double()
        got = ops.eigvals(A, B, backend="cpp")
        match_eigvals(got, torch.linalg.eigvals(A @ B), 1e-6)
    torch.testing.assert_close(
        ops.eigvals(torch.eye(2, dtype=torch.float64), torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)),
        torch.tensor([1j, -1j], dtype=torch.complex128),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [4, 130])
def test_eigvals_nonfinite_inputs_give_nan(k, device):
    A, B = factors((3,), k + 2, k, k + 2, seed=1)
    A[1, 0, 0] = float("nan")
    B[2, 0, 0] = float("inf")
    for backend in BACKENDS:
        ev = ops.eigvals(A.to(device), B.to(device), backend=backend).cpu()
        assert ev[1:].isnan().all() and not ev[0].isnan().any(), backend
        match_eigvals(ev[0], torch.linalg.eigvals(A[0] @ B[0]), eig_tol(A[0] @ B[0], torch.float64))


def test_eigvals_broadcast_batch():
    A, B = factors((2, 1), 10, 6, 10, seed=5)
    B3 = torch.randn(3, 6, 10, generator=_gen(6), dtype=torch.float64)
    ev = ops.eigvals(A, B3, backend="cpp")
    assert ev.shape == (2, 3, 6)
    torch.testing.assert_close(ev, ops.eigvals(A, B3, backend="torch"), **tolerance("lowrank", torch.float64))


# ---------------------------------------------------------------------------------------------------------
# small_eigvals: every CPU solver (SIMD lanes, scalar, LAPACK) against float64 torch.linalg
# ---------------------------------------------------------------------------------------------------------

CPU_SOLVERS = ["lanes", "scalar", "lapack"]


@pytest.fixture(scope="module")
def lanes_available():
    ops.lowrank.load_extension(required=True)
    try:
        torch.ops.hooklens.small_eigvals(torch.eye(4, dtype=torch.float64), "lanes")
    except RuntimeError as err:
        assert "AVX2" in str(err)
        return False
    return True


def _solvers(lanes_available):
    return CPU_SOLVERS if lanes_available else ["scalar", "lapack"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [(), (1,), (3,), (5,), (2, 7)])  # lane groups of 4: full, partial, one
@pytest.mark.parametrize("k", [1, 2, 3, 7, 64, 128, 129])  # 129: above the small-solver limit (LAPACK)
def test_small_eigvals_solvers_match_dense(batch, k, lanes_available, device):
    if k >= 64 and len(batch) == 2:
        batch = (2, 3)  # keep the test fast
    C = torch.randn(*batch, k, k, generator=_gen(k), dtype=torch.float64)
    want = torch.linalg.eigvals(C)
    tol = eig_tol(C, torch.float64)
    for solver in _solvers(lanes_available):
        got = ops.small_eigvals(C.to(device), solver=solver)
        assert got.device.type == device
        got = got.cpu()
        assert got.shape == (*batch, k) and got.dtype == torch.complex128
        for idx in np.ndindex(*batch):
            match_eigvals(got[idx], want[idx], tol)
        mags = got.abs()
        assert (mags[..., :-1] >= mags[..., 1:] * (1 - 1e-9) - 1e-300).all(), solver


def test_small_eigvals_special_matrices_in_one_lane_group(lanes_available):
    # Matrices that converge at very different rates share one group of four lanes: a cyclic permutation
    # (needs exceptional shifts), a nilpotent Jordan block, the zero matrix, a diagonal one, a rank-2 one,
    # random ones; plus a NaN matrix and an inf matrix that must not disturb their neighbours.
    n = 9
    mats = [
        torch.roll(torch.eye(n), 1, dims=0),
        torch.diag(torch.ones(n - 1), 1),
        torch.zeros(n, n),
        torch.diag(torch.arange(1.0, n + 1)),
        torch.randn(n, 2, generator=_gen(1)) @ torch.randn(2, n, generator=_gen(2)),
        torch.randn(n, n, generator=_gen(3)),
        torch.full((n, n), float("nan")),
        torch.randn(n, n, generator=_gen(4)),
        torch.randn(n, n, generator=_gen(5)) * 1e-200,  # tiny scale: balancing and the tests must cope
    ]
    mats[7][2, 3] = float("inf")
    C = torch.stack(mats).double()
    for solver in _solvers(lanes_available):
        got = ops.small_eigvals(C, solver=solver)
        assert got[6].isnan().all() and got[7].isnan().all(), solver
        for i in [0, 1, 2, 3, 4, 5, 8]:
            want = torch.linalg.eigvals(C[i])
            scale = max(float(C[i].abs().max()), 1e-300)
            # The Jordan block's eigenvalue 0 is defective: it is only determined to ~eps^(1/n).
            tol = (1e-1 if i == 1 else 1e-9) * scale
            match_eigvals(got[i], want, tol)


def test_small_eigvals_float32_and_errors():
    C = torch.randn(6, 10, 10, generator=_gen(7), dtype=torch.float64)
    got = ops.small_eigvals(C.float())
    assert got.dtype == torch.complex64
    for i in range(6):
        match_eigvals(got[i], torch.linalg.eigvals(C.float()[i].double()), 1e-5 * float(C.abs().max()))
    with pytest.raises(ValueError, match="square matrices"):
        ops.small_eigvals(torch.ones(3, 4))
    with pytest.raises(ValueError, match="solver must be one of"):
        ops.small_eigvals(torch.eye(3), solver="fast")
    with pytest.raises(RuntimeError, match="solver must be"):
        torch.ops.hooklens.small_eigvals(torch.eye(3), "fast")


@pytest.mark.parametrize("device", DEVICES)
def test_small_eigvals_gradient_and_opcheck(device):
    C = torch.randn(3, 5, 5, generator=_gen(8), dtype=torch.float64).to(device).requires_grad_(True)
    torch.autograd.gradcheck(lambda c: torch.view_as_real(ops.small_eigvals(c, backend="cpp")), (C,))
    torch.autograd.gradgradcheck(lambda c: ops.small_eigvals(c, backend="cpp").abs(), (C,))
    torch.library.opcheck(torch.ops.hooklens.small_eigvals.default, (C,))
    torch.library.opcheck(torch.ops.hooklens.small_eigvals.default, (C.detach().float(), "scalar"))


# ---------------------------------------------------------------------------------------------------------
# svd
# ---------------------------------------------------------------------------------------------------------

SVD_CASES = [
    # batch, m, k, n, rank
    ((), 6, 1, 4, None),
    ((3,), 20, 7, 11, None),
    ((2,), 9, 7, 30, 3),  # rank-deficient
    ((2, 2), 80, 64, 72, None),
    ((), 5, 9, 12, None),  # k > m: r = m
    ((), 140, 130, 135, None),
]


def assert_orthonormal(Q: torch.Tensor, tol: float, rows: bool = False):
    G = Q @ Q.mT if rows else Q.mT @ Q
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    assert (G - eye).abs().max() <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,m,k,n,rank", SVD_CASES)
def test_svd_match_dense(batch, m, k, n, rank, dtype, backend, device):
    A, B = factors(batch, m, k, n, dtype=dtype, rank=rank, seed=m + n)
    U, S, Vh = ops.svd(A.to(device), B.to(device), backend=backend)
    assert U.device.type == S.device.type == Vh.device.type == device
    U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
    r = min(m, k, n)
    assert U.shape == (*batch, m, r) and S.shape == (*batch, r) and Vh.shape == (*batch, r, n)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    eps = 1e-10 if dtype == torch.float64 else 2e-5
    C = dense(A, B)
    Ud, Sd, Vhd = torch.linalg.svd(C, full_matrices=False)
    scale = float(Sd.max())
    torch.testing.assert_close(S.double(), Sd[..., :r], rtol=0, atol=scale * eps)
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values not descending"
    assert ((U.double() * S.double()[..., None, :]) @ Vh.double() - C).abs().max() <= scale * eps * 10
    assert_orthonormal(U.double(), eps * 10)
    assert_orthonormal(Vh.double(), eps * 10, rows=True)
    # Sign-invariant comparison of the leading singular vectors (well separated for random inputs).
    for idx in np.ndindex(*batch):
        s = Sd[idx]
        for i in range(min(r, 3)):
            gap = min(float(s[i - 1] - s[i]) if i > 0 else np.inf, float(s[i] - s[i + 1]) if i + 1 < len(s) else np.inf)
            if gap < 1e-3 * scale:
                continue
            assert abs(float(U[idx][:, i].double() @ Ud[idx][:, i])) == pytest.approx(1.0, abs=eps * 1e3)
            assert abs(float(Vh[idx][i].double() @ Vhd[idx][i])) == pytest.approx(1.0, abs=eps * 1e3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_svd(backend):
    A, B = factors((2,), 30, 8, 25, seed=9)
    U, S, Vh = ops.topk_svd(A, B, 3, backend=backend)
    assert U.shape == (2, 30, 3) and S.shape == (2, 3) and Vh.shape == (2, 3, 25)
    torch.testing.assert_close(S, torch.linalg.svdvals(A @ B)[..., :3])
    with pytest.raises(ValueError, match="k must be an int"):
        ops.topk_svd(A, B, 9, backend=backend)


def test_svd_parallel_over_the_batch_matches_one_thread():
    # On CPU with more than one thread the C++ operator splits the batch over threads (each slice through
    # the same LAPACK calls): results equal the single-threaded ones, for a broadcast factor too.
    A, B = factors((7,), 30, 5, 20, seed=21)
    B1 = B[:1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = [ops.svd(A, B, backend="cpp"), ops.svd(A, B1, backend="cpp")]
        torch.set_num_threads(3)
        parallel = [ops.svd(A, B, backend="cpp"), ops.svd(A, B1, backend="cpp")]
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(serial, parallel):
        for x, y in zip(one, many):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, **tolerance("lowrank_threads", x.dtype))


def test_svd_broadcast_batch():
    A = torch.randn(3, 1, 12, 4, generator=_gen(1), dtype=torch.float64)
    B = torch.randn(5, 4, 9, generator=_gen(2), dtype=torch.float64)
    U, S, Vh = ops.svd(A, B, backend="cpp")
    assert U.shape == (3, 5, 12, 4) and S.shape == (3, 5, 4) and Vh.shape == (3, 5, 4, 9)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, (A @ B).expand(3, 5, 12, 9))
    torch.testing.assert_close(S, ops.svd(A, B, backend="torch").S)


# ---------------------------------------------------------------------------------------------------------
# fro_norm and trace
# ---------------------------------------------------------------------------------------------------------

NORM_CASES = [((), 6, 1, 4), ((3,), 20, 7, 11), ((2, 2), 64, 64, 64), ((), 5, 30, 6), ((4,), 200, 16, 150)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,m,k,n", NORM_CASES)
def test_fro_norm_match_dense(batch, m, k, n, dtype, backend, device):
    A, B = factors(batch, m, k, n, dtype=dtype, seed=k)
    got = ops.fro_norm(A.to(device), B.to(device), backend=backend)
    assert got.device.type == device
    got = got.cpu()
    assert got.shape == batch and got.dtype == dtype
    want = torch.linalg.matrix_norm(dense(A, B))
    torch.testing.assert_close(got.double(), want, rtol=1e-10 if dtype == torch.float64 else 2e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,m,k", [((), 4, 1), ((3,), 20, 7), ((2, 2), 64, 64), ((), 6, 30)])
def test_trace_match_dense(batch, m, k, dtype, backend, device):
    A, B = factors(batch, m, k, m, dtype=dtype, seed=m)
    got = ops.trace(A.to(device), B.to(device), backend=backend)
    assert got.device.type == device
    got = got.cpu()
    assert got.shape == batch and got.dtype == dtype
    want = dense(A, B).diagonal(dim1=-2, dim2=-1).sum(-1)
    scale = float(A.double().norm() * B.double().norm())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=scale * (1e-12 if dtype == torch.float64 else 1e-5))


def test_fro_norm_and_trace_of_zero_and_rank_deficient():
    A, B = torch.zeros(7, 3, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    assert ops.fro_norm(A, B, backend="cpp").item() == 0.0
    assert ops.trace(A, B, backend="cpp").item() == 0.0
    A, B = factors((2,), 40, 12, 40, rank=2, seed=4)
    torch.testing.assert_close(ops.fro_norm(A, B, backend="cpp"), torch.linalg.matrix_norm(A @ B))


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_trace_and_fro_norm_gradients_cpp(device):
    A, B = (x.to(device).requires_grad_(True) for x in factors((2,), 6, 3, 6, seed=2))
    torch.autograd.gradcheck(lambda a, b: ops.trace(a, b, backend="cpp"), (A, B))
    torch.autograd.gradcheck(lambda a, b: ops.fro_norm(a, b, backend="cpp"), (A, B))
    # Broadcast batch dims reduce back to the inputs' shapes.
    B1 = torch.randn(3, 6, generator=_gen(3), dtype=torch.float64).to(device).requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: ops.fro_norm(a, b, backend="cpp"), (A, B1))
    torch.autograd.gradcheck(lambda a, b: ops.trace(a, b, backend="cpp"), (A, B1))


@pytest.mark.parametrize("device", DEVICES)
def test_eigvals_and_svd_gradients_cpp(device):
    # The backward recomputes with torch.linalg; gradcheck compares with finite differences of the C++ forward.
    A, B = (x.to(device).requires_grad_(True) for x in factors((2,), 8, 3, 8, seed=7))
    torch.autograd.gradcheck(lambda a, b: torch.view_as_real(ops.eigvals(a, b, backend="cpp")), (A, B))
    torch.autograd.gradgradcheck(lambda a, b: ops.eigvals(a, b, backend="cpp").abs(), (A, B))
    A2, B2 = (x.to(device) for x in factors((2,), 7, 3, 5, seed=8))
    B2 = B2[0].clone().requires_grad_(True)  # broadcast batch dim: its gradient sums over the batch
    A2.requires_grad_(True)

    def svd_outputs(a, b):  # sign-invariant functions of U and Vh, plus S and the reconstruction
        U, S, Vh = ops.svd(a, b, backend="cpp")
        return S, U @ torch.diag_embed(S) @ Vh, U.abs(), Vh.abs()

    torch.autograd.gradcheck(svd_outputs, (A2, B2))
    torch.autograd.gradgradcheck(lambda a, b: ops.svd(a, b, backend="cpp").S, (A2, B2))
    # Only one factor needing a gradient.
    torch.autograd.gradcheck(lambda a: ops.eigvals(a, B.detach(), backend="cpp").abs(), (A,))


@pytest.mark.parametrize("device", DEVICES)
def test_eigvals_gradient_follows_the_forward_order(device):
    # The forward sorts by |lambda| (C++ solver); the backward's LAPACK call finds the eigenvalues in another
    # order. The gradient of entry i must be that of the forward's i-th eigenvalue: compare with the torch
    # backend (same sorting, differentiated directly).
    A, B = (x.to(device) for x in factors((3,), 10, 5, 10, seed=9))
    weights = torch.randn(3, 5, dtype=torch.complex128, generator=_gen(1)).to(device)
    grads = []
    for backend in ("cpp", "torch"):
        a = A.clone().requires_grad_(True)
        ev = ops.eigvals(a, B, backend=backend)
        (ev * weights).real.sum().backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_auto_backend_uses_cpp_with_gradients(monkeypatch):
    A, B = factors((), 8, 3, 8, seed=7)
    A.requires_grad_(True)
    monkeypatch.setattr(ops.lowrank, "_eigvals_torch", lambda *a: pytest.fail("auto used the torch backend"))
    ev = ops.eigvals(A, B)
    ev.abs().sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()
    # The value: sum |lambda| is order-free, and the nonzero eigenvalues of A @ B are those of the k x k matrix
    # B @ A, so the dense float64 computation's gradient is the reference.
    A_ref = A.detach().clone().requires_grad_(True)
    torch.linalg.eigvals(B @ A_ref).abs().sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad, **tolerance("lowrank", torch.float64))


# ---------------------------------------------------------------------------------------------------------
# row_max
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((1, 1), (1, 1)), ((7, 3), (3, 5)), ((2, 600, 4), (4, 1100)), ((3, 1, 40, 6), (2, 6, 1030)), ((9, 0), (0, 4))],
)
def test_row_max_matches_dense(backend, dtype, a_shape, b_shape, device):
    # Shapes cross the CPU kernel's 512 x 512 tiles with ragged edges; k = 0 (A @ B is zeros) too.
    A = torch.randn(a_shape, generator=_gen(1), dtype=torch.float64)
    B = torch.randn(b_shape, generator=_gen(2), dtype=torch.float64)
    values, indices = ops.row_max(A.to(device, dtype), B.to(device, dtype), backend=backend)
    assert values.device.type == indices.device.type == device
    values, indices = values.cpu(), indices.cpu()
    dense = (A @ B).max(-1)
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert values.shape == indices.shape == dense.values.shape
    torch.testing.assert_close(values.double(), dense.values, **tolerance("lowrank_row_max", dtype))
    if dtype == torch.float64:
        assert torch.equal(indices, dense.indices)


def test_row_max_cuda_kernel_logic_on_cpu():
    # lowrank_max's CUDA kernel (row chunks of A @ B reduced with at::max) is also registered as
    # hooklens::_lowrank_max_chunked for every device: check it here, broadcast batch dims included.
    A = torch.randn(3, 1, 70, 5, generator=_gen(3), dtype=torch.float64)
    B = torch.randn(2, 5, 333, generator=_gen(4), dtype=torch.float64)
    dense = (A @ B).max(-1)
    for chunk_bytes in (256 << 20, 6 * 333 * 8 * 9, 1):  # one chunk; 9 rows per chunk (ragged end); one row
        values, indices = torch.ops.hooklens._lowrank_max_chunked(A, B, chunk_bytes)
        assert torch.equal(indices, dense.indices)
        torch.testing.assert_close(values, dense.values)
    values, indices = torch.ops.hooklens._lowrank_max_chunked(A[0, 0, :0], B[0])
    assert values.shape == indices.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_row_max_ties_nan_and_infinities(backend, device):
    # Ties: the first column wins, also across tiles (columns 3 and 700 hold the same maximum).
    A = torch.ones(4, 1, dtype=torch.float64, device=device)
    B = torch.zeros(1, 1500, dtype=torch.float64, device=device)
    B[0, 3] = B[0, 700] = 2.0
    B[0, 1200] = 2.0
    assert ops.row_max(A, B, backend=backend).indices.tolist() == [3, 3, 3, 3]
    # NaN wins (first NaN), -inf rows give -inf at column 0, +inf beats everything.
    A = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64, device=device)
    B = torch.tensor([[0.0] * 600 + [float("nan")] + [5.0] * 10 + [float("nan")]], dtype=torch.float64, device=device)
    values, indices = ops.row_max(A, B, backend=backend)
    assert indices.tolist() == [600] * 3 and torch.isnan(values).all()
    A = torch.tensor([[1.0], [-1.0]], dtype=torch.float64, device=device)
    B = torch.full((1, 900), float("inf"), dtype=torch.float64, device=device)
    values, indices = ops.row_max(A, B, backend=backend)
    dense = (A @ B).max(-1)
    assert torch.equal(values, dense.values) and torch.equal(indices, dense.indices)


@pytest.mark.parametrize("device", DEVICES)
def test_row_max_gradient_and_errors(device):
    A, B = (x.to(device) for x in factors((2,), 6, 3, 9, seed=5))
    A.requires_grad_(True)
    B = B[0].clone().requires_grad_(True)  # broadcast over the batch
    torch.autograd.gradcheck(lambda a, b: ops.row_max(a, b, backend="cpp").values, (A, B))
    with pytest.raises(ValueError, match="no columns"):
        ops.row_max(torch.ones(3, 2), torch.ones(2, 0))
    with pytest.raises(ValueError, match="inner dimensions must match"):
        ops.row_max(torch.ones(3, 2), torch.ones(3, 4))


# ---------------------------------------------------------------------------------------------------------
# torch.library: opcheck, fake kernels, torch.compile
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype, device):
    A, B = (x.to(device) for x in factors((2,), 9, 4, 9, dtype=dtype, seed=11))
    A1, B1 = (x.to(device) for x in factors((), 7, 3, 5, dtype=dtype, seed=12))
    torch.library.opcheck(torch.ops.hooklens.lowrank_eigvals.default, (A, B))
    torch.library.opcheck(torch.ops.hooklens.lowrank_svd.default, (A1, B1))
    if dtype == torch.float32:
        return  # the differentiable ops below do not depend on the dtype
    # With gradients (their autograd formulas are registered), including broadcast batch dims.
    for op, (a, b) in [
        (torch.ops.hooklens.lowrank_trace.default, (A, B[:1])),
        (torch.ops.hooklens.lowrank_fro_norm.default, (A, B[:1])),
        (torch.ops.hooklens.lowrank_fro_norm.default, (A1, B1)),
        (torch.ops.hooklens.lowrank_eigvals.default, (A, B[:1])),
        (torch.ops.hooklens.lowrank_svd.default, (A1, B1)),
        (torch.ops.hooklens.lowrank_max.default, (A, B[:1])),
    ]:
        torch.library.opcheck(op, (a.clone().requires_grad_(True), b.clone().requires_grad_(True)))


def test_fake_kernels_shapes():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        A, B = torch.empty(2, 1, 10, 4), torch.empty(3, 4, 10)
        assert torch.ops.hooklens.lowrank_eigvals(A, B).shape == (2, 3, 4)
        assert torch.ops.hooklens.lowrank_eigvals(A, B).dtype == torch.complex64
        U, S, Vh = torch.ops.hooklens.lowrank_svd(A, B)
        assert (U.shape, S.shape, Vh.shape) == ((2, 3, 10, 4), (2, 3, 4), (2, 3, 4, 10))
        assert torch.ops.hooklens.lowrank_trace(A, B).shape == (2, 3)
        assert torch.ops.hooklens.lowrank_fro_norm(A, B).shape == (2, 3)
        values, indices = torch.ops.hooklens.lowrank_max(A, B)
        assert values.shape == indices.shape == (2, 3, 10) and indices.dtype == torch.int64


def test_torch_compile():
    def f(A, B):
        U, S, Vh = torch.ops.hooklens.lowrank_svd(A, B)
        ev = torch.ops.hooklens.lowrank_eigvals(A, B)
        return U * S[..., None, :], Vh, ev.abs() + torch.ops.hooklens.lowrank_trace(A, B)[..., None], (
            torch.ops.hooklens.lowrank_fro_norm(A, B)
        )

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 12, 5), (3, 20, 6)]:
        A = torch.randn(*shape, generator=_gen(1), dtype=torch.float64)
        B = torch.randn(shape[0], shape[2], shape[1], generator=_gen(2), dtype=torch.float64)
        for got, want in zip(compiled(A, B), f(A, B)):
            torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# Errors, backends, loading
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_bad_inputs_raise_clear_errors(backend):
    A, B = torch.randn(5, 3), torch.randn(3, 5)
    with pytest.raises(ValueError, match="inner dimensions must match"):
        ops.svd(A, torch.randn(4, 5), backend=backend)
    with pytest.raises(ValueError, match=r"must be square \(m == n\)"):
        ops.eigvals(A, torch.randn(3, 6), backend=backend)
    with pytest.raises(ValueError, match=r"must be square \(m == n\)"):
        ops.trace(A, torch.randn(3, 6), backend=backend)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ops.fro_norm(torch.randn(5), B, backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        ops.fro_norm(A, B.double(), backend=backend)
    with pytest.raises(TypeError, match="only float32 and float64"):
        ops.trace(A.half(), B.half(), backend=backend)
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.svd(torch.randn(2, 5, 3), torch.randn(3, 3, 5), backend=backend)
    with pytest.raises(ValueError, match="same device"):
        ops.svd(A, B.to("meta"), backend=backend)


def test_bad_inputs_raise_clear_errors_in_cpp_ops():
    A, B = torch.randn(5, 3), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="hooklens::lowrank_svd: inner dimensions must match"):
        torch.ops.hooklens.lowrank_svd(A, torch.randn(4, 5))
    with pytest.raises(RuntimeError, match=r"lowrank_eigvals: A @ B must be square \(m == n\)"):
        torch.ops.hooklens.lowrank_eigvals(A, torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="lowrank_trace: A and B must have the same dtype"):
        torch.ops.hooklens.lowrank_trace(A, B.double())
    with pytest.raises(RuntimeError, match="lowrank_fro_norm: only float32 and float64"):
        torch.ops.hooklens.lowrank_fro_norm(A.int(), B.int())
    with pytest.raises(RuntimeError, match="B must have shape"):
        torch.ops.hooklens.lowrank_fro_norm(A, torch.randn(3))
    with pytest.raises(RuntimeError, match="do not broadcast"):
        torch.ops.hooklens.lowrank_trace(torch.randn(2, 5, 3), torch.randn(3, 3, 5))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.trace(torch.randn(3, 2), torch.randn(2, 3), backend="numpy")


def test_backend_selection_and_fallback(monkeypatch):
    A, B = factors((), 10, 4, 10, seed=8)
    calls = []
    real = torch.ops.hooklens.lowrank_trace

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.hooklens, "lowrank_trace", Spy())
    ops.trace(A, B)
    assert len(calls) == 1, "auto should use the C++ op when the extension is available"
    ops.trace(A, B, backend="torch")
    assert len(calls) == 1
    # Without the extension, auto falls back to the reference implementation and cpp says why.
    monkeypatch.setattr(L, "_loaded", False)
    monkeypatch.setattr(L, "_load_error", ImportError("simulated"))
    torch.testing.assert_close(ops.trace(A, B), torch.trace(A @ B))
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="simulated"):
        ops.trace(A, B, backend="cpp")


def test_import_has_no_side_effects():
    code = "import sys, hooklens, hooklens.ops; assert 'hooklens._C' not in sys.modules, 'loaded at import'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------
# Device policy: torch.ops.hooklens.X and hooklens.ops.X take the same route on every device
# ---------------------------------------------------------------------------------------------------------


def _operator_and_wrapper_calls(A, B, C):
    """{name: (operator call, wrapper call taking the backend)} for every operator with a hooklens.ops wrapper."""
    hl = torch.ops.hooklens
    return {
        "eigvals": (lambda: hl.lowrank_eigvals(A, B), lambda backend: ops.eigvals(A, B, backend=backend)),
        "small_eigvals": (lambda: hl.small_eigvals(C), lambda backend: ops.small_eigvals(C, backend=backend)),
        "small_eigvals scalar": (lambda: hl.small_eigvals(C, "scalar"),
                                 lambda backend: ops.small_eigvals(C, solver="scalar", backend=backend)),
        "small_eigvals lapack": (lambda: hl.small_eigvals(C, "lapack"),
                                 lambda backend: ops.small_eigvals(C, solver="lapack", backend=backend)),
        "svd": (lambda: hl.lowrank_svd(A, B), lambda backend: ops.svd(A, B, backend=backend)),
        "fro_norm": (lambda: hl.lowrank_fro_norm(A, B), lambda backend: ops.fro_norm(A, B, backend=backend)),
        "trace": (lambda: hl.lowrank_trace(A, B), lambda backend: ops.trace(A, B, backend=backend)),
        "row_max": (lambda: hl.lowrank_max(A, B), lambda backend: ops.row_max(A, B, backend=backend)),
    }


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_ops_and_wrappers_agree(device, dtype):
    # The wrappers validate and call the operator; any device-dependent route is the operator's own, so both give
    # the same bits on every device, with the default backend ("auto") and with "cpp".
    A, B = (x.to(device) for x in factors((2, 3), 40, 8, 40, dtype=dtype, seed=13))
    C = torch.randn(5, 12, 12, generator=_gen(14), dtype=torch.float64).to(device, dtype)
    for name, (operator_call, wrapper_call) in _operator_and_wrapper_calls(A, B, C).items():
        want = _as_tuple(operator_call())
        for backend in ("auto", "cpp"):
            got = _as_tuple(wrapper_call(backend))
            assert len(got) == len(want), name
            for x, y in zip(want, got):
                assert x.device.type == y.device.type == device, (name, backend)
                assert x.dtype == y.dtype, (name, backend)
                assert torch.equal(x, y), f"{name} ({backend}): torch.ops.hooklens and hooklens.ops differ on {device}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_eigenvalues_run_the_host_solver(dtype):
    # The CUDA kernels of both eigenvalue operators copy the matrices to the host solver and the eigenvalues back:
    # bit for bit what the CPU kernel gives on the same (copied) matrices. solver="lapack" stays on the device.
    A, B = (x.to("cuda") for x in factors((4, 3), 40, 8, 40, dtype=dtype, seed=3))
    core = B.double() @ A.double()  # [4, 3, 8, 8], on the device
    ev = torch.ops.hooklens.lowrank_eigvals(A, B)
    assert ev.device.type == "cuda" and ev.dtype == L._complex_of(dtype)
    host = torch.ops.hooklens.small_eigvals(core.cpu()).to(L._complex_of(dtype))
    assert torch.equal(ev.cpu(), host)
    C = core.to(dtype)
    for solver in ("auto", "scalar"):
        got = torch.ops.hooklens.small_eigvals(C, solver)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), torch.ops.hooklens.small_eigvals(C.cpu(), solver)), solver
    on_device = torch.ops.hooklens.small_eigvals(C, "lapack")
    assert on_device.device.type == "cuda"
    torch.testing.assert_close(on_device, ops.small_eigvals(C, backend="torch"), **tolerance("lowrank_lapack", dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigvals_route_matches_reference(dtype, device):
    # Whatever route a device takes (on CUDA: cores copied to the host solver, eigenvalues copied back), the
    # operators' values, ordering, dtype, device and gradient match the torch reference computed on the CPU.
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(4, 3, 40, 8, generator=gen, dtype=dtype)
    B = torch.randn(4, 3, 8, 40, generator=gen, dtype=dtype)
    C = (B.double() @ A.double()).to(device).requires_grad_(True)
    got = ops.small_eigvals(C)
    torch.testing.assert_close(ops.small_eigvals(C.detach(), solver="scalar"), got.detach())
    assert got.dtype == torch.complex128 and got.shape == (4, 3, 8) and got.device.type == device
    got = got.to(L._complex_of(dtype))
    assert torch.equal(got.detach(), ops.eigvals(A.to(device), B.to(device)))
    want = L._eigvals_torch(A, B)
    torch.testing.assert_close(got.cpu(), want, **tolerance("eigvals_route", dtype))
    got.abs().sum().backward()
    C_ref = C.detach().cpu().clone().requires_grad_(True)
    L._small_eigvals_torch(C_ref).abs().sum().backward()
    torch.testing.assert_close(C.grad.cpu(), C_ref.grad, **tolerance("eigvals_route_grads", dtype))
