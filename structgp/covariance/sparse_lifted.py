"""SparseLifted: ``L B L^T``, a latent covariance ``B`` lifted to many outputs by a sparse matrix ``L``.

``L`` (``n_out x n_in``, e.g. interpolation weights from data points to a grid, or a design matrix) is
held once in canonical CSR form (:class:`Lift`); ``B`` (``n_in x n_in``) is any operator (Dense,
Kronecker, ...). Nothing ``n_out x n_out`` or dense ``n_out x n_in`` is formed by products or the
diagonal; ``solve``/``logdet`` go to the latent-space Woodbury engine
(:mod:`structgp.inference.lifted_woodbury`) when diagonal noise is added.

Sparse products go through a custom autograd function: the forward is torch's CSR @ dense product and
the backward is written out (``L^T g`` for the dense input; the sampled product ``sum_c g[i, c] x[j, c]``
over the stored entries ``(i, j)`` for the values), because torch's own CSR backward is orders of
magnitude slower and returns wrong gradients for CSR tensors whose columns are not sorted. Under
``torch.distributed`` each rank applies only its rows of ``L`` (:mod:`.lift_products`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from structgp.covariance import lift_products
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.pytree_node import PyTreeNode
from structgp.covariance.validation import check_dense_size, check_finite, value_checks_enabled

DENSE_LIFT_LIMIT = 2**26  # entries of a dense ``lift`` tensor above which a sparse one is required
_FLOATS = (torch.float32, torch.float64)


class Lift(PyTreeNode):
    """The sparse lift ``L`` ``(n_out, n_in)`` in canonical CSR form (rows ascending, columns sorted and
    unique within a row), with the permutation that gives ``L^T`` in CSR form.

    Tensors: ``crow`` ``(n_out + 1,)``, ``col``/``row`` ``(nnz,)`` (int64), ``values`` ``(nnz,)`` (the
    differentiable data), ``t_crow`` ``(n_in + 1,)``, ``t_col`` ``(nnz,)``, ``t_perm`` ``(nnz,)`` with
    ``L^T = CSR(t_crow, t_col, values[t_perm])``. ``n_pairs`` is ``sum_r nnz_r^2``, the number of
    within-row pairs of entries that the diagonal and ``L^T D^{-1} L`` visit.

    ``kind`` says what the lift really is, found once from its pattern and values when it is built, so
    that the planner can answer ``L B L^T`` by the base's own structure (see :data:`KINDS`).
    """

    _children = ("crow", "col", "row", "values", "t_crow", "t_col", "t_perm")
    _static = ("n_out", "n_in", "n_pairs", "kind")

    CHUNK = 2**21  # elements of the row-block / sampled-product temporaries processed at a time

    @classmethod
    def from_tensor(
        cls, lift: Tensor, name: str = "lift", *, like: tuple[int, torch.dtype, Any, str] | None = None
    ) -> Lift:
        """Canonicalise a dense, sparse COO or sparse CSR ``(n_out, n_in)`` tensor, validated (and checked
        against ``like = (n_in, dtype, device, what they belong to)`` before any work on its entries)."""
        _check_layout(lift, name)
        if like is not None:
            check_lift_matches(lift, name, *like)
        row, col, values, shape = _triplets(lift, name)
        check_finite(values, name)
        return cls._from_triplets(row, col, values, shape)

    @classmethod
    def _from_triplets(
        cls, row: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int], kind: str | None = None
    ) -> Lift:
        """The lift of entries ``(row, col, values)`` ``(nnz,)`` in row-major order, unique; ``kind`` found
        from them unless given."""
        n_out, n_in = shape
        crow = torch.zeros(n_out + 1, dtype=torch.int64, device=row.device)
        crow[1:] = torch.bincount(row, minlength=n_out).cumsum(0)
        t_perm = torch.argsort(col * n_out + row)
        t_crow = torch.zeros(n_in + 1, dtype=torch.int64, device=row.device)
        t_crow[1:] = torch.bincount(col, minlength=n_in).cumsum(0)
        counts = crow.diff()
        n_pairs = int(counts.square().sum())
        kind = _kind(counts, col, values, t_crow, shape) if kind is None else kind
        return cls._from_children([crow, col, row, values, t_crow, row[t_perm], t_perm], (n_out, n_in, n_pairs, kind))

    def rows(self, start: int, stop: int) -> tuple[Lift, int, int]:
        """Rows ``start:stop`` of ``L``: their pattern as a lift ``(stop - start, n_in)`` and the range ``a:b`` of
        their entries among this lift's (pass ``values[a:b]`` to its products: its own values are zeros,
        placeholders). Built once per range (the pattern never changes) and kept on this lift."""
        key = ("rows", start, stop)
        if key not in self._cache:
            a, b = int(self.crow[start]), int(self.crow[stop])
            placeholder = torch.zeros(b - a, dtype=self.dtype, device=self.device)
            view = Lift._from_triplets(
                self.row[a:b] - start, self.col[a:b], placeholder, (stop - start, self.n_in), "general"
            )
            view._cache["rows of"] = (start, stop)  # already one rank's part: applied whole (lift_products)
            self._cache[key] = (view, a, b)
        return self._cache[key]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_out, self.n_in))

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def matmul(self, x: Tensor, values: Tensor | None = None) -> Tensor:
        """``L x`` for ``x`` ``(..., n_in, c)`` -> ``(..., n_out, c)``; ``values`` overrides (e.g. casts)
        the stored values."""
        return self._product(x, values, transpose=False)

    def tmatmul(self, y: Tensor, values: Tensor | None = None) -> Tensor:
        """``L^T y`` for ``y`` ``(..., n_out, c)`` -> ``(..., n_in, c)``."""
        return self._product(y, values, transpose=True)

    def _product(self, x: Tensor, values: Tensor | None, transpose: bool) -> Tensor:
        values = self.values.to(x.dtype) if values is None else values
        n_rows = self.n_in if transpose else self.n_out
        batch, c = x.shape[:-2], x.shape[-1]
        flat = x.movedim(-2, 0).reshape(x.shape[-2], -1)  # batch folded into columns: L is unbatched
        out = _LiftProduct.apply(values, flat, self, transpose)
        return out.reshape(n_rows, *batch, c).movedim(0, -2)

    def to_dense(self) -> Tensor:
        """The dense ``(n_out, n_in)`` matrix (small sizes only)."""
        out = self.values.new_zeros(self.n_out * self.n_in)
        return out.index_add(0, self.row * self.n_in + self.col, self.values).view(self.n_out, self.n_in)

    def csr(self, values: Tensor | None = None, transpose: bool = False) -> Tensor:
        """``L`` (``transpose=False``, ``(n_out, n_in)``) or ``L^T`` (``(n_in, n_out)``) as a torch sparse CSR
        tensor with the stored ``values`` or the given ones ``(nnz,)`` (in the order of ``L``'s entries)."""
        values = self.values if values is None else values
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            if transpose:
                return torch.sparse_csr_tensor(
                    self.t_crow, self.t_col, values[self.t_perm], (self.n_in, self.n_out), check_invariants=False
                )
            return torch.sparse_csr_tensor(
                self.crow, self.col, values, (self.n_out, self.n_in), check_invariants=False
            )

    def row_blocks(self, max_elems: int = CHUNK) -> Iterator[tuple[Tensor, Tensor]]:
        """The rows with nonzeros, grouped by their count ``m`` and chunked so that ``k m^2 <= max_elems``
        (at least one row a chunk): ``(rows (k,), positions of their entries (k, m))``."""
        counts = self.crow.diff()
        order = torch.argsort(counts)
        start = 0
        for m, k in enumerate(torch.bincount(counts).tolist()):
            group, start = order[start : start + k], start + k
            if not (k and m):
                continue
            offsets = torch.arange(m, device=group.device)
            step = max(1, max_elems // (m * m))
            for s in range(0, k, step):
                rows = group[s : s + step]
                yield rows, self.crow[rows].unsqueeze(-1) + offsets

    def __repr__(self) -> str:
        return f"Lift({self.n_out}x{self.n_in}, nnz={self.nnz}, {str(self.dtype).replace('torch.', '')})"


class _LiftProduct(torch.autograd.Function):
    """``L x`` (or ``L^T x``) for a 2-D dense ``x``; differentiable in ``values`` and ``x``, forward mode
    (``jvp``: ``d(L x) = L dx + L(dvalues) x``, linear in each) and under ``torch.func.vmap`` (a batched ``x``
    becomes more columns of one sparse product; batched values, one product per member), so ``jacfwd``,
    ``jacrev`` and ``vmap`` see through the lift. Under an active process group each rank applies only its rows
    of ``L``, forward and backward (:mod:`.lift_products`); inputs, outputs and gradients are whole on every rank."""

    @staticmethod
    def forward(values: Tensor, x: Tensor, lift: Lift, transpose: bool) -> Tensor:
        return lift_products.product(values, x, lift, transpose)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        values, x, ctx.lift, ctx.transpose = inputs
        ctx.save_for_backward(values, x)
        ctx.save_for_forward(values, x)

    @staticmethod
    def jvp(ctx, dvalues: Tensor | None, dx: Tensor | None, _lift, _transpose) -> Tensor:
        values, x = ctx.saved_tensors
        out = None
        if dx is not None:
            out = _LiftProduct.apply(values, dx, ctx.lift, ctx.transpose)
        if dvalues is not None:
            term = _LiftProduct.apply(dvalues, x, ctx.lift, ctx.transpose)
            out = term if out is None else out + term
        return out

    @staticmethod
    def vmap(info, in_dims, values: Tensor, x: Tensor, lift: Lift, transpose: bool) -> tuple[Tensor, int]:
        v_dim, x_dim = in_dims[0], in_dims[1]
        if v_dim is not None:  # per-member values: one sparse product each
            xs = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
            outs = [_LiftProduct.apply(v, xi, lift, transpose) for v, xi in zip(values.movedim(v_dim, 0), xs)]
            return torch.stack(outs), 0
        xb = x.movedim(x_dim, -1)  # (rows, c, B): the members become columns
        out = _LiftProduct.apply(values, xb.reshape(xb.shape[0], -1), lift, transpose)
        return out.reshape(out.shape[0], *xb.shape[1:]), -1

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, x = ctx.saved_tensors
        lift, transpose = ctx.lift, ctx.transpose
        grad_values = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_values = lift_products.values_gradient(grad, x, lift, transpose)
        if ctx.needs_input_grad[1]:
            grad_x = _LiftProduct.apply(values, grad, lift, not transpose)
        return grad_values, grad_x, None, None


KINDS = ("identity", "permutation", "selection", "general")
"""What a lift is: ``identity`` (``L = I``), ``permutation`` (``(L x)[r] = x[col[r]]``, every cell once),
``selection`` (fewer rows than cells, each row one cell with weight 1, no cell twice: a grid with missing
cells), else ``general``. A lift whose values carry gradients is ``general`` (its values are data)."""


def _kind(counts: Tensor, col: Tensor, values: Tensor, t_crow: Tensor, shape: tuple[int, int]) -> str:
    """The lift's :data:`KINDS` entry from its row counts ``(n_out,)``, columns and values ``(nnz,)`` and the
    transpose's row pointers ``(n_in + 1,)``; ``general`` when the values cannot be read (vmap, compile)."""
    n_out, n_in = shape
    if values.requires_grad or not value_checks_enabled(values) or n_out > n_in or n_out == 0:
        return "general"
    one_each = bool((counts == 1).all()) and bool((values == 1).all())
    if not one_each or bool((t_crow.diff() > 1).any()):  # a row with other than one cell, or a cell used twice
        return "general"
    if n_out < n_in:
        return "selection"
    return "identity" if bool((col == torch.arange(n_in, device=col.device)).all()) else "permutation"


def _check_layout(lift, name: str) -> None:
    """A 2-D dense, sparse COO (not hybrid) or sparse CSR tensor of a floating dtype."""
    if not isinstance(lift, Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor (dense, sparse COO or sparse CSR), got {type(lift).__name__}"
        )
    if lift.layout not in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        raise TypeError(
            f"{name}: expected a dense tensor or a sparse tensor of layout torch.sparse_coo or "
            f"torch.sparse_csr, got {lift.layout}; convert it with .to_sparse_csr()"
        )
    if lift.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D (n_out, n_in) matrix (unbatched), got shape {tuple(lift.shape)}"
        )
    if lift.layout == torch.sparse_coo and lift.dense_dim() != 0:
        raise ValueError(f"{name}: expected a sparse COO matrix without dense dimensions, got a hybrid one")
    if lift.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {lift.dtype}")


def as_lift(lift: Tensor | Lift, like: tuple[int, torch.dtype, Any, str]) -> Lift:
    """``lift`` (argument ``lift``) as a canonical :class:`Lift` matching ``like = (n_in, dtype, device, what)``:
    a prebuilt Lift is checked, a tensor is canonicalised."""
    if isinstance(lift, Lift):
        check_lift_matches(lift, "lift", *like)
        return lift
    return Lift.from_tensor(lift, "lift", like=like)


def check_lift_matches(lift: Tensor | Lift, name: str, n: int, dtype: torch.dtype, device, what: str) -> None:
    """``lift`` has ``n`` columns and the ``dtype`` and ``device`` of ``what``."""
    if lift.shape[-1] != n:
        raise ValueError(f"{name}: expected {n} columns (the size of {what}), got shape {tuple(lift.shape)}")
    if lift.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of {what}), got {lift.dtype}")
    if lift.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of {what}), got {lift.device}")


