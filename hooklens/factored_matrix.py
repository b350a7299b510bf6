"""FactoredMatrix: a low-rank matrix `A @ B` (A: [..., m, k], B: [..., k, n], k small) that is never formed.

TransformerLens's surface (`A, B, AB, BA, T, svd(), U, S, V, eigenvalues, norm(), get_corner, collapse_l/r,
make_even, unsqueeze, pair, __getitem__, @, *`), with the heavy routines in `hooklens.ops.lowrank` (compiled
in `hooklens._C`, PyTorch reference beside it).

Multiplying by a plain matrix on the outside (`W_E @ model.OV @ W_U`) is *deferred*: the outer factors are kept
apart (`left @ A @ B @ right`) and only combined when something needs them. Eigenvalues then come from the small
`B @ (right @ left) @ A`, never from the [50257 × k] products TransformerLens forms. Slicing rows or columns
(`fm[i:i+1000].AB`) multiplies an outer factor into its side once, when that product is no larger than the
factor (a [50257 × 64] A rather than W_E), and never for all heads of a batched matrix: `full_ov[l, h]` and
`full_ov[l, h, rows]` only touch that head.

Differences from TransformerLens 3.9, on purpose:
* none in the SVD: `svd()` returns `(U, S, V)` with `U @ S.diag() @ V.transpose(-2, -1) == AB`, V `[..., n, k]`,
  as TL 3.9 does; `.Vh` is TL's deprecated alias of `.V` (it always returned V) and warns as TL's does.
* `trace()`, `max(dim)` and `argmax(dim)` exist (TL has none); the last two reduce rows or columns of
  `AB` without forming it.
* `eigenvalues` come from hooklens's own small eigensolver, sorted by descending magnitude (ties: descending
  imaginary part); LAPACK's order, which TL returns, depends on the Hessenberg deflation and is not reproducible
  without calling LAPACK on every head. The values are the same.

* an integer row or column index outside the matrix (`fm[5]` on 3 rows, `fm[:, -9]`) raises `IndexError` naming
  the size, where TL returns an empty matrix (slices keep Python's rules and may be empty, as in TL); NumPy
  integers and 0-d integer tensors index like Python ints (TL fails on them).

Bad input that TL rejects with an `assert` (inner dimensions that do not match, a non-scalar tensor after `*`,
`BA` / `eigenvalues` of a non-square matrix) raises `InvalidInputError`, which is both a `ValueError` and the
`AssertionError` TL users catch; so do factors that are not (batches of) matrices (0-D or 1-D), where TL fails
with an `IndexError` from a shape lookup. Leading dimensions that do not broadcast raise `RuntimeError`, as in TL.
"""
from __future__ import annotations

import operator
import warnings
from functools import cached_property
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor

from hooklens.errors import InvalidInputError
from hooklens.utils import get_corner

Index = Union[int, slice, Tuple[Any, ...], None]


