"""hooklens's FactoredMatrix against TransformerLens 3.9's on identical random tensors, parametrized as TL's own
unit tests (tests/unit/factored_matrix): constructor, `*` by scalars and one-element tensors, `@` by matrices,
vectors and factored matrices, indexing, the properties (AB, BA, T, svd, norm, eigenvalues), the errors TL users
catch (`AssertionError` where TL asserts, `RuntimeError` where leading dimensions do not broadcast) and the repr.

Values are compared in float64. The one deliberate difference: `eigenvalues` come from hooklens's own solver,
sorted by descending magnitude, where TL returns LAPACK's order; they are compared as multisets.
"""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from tolerances import tolerance

from hooklens import FactoredMatrix
from hooklens.errors import InvalidInputError
from hooklens.FactoredMatrix import FactoredMatrix as ShimFactoredMatrix

pytestmark = pytest.mark.usefixtures("no_grad")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

SAME = tolerance("same_dtype", torch.float64)  # the same ops on the same tensors (TL's path, hooklens's path)
FACTORED = tolerance("factored_float64", torch.float64)  # hooklens's low-rank routines against TL's dense ones


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def both(A, B):
    """The same matrix as a hooklens and a TL FactoredMatrix."""
    return FactoredMatrix(A, B), TLFactoredMatrix(A, B)


def assert_same_structure(ours, theirs):
    assert (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)
    assert ours.shape == theirs.shape and type(ours.shape) is type(theirs.shape)
    assert ours.ndim == theirs.ndim and ours.has_leading_dims == theirs.has_leading_dims
    assert repr(ours) == repr(theirs)


def sorted_eigs(values):
    """Eigenvalues (last dim) in a canonical order, to compare two solvers' outputs as multisets."""
    key = values.real.round(decimals=6) * 1e6 + values.imag.round(decimals=6)
    return torch.gather(values, -1, key.argsort(dim=-1))


def expect_error(make, error, match=None):
    """`make(TLFactoredMatrix)` and `make(FactoredMatrix)` both raise `error`; returns hooklens's exception."""
    with pytest.raises(error):
        make(TLFactoredMatrix)
    with pytest.raises(error, match=match) as raised:
        make(FactoredMatrix)
    return raised.value


# -- constructor (TL: test_constructor.py) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((5, 3), (3, 7)), ((5, 3), (2, 4, 3, 7)), ((4, 5, 3), (2, 4, 3, 7)), ((1, 8, 9), (1, 9, 8)),
     ((2, 1, 6, 4), (3, 4, 6))],
    ids=["no_leading", "b_leading", "a_b_leading", "leading_ones", "broadcast"],
)
def test_constructor(a_shape, b_shape):
    A, B = rand(*a_shape, seed=1), rand(*b_shape, seed=2)
    ours, theirs = both(A, B)
    assert_same_structure(ours, theirs)
    assert ours.A.shape == theirs.A.shape and ours.B.shape == theirs.B.shape
    assert torch.equal(ours.A, theirs.A) and torch.equal(ours.B, theirs.B)
    assert ShimFactoredMatrix is FactoredMatrix


def test_constructor_broadcast_mismatch_is_a_runtime_error():
    error = expect_error(lambda F: F(torch.ones(9, 5, 3), torch.ones(2, 4, 3, 7)), RuntimeError, r"[Mm]ismatch")
    assert "Cannot broadcast leading dimensions" in str(error) and "torch.broadcast_shapes" in str(error)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 3, 4), (2, 3, 5)), ((5, 3), (4, 7))])
def test_constructor_inner_mismatch_is_an_assertion_error(a_shape, b_shape):
    error = expect_error(lambda F: F(torch.ones(a_shape), torch.ones(b_shape)), AssertionError, "inner dimension")
    assert isinstance(error, InvalidInputError) and isinstance(error, ValueError)
    assert "Factored matrix must match on inner dimension" in str(error) and "transpose" in str(error)


