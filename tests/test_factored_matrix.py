"""FactoredMatrix against dense float64 linear algebra and against TransformerLens 3.9's FactoredMatrix."""
from __future__ import annotations

import warnings

import pytest
import torch
from tolerances import tolerance

import hooklens.utils as utils
from hooklens import FactoredMatrix, HookedTransformer

pytestmark = pytest.mark.usefixtures("no_grad")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.utils as tl_utils
    from transformer_lens import FactoredMatrix as TLFactoredMatrix


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sorted_eigs(values: torch.Tensor) -> torch.Tensor:
    """Sort complex eigenvalues (last dim) by (real, imag) rounded, for multiset comparison."""
    key = values.real * 1e6 + values.imag.round(decimals=6)
    return torch.gather(values, -1, key.argsort(dim=-1))


FACTORED_F64 = tolerance("factored_float64", torch.float64)


def assert_close(a, b, atol=FACTORED_F64["atol"], rtol=FACTORED_F64["rtol"], what=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


CASES = {
    "square": ((3, 20, 5), (3, 5, 20)),
    "rank_deficient": ((2, 16, 6), (2, 6, 16)),
    "non_square": ((4, 30, 7), (4, 7, 11)),
    "no_batch": ((12, 3), (3, 12)),
    "broadcast": ((2, 1, 10, 4), (1, 3, 4, 10)),
    "k1": ((5, 9, 1), (5, 1, 9)),
}


def make(case, seed=0):
    a_shape, b_shape = CASES[case]
    A, B = rand(*a_shape, seed=seed), rand(*b_shape, seed=seed + 1)
    if case == "rank_deficient":
        A[..., :, -2:] = A[..., :, :2]  # rank 4 < k = 6
    return A, B


@pytest.mark.parametrize("case", list(CASES))
def test_dense_equivalents(case):
    A, B = make(case)
    fm = FactoredMatrix(A, B)
    dense = A @ B
    assert fm.shape == dense.shape
    assert_close(fm.AB, dense, what="AB")
    S_dense = torch.linalg.svdvals(dense)[..., : fm.mdim]
    assert_close(fm.S, S_dense, atol=1e-9, what="S")
    U, S, V = fm.svd()  # TL's convention: U @ S.diag() @ V.transpose(-2, -1) == M
    assert V.shape == (*fm.shape[:-2], fm.rdim, fm.mdim)
    assert_close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), dense, atol=1e-9, what="reconstruction")
    eye = torch.eye(fm.mdim, dtype=A.dtype)
    rank = int(torch.linalg.matrix_rank(dense).min())
    for name, Q in (("U", U), ("V", V)):
        gram = (Q.transpose(-2, -1) @ Q)[..., :rank, :rank]  # [..., rank, rank]
        assert_close(gram, eye[:rank, :rank].expand_as(gram), atol=1e-9, what=f"{name} orthonormal")
    assert_close(fm.V, V)
    with pytest.warns(DeprecationWarning, match="returns V"):
        assert_close(fm.Vh, V)  # TL's deprecated alias: it always returned V
    assert_close(fm.norm(), torch.linalg.matrix_norm(dense), what="norm")
    if fm.ldim == fm.rdim:
        assert_close(fm.trace(), dense.diagonal(dim1=-2, dim2=-1).sum(-1), what="trace")
        dense_eigs = torch.linalg.eigvals(dense)
        top = dense_eigs.gather(-1, dense_eigs.abs().argsort(dim=-1, descending=True)[..., : fm.mdim])
        assert_close(sorted_eigs(fm.eigenvalues), sorted_eigs(top), atol=1e-7, what="eigenvalues")
        assert_close(fm.BA, B @ A)