def _triplets(lift: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """``(row, col, values, shape)`` of a lift in row-major order with unique entries."""
    n_out, n_in = lift.shape
    if lift.layout == torch.strided:
        if lift.numel() > DENSE_LIFT_LIMIT:
            raise ValueError(
                f"{name}: a dense {n_out} x {n_in} lift is too large ({lift.numel()} > {DENSE_LIFT_LIMIT} "
                "entries); pass a sparse COO or CSR tensor (e.g. lift.to_sparse_csr())"
            )
        if lift.requires_grad:  # keep every entry so the gradient is exact at the zeros too
            row = torch.arange(n_out, device=lift.device).repeat_interleave(n_in)
            col = torch.arange(n_in, device=lift.device).repeat(n_out)
        else:
            row, col = lift.nonzero().unbind(-1)
        return row, col, lift[row, col], (n_out, n_in)
    if lift.layout == torch.sparse_coo:
        _check_indices(lift._indices(), (n_out, n_in), name)
        lift = lift.coalesce()  # sorted row-major, duplicates summed (differentiable)
        row, col = lift.indices().unbind(0)
        return row, col, lift.values(), (n_out, n_in)
    crow, col = lift.crow_indices().to(torch.int64), lift.col_indices().to(torch.int64)
    _check_crow(crow, col, n_out, name)
    _check_indices(col.unsqueeze(0), (n_in,), name, ("column",))
    row = torch.repeat_interleave(torch.arange(n_out, device=col.device), crow.diff())
    key = row * n_in + col
    if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
        raise ValueError(
            f"{name}: CSR column indices must be sorted and unique within each row (torch's CSR invariant); "
            "build it with .to_sparse_csr() from a coalesced COO tensor"
        )
    return row, col, lift.values(), (n_out, n_in)


def _check_indices(indices: Tensor, shape: tuple[int, ...], name: str, what=("row", "column")) -> None:
    """Each row of ``indices`` ``(d, nnz)`` inside ``[0, shape[i])`` (torch does not check sparse indices
    unless asked, and out-of-range ones are undefined behaviour)."""
    if not value_checks_enabled(indices) or indices.numel() == 0:
        return
    for i, (size, label) in enumerate(zip(shape, what)):
        bad = (indices[i] < 0) | (indices[i] >= size)
        if bool(bad.any()):
            value = int(indices[i][bad][0])
            raise ValueError(f"{name}: {label} index {value} is out of range for a lift of shape {shape}: "
                             f"expected 0 <= index < {size}")


def _check_crow(crow: Tensor, col: Tensor, n_out: int, name: str) -> None:
    """CSR row pointers consistent with the shape and the entries: ``n_out + 1`` of them, from 0 to ``nnz``,
    non-decreasing."""
    if crow.shape != (n_out + 1,):
        raise ValueError(f"{name}: CSR crow_indices must have n_out + 1 = {n_out + 1} entries, got {crow.shape[0]}")
    if not value_checks_enabled(crow):
        return
    if int(crow[0]) != 0 or int(crow[-1]) != col.shape[0] or bool((crow.diff() < 0).any()):
        raise ValueError(
            f"{name}: CSR crow_indices must rise from 0 to nnz = {col.shape[0]} without decreasing, got "
            f"{int(crow[0])} .. {int(crow[-1])}"
        )


def lifted_diagonal(lift: Lift, base: Operator, values: Tensor) -> Tensor:
    """The diagonal ``(..., n_out)`` of ``L B L^T`` for the lift's pattern with ``values`` ``(nnz,)`` (of the
    base's dtype): per row, the ``nnz_r x nnz_r`` block of ``B`` at the row's columns is gathered
    (``sum_r nnz_r^2`` entries of ``B``, never ``L B L^T``); differentiable in ``values`` and ``B``."""
    from structgp.covariance.indexing import entries  # imported here: indexing imports this module

    out = values.new_zeros(*base.batch_shape, lift.n_out)
    for rows, pos in lift.row_blocks():
        v, c = values[pos], lift.col[pos]  # (k, m)
        block = entries(base, c.unsqueeze(-1), c.unsqueeze(-2))  # (..., k, m, m)
        quad = ((block @ v.unsqueeze(-1)).squeeze(-1) * v).sum(-1)  # (..., k)
        out = out.index_copy(-1, rows, quad.expand(*out.shape[:-1], rows.shape[0]))
    return out


class SparseLifted(Operator):
    """``L B L^T`` of shape ``(..., n_out, n_out)`` for a lift ``L`` ``(n_out, n_in)`` and a base ``B``
    ``(..., n_in, n_in)`` (operator or tensor); batch dims are the base's (the lift is unbatched).

    lift: dense, sparse COO or sparse CSR tensor of base's floating dtype and device, finite; a dense
    lift over ``2^26`` entries is refused (pass a sparse one). Stored entries are kept (explicit zeros
    included) and are differentiable; a dense lift that requires grad keeps all its entries.
    """

    _children = ("lift", "base")

    def __init__(self, lift: Tensor | Lift, base: Operator | Tensor) -> None:
        super().__init__()
        base = as_operator(base, "base")
        self.lift = as_lift(lift, (base.n, base.dtype, base.device, "base"))
        self.base = base

    @property
    def shape(self) -> torch.Size:
        return self.base.batch_shape + (self.lift.n_out, self.lift.n_out)

    @property
    def n_in(self) -> int:
        return self.lift.n_in

    def with_base(self, base: Operator | Tensor) -> SparseLifted:
        """``L base L^T`` sharing this lift (and its cached pattern work) with a new base."""
        base = as_operator(base, "base")
        check_lift_matches(self.lift, "self.lift", base.n, base.dtype, base.device, "base")
        return self._replace(base=base)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.lift.matmul(self.base._matmul(self.lift.tmatmul(rhs)))

    def diagonal(self) -> Tensor:
        """``sum_{a, b in row r} v_a v_b B[c_a, c_b]`` (see :func:`lifted_diagonal`)."""
        return lifted_diagonal(self.lift, self.base, self.lift.values)

    def _to_dense(self) -> Tensor:
        if self.lift.kind != "general":  # one cell a row, weight 1: B[c, c], gathered from the base's structure
            from structgp.covariance.indexing import entries

            c = self.lift.col
            return entries(self.base, c.unsqueeze(-1), c.unsqueeze(-2))
        b = self.base._to_dense()
        lbt = self.lift.matmul(b.mT)  # (..., n_out, n_in) = L B^T
        return self.lift.matmul(lbt.mT)  # L (L B^T)^T = L B L^T (B's gradient in B's own layout)

    def _scale(self, c: Tensor) -> SparseLifted:
        return self._replace(base=self.base._scale(c))

    def _expand(self, batch_shape: torch.Size) -> SparseLifted:
        return self._replace(base=self.base._expand(batch_shape))


class LiftedRoot(LinearMap):
    """``L R`` ``(..., n_out, r)`` for a lift ``L`` ``(n_out, n_in)`` and a root ``R`` ``(..., n_in, r)``;
    ``(L R)(L R)^T = L B L^T`` when ``R R^T = B``."""

    _children = ("lift", "inner")

    def __init__(self, lift: Tensor | Lift, inner: LinearMap) -> None:
        super().__init__()
        if not isinstance(inner, LinearMap):
            raise TypeError(f"inner: expected a structgp LinearMap, got {type(inner).__name__}")
        self.lift = as_lift(lift, (inner.shape[-2], inner.dtype, inner.device, "inner"))
        self.inner = inner

    @property
    def shape(self) -> torch.Size:
        return self.inner.batch_shape + (self.lift.n_out, self.inner.shape[-1])

    def _matmul(self, x: Tensor) -> Tensor:
        return self.lift.matmul(self.inner._matmul(x))

    def tmatmul(self, y: Tensor) -> Tensor:
        return self.inner.tmatmul(self.lift.tmatmul(y))

    def to_dense(self) -> Tensor:
        check_dense_size(
            self.shape, self.dtype, f"LiftedRoot.to_dense(): {tuple(self.shape)}",
            "; use R @ x and R.tmatmul(y) instead",
        )
        return self.lift.matmul(self.inner.to_dense())