# -- * by scalars (TL: test_multiply_by_scalar.py) ----------------------------------------------------------------
SCALARS = {
    "tensor_0d": lambda: torch.tensor(1.7),
    "tensor_1d": lambda: rand(1, seed=3),
    "tensor_2d": lambda: rand(1, 1, seed=4),
    "tensor_4d": lambda: rand(1, 1, 1, 1, seed=5),  # broadcasts: adds a leading dimension, as in TL
    "tensor_float32": lambda: torch.tensor([0.3]),
    "tensor_int": lambda: torch.tensor(3),
    "float": lambda: 0.37,
    "int": lambda: -42,
    "bool": lambda: True,
}


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("leading_dim", [False, True])
@pytest.mark.parametrize("multiply_from_left", [False, True])
def test_multiply_by_scalar(scalar, leading_dim, multiply_from_left):
    shapes = ((6, 2, 3), (6, 3, 4)) if leading_dim else ((2, 3), (3, 4))
    a, b = rand(*shapes[0], seed=6), rand(*shapes[1], seed=7)
    value = SCALARS[scalar]()
    ours, theirs = both(a, b)
    if multiply_from_left:
        ours, theirs = ours * value, theirs * value
    else:
        ours, theirs = value * ours, value * theirs
    assert isinstance(ours, FactoredMatrix)
    assert_same_structure(ours, theirs)
    assert ours.A.dtype == theirs.A.dtype
    torch.testing.assert_close(ours.A, theirs.A, **SAME)  # the scalar goes into A, as in TL
    torch.testing.assert_close(ours.AB, theirs.AB, **SAME)
    torch.testing.assert_close(ours.AB, (a @ b) * value, **SAME)


def test_multiply_by_scalar_with_outer_factors_matches_tl():
    fm = FactoredMatrix(rand(2, 8, 3, seed=8), rand(2, 3, 8, seed=9))
    tl = TLFactoredMatrix(fm.A, fm.B)
    left, right = rand(10, 8, seed=10), rand(8, 12, seed=11)
    scale = rand(1, 1, 1, seed=12)
    ours, theirs = (left @ fm @ right) * scale, scale * (left @ tl @ right)
    assert_same_structure(ours, theirs)
    torch.testing.assert_close(ours.AB, theirs.AB, **FACTORED)


@pytest.mark.parametrize("shape", [(2,), (2, 2), (3, 1), (1, 2, 1)], ids=["1d", "2d", "column", "3d"])
@pytest.mark.parametrize("leading_dim", [False, True])
@pytest.mark.parametrize("multiply_from_left", [False, True])
def test_multiply_by_non_scalar_tensor_is_an_assertion_error(shape, leading_dim, multiply_from_left):
    shapes = ((6, 2, 3), (6, 3, 4)) if leading_dim else ((2, 3), (3, 4))
    a, b, value = rand(*shapes[0], seed=13), rand(*shapes[1], seed=14), rand(*shape, seed=15)

    def multiply(F):
        fm = F(a, b)
        return fm * value if multiply_from_left else value * fm

    error = expect_error(multiply, AssertionError, "must be a scalar")
    assert isinstance(error, InvalidInputError)
    assert "use @ instead" in str(error) and str(torch.Size(shape)) in str(error)


# -- @ by matrices (TL: test_multiply_by_matrix.py) ---------------------------------------------------------------
LEFT_CASES = {  # factored matrix @ matrix
    "rdim > mdim": ((2, 3), (3, 4), (4, 5)),
    "rdim < mdim": ((2, 6), (6, 4), (4, 5)),
    "rdim == mdim": ((2, 4), (4, 4), (4, 5)),
}
RIGHT_CASES = {  # matrix @ factored matrix
    "ldim > mdim": ((6, 3), (3, 4), (4, 6)),
    "ldim < mdim": ((2, 6), (6, 4), (4, 2)),
    "ldim == mdim": ((2, 2), (2, 4), (4, 2)),
}
LEADING = {  # leading dims of (factored matrix, matrix), as TL's four variants
    "none": ((), ()),
    "factored_matrix_leading": ((2,), ()),
    "matrix_leading": ((), (2, 12)),
    "both_leading": ((2,), (2,)),
}