def test_operations_match_dense():
    A, B = make("square")
    fm, dense = FactoredMatrix(A, B), A @ B
    M = rand(20, 20, seed=7)
    v = rand(20, seed=8)
    assert_close((fm @ M).AB, dense @ M)
    assert_close((M @ fm).AB, M @ dense)
    assert_close(fm @ v, dense @ v)
    assert_close(v @ fm, v @ dense)
    assert_close((fm @ fm).AB, dense @ dense)
    assert_close((2.5 * fm).AB, 2.5 * dense)
    assert_close((fm * torch.tensor(3.0, dtype=torch.float64)).AB, 3 * dense)
    assert_close(fm.T.AB, dense.transpose(-2, -1))
    assert_close(fm[1].AB, dense[1])
    assert_close(fm[1:3, 2:5].AB, dense[1:3, 2:5])
    assert_close(fm[0, 4].AB, dense[0, 4:5])
    assert_close(fm[0, 4, -1].AB, dense[0, 4:5, -1:])
    assert_close(fm[:, torch.tensor([1, 3])].AB, dense[:, [1, 3]])
    assert_close(fm.unsqueeze(0).AB, dense.unsqueeze(0))
    assert_close(fm.make_even().AB, dense, atol=1e-9)
    even_A, even_B = fm.make_even().pair
    assert_close(torch.linalg.svdvals(even_A), torch.linalg.svdvals(even_B.transpose(-2, -1)), atol=1e-9)
    assert_close(fm.collapse_l(), torch.diag_embed(fm.S) @ fm.V.transpose(-2, -1))
    assert_close(fm.collapse_r(), fm.U @ torch.diag_embed(fm.S))
    assert_close(fm.get_corner(2), dense[:2, :2, :2])
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(A, B[..., :4, :])
    with pytest.raises(ValueError, match="scalar"):
        fm * torch.ones(2)


def test_outer_factors_are_deferred_and_exact():
    """`left @ FM @ right` keeps the outer factors apart; every result equals the dense computation."""
    A, B = rand(3, 8, 4, seed=1), rand(3, 4, 8, seed=2)
    left, right = rand(50, 8, seed=3), rand(8, 50, seed=4)
    fm = left @ FactoredMatrix(A, B) @ right
    dense = left @ (A @ B) @ right
    assert fm.shape == (3, 50, 50) and fm.mdim == 4
    assert_close(fm.AB, dense)
    assert_close(fm.norm(), torch.linalg.matrix_norm(dense), what="norm")
    assert_close(fm.trace(), dense.diagonal(dim1=-2, dim2=-1).sum(-1))
    dense_eigs = torch.linalg.eigvals(dense)
    top = dense_eigs.gather(-1, dense_eigs.abs().argsort(dim=-1, descending=True)[..., :4])
    assert_close(sorted_eigs(fm.eigenvalues), sorted_eigs(top), atol=1e-7, what="eigenvalues")
    assert_close(fm.S, torch.linalg.svdvals(dense)[..., :4], atol=1e-9)
    assert_close(fm[1, 10:20].AB, dense[1, 10:20])
    assert_close(fm[:, :, 5:9].AB, dense[:, :, 5:9])
    assert_close(fm[2][torch.tensor([0, 7, 49])].AB, dense[2][[0, 7, 49]])
    assert_close(fm.T.AB, dense.transpose(-2, -1))
    assert_close((fm @ fm.T).AB, dense @ dense.transpose(-2, -1))


