"""Adversarial probes of the C++ operators (torch.ops.hooklens.*, their fake kernels and autograd registrations)
and of FactoredMatrix's constructor and indexing.

- Every operator, real kernel and fake (meta) kernel alike, refuses tensors on different devices with an error
  naming the arguments and the fix: a CPU tensor mixed with a meta one dispatches to the fake kernel, which used
  to return uninitialised memory shaped like the answer.
- torch.library.opcheck passes for every registered operator (schema, autograd registration, fake tensors, AOT
  dispatch), with and without inputs that require grad; a new operator without a case here fails the suite.
- Fuzzed calls (odd shapes, strides, dtypes, devices, NaN / inf, bad arguments) run in a subprocess, so a crash of
  the interpreter is a test failure rather than the end of the run: every call returns a correct result or raises a
  Python exception, and no valid call raises.
- FactoredMatrix: an integer row or column index outside the matrix raises IndexError naming the size (TL returns
  an empty matrix); factors that are not (batches of) matrices raise InvalidInputError in the constructor. Valid
  indexing gives what TL 3.9 gives.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from tolerances import tolerance

from hooklens import FactoredMatrix
from hooklens.errors import InvalidInputError
from hooklens.ops import lowrank as L
from hooklens.ops.patching import masked_patch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # Fails (not skips) every test of this file when hooklens._C is missing or broken.
    L.load_extension(required=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(dtype=torch.float64, seed=0):
    A = torch.randn(2, 6, 3, generator=_gen(seed), dtype=dtype)
    B = torch.randn(2, 3, 6, generator=_gen(seed + 1), dtype=dtype)
    return A, B


def _two_tensor_calls(A, B):
    """{name: call} for every operator taking the factors A and B."""
    hl = torch.ops.hooklens
    return {
        "lowrank_eigvals": lambda: hl.lowrank_eigvals(A, B),
        "lowrank_svd": lambda: hl.lowrank_svd(A, B),
        "lowrank_fro_norm": lambda: hl.lowrank_fro_norm(A, B),
        "lowrank_trace": lambda: hl.lowrank_trace(A, B),
        "lowrank_max": lambda: hl.lowrank_max(A, B),
        "_lowrank_max_chunked": lambda: hl._lowrank_max_chunked(A, B, 1000),
    }


# ---------------------------------------------------------------------------------------------------------
# Mixed devices and dtypes, real and fake kernels
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta_side", ["A", "B"])
@pytest.mark.parametrize("op", list(_two_tensor_calls(None, None)))
def test_cpu_and_meta_factors_raise_naming_both_devices(op, meta_side):
    A, B = _factors()
    A, B = (A.to("meta"), B) if meta_side == "A" else (A, B.to("meta"))
    with pytest.raises(RuntimeError, match=rf"hooklens::{op}: A and B must be on the same device, got A on "
                                           rf"{A.device} and B on {B.device}; move one with B.to\(A.device\)"):
        _two_tensor_calls(A, B)[op]()


@pytest.mark.parametrize("op", list(_two_tensor_calls(None, None)))
def test_meta_factors_of_different_dtypes_raise(op):
    A, B = _factors()
    with pytest.raises(RuntimeError, match=f"hooklens::{op}: A and B must have the same dtype.*B.to"):
        _two_tensor_calls(A.to("meta"), B.to("meta", torch.float32))[op]()


@pytest.mark.parametrize("op", list(_two_tensor_calls(None, None)))
def test_meta_factors_give_meta_results_of_the_real_shapes(op):
    A, B = _factors()
    want = _as_tuple(_two_tensor_calls(A, B)[op]())
    got = _as_tuple(_two_tensor_calls(A.to("meta"), B.to("meta"))[op]())
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    assert all(t.device.type == "meta" for t in got)


@requires_cuda
@pytest.mark.parametrize("op", list(_two_tensor_calls(None, None)))
def test_cpu_and_cuda_factors_raise(op):
    A, B = _factors()
    with pytest.raises(RuntimeError, match=f"hooklens::{op}: A and B must be on the same device"):
        _two_tensor_calls(A, B.cuda())[op]()


def test_fake_kernels_make_the_real_kernels_checks():
    # What the real kernels reject, the fake ones reject too (else torch.compile would trace a call that fails).
    hl = torch.ops.hooklens
    A, B = (t.to("meta") for t in _factors())
    with pytest.raises(RuntimeError, match="chunk_bytes must be positive, got 0"):
        hl._lowrank_max_chunked(A, B, 0)
    with pytest.raises(RuntimeError, match="maximum of an empty row"):
        hl.lowrank_max(A, B[..., :0])
    with pytest.raises(RuntimeError, match="solver must be 'auto', 'lanes', 'scalar' or 'lapack', got 'fast'"):
        hl.small_eigvals(torch.empty(3, 3, device="meta"), "fast")
    with pytest.raises(RuntimeError, match="only float32 and float64 are supported, got torch.int64"):
        hl.lowrank_trace(A.long(), B.long())
    with pytest.raises(RuntimeError, match=r"need at least 2 dimensions, got shapes \(2, 6, 3\) and \(3,\)"):
        hl.lowrank_fro_norm(A, B[0, :, 0])
    for t in (hl.lowrank_max(A[:, :0], B[..., :0]), hl._lowrank_max_chunked(A[:, :0], B[..., :0])):
        assert t[0].shape == t[1].shape == (2, 0)  # no rows: no maximum needed, as on the real kernels


def test_wrappers_refuse_mixed_devices_before_dispatch():
    A, B = _factors()
    for name in ("eigvals", "svd", "fro_norm", "trace", "row_max"):
        for backend in ("auto", "cpp", "torch"):
            with pytest.raises(ValueError, match="must be on the same device"):
                getattr(L, name)(A, B.to("meta"), backend=backend)


# ---------------------------------------------------------------------------------------------------------
# opcheck over every operator
# ---------------------------------------------------------------------------------------------------------


def _opcheck_cases():
    A, B = _factors()
    C = torch.randn(3, 5, 5, generator=_gen(7), dtype=torch.float64)
    hl = torch.ops.hooklens
    return {
        "hooklens::lowrank_eigvals": [(hl.lowrank_eigvals.default, (A, B))],
        "hooklens::lowrank_svd": [(hl.lowrank_svd.default, (A, B[..., :5]))],
        "hooklens::lowrank_fro_norm": [(hl.lowrank_fro_norm.default, (A, B[:1]))],
        "hooklens::lowrank_trace": [(hl.lowrank_trace.default, (A[:1], B))],
        "hooklens::lowrank_max": [(hl.lowrank_max.default, (A, B))],
        "hooklens::_lowrank_max_chunked": [(hl._lowrank_max_chunked.default, (A, B)),
                                           (hl._lowrank_max_chunked.default, (A, B[:1], 100))],
        "hooklens::small_eigvals": [(hl.small_eigvals.default, (C,)), (hl.small_eigvals.default, (C, "scalar")),
                                    (hl.small_eigvals.default, (C, "lapack"))],
    }


# The operators hooklens._C registers (the extension is loaded by the fixture, after collection).
OPERATORS = ["hooklens::_lowrank_max_chunked", "hooklens::lowrank_eigvals", "hooklens::lowrank_fro_norm",
             "hooklens::lowrank_max", "hooklens::lowrank_svd", "hooklens::lowrank_trace",
             "hooklens::small_eigvals"]


def test_opcheck_covers_every_registered_operator():
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("hooklens::")}
    assert registered == set(OPERATORS) == set(_opcheck_cases()), "add an opcheck case for each new operator"


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", OPERATORS)
def test_opcheck(name, requires_grad):
    for op, args in _opcheck_cases()[name]:
        args = tuple(a.clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)
        results = torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
        assert set(results) == set(OPCHECK_UTILS) and set(results.values()) == {"SUCCESS"}, results


def test_lowrank_max_chunked_gradients_match_the_dense_max():
    A, B = _factors()
    A, B = A.requires_grad_(), B[:1].clone().requires_grad_()
    for chunk_bytes in (1, 100, 256 << 20):
        values, _ = torch.ops.hooklens._lowrank_max_chunked(A, B, chunk_bytes)
        gA, gB = torch.autograd.grad(values.sum(), (A, B))
        wA, wB = torch.autograd.grad((A @ B).max(-1).values.sum(), (A, B))
        torch.testing.assert_close(gA, wA, **tolerance("lowrank_row_max", torch.float64))
        torch.testing.assert_close(gB, wB, **tolerance("lowrank_row_max", torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.hooklens._lowrank_max_chunked(a, b, 100)[0], (A, B))


# ---------------------------------------------------------------------------------------------------------
# Fuzzing, in a subprocess (a crash there fails the test instead of ending the run)
# ---------------------------------------------------------------------------------------------------------

FUZZ = r'''
import random, sys
import torch
sys.path.insert(0, sys.argv[2])
from tolerances import tolerance
from hooklens.ops import lowrank as L

L.load_extension(required=True)
hl = torch.ops.hooklens
rng = random.Random(int(sys.argv[1]))
torch.manual_seed(int(sys.argv[1]))
ERRORS = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)
FLOATS = (torch.float32, torch.float64)
ODD_DTYPES = (torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.complex64)


def dtype():
    return rng.choice(FLOATS) if rng.random() < 0.85 else rng.choice(ODD_DTYPES)


def tensor(shape, dt, device="cpu"):
    """A tensor of `shape` with a random memory layout and random (sometimes non-finite) values."""
    kind = rng.choice(["plain", "plain", "transposed", "strided", "expanded", "nan", "inf", "zero"])
    if len(shape) >= 2 and kind == "transposed":
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).mT
    elif shape and kind == "strided":
        t = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]
    elif len(shape) >= 3 and kind == "expanded":
        t = torch.randn(1, *shape[1:], dtype=torch.float64).expand(shape)
    elif kind == "zero":
        t = torch.zeros(shape, dtype=torch.float64)
    else:
        t = torch.randn(shape, dtype=torch.float64)
        if kind in ("nan", "inf") and t.numel():
            t.view(-1)[rng.randrange(t.numel())] = float(kind)
    t = t.to(dt) if dt != torch.bool else t > 0
    return t.to(device) if device != "cpu" else t


def finite(*ts):
    return all(torch.isfinite(t).all() for t in ts if t.is_floating_point())


def factor_shapes():
    batch_a, batch_b = rng.choice([((), ()), ((2,), ()), ((2,), (1,)), ((1, 3), (2, 1)), ((2,), (3,)), ((0,), ())])
    m, k, n = (rng.choice([0, 1, 2, 3, 5, 9]) for _ in range(3))
    if rng.random() < 0.15:
        n = m  # square, so the eigenvalue and trace ops get valid calls too
    a, b = (*batch_a, m, k), (*batch_b, k + (rng.random() < 0.1), n)
    if rng.random() < 0.05:
        a = a[-1:]  # a vector
    return a, b


def check_factor_op(name, A, B, out):
    """Shapes, dtypes and (finite float64 inputs) values of a successful call against dense torch math."""
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    if A.device.type == "meta":
        assert all(t.device.type == "meta" for t in (out if isinstance(out, tuple) else (out,)))
    dense = A.double() @ B.double() if A.device.type == "cpu" else None
    check = dense is not None and A.dtype == torch.float64 and finite(A, B)
    tol = tolerance("lowrank", torch.float64)
    if name == "trace":
        assert out.shape == batch and out.dtype == A.dtype
        if check:
            torch.testing.assert_close(out, dense.diagonal(dim1=-2, dim2=-1).sum(-1), **tol)
    elif name == "fro_norm":
        assert out.shape == batch and out.dtype == A.dtype
        if check:
            torch.testing.assert_close(out, torch.linalg.vector_norm(dense, dim=(-2, -1)), **tol)
    elif name == "eigvals":
        assert out.shape == (*batch, k) and out.dtype == L._complex_of(A.dtype)
        if check:
            want = torch.linalg.eigvals((B.double() @ A.double())).abs().sort(-1).values
            torch.testing.assert_close(out.abs().sort(-1).values, want, **tol)
    elif name == "svd":
        U, S, Vh = out
        r = min(m, k, n)
        assert (U.shape, S.shape, Vh.shape) == ((*batch, m, r), (*batch, r), (*batch, r, n))
        if check:
            torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, dense, **tol)
    else:  # max, max_chunked
        values, indices = out
        assert values.shape == indices.shape == (*batch, m) and indices.dtype == torch.int64
        if check and m:
            want = dense.max(-1)
            torch.testing.assert_close(values, want.values, **tolerance("lowrank_row_max", torch.float64))
            assert torch.equal(indices, want.indices)


def factor_call(stats):
    a_shape, b_shape = factor_shapes()
    dt_a = dtype()
    dt_b = dt_a if rng.random() < 0.9 else dtype()
    dev_a, dev_b = ("meta", "meta") if rng.random() < 0.1 else ("cpu", "cpu")
    if rng.random() < 0.2:
        dev_a, dev_b = rng.sample(["cpu", "meta"], 2)
    A, B = tensor(a_shape, dt_a, dev_a), tensor(b_shape, dt_b, dev_b)
    name = rng.choice(["trace", "fro_norm", "eigvals", "svd", "max", "max_chunked"])
    chunk = rng.choice([-5, 0, 1, 100, 1 << 28])
    call = {"trace": lambda: hl.lowrank_trace(A, B), "fro_norm": lambda: hl.lowrank_fro_norm(A, B),
            "eigvals": lambda: hl.lowrank_eigvals(A, B), "svd": lambda: hl.lowrank_svd(A, B),
            "max": lambda: hl.lowrank_max(A, B), "max_chunked": lambda: hl._lowrank_max_chunked(A, B, chunk)}[name]
    valid = (A.dim() >= 2 and B.dim() >= 2 and A.device == B.device and A.dtype == B.dtype and A.dtype in FLOATS
             and A.shape[-1] == B.shape[-2])
    if valid:
        try:
            torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            valid = False
    if name in ("trace", "eigvals"):
        valid = valid and A.shape[-2] == B.shape[-1]
    if name.startswith("max"):
        valid = valid and (B.shape[-1] > 0 or A.shape[-2] == 0) and (name == "max" or chunk > 0)
    try:
        out = call()
    except torch.linalg.LinAlgError as e:  # torch.linalg.svd's answer to a NaN or inf, as on the torch backend
        assert name == "svd" and A.device.type == "cpu" and not finite(A, B), repr(e)
        stats["raised"] += 1
        return
    except ERRORS as e:
        assert not valid, f"valid call {name} A {A.shape} {A.dtype} {A.device} B {B.shape} {B.dtype} raised {e!r}"
        stats["raised"] += 1
        return
    assert valid, f"invalid call {name} A {A.shape} {A.dtype} {A.device} B {B.shape} {B.dtype} {B.device} returned"
    check_factor_op(name, A, B, out)
    stats["ok"] += 1


def small_eigvals_call(stats):
    k = rng.choice([0, 1, 2, 3, 4, 7, 12])
    shape = (*rng.choice([(), (3,), (2, 1), (0,)]), k, k + (rng.random() < 0.1))
    C = tensor(shape, dtype(), "meta" if rng.random() < 0.1 else "cpu")
    solver = rng.choice(["auto", "scalar", "lapack", "bogus"])
    valid = C.shape[-1] == C.shape[-2] and C.dtype in FLOATS and solver != "bogus"
    try:
        out = hl.small_eigvals(C, solver)
    except ERRORS as e:
        assert not valid, f"valid small_eigvals {C.shape} {C.dtype} {solver} raised {e!r}"
        stats["raised"] += 1
        return
    assert valid, f"invalid small_eigvals {C.shape} {C.dtype} {solver} returned"
    assert out.shape == C.shape[:-1] and out.dtype == L._complex_of(C.dtype)
    if C.device.type == "cpu" and C.dtype == torch.float64 and C.numel():
        good = torch.isfinite(C).all(-1).all(-1)
        assert torch.isnan(out[~good]).all(), "a matrix with a NaN or inf entry gets all-NaN eigenvalues"
        want = torch.linalg.eigvals(C[good]).abs().sort(-1).values
        torch.testing.assert_close(out[good].abs().sort(-1).values, want, **tolerance("lowrank", torch.float64))
    stats["ok"] += 1


stats = {"ok": 0, "raised": 0}
for i in range(int(sys.argv[3])):
    rng.choice([factor_call, factor_call, factor_call, small_eigvals_call])(stats)
print("FUZZ-DONE", stats["ok"], stats["raised"])
'''


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_operator_calls_never_crash_and_are_right_or_raise(seed):
    calls = 250
    result = subprocess.run([sys.executable, "-c", FUZZ, str(seed), TESTS_DIR, str(calls)], capture_output=True,
                            text=True, timeout=600, cwd=TESTS_DIR)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    ok, raised = map(int, result.stdout.split("FUZZ-DONE")[1].split())
    assert ok + raised == calls and ok > calls // 4 and raised > calls // 10, (ok, raised)


# ---------------------------------------------------------------------------------------------------------
# FactoredMatrix
# ---------------------------------------------------------------------------------------------------------


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "index, message",
    [(5, r"row index 5 is out of range for a FactoredMatrix with 3 rows: use an index in \[-3, 2\]"),
     (3, r"row index 3 is out of range for a FactoredMatrix with 3 rows"),
     (-4, r"row index -4 is out of range for a FactoredMatrix with 3 rows"),
     ((slice(None), 10), r"column index 10 is out of range for a FactoredMatrix with 4 columns: use an index in "
                         r"\[-4, 3\]"),
     ((slice(None), -5), r"column index -5 is out of range for a FactoredMatrix with 4 columns"),
     ((1, 4), r"column index 4 is out of range"),
     ((np.int64(7), 0), r"row index 7 is out of range"),
     (torch.tensor(3), r"row index 3 is out of range")],
    ids=str,
)
def test_factored_matrix_integer_index_outside_the_matrix_raises_index_error(index, message):
    A, B = _rand(3, 2, seed=1), _rand(2, 4, seed=2)
    with pytest.raises(IndexError, match=message):
        FactoredMatrix(A, B)[index]
    # TL 3.9 turns a Python int into a slice and silently returns an empty matrix.
    python_ints = tuple(i for i in (index if isinstance(index, tuple) else (index,)) if not isinstance(i, slice))
    if all(type(i) is int for i in python_ints):
        assert 0 in TLFactoredMatrix(A, B)[index].shape


def test_factored_matrix_out_of_range_index_with_leading_dims_and_outer_factors():
    fm = FactoredMatrix(_rand(2, 5, 3, seed=3), _rand(2, 3, 4, seed=4), left=_rand(7, 5, seed=5))
    assert fm.shape == (2, 7, 4)
    with pytest.raises(IndexError, match="row index 7 is out of range for a FactoredMatrix with 7 rows"):
        fm[1, 7]
    with pytest.raises(IndexError, match="column index -5 is out of range for a FactoredMatrix with 4 columns"):
        fm[0, :, -5]
    with pytest.raises(IndexError, match="out of bounds for dimension 0 with size 2"):  # a leading dim: torch's
        fm[2]
    torch.testing.assert_close(fm[1, 6].AB, fm.AB[1, 6:7], **tolerance("same_dtype", torch.float64))
    torch.testing.assert_close(fm[:, -7, -1].AB, fm.AB[:, -7:-6, -1:], **tolerance("same_dtype", torch.float64))


@pytest.mark.parametrize(
    "index",
    [0, 2, -1, -3, (slice(None), 0), (slice(None), 3), (slice(None), -4), (1, -1), (-1, 2), slice(5, 10),
     slice(-10, 2), (slice(None), slice(4, 9)), [0, 2], (slice(None), [0, 3]), torch.tensor([2, 0]), True, False],
    ids=str,
)
def test_factored_matrix_valid_indexing_is_identical_to_tl(index):
    A, B = _rand(3, 2, seed=6), _rand(2, 4, seed=7)
    ours, theirs = FactoredMatrix(A, B)[index], TLFactoredMatrix(A, B)[index]
    assert ours.shape == theirs.shape and (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)
    assert torch.equal(ours.AB, theirs.AB)


@pytest.mark.parametrize("index", [np.int64(1), np.int32(-1), torch.tensor(2), torch.tensor(-3)], ids=repr)
def test_factored_matrix_numpy_and_tensor_integers_index_like_python_ints(index):
    # TL passes these through to tensor indexing, which drops the dimension and fails later; here they are ints.
    fm = FactoredMatrix(_rand(3, 2, seed=8), _rand(2, 4, seed=9))
    assert torch.equal(fm[index].AB, fm[int(index)].AB)
    assert torch.equal(fm[:, index].AB, fm[:, int(index)].AB)


@pytest.mark.parametrize(
    "a_shape, b_shape, name, shape",
    [((3,), (3, 4), "A", r"\(3,\) \(1-D\)"), ((3, 2), (2,), "B", r"\(2,\) \(1-D\)"), ((), (1, 4), "A", r"\(\) \(0-D\)"),
     ((4, 3), (), "B", r"\(\) \(0-D\)")],
)
def test_factored_matrix_factors_below_2d_raise_in_the_constructor(a_shape, b_shape, name, shape):
    with pytest.raises(InvalidInputError, match=rf"factors must be at least 2-D \(A \[\.\.\., ldim, mdim\], B "
                                                rf"\[\.\.\., mdim, rdim\]\), but {name} has shape {shape}\. Make a "
                                                r"vector a matrix with \.unsqueeze"):
        FactoredMatrix(_rand(*a_shape), _rand(*b_shape))
    with pytest.raises(IndexError):  # TL: an IndexError from a shape lookup, naming no factor
        TLFactoredMatrix(_rand(*a_shape), _rand(*b_shape))


def test_factored_matrix_outer_factors_below_2d_raise():
    A, B = _rand(3, 2), _rand(2, 4)
    with pytest.raises(InvalidInputError, match=r"but left has shape \(3,\)"):
        FactoredMatrix(A, B, left=_rand(3))
    with pytest.raises(InvalidInputError, match=r"but right has shape \(\)"):
        FactoredMatrix(A, B, right=_rand())


def test_factored_matrix_mismatched_inner_dimensions_raise_naming_both_shapes():
    with pytest.raises(InvalidInputError, match=r"must match on inner dimension, shapes were a: "
                                                r"torch.Size\(\[3, 2\]\), b:torch.Size\(\[3, 4\]\).*transpose"):
        FactoredMatrix(_rand(3, 2), _rand(3, 4))
    with pytest.raises(AssertionError):  # what TL users catch
        FactoredMatrix(_rand(3, 2), _rand(3, 4))
    with pytest.raises(InvalidInputError, match=r"Left factor \(3, 4\) does not fit A \(3, 2\)"):
        FactoredMatrix(_rand(3, 2), _rand(2, 4), left=_rand(3, 4))
    with pytest.raises(InvalidInputError, match=r"Right factor \(3, 5\) does not fit B \(2, 4\)"):
        FactoredMatrix(_rand(3, 2), _rand(2, 4), right=_rand(3, 5))


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def test_masked_patch_promotes_dtypes_as_torch_where():
    # masked_patch is torch.where: dtypes promote.
    act, clean = torch.zeros(6, 4, dtype=torch.float32), torch.ones(2, 4, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=_gen(11)) > 0.5
    got = masked_patch(act, clean, mask)
    want = torch.where(mask.unsqueeze(1), clean.unsqueeze(0), act.view(3, 2, 4)).view(6, 4)
    assert got.dtype == torch.float64 and torch.equal(got, want)