def _operands(shapes, leading, seed):
    (a_shape, b_shape, m_shape), (fm_lead, m_lead) = shapes, leading
    a, b = rand(*a_shape, seed=seed), rand(*b_shape, seed=seed + 1)
    matrix = rand(*m_shape, seed=seed + 2)
    if fm_lead:
        a, b = a.expand(*fm_lead, *a.shape), b.expand(*fm_lead, *b.shape)
    return a, b, matrix.expand(*m_lead, *matrix.shape)


@pytest.mark.parametrize("leading", list(LEADING))
@pytest.mark.parametrize("case", list(LEFT_CASES))
def test_left_multiply_by_matrix(case, leading):
    a, b, matrix = _operands(LEFT_CASES[case], LEADING[leading], seed=20)
    fm, tl = both(a, b)
    ours, theirs = fm @ matrix, tl @ matrix
    assert_same_structure(ours, theirs)
    assert ours.mdim == min(fm.mdim, matrix.shape[-2])
    assert ours.A.shape == theirs.A.shape and ours.B.shape == theirs.B.shape
    torch.testing.assert_close(ours.AB, theirs.AB, **FACTORED)
    torch.testing.assert_close(ours.AB, (a @ b) @ matrix, **FACTORED)


@pytest.mark.parametrize("leading", list(LEADING))
@pytest.mark.parametrize("case", list(RIGHT_CASES))
def test_right_multiply_by_matrix(case, leading):
    a, b, matrix = _operands(RIGHT_CASES[case], LEADING[leading], seed=30)
    fm, tl = both(a, b)
    ours, theirs = matrix @ fm, matrix @ tl
    assert_same_structure(ours, theirs)
    assert ours.mdim == min(fm.mdim, matrix.shape[-1])
    assert ours.A.shape == theirs.A.shape and ours.B.shape == theirs.B.shape
    torch.testing.assert_close(ours.AB, theirs.AB, **FACTORED)