def _t(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _chain(*mats: Optional[Tensor]) -> Tensor:
    """Product of a chain of matrices (None entries skipped), in the cheapest association (matrix-chain DP,
    counting broadcast leading dims: a shared [50257, 768] factor times 144 heads costs 144 times)."""
    mats = [m for m in mats if m is not None]
    n = len(mats)
    rows = [m.shape[-2] for m in mats] + [mats[-1].shape[-1]]
    batch = [max(1, m.shape[:-2].numel()) for m in mats]
    cost = {(i, i): 0 for i in range(n)}
    split = {}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            b = max(batch[i : j + 1])
            cost[i, j], split[i, j] = min(
                (cost[i, k] + cost[k + 1, j] + b * rows[i] * rows[k + 1] * rows[j + 1], k) for k in range(i, j)
            )

    def multiply(i: int, j: int) -> Tensor:
        if i == j:
            return mats[i]
        k = split[i, j]
        return multiply(i, k) @ multiply(k + 1, j)

    return multiply(0, n - 1)


class FactoredMatrix:
    """The matrix `left @ A @ B @ right` (outer factors optional), stored factored; shape `[..., ldim, rdim]`."""

    def __init__(self, A: Tensor, B: Tensor, *, left: Optional[Tensor] = None, right: Optional[Tensor] = None):
        _check_factor_dims(A=A, B=B, left=left, right=right)
        if A.shape[-1] != B.shape[-2]:
            raise InvalidInputError(
                f"Factored matrix must match on inner dimension, shapes were a: {A.shape}, b:{B.shape}. "
                f"A is [..., ldim, mdim] and B [..., mdim, rdim]: A's last dimension must equal B's second-to-last "
                f"(transpose a factor with .transpose(-2, -1) if it is the wrong way round)."
            )
        if left is not None and left.shape[-1] != A.shape[-2]:
            raise InvalidInputError(f"Left factor {tuple(left.shape)} does not fit A {tuple(A.shape)}: its last "
                                    f"dimension must equal A's second-to-last.")
        if right is not None and right.shape[-2] != B.shape[-1]:
            raise InvalidInputError(f"Right factor {tuple(right.shape)} does not fit B {tuple(B.shape)}: its "
                                    f"second-to-last dimension must equal B's last.")
        self._A, self._B, self._left, self._right = A, B, left, right
        self.ldim = left.shape[-2] if left is not None else A.shape[-2]
        self.rdim = right.shape[-1] if right is not None else B.shape[-1]
        self.mdim = B.shape[-2]
        leading = [t.shape[:-2] for t in (A, B, left, right) if t is not None]
        try:
            self.batch_shape = torch.broadcast_shapes(*leading)
        except RuntimeError as err:
            raise RuntimeError(
                f"Shape mismatch: Cannot broadcast leading dimensions. A has shape {A.shape}, B has shape {B.shape}"
                + (f" (outer factors: left {_shape(left)}, right {_shape(right)})" if left is not None
                   or right is not None else "")
                + f". Leading (batch) dimensions {[tuple(t) for t in leading]} must be equal or 1, as in "
                f"torch.broadcast_shapes; index or unsqueeze one operand so they line up. {err}"
            ) from err
        self.shape = torch.Size(self.batch_shape + (self.ldim, self.rdim))
        self.has_leading_dims = len(self.batch_shape) > 0

    # -- the factors --------------------------------------------------------------------------------------------
    @cached_property
    def A(self) -> Tensor:
        """Left factor `[..., ldim, mdim]` (outer left factor multiplied in)."""
        A = self._A if self._left is None else self._left @ self._A
        return A.broadcast_to(self.batch_shape + A.shape[-2:])

    @cached_property
    def B(self) -> Tensor:
        """Right factor `[..., mdim, rdim]` (outer right factor multiplied in)."""
        B = self._B if self._right is None else self._B @ self._right
        return B.broadcast_to(self.batch_shape + B.shape[-2:])

    @property
    def pair(self) -> Tuple[Tensor, Tensor]:
        return self.A, self.B

    @property
    def AB(self) -> Tensor:
        """The dense matrix `[..., ldim, rdim]`."""
        return _chain(self._left, self._A, self._B, self._right).broadcast_to(self.shape)

    @property
    def BA(self) -> Tensor:
        """The small square `[..., mdim, mdim]` matrix `B @ A` (needs ldim == rdim)."""
        if self.ldim != self.rdim:
            raise InvalidInputError(
                f"Can only take ba if ldim==rdim, shapes were self: {self.shape}. BA (and eigenvalues, computed "
                f"from it) needs a square matrix; for a rectangular one use svd() (singular values) instead."
            )
        outer = _chain(self._right, self._left) if (self._left is not None or self._right is not None) else None
        BA = _chain(self._B, outer, self._A)
        return BA.broadcast_to(self.batch_shape + (self.mdim, self.mdim))

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(
            _t(self._B), _t(self._A),
            left=None if self._right is None else _t(self._right),
            right=None if self._left is None else _t(self._left),
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    # -- products -----------------------------------------------------------------------------------------------
    def __matmul__(self, other: Union[Tensor, "FactoredMatrix"]) -> Union["FactoredMatrix", Tensor]:
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:  # matrix @ vector
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise InvalidInputError(
                f"Right matrix must match on inner dimension, shapes were self: {self.shape}, other:{other.shape}. "
                f"In `fm @ other`, other is [..., rdim={self.rdim}, n] (a vector: [rdim]); if it is [..., n, rdim], "
                f"multiply by other.transpose(-2, -1)."
            )
        if self.rdim < self.mdim:
            # As TL: the product's inner dim shrinks to rdim, so its S, U, V have TL's shapes. (At rdim == mdim TL
            # forms AB too, but the inner dim is the same, so the outer factor stays deferred and shared by heads.)
            return FactoredMatrix(self.AB, other)
        if self._right is None:
            return FactoredMatrix(self._A, self._B, left=self._left, right=other)
        # Two outer factors on the right: fold the smaller product. B @ right is [.., mdim, n_old] (64 x 64 for
        # `... @ W_O.T @ X`); right @ other can be [d_model, vocab].
        if _numel(self._B, self._right) <= _numel(self._right, other):
            return FactoredMatrix(self._A, self._B @ self._right, left=self._left, right=other)
        return FactoredMatrix(self._A, self._B, left=self._left, right=self._right @ other)

    def __rmatmul__(self, other: Tensor) -> Union["FactoredMatrix", Tensor]:
        # As TL, the inner dimension is checked for vectors too.
        if other.shape[-1] != self.ldim:
            raise InvalidInputError(
                f"Left matrix must match on inner dimension, shapes were self: {self.shape}, other:{other.shape}. "
                f"In `other @ fm`, other is [..., n, ldim={self.ldim}] (a vector: [ldim]); if it is [..., ldim, n], "
                f"multiply by other.transpose(-2, -1)."
            )
        if other.ndim < 2:  # vector @ matrix
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim < self.mdim:  # as TL (see __matmul__)
            return FactoredMatrix(other, self.AB)
        if self._left is None:
            return FactoredMatrix(self._A, self._B, left=other, right=self._right)
        if _numel(self._left, self._A) <= _numel(other, self._left):
            return FactoredMatrix(self._left @ self._A, self._B, left=other, right=self._right)
        return FactoredMatrix(self._A, self._B, left=other @ self._left, right=self._right)

    def __mul__(self, scalar: Union[int, float, Tensor]) -> "FactoredMatrix":
        """`fm * scalar` (and `scalar * fm`): scales the A factor. A one-element tensor of any number of
        dimensions is a scalar and broadcasts as torch does (a [1, 1, 1] tensor adds a leading dimension), as in TL."""
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise InvalidInputError(
                f"Tensor must be a scalar for use with * but was of shape {scalar.shape}. For matrix "
                f"multiplication, use @ instead. To scale rows or heads, scale a factor: "
                f"FactoredMatrix(fm.A * x[..., :, None], fm.B) scales row i by x[..., i]."
            )
        return FactoredMatrix(self._A * scalar, self._B, left=self._left, right=self._right)

    __rmul__ = __mul__

    # -- spectra ------------------------------------------------------------------------------------------------
    @property
    def eigenvalues(self) -> Tensor:
        """The mdim eigenvalues of the (square) matrix that can be nonzero: those of `B @ A`. Complex `[..., mdim]`."""
        BA = self.BA
        if BA.dtype in (torch.float16, torch.bfloat16):
            BA = BA.float()
        return _lowrank().small_eigvals(BA)

    @cached_property
    def _svd(self) -> Tuple[Tensor, Tensor, Tensor]:
        """`(U, S, V)`, computed once per instance (freed with it), so every call returns the same tensors."""
        A, B = self.A, self.B
        if A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        U, S, Vh = _lowrank().svd(A.contiguous(), B.contiguous())
        return U, S, _t(Vh)

    def svd(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Thin SVD `(U [..., ldim, r], S [..., r], V [..., rdim, r])`, r = min(ldim, mdim, rdim), with
        `U @ S.diag() @ V.transpose(-2, -1) == AB` (TransformerLens's convention and shapes). Cached: a second
        call returns the same tensor objects."""
        return self._svd

    @property
    def U(self) -> Tensor:
        return self._svd[0]

    @property
    def S(self) -> Tensor:
        return self._svd[1]

    @property
    def Vh(self) -> Tensor:
        """Deprecated alias of `.V`, `[..., rdim, mdim]`: TransformerLens's `.Vh` always returned V, so code written
        for it keeps working; warns as TL 3.9 does. The transpose proper is `.V.transpose(-2, -1)`."""
        warnings.warn(
            "FactoredMatrix.Vh returns V (right singular vectors, [..., rdim, mdim]) as TransformerLens's always did; "
            "use .V, or .V.transpose(-2, -1) for the conjugate transpose.", DeprecationWarning, stacklevel=2,
        )
        return self.V

    @property
    def V(self) -> Tensor:
        """Right singular vectors as columns, `[..., rdim, mdim]` (same as TransformerLens's `.V`)."""
        return self._svd[2]

    def _gram_left(self) -> Tensor:
        """`A^T A` with the outer left factor folded in: `[..., mdim, mdim]`."""
        if self._left is None:
            return _t(self._A) @ self._A
        return _t(self._A) @ (_t(self._left) @ self._left) @ self._A

    def _gram_right(self) -> Tensor:
        """`B B^T` with the outer right factor folded in: `[..., mdim, mdim]`."""
        if self._right is None:
            return self._B @ _t(self._B)
        return self._B @ (self._right @ _t(self._right)) @ _t(self._B)

    def norm(self) -> Tensor:
        """Frobenius norm `[...]`, from the two mdim × mdim Gram matrices (the product is never formed)."""
        if self._left is None and self._right is None:
            return _lowrank().fro_norm(self.A.contiguous(), self.B.contiguous())
        squared = (self._gram_left() * self._gram_right()).sum((-2, -1))
        return squared.clamp(min=0).sqrt().broadcast_to(self.batch_shape)

    def trace(self) -> Tensor:
        """Trace `[...]` of the (square) matrix, as the trace of the small `B @ A`."""
        return self.BA.diagonal(dim1=-2, dim2=-1).sum(-1)

    # -- reductions ---------------------------------------------------------------------------------------------
    def max(self, dim: int = -1):
        """`torch.max(self.AB, dim)` as `(values, indices)`, without forming `AB`: `dim=-1` reduces each row,
        `dim=-2` each column. A [50257 x 50257] full circuit (10 GB dense) is reduced tile by tile in cache,
        e.g. top-1 accuracy of a circuit is `(fm.argmax(-1) == torch.arange(fm.ldim)).float().mean()`."""
        lowrank = _lowrank()
        reduce_rows = self._reduction_dim(dim, "max")
        A, B = (self.A, self.B) if reduce_rows else (_t(self.B), _t(self.A))
        if A.dtype in (torch.float16, torch.bfloat16):
            values, indices = lowrank.row_max(A.float(), B.float())
            return lowrank.RowMax(values.to(A.dtype), indices)
        return lowrank.row_max(A, B)

    def argmax(self, dim: int = -1) -> Tensor:
        """`self.AB.argmax(dim)` (first index of the maximum) without forming `AB`; see `max`."""
        return self.max(dim).indices

    def _reduction_dim(self, dim: int, name: str) -> bool:
        if isinstance(dim, bool) or not isinstance(dim, int) or not -self.ndim <= dim < self.ndim:
            raise ValueError(f"{name}: dim must be an int in [{-self.ndim}, {self.ndim - 1}] for a FactoredMatrix "
                             f"of shape {tuple(self.shape)}, got {dim!r}")
        dim = dim % self.ndim
        if dim < self.ndim - 2:
            raise ValueError(f"{name}(dim={dim}) reduces a leading (batch) dimension of a FactoredMatrix of shape "
                             f"{tuple(self.shape)}; only the last two (-1: within each row, -2: within each column) "
                             f"are supported. Use .AB.{name}(dim) for the dense matrix.")
        return dim == self.ndim - 1

    # -- reshaping ----------------------------------------------------------------------------------------------
    def get_corner(self, k: int = 3) -> Tensor:
        A = self._A if self._left is None else self._left[..., :k, :] @ self._A
        B = self._B if self._right is None else self._B @ self._right[..., :, :k]
        return _corner(A[..., :k, :] @ B[..., :, :k], k)

    def collapse_l(self) -> Tensor:
        """`S Vh`: the factorization without its orthogonal left factor, `[..., mdim, rdim]`."""
        return self.S[..., :, None] * _t(self._svd[2])

    def collapse_r(self) -> Tensor:
        """`U S`: the factorization without its orthogonal right factor, `[..., ldim, mdim]`."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as `(U √S) @ (√S Vh)`: both halves carry half the spectrum."""
        sqrt_S = self.S.sqrt()
        return FactoredMatrix(self.U * sqrt_S[..., None, :], sqrt_S[..., :, None] * _t(self._svd[2]))

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        if k < 0:
            k = k + self.ndim + 1
        if k > len(self.batch_shape):
            raise InvalidInputError(f"unsqueeze({k}) must add a leading dimension (ndim is {self.ndim}): use k in "
                                    f"[0, {len(self.batch_shape)}] or [{-self.ndim - 1}, -3].")
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def to(self, *args: Any, **kwargs: Any) -> "FactoredMatrix":
        def move(t):
            return None if t is None else t.to(*args, **kwargs)

        return FactoredMatrix(move(self._A), move(self._B), left=move(self._left), right=move(self._right))

    def __getitem__(self, idx: Index) -> "FactoredMatrix":
        """Index leading dims, then rows, then columns (TL semantics: integer rows/columns keep their dim)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_batch = len(self.batch_shape)
        used = len([i for i in idx if i is not None])
        if used > self.ndim:
            raise ValueError(f"{idx} is too long an index for a FactoredMatrix with shape {tuple(self.shape)}")
        batch_idx, row, col = idx[:n_batch], slice(None), slice(None)
        if used == n_batch + 1:
            row = _keep_dim(idx[-1], self.ldim, "row")
        elif used == n_batch + 2:
            row, col = _keep_dim(idx[-2], self.ldim, "row"), _keep_dim(idx[-1], self.rdim, "column")
        if any(not _is_full(i) for i in batch_idx):
            # Leading dims first, on views: `full_ov[l, h]` must not materialize anything for all heads.
            def pick(t):
                return None if t is None else t[batch_idx]

            left, A, B, right = (pick(t) for t in self._broadcast_factors())
            picked = FactoredMatrix(A, B, left=left, right=right)
            return picked._slice(row, col, materialize=False)
        return self._slice(row, col, materialize=True)

    def _slice(self, row: Any, col: Any, materialize: bool) -> "FactoredMatrix":
        """Rows and columns of this matrix (no leading-dim index). With `materialize`, an outer factor is first
        multiplied into its side once (`self.A` / `self.B` are cached) when the product is no larger than the outer
        factor itself, as TL's factors are: a sweep over row chunks of `W_E @ QK @ W_E.T` then gathers rows of the
        [ldim, mdim] A instead of multiplying a fresh [rows, d_model] slice of W_E each time. Not done for a
        transient matrix (a leading-dim index was applied), whose cache would not outlive the call."""
        if _is_full(row) and _is_full(col):
            return self
        left, A, B, right = self._left, self._A, self._B, self._right
        batch = max(1, self.batch_shape.numel())
        if materialize and right is not None and batch * self.mdim * self.rdim <= right.numel():
            B, right = self.B, None
        if materialize and left is not None and batch * self.ldim * self.mdim <= left.numel():
            A, left = self.A, None
        if not _is_full(row):
            if left is not None:
                left = left[..., row, :]
            else:
                A = A[..., row, :]
        if not _is_full(col):
            if right is not None:
                right = right[..., :, col]
            else:
                B = B[..., :, col]
        return FactoredMatrix(A, B, left=left, right=right)

    def _broadcast_factors(self) -> List[Optional[Tensor]]:
        """Factors expanded to the full leading shape, so leading-dim indices apply to each of them."""
        def expand(t):
            return None if t is None else t.broadcast_to(self.batch_shape + t.shape[-2:])

        return [expand(self._left), expand(self._A), expand(self._B), expand(self._right)]


def _shape(t: Optional[Tensor]) -> Optional[torch.Size]:
    return None if t is None else t.shape


def _numel(a: Tensor, b: Tensor) -> int:
    """Number of elements of `a @ b` (with broadcast leading dims)."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]).numel()
    return max(1, batch) * a.shape[-2] * b.shape[-1]


def _is_full(index: Any) -> bool:
    return isinstance(index, slice) and index == slice(None)


def _keep_dim(index: Any, size: int, what: str) -> Any:
    """TL turns an integer row/column index into a length-1 slice (-1 -> slice(-1, None)). An integer outside
    [-size, size) raises IndexError: as a slice it would silently select nothing (TL returns an empty matrix)."""
    if not _is_integer(index):
        return index  # slices, lists, index tensors: torch's indexing rules (and errors) apply
    index = operator.index(index)
    if not -size <= index < size:
        raise IndexError(f"{what} index {index} is out of range for a FactoredMatrix with {size} {what}s: use an "
                         f"index in [{-size}, {size - 1}] (or a slice, which may be empty)")
    return slice(index, index + 1 if index != -1 else None)


def _is_integer(index: Any) -> bool:
    """A Python or NumPy integer, or a 0-d integer tensor: one row or column. (TL handles only Python ints; the
    others dropped the dimension there and failed further on.)"""
    if isinstance(index, Tensor):
        return index.ndim == 0 and index.dtype in _INT_DTYPES
    return hasattr(index, "__index__")


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_factor_dims(**factors: Optional[Tensor]) -> None:
    """Each factor must be a (batch of) matrices: A [..., ldim, mdim], B [..., mdim, rdim], left [..., l, ldim],
    right [..., rdim, r]. Checked first, so a vector gets this message rather than an IndexError from a shape."""
    for name, factor in factors.items():
        if factor is None:
            continue
        ndim = len(factor.shape)
        if ndim < 2:
            raise InvalidInputError(
                f"FactoredMatrix factors must be at least 2-D (A [..., ldim, mdim], B [..., mdim, rdim]), but {name} "
                f"has shape {tuple(factor.shape)} ({ndim}-D). Make a vector a matrix with .unsqueeze(-1) (a column, "
                f"[n, 1]) or .unsqueeze(0) (a row, [1, n]); a scalar with .reshape(1, 1)."
            )


def _corner(tensor: Tensor, k: int) -> Tensor:
    return get_corner(tensor, k)


def _lowrank():
    """`hooklens.ops.lowrank`, imported on first use (lazy: importing it loads torch._dynamo, about a second,
    which `import hooklens` should not pay for)."""
    from hooklens.ops import lowrank

    return lowrank