def test_matches_transformerlens_factored_matrix():
    A, B = rand(2, 3, 16, 4, seed=5).float(), rand(2, 3, 4, 16, seed=6).float()
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    assert tuple(ours.shape) == tuple(theirs.shape) and ours.ndim == theirs.ndim
    assert (ours.ldim, ours.rdim, ours.mdim) == (theirs.ldim, theirs.rdim, theirs.mdim)
    for name in ("AB", "BA", "S"):
        assert_close(getattr(ours, name), getattr(theirs, name), **tolerance("reordered_sum"), what=name)
    assert_close(ours.norm(), theirs.norm(), **tolerance("reordered_sum"))
    assert_close(sorted_eigs(ours.eigenvalues.to(torch.complex64)), sorted_eigs(theirs.eigenvalues),
                 **tolerance("reordered_sum"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_V = theirs.V
    # svd() has TL's convention and shapes: (U, S, V) with V [..., rdim, mdim].
    A2, B2 = rand(3, 20, 5, seed=7).float(), rand(3, 5, 12, seed=8).float()
    ours_svd, theirs_svd = FactoredMatrix(A2, B2).svd(), TLFactoredMatrix(A2, B2).svd()
    assert [t.shape for t in ours_svd] == [t.shape for t in theirs_svd]
    U, S, V = ours_svd
    assert_close(U @ S.diag_embed() @ V.transpose(-2, -1), A2 @ B2, **tolerance("reordered_sum"))
    # Singular vectors are defined up to sign: compare the sign-invariant projections.
    assert_close(ours.U @ ours.U.transpose(-2, -1), theirs.U @ theirs.U.transpose(-2, -1), **tolerance("reordered_sum"))
    assert_close(ours.V @ ours.V.transpose(-2, -1), theirs_V @ theirs_V.transpose(-2, -1), **tolerance("reordered_sum"))
    for index in [(1,), (0, 2), (1, 0, slice(3, 9)), (0, 1, 5), (0, 1, 5, 7), (slice(None), 1)]:
        assert_close(ours[index].AB, theirs[index].AB, atol=1e-5, what=str(index))
    assert_close(ours.T.AB, theirs.T.AB)
    assert_close(ours.collapse_l().norm(dim=(-2, -1)), theirs.collapse_l().norm(dim=(-2, -1)),
                 **tolerance("reordered_sum"))
    assert_close(ours.get_corner(3), theirs.get_corner(3))
    left = rand(3, 16, seed=9).float()
    assert_close((left @ ours @ left.T).AB, (left @ theirs @ left.T).AB, **tolerance("reordered_sum"))
    # Products have TL's inner dimension (so .S / .U / .V have its shapes), whichever side is narrower.
    wide, narrow = rand(10, 6, seed=10).float(), rand(6, 4, seed=11).float()
    square = rand(4, 4, seed=12).float()
    other = FactoredMatrix(rand(4, 3, seed=13).float(), rand(3, 7, seed=14).float())
    for make_ours, make_theirs in [
        (lambda: FactoredMatrix(wide, narrow) @ square, lambda: TLFactoredMatrix(wide, narrow) @ square),
        (lambda: square @ FactoredMatrix(narrow.T, wide.T), lambda: square @ TLFactoredMatrix(narrow.T, wide.T)),
        (lambda: FactoredMatrix(wide, narrow) @ other,
         lambda: TLFactoredMatrix(wide, narrow) @ TLFactoredMatrix(other.A, other.B)),
        (lambda: left @ ours @ left.T, lambda: left @ theirs @ left.T),
    ]:
        product, reference = make_ours(), make_theirs()
        assert (product.ldim, product.mdim, product.rdim) == (reference.ldim, reference.mdim, reference.rdim)
        assert product.S.shape == reference.S.shape
        assert_close(product.AB, reference.AB, **tolerance("reordered_sum"))


def test_composition_scores_match_transformerlens():
    left = FactoredMatrix(rand(2, 3, 12, 4, seed=1).float(), rand(2, 3, 4, 12, seed=2).float())
    right = FactoredMatrix(rand(2, 3, 12, 4, seed=3).float(), rand(2, 3, 4, 12, seed=4).float())
    tl_left = TLFactoredMatrix(left.A, left.B)
    tl_right = TLFactoredMatrix(right.A, right.B)
    expected = tl_utils.composition_scores(tl_left, tl_right, broadcast_dims=True)
    actual = utils.composition_scores(left, right, broadcast_dims=True)
    assert actual.shape == (2, 3, 2, 3)
    assert_close(actual, expected, **tolerance("reordered_short_sum"))
    assert_close(utils.composition_scores(left, right, broadcast_dims=False),
                 tl_utils.composition_scores(tl_left, tl_right, broadcast_dims=False),
                 **tolerance("reordered_short_sum"))
    # The other branch (shared dim larger than m1 * m2).
    wide_l = FactoredMatrix(rand(3, 40, 2, seed=5).float(), rand(3, 2, 40, seed=6).float())
    wide_r = FactoredMatrix(rand(2, 40, 2, seed=7).float(), rand(2, 2, 40, seed=8).float())
    assert_close(utils.composition_scores(wide_l, wide_r),
                 tl_utils.composition_scores(TLFactoredMatrix(wide_l.A, wide_l.B),
                                             TLFactoredMatrix(wide_r.A, wide_r.B)),
                 **tolerance("reordered_short_sum"))


def top_1_acc(full_circuit, batch_size=40):
    total = 0
    for indices in torch.split(torch.arange(full_circuit.shape[-2]), batch_size):
        total += (full_circuit[indices].AB.argmax(dim=-1) == indices).float().sum().item()
    return total / full_circuit.shape[-2]


def test_circuit_workflows_match_transformerlens(tiny_dir):
    """The induction-demo workflows: OV copying scores, full OV circuits, K-composition top-1 accuracy."""
    from conftest import tl_model_from_hf

    tl = tl_model_from_hf(tiny_dir)
    model = HookedTransformer.from_pretrained(tiny_dir)
    assert model.OV.shape == tl.OV.shape == (2, 4, 64, 64)
    ours_eigs, tl_eigs = model.OV.eigenvalues, tl.OV.eigenvalues

    def copying(e):
        return (e.sum(-1) / e.abs().sum(-1)).real

    assert_close(copying(ours_eigs).float(), copying(tl_eigs), **tolerance("reordered_sum"), what="OV copying scores")
    W_E, W_U = model.W_E[:300], model.W_U[:, :300]  # a 300-token vocabulary slice keeps the test fast
    full = W_E @ model.OV @ W_U
    tl_full = W_E @ tl.OV @ W_U
    assert_close(copying(full.eigenvalues).float(), copying(tl_full.eigenvalues), **tolerance("reordered_sum"),
                 what="full OV circuit copying scores")
    assert_close(full.AB, tl_full.AB, **tolerance("reordered_sum"))
    k_comp = W_E @ model.QK[1, 2] @ (W_E @ model.OV[0, 3]).T
    tl_k_comp = W_E @ tl.QK[1, 2] @ (W_E @ tl.OV[0, 3]).T
    assert top_1_acc(k_comp) == top_1_acc(tl_k_comp)
    rows = torch.arange(k_comp.ldim)
    assert (k_comp.argmax(-1) == rows).sum().item() / k_comp.ldim == top_1_acc(tl_k_comp)
    assert_close(model.all_composition_scores("K"), tl.all_composition_scores("K"), **tolerance("reordered_short_sum"))
    assert_close(model.all_composition_scores("Q"), tl.all_composition_scores("Q"), **tolerance("reordered_short_sum"))
    assert_close(model.all_composition_scores("V"), tl.all_composition_scores("V"), **tolerance("reordered_short_sum"))
    assert_close(model.blocks[1].attn.OV.AB, tl.blocks[1].attn.OV.AB)


@pytest.mark.parametrize("case", list(CASES))
def test_max_and_argmax_match_dense(case):
    A, B = make(case)
    fm = FactoredMatrix(A, B)
    for dim in (-1, -2, fm.ndim - 1):
        values, indices = fm.max(dim)
        dense = fm.AB.max(dim)
        assert torch.equal(indices, dense.indices), dim
        assert_close(values, dense.values, what=f"max({dim})")
        assert torch.equal(fm.argmax(dim), dense.indices)
    # With deferred outer factors (a full-circuit-like chain) and after row slicing.
    chained = rand(25, A.shape[-2], seed=3) @ fm @ rand(B.shape[-1], 19, seed=4)
    assert torch.equal(chained.argmax(-1), chained.AB.argmax(-1))
    rows = (slice(None),) * len(chained.batch_shape) + (slice(3, 11),)
    assert torch.equal(chained[rows].argmax(-2), chained.AB[..., 3:11, :].argmax(-2))


def test_max_rejects_batch_dims_and_bad_dims():
    fm = FactoredMatrix(rand(3, 6, 2), rand(3, 2, 5))
    with pytest.raises(ValueError, match="leading .batch. dimension.*AB.max"):
        fm.max(0)
    with pytest.raises(ValueError, match=r"dim must be an int in \[-3, 2\]"):
        fm.argmax(3)


def test_max_float32_and_half_inputs():
    A, B = rand(50, 4, seed=1, dtype=torch.float32), rand(4, 700, seed=2, dtype=torch.float32)
    fm = FactoredMatrix(A, B)
    dense = (A.double() @ B.double()).max(-1)
    values, indices = fm.max(-1)
    assert values.dtype == torch.float32
    assert_close(values.double(), dense.values, **tolerance())
    # Rows whose two largest entries are further apart than float32 rounding get the exact float64 argmax.
    top2 = (A.double() @ B.double()).topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(indices[clear], dense.indices[clear])
    half = FactoredMatrix(A.bfloat16(), B.bfloat16())
    assert half.max(-1).values.dtype == torch.bfloat16


def test_indexing_heads_of_a_batched_full_circuit_materializes_nothing_for_all_heads():
    # `full_ov[l, h]` (and a row slice of it) must stay factored per head: multiplying W_U into B for all
    # heads first would be [heads, d_head, vocab] (1.8 GB at GPT-2 size).
    W_E, W_U = rand(300, 24, seed=1), rand(24, 280, seed=2)
    OV = FactoredMatrix(rand(3, 4, 24, 5, seed=3), rand(3, 4, 5, 24, seed=4))
    full = W_E @ OV @ W_U
    head = full[1, 2]
    assert head._A.shape == (24, 5) and head._B.shape == (5, 24)
    assert head._left.shape == (300, 24) and head._right.shape == (24, 280)
    assert "A" not in full.__dict__ and "B" not in full.__dict__  # nothing cached on the batched matrix
    rows = full[1, 2, 10:20]
    assert rows._left.shape == (10, 24) and rows._right.shape == (24, 280)
    assert_close(rows.AB, (W_E @ OV.AB[1, 2] @ W_U)[10:20])
    assert_close(full[1, 2, 10:20, 7:9].AB, (W_E @ OV.AB[1, 2] @ W_U)[10:20, 7:9])


def test_row_sweeps_reuse_the_materialized_side():
    # A single circuit (no leading dims): slicing rows multiplies W_E into A once ([vocab, k], smaller than
    # W_E) and every later slice gathers rows of it, like TL's factors.
    W_E = rand(400, 32, seed=5)
    QK = FactoredMatrix(rand(32, 4, seed=6), rand(4, 32, seed=7))
    circuit = W_E @ QK @ W_E.T
    first, second = circuit[0:50], circuit[torch.arange(100, 150)]
    assert "A" in circuit.__dict__ and "B" in circuit.__dict__
    assert first._left is None and first._A.shape == (50, 4)
    assert second._left is None and torch.equal(second._A, circuit.A[100:150])
    dense = circuit.AB
    assert_close(first.AB, dense[0:50])
    assert_close(second.AB, dense[100:150])
    assert torch.equal(circuit[torch.arange(100, 150)].argmax(-1), dense[100:150].argmax(-1))


def test_a_second_outer_factor_folds_the_smaller_product():
    # W_E @ QK @ (W_E @ OV).T: the right side gets W_O^T [d, k] then [k, vocab]; folding W_O^T into B keeps
    # every stored factor at most [k, vocab] / [vocab, d] instead of forming a [d, vocab] right factor.
    d, k, vocab = 24, 4, 300
    W_E = rand(vocab, d, seed=1)
    QK = FactoredMatrix(rand(d, k, seed=2), rand(k, d, seed=3))
    OV = FactoredMatrix(rand(d, k, seed=4), rand(k, d, seed=5))
    circuit = W_E @ QK @ (W_E @ OV).T
    assert circuit._right.shape == (k, vocab) and circuit._B.shape == (k, k)
    assert_close(circuit.AB, W_E @ QK.AB @ (W_E @ OV.AB).T)
    # ...and the other way round on the left.
    mirrored = (W_E @ OV) @ (W_E @ QK).T
    assert_close(mirrored.AB, (W_E @ OV.AB) @ (W_E @ QK.AB).T)
    left_chain = rand(7, vocab, seed=6) @ (W_E @ QK)
    assert left_chain._left.shape == (7, d) and left_chain._A.shape == (d, k)  # X @ W_E is the smaller fold
    assert_close(left_chain.AB, rand(7, vocab, seed=6) @ W_E @ QK.AB)