MISMATCHES = {
    "Leading dim mismatch where each has one leading dim": (((2, 3, 4), (2, 4, 6)), (4, 6, 7), (4, 6, 3),
                                                            RuntimeError),
    "Leading dim mismatch, two leading dims against one": (((2, 9, 3, 4), (2, 9, 4, 6)), (2, 6, 7), (2, 6, 3),
                                                           RuntimeError),
    "Inner dimension mismatch": (((3, 4), (4, 6)), (5, 6), (5, 6), AssertionError),
    "Inner dimension mismatch with batch": (((3, 4), (4, 6)), (2, 5, 6), (2, 5, 6), AssertionError),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_dimension_mismatch_left_multiply(case):
    (a_shape, b_shape), matrix_shape, _, error = MISMATCHES[case]
    a, b, matrix = rand(*a_shape, seed=40), rand(*b_shape, seed=41), rand(*matrix_shape, seed=42)
    raised = expect_error(lambda F: F(a, b) @ matrix, error)
    if error is AssertionError:
        assert isinstance(raised, InvalidInputError)
        assert "Right matrix must match on inner dimension" in str(raised) and "transpose" in str(raised)


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_dimension_mismatch_right_multiply(case):
    (a_shape, b_shape), _, matrix_shape, error = MISMATCHES[case]
    a, b, matrix = rand(*a_shape, seed=43), rand(*b_shape, seed=44), rand(*matrix_shape, seed=45)
    raised = expect_error(lambda F: matrix @ F(a, b), error)
    if error is AssertionError:
        assert isinstance(raised, InvalidInputError)
        assert "Left matrix must match on inner dimension" in str(raised) and "transpose" in str(raised)


# -- @ by vectors (TL: test_multiply_by_vector.py) ----------------------------------------------------------------
@pytest.mark.parametrize("leading_dim", [False, True])
def test_multiply_by_vector(leading_dim):
    lead = (6,) if leading_dim else ()
    a, b = rand(*lead, 2, 3, seed=50), rand(*lead, 3, 4, seed=51)
    fm, tl = both(a, b)
    right, left = rand(4, seed=52), rand(2, seed=53)
    torch.testing.assert_close(fm @ right, tl @ right, **SAME)
    torch.testing.assert_close(left @ fm, left @ tl, **SAME)
    torch.testing.assert_close(fm @ right, (a @ b) @ right, **SAME)


def test_vector_of_the_wrong_length():
    a, b = rand(2, 3, seed=54), rand(3, 4, seed=55)
    # TL checks the inner dimension of `vector @ fm` (AssertionError), not of `fm @ vector` (torch's RuntimeError).
    raised = expect_error(lambda F: rand(3, seed=56) @ F(a, b), AssertionError, "inner dimension")
    assert isinstance(raised, InvalidInputError)
    expect_error(lambda F: F(a, b) @ rand(3, seed=57), RuntimeError)


# -- @ by factored matrices (TL: test_multiply_by_factored_matrix.py) ---------------------------------------------
FM_PAIRS = {
    "both have ldim == mdim == rdim": (((3, 3), (3, 3)), ((3, 3), (3, 3))),
    "both have ldim == rdim == 1 != mdim": (((1, 2), (2, 1)), ((1, 6), (6, 1))),
    "A has ldim == mdim == rdim == 1": (((1, 1), (1, 1)), ((1, 2), (2, 5))),
    "B has ldim == 1": (((3, 2), (2, 1)), ((1, 3), (3, 2))),
    "both have rdim > mdim": (((3, 4), (4, 5)), ((5, 6), (6, 7))),
    "both have rdim < mdim": (((8, 6), (6, 5)), ((5, 7), (7, 3))),
    "both have rdim == mdim": (((3, 4), (4, 4)), ((4, 5), (5, 5))),
    "A has rdim < mdim and B has rdim > mdim": (((7, 6), (6, 3)), ((3, 7), (7, 8))),
}


@pytest.mark.parametrize("leading", [((), ()), ((2,), ()), ((), (2,)), ((2, 9), (9,))],
                         ids=["none", "A_leading", "B_leading", "both_leading"])
@pytest.mark.parametrize("case", list(FM_PAIRS))
def test_multiply_by_factored_matrix(case, leading):
    (a_shapes, b_shapes), (a_lead, b_lead) = FM_PAIRS[case], leading
    a_left, a_right = (rand(*a_lead, *s, seed=60 + i) for i, s in enumerate(a_shapes))
    b_left, b_right = (rand(*b_lead, *s, seed=62 + i) for i, s in enumerate(b_shapes))
    ours = FactoredMatrix(a_left, a_right) @ FactoredMatrix(b_left, b_right)
    theirs = TLFactoredMatrix(a_left, a_right) @ TLFactoredMatrix(b_left, b_right)
    assert_same_structure(ours, theirs)
    torch.testing.assert_close(ours.AB, theirs.AB, **FACTORED)


@pytest.mark.parametrize(
    "a_shapes, b_shapes, error",
    [(((2, 3, 4), (2, 4, 6)), ((4, 6, 7), (4, 7, 2)), RuntimeError),
     (((2, 9, 3, 4), (2, 9, 4, 6)), ((2, 6, 7), (2, 7, 2)), RuntimeError),
     (((3, 4), (4, 6)), ((5, 6), (6, 7)), AssertionError),
     (((3, 4), (4, 6)), ((2, 5, 6), (2, 6, 7)), AssertionError)],
    ids=["leading_each_one", "leading_two_against_one", "inner", "inner_with_batch"],
)
def test_factored_matrix_dimension_mismatch(a_shapes, b_shapes, error):
    a = [rand(*s, seed=70 + i) for i, s in enumerate(a_shapes)]
    b = [rand(*s, seed=72 + i) for i, s in enumerate(b_shapes)]
    expect_error(lambda F: F(*a) @ F(*b), error)


# -- indexing (TL: test_get_item.py) ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "index",
    [0, (0, 1), (slice(None), 1), (slice(None), slice(None), 1), (0, 0, 0, 1), (0, 0, 0, 0, 1), (0, 0, 0, -1),
     (0, 0, 0, 0, -1), (0, 0, 0, -1, -1), (slice(None),) * 3 + ([0, 1], [0]), (slice(None),) * 3 + ([0, 1], 0),
     (slice(None),) * 3 + (torch.tensor([0, 1]), torch.tensor([0]))],
    ids=str,
)
def test_getitem(index):
    ours, theirs = both(rand(2, 2, 2, 2, 2, seed=80), rand(2, 2, 2, 2, 2, seed=81))
    picked, reference = ours[index], theirs[index]
    assert_same_structure(picked, reference)
    torch.testing.assert_close(picked.AB, reference.AB, **SAME)


