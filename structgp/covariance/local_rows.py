"""Rows of an operator's products and entries, for computations partitioned by rows across processes.

A partitioned iterative solve (:mod:`structgp.inference.partitioned`) keeps only rows ``start:stop`` of its
vectors on each rank. It needs three things of the operator, each a ``functools.singledispatch`` rule:

- :func:`partitionable`: whether every part of the operator has the rules below (kernel matrices, diagonals
  and their sums, unbatched); other operators keep their vectors whole on every rank.
- :func:`matmul_rows`: rows ``start:stop`` of ``A V`` for the full ``V`` ``(n, c)``, differentiable, with no
  collective in the forward or the backward (the caller sums the gradients' shares over the ranks).
- :func:`entries`: ``A[i, j]`` ``(len(i), len(j))`` for index tensors ``i`` and ``j``, differentiable: the
  pivoted Cholesky preconditioner's columns at this rank's rows, and the pivots' block ``A[S, S]``.
"""

from __future__ import annotations

import functools

from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kernel_operator import KernelOperator, kernel_block
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal, Sum


def partitionable(op: Operator) -> bool:
    """Whether ``op`` is unbatched and has the rules of this module in every part."""
    return not op.batch_shape and _has_rules(op)


@functools.singledispatch
def _has_rules(op: Operator) -> bool:
    return False


@_has_rules.register(Diagonal)
@_has_rules.register(ScaledIdentity)
def _(op: Operator) -> bool:
    return True


@_has_rules.register
def _(op: KernelOperator) -> bool:
    return op.backend == "torch"  # a KeOps product is one reduction over all rows


@_has_rules.register
def _(op: AddedDiagonal) -> bool:
    return _has_rules(op.base) and _has_rules(op.noise)


@_has_rules.register
def _(op: Sum) -> bool:
    return all(_has_rules(t) for t in op.terms)


@functools.singledispatch
def matmul_rows(op: Operator, rhs: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``op @ rhs`` ``(stop - start, c)`` for ``rhs`` ``(n, c)``."""
    raise TypeError(f"op: {type(op).__name__} has no partitioned product (see partitionable())")


@matmul_rows.register(Diagonal)
@matmul_rows.register(ScaledIdentity)
def _(op: Operator, rhs: Tensor, start: int, stop: int) -> Tensor:
    return op.diagonal().expand(op.n)[start:stop].unsqueeze(-1) * rhs[start:stop]


@matmul_rows.register
def _(op: KernelOperator, rhs: Tensor, start: int, stop: int) -> Tensor:
    return op._matmul_rows(rhs, start, stop)


@matmul_rows.register
def _(op: AddedDiagonal, rhs: Tensor, start: int, stop: int) -> Tensor:
    return matmul_rows(op.base, rhs, start, stop) + matmul_rows(op.noise, rhs, start, stop)


@matmul_rows.register
def _(op: Sum, rhs: Tensor, start: int, stop: int) -> Tensor:
    return sum(matmul_rows(t, rhs, start, stop) for t in op.terms)


@functools.singledispatch
def entries(op: Operator, rows: Tensor, cols: Tensor) -> Tensor:
    """``op[rows][:, cols]`` ``(len(rows), len(cols))`` for long tensors ``rows`` and ``cols``."""
    raise TypeError(f"op: {type(op).__name__} has no entry rule (see partitionable())")


@entries.register(Diagonal)
@entries.register(ScaledIdentity)
def _(op: Operator, rows: Tensor, cols: Tensor) -> Tensor:
    diag = op.diagonal().expand(op.n)
    same = rows.unsqueeze(-1) == cols.unsqueeze(-2)
    return same.to(diag.dtype) * diag[rows].unsqueeze(-1)


@entries.register
def _(op: KernelOperator, rows: Tensor, cols: Tensor) -> Tensor:
    # evaluated as k(x[cols], x[rows])^T: the orientation of KernelOperator.rows, which one process's pivoted
    # Cholesky reads, so both round every entry the same way (a pivot is the largest of near-equal values)
    return op.scale * kernel_block(op.kernel, op.names, op.params, op.x[cols], op.x[rows]).mT


@entries.register
def _(op: AddedDiagonal, rows: Tensor, cols: Tensor) -> Tensor:
    return entries(op.base, rows, cols) + entries(op.noise, rows, cols)


@entries.register
def _(op: Sum, rows: Tensor, cols: Tensor) -> Tensor:
    return sum(entries(t, rows, cols) for t in op.terms)
