"""General structured linear maps ``(..., n, k)``: products, permutations, selections, transposes and
non-square block-diagonal / Kronecker maps.

These extend the :class:`~structgp.covariance.root.LinearMap` protocol (``shape``, ``R @ x`` through ``_matmul``,
``R.tmatmul(y) = R^T y``, ``to_dense``), so every structured root is also a map that composes:
``A @ B`` of maps (or of a map and a covariance operator) is a lazy :class:`Product`, ``M.mT`` is the
transpose, itself structured where the structure allows (a permutation's transpose is its inverse, a
block-diagonal map's transpose is block diagonal). Nothing is materialised unless ``to_dense()`` is asked
(guarded by ``settings(dense_limit=...)``).

A Monarch matrix ``M = (P L)(P^T R)`` (``P`` the reshape-transpose permutation, ``L``, ``R`` block diagonal
with ``b`` blocks ``m x m``) is ``Permutation.reshape_transpose(b, m) @ BlockDiagMap(l) @ ... @ BlockDiagMap(r)``
and multiplies ``(n, c)`` in ``2 b m^2 c`` flops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structgp.covariance.kron import kron_dense
from structgp.covariance.map import LinearMap, guard_map_dense
from structgp.covariance.operator import Operator
from structgp.covariance.root import DenseRoot, DiagonalRoot, KroneckerRoot
from structgp.covariance.validation import as_tensor, broadcast_batch, check_ndim, check_same_kind


def as_map(x: Any, name: str = "map") -> LinearMap:
    """A structured map from a map/root, a covariance operator (symmetric) or a dense ``(..., n, k)`` tensor."""
    if isinstance(x, LinearMap):
        return x
    if isinstance(x, Operator):
        return OperatorMap(x)
    if isinstance(x, Tensor):
        return DenseMap(x, name=name)
    raise TypeError(f"{name}: expected a structgp map/root, operator or a torch.Tensor, got {type(x).__name__}")


def compose(*maps: Any) -> Product:
    """``M_1 @ M_2 @ ...`` as a lazy :class:`Product` (nested products are flattened)."""
    return Product(*maps)


def transpose(m: LinearMap) -> LinearMap:
    """``M^T`` ``(..., k, n)``: structured where the map knows its transpose, else a lazy :class:`Transpose`."""
    if isinstance(m, DiagonalRoot):
        return m
    own = getattr(m, "_transpose", None)
    return own() if own is not None else Transpose(m)


def _dense_by_identity(m: LinearMap) -> Tensor:
    """``M`` ``(..., n, k)`` as ``M @ I_k`` (uses the structured product)."""
    guard_map_dense(m, "to_dense()")
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return m._matmul(eye)


class Transpose(LinearMap):
    """``M^T`` ``(..., k, n)`` of a map ``M`` ``(..., n, k)`` that has no structured transpose of its own."""

    _children = ("inner",)

    def __init__(self, inner: LinearMap) -> None:
        super().__init__()
        if not isinstance(inner, LinearMap):
            raise TypeError(f"inner: expected a structgp map/root, got {type(inner).__name__}")
        self.inner = inner

    @property
    def shape(self) -> torch.Size:
        s = self.inner.shape
        return s[:-2] + (s[-1], s[-2])

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _matmul(self, x: Tensor) -> Tensor:
        return self.inner.tmatmul(x)

    def tmatmul(self, y: Tensor) -> Tensor:
        return self.inner._matmul(y)

    def to_dense(self) -> Tensor:
        return self.inner.to_dense().mT

    def _transpose(self) -> LinearMap:
        return self.inner


class DenseMap(DenseRoot):
    """A dense map ``(..., n, k)`` held as its matrix (any shape, not necessarily symmetric), validated."""

    def __init__(self, matrix: Tensor, *, name: str = "matrix") -> None:
        matrix = as_tensor(matrix, name)
        check_ndim(matrix, name, 2, "(..., n, k)")
        super().__init__(matrix)

    def _transpose(self) -> DenseMap:
        return self._replace(matrix=self.matrix.mT)


class OperatorMap(LinearMap):
    """A covariance operator ``A`` ``(..., n, n)`` seen as a (symmetric) map, so it composes in products."""

    _children = ("op",)

    def __init__(self, op: Operator) -> None:
        super().__init__()
        if not isinstance(op, Operator):
            raise TypeError(f"op: expected a structgp operator, got {type(op).__name__}")
        self.op = op

    @property
    def shape(self) -> torch.Size:
        return self.op.shape

    def _matmul(self, x: Tensor) -> Tensor:
        return self.op._matmul(x)

    tmatmul = _matmul

    def to_dense(self) -> Tensor:
        return self.op.to_dense()

    def _transpose(self) -> OperatorMap:
        return self


class Selection(LinearMap):
    """Rows ``index`` of the identity ``I_n``: ``(S x)_i = x_{index_i}``, shape ``(k, n)`` for ``index`` ``(k,)``.

    ``S^T y`` scatters (adds) the rows of ``y`` back to positions ``index``. Integer data, no batch dims;
    ``dtype`` is the floating dtype of ``to_dense()`` (the products keep the dtype of their argument).
    """

    _children = ("index",)
    _static = ("size", "float_dtype")

    def __init__(self, index: Tensor, n: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.index = _check_index(index, n, "index")
        self.size = n
        self.float_dtype = dtype or torch.get_default_dtype()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.index.shape[0], self.size))

    @property
    def dtype(self) -> torch.dtype:
        return self.float_dtype

    @property
    def device(self) -> torch.device:
        return self.index.device

    def _matmul(self, x: Tensor) -> Tensor:
        return x.index_select(-2, self.index)

    def tmatmul(self, y: Tensor) -> Tensor:
        out = y.new_zeros(*y.shape[:-2], self.size, y.shape[-1])
        return out.index_add(-2, self.index, y)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        return torch.eye(self.size, dtype=self.float_dtype, device=self.device).index_select(0, self.index)


class Permutation(Selection):
    """The permutation matrix ``P`` ``(n, n)`` with ``(P x)_i = x_{perm_i}``; ``P^T = P^{-1}`` gathers with the
    inverse permutation (held alongside, so both directions are a gather)."""

    _children = ("index", "inverse")

    def __init__(self, perm: Tensor, *, dtype: torch.dtype | None = None) -> None:
        n = perm.shape[-1] if isinstance(perm, Tensor) and perm.dim() == 1 else -1
        super().__init__(perm, max(n, 0), dtype=dtype)
        counts = torch.bincount(self.index, minlength=self.size)
        if bool((counts != 1).any()):
            raise ValueError(f"perm: expected a permutation of 0..{self.size - 1} (each index exactly once)")
        self.inverse = torch.argsort(self.index)

    @classmethod
    def reshape_transpose(
        cls, rows: int, cols: int, *, dtype: torch.dtype | None = None, device: Any = None
    ) -> Permutation:
        """The permutation that reads ``x`` ``(rows * cols,)`` as a ``(rows, cols)`` matrix and returns its
        transpose flattened: ``(P x)[j * rows + i] = x[i * cols + j]`` (the stride permutation of Monarch
        and FFT-like factorisations)."""
        grid = torch.arange(rows * cols, device=device).view(rows, cols)
        return cls(grid.mT.reshape(-1), dtype=dtype)

    def tmatmul(self, y: Tensor) -> Tensor:
        return y.index_select(-2, self.inverse)

    def _transpose(self) -> Permutation:
        return self._replace(index=self.inverse, inverse=self.index)


class BlockDiagMap(LinearMap):
    """``diag(B_1, ..., B_b)`` ``(..., b m, b k)`` from uniform blocks ``(..., b, m, k)`` (non-square and
    non-symmetric allowed): ``x`` ``(..., b k, c)`` is viewed as ``(..., b, k, c)`` and multiplied block by
    block in one batched product (``b m k c`` flops)."""

    _children = ("blocks",)

    def __init__(self, blocks: Tensor) -> None:
        super().__init__()
        blocks = as_tensor(blocks, "blocks")
        check_ndim(blocks, "blocks", 3, "(..., b, m, k)")
        self.blocks = blocks

    @property
    def shape(self) -> torch.Size:
        b, m, k = self.blocks.shape[-3:]
        return self.blocks.shape[:-3] + (b * m, b * k)

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[-3]

    def _matmul(self, x: Tensor) -> Tensor:
        b, _, k = self.blocks.shape[-3:]
        return (self.blocks @ x.unflatten(-2, (b, k))).flatten(-3, -2)

    def tmatmul(self, y: Tensor) -> Tensor:
        b, m, _ = self.blocks.shape[-3:]
        return (self.blocks.mT @ y.unflatten(-2, (b, m))).flatten(-3, -2)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        b, m, k = self.blocks.shape[-3:]
        eye = torch.eye(b, dtype=self.blocks.dtype, device=self.blocks.device)
        # out[..., i, r, j, s] = delta_ij B_i[r, s]
        out = self.blocks.unsqueeze(-2) * eye.view(b, 1, b, 1)
        return out.reshape(*self.blocks.shape[:-3], b * m, b * k)

    def _transpose(self) -> BlockDiagMap:
        return self._replace(blocks=self.blocks.mT)


class KroneckerMap(KroneckerRoot):
    """``A_1 (x) A_2 (x) ...`` ``(..., prod n_i, prod k_i)`` from factors ``(..., n_i, k_i)`` of any shape."""

    def __init__(self, *factors: Tensor) -> None:
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        if not factors:
            raise ValueError("factors: expected at least one factor")
        mats = [as_tensor(f, f"factors[{i}]") for i, f in enumerate(factors)]
        for i, f in enumerate(mats):
            check_ndim(f, f"factors[{i}]", 2, "(..., n_i, k_i)")
        names = tuple(f"factors[{i}]" for i in range(len(mats)))
        broadcast_batch(*(f.shape[:-2] for f in mats), names=names)
        check_same_kind(dict(zip(names, mats)))
        super().__init__(mats)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        return kron_dense(self.factors)

    def _transpose(self) -> KroneckerMap:
        return self._replace(factors=[f.mT for f in self.factors])


class SparseMap(LinearMap):
    """A sparse map ``L`` ``(n, k)`` (unbatched), held as a :class:`~structgp.covariance.sparse_lifted.Lift`
    (canonical CSR with its transpose), differentiable in its values; ``L x`` and ``L^T y`` never densify."""

    _children = ("lift",)
    _static = ("transposed",)

    def __init__(self, lift: Any, *, transposed: bool = False) -> None:
        super().__init__()
        from structgp.covariance.sparse_lifted import Lift

        self.lift = lift if isinstance(lift, Lift) else Lift.from_tensor(lift, "lift")
        self.transposed = bool(transposed)

    @property
    def shape(self) -> torch.Size:
        n, k = self.lift.shape
        return torch.Size((k, n) if self.transposed else (n, k))

    @property
    def dtype(self) -> torch.dtype:
        return self.lift.dtype

    @property
    def device(self) -> torch.device:
        return self.lift.device

    def _matmul(self, x: Tensor) -> Tensor:
        return self.lift.tmatmul(x) if self.transposed else self.lift.matmul(x)

    def tmatmul(self, y: Tensor) -> Tensor:
        return self.lift.matmul(y) if self.transposed else self.lift.tmatmul(y)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        dense = self.lift.to_dense()
        return dense.mT if self.transposed else dense

    def _transpose(self) -> SparseMap:
        return self._replace(transposed=not self.transposed)


class Product(LinearMap):
    """``M_1 M_2 ... M_p`` ``(..., n_1, k_p)``, applied right to left; never formed.

    factors: maps/roots, covariance operators or dense tensors (inner sizes must agree; batch dims broadcast).
    ``Product.mT`` is the product of the transposes in reverse order.
    """

    _children = ("factors",)

    def __init__(self, *factors: Any) -> None:
        super().__init__()
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        if len(factors) < 1:
            raise ValueError("factors: expected at least one map")
        flat: list[LinearMap] = []
        for i, f in enumerate(factors):
            m = as_map(f, f"factors[{i}]")
            flat.extend(m.factors if isinstance(m, Product) else [m])
        for i in range(1, len(flat)):
            if flat[i - 1].shape[-1] != flat[i].shape[-2]:
                raise ValueError(
                    f"factors: cannot multiply {flat[i - 1]!r} by {flat[i]!r} "
                    f"(inner sizes {flat[i - 1].shape[-1]} and {flat[i].shape[-2]} differ)"
                )
        broadcast_batch(*(f.batch_shape for f in flat), names=tuple(repr(f) for f in flat))
        floats = [f for f in flat if _has_float(f)]
        if len(floats) > 1:
            check_same_kind({f"factors[{i}]": f._first_float() for i, f in enumerate(floats)})
        self.factors = flat

    @property
    def shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(*(f.batch_shape for f in self.factors))
        return batch + (self.factors[0].shape[-2], self.factors[-1].shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        for f in self.factors:
            if _has_float(f):
                return f.dtype
        return self.factors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    def _matmul(self, x: Tensor) -> Tensor:
        for f in reversed(self.factors):
            x = f._matmul(x)
        return x

    def tmatmul(self, y: Tensor) -> Tensor:
        for f in self.factors:
            y = f.tmatmul(y)
        return y

    def to_dense(self) -> Tensor:
        return _dense_by_identity(self)

    def _transpose(self) -> Product:
        return self._replace(factors=[transpose(f) for f in reversed(self.factors)])

    def __repr__(self) -> str:
        return "Product(" + " @ ".join(repr(f) for f in self.factors) + ")"


def _has_float(m: LinearMap) -> bool:
    return any(t.is_floating_point() for t in m._tensors())


def _check_index(index: Any, n: int, name: str) -> Tensor:
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        got = type(index).__name__
        if isinstance(index, Tensor):
            got = f"{index.dtype} tensor of shape {tuple(index.shape)}"
        raise TypeError(f"{name}: expected a 1-D int64 tensor, got {got}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    index = index.to(torch.int64)
    if index.numel() and bool(((index < 0) | (index >= n)).any()):
        raise IndexError(f"{name}: entries must lie in [0, {n}), got range [{int(index.min())}, {int(index.max())}]")
    return index