@pytest.mark.parametrize("index, error", [((0, 1, 2), IndexError), ((1, 1, 1, 1, 1, 1), ValueError)])
def test_getitem_errors(index, error):
    expect_error(lambda F: F(rand(2, 2, 2, 2, 2, seed=82), rand(2, 2, 2, 2, 2, seed=83))[index], error)


# -- properties (TL: test_properties.py) --------------------------------------------------------------------------
MATRICES = {
    "3x2x3": ((3, 2), (2, 3)),
    "4x5x4": ((4, 5), (5, 4)),
    "6x7x6": ((6, 7), (7, 6)),
    "6x7x3": ((6, 7), (7, 3)),
    "leading_ones": ((1, 8, 9), (1, 9, 8)),
    "batched": ((2, 3, 10, 4), (2, 3, 4, 10)),
    "batched_non_square": ((3, 10, 4), (3, 4, 6)),
}


@pytest.mark.parametrize("case", list(MATRICES))
def test_properties(case):
    a_shape, b_shape = MATRICES[case]
    ours, theirs = both(rand(*a_shape, seed=90), rand(*b_shape, seed=91))
    assert_same_structure(ours, theirs)
    torch.testing.assert_close(ours.AB, theirs.AB, **SAME)
    torch.testing.assert_close(ours.T.AB, theirs.T.AB, **SAME)
    assert_same_structure(ours.T, theirs.T)
    for mine, tl in zip(ours.pair, theirs.pair):
        assert torch.equal(mine, tl)
    torch.testing.assert_close(ours.norm(), theirs.norm(), **FACTORED)
    torch.testing.assert_close(ours.get_corner(3), theirs.get_corner(3), **SAME)
    for mine, tl in [(ours.unsqueeze(0), theirs.unsqueeze(0)), (ours.make_even(), theirs.make_even())]:
        assert_same_structure(mine, tl)
        torch.testing.assert_close(mine.AB, tl.AB, **FACTORED)


@pytest.mark.parametrize("case", list(MATRICES))
def test_svd(case):
    a_shape, b_shape = MATRICES[case]
    ours, theirs = both(rand(*a_shape, seed=92), rand(*b_shape, seed=93))
    (U, S, V), (tl_U, tl_S, tl_V) = ours.svd(), theirs.svd()
    assert (U.shape, S.shape, V.shape) == (tl_U.shape, tl_S.shape, tl_V.shape)
    torch.testing.assert_close(S, tl_S, **FACTORED)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, theirs.AB, **FACTORED)
    # Distinct singular values: the vectors agree with TL's up to one sign per component.
    signs = (U * tl_U).sum(-2).sign()
    torch.testing.assert_close(U * signs[..., None, :], tl_U, **FACTORED)
    torch.testing.assert_close(V * signs[..., None, :], tl_V, **FACTORED)
    torch.testing.assert_close(ours.collapse_r(), theirs.collapse_r() * signs[..., None, :], **FACTORED)
    torch.testing.assert_close(ours.collapse_l(), theirs.collapse_l() * signs[..., :, None], **FACTORED)


def test_svd_is_cached_per_instance_and_freed_with_it():
    fm = FactoredMatrix(rand(4, 3, seed=94), rand(3, 4, seed=95))
    first, second = fm.svd(), fm.svd()
    assert all(x is y for x, y in zip(first, second))
    assert fm.U is first[0] and fm.S is first[1] and fm.V is first[2]
    with pytest.warns(DeprecationWarning):
        assert fm.Vh is first[2]
    ref = weakref.ref(fm)
    del fm, first, second
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("case", list(MATRICES))
def test_BA_and_eigenvalues(case):
    a_shape, b_shape = MATRICES[case]
    ours, theirs = both(rand(*a_shape, seed=96), rand(*b_shape, seed=97))
    if theirs.ldim != theirs.rdim:
        for name in ("BA", "eigenvalues"):
            error = expect_error(lambda F: getattr(F(ours.A, ours.B), name), AssertionError, "ldim==rdim")
            assert isinstance(error, InvalidInputError) and "svd()" in str(error)
        return
    torch.testing.assert_close(ours.BA, theirs.BA, **SAME)
    eigenvalues, reference = ours.eigenvalues, theirs.eigenvalues
    assert eigenvalues.dtype == reference.dtype and eigenvalues.shape == reference.shape
    torch.testing.assert_close(sorted_eigs(eigenvalues), sorted_eigs(reference), **FACTORED)
    # Deliberate difference: hooklens's order is by descending magnitude, not LAPACK's.
    assert (eigenvalues.abs().diff(dim=-1) <= 1e-12).all()


def test_BA_and_eigenvalues_with_outer_factors():
    """`W_E @ OV @ W_U`-style products keep the outer factors apart; BA and the eigenvalues are still TL's."""
    fm, tl = both(rand(2, 3, 8, 4, seed=98), rand(2, 3, 4, 8, seed=99))
    left, right = rand(20, 8, seed=100), rand(8, 20, seed=101)
    ours, theirs = left @ fm @ right, left @ tl @ right
    assert_same_structure(ours, theirs)
    torch.testing.assert_close(ours.BA, theirs.BA, **FACTORED)
    torch.testing.assert_close(sorted_eigs(ours.eigenvalues), sorted_eigs(theirs.eigenvalues), **FACTORED)
    non_square = left @ fm
    expect_error(lambda F: non_square.BA if F is FactoredMatrix else (left @ tl).BA, AssertionError, "ldim==rdim")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eigenvalues_of_half_precision_matrices(dtype):
    ours, theirs = both(rand(10, 4, seed=102).to(dtype), rand(4, 10, seed=103).to(dtype))
    eigenvalues, reference = ours.eigenvalues, theirs.eigenvalues
    assert eigenvalues.dtype == reference.dtype == torch.complex64
    torch.testing.assert_close(sorted_eigs(eigenvalues), sorted_eigs(reference), **tolerance("same_dtype", dtype))


# -- repr ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [((5, 3), (3, 7)), ((12, 12, 768, 64), (12, 12, 64, 768))])
def test_repr(a_shape, b_shape):
    # expand: a [12, 12, 768, 64] view of one head's zeros allocates nothing.
    A = torch.zeros(a_shape[-2:]).expand(a_shape)
    B = torch.zeros(b_shape[-2:]).expand(b_shape)
    ours, theirs = both(A, B)
    assert repr(ours) == repr(theirs)
    if len(a_shape) == 4:
        assert repr(ours) == "FactoredMatrix: Shape(torch.Size([12, 12, 768, 768])), Hidden Dim(64)"
        assert repr(torch.zeros(50, 768) @ ours @ torch.zeros(768, 50)) == repr(
            torch.zeros(50, 768) @ theirs @ torch.zeros(768, 50))
