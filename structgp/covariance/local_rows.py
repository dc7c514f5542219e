"""Rows of an operator's products and entries, for computations partitioned by rows across processes.

A partitioned iterative solve (:mod:`structgp.inference.partitioned`) keeps only rows ``start:stop`` of its
vectors on each rank. Besides the operator's entries (:func:`.indexing.entries`) it needs three things of
it, each a ``functools.singledispatch`` rule:

- :func:`partitionable`: whether every part of the operator has the rules below (kernel matrices, diagonals
  and their sums, unbatched); other operators keep their vectors whole on every rank.
- :func:`matmul_rows`: rows ``start:stop`` of ``A V`` for the full ``V`` ``(n, c)``, differentiable, with no
  collective in the forward or the backward (the caller sums the gradients' shares over the ranks).
- :func:`rows_product`: this rank's rows of ``A P`` from this rank's rows of ``P`` (:class:`Search`),
  differentiable with gradients as shares: kernel matrices gather ``P`` once and take :func:`matmul_rows`
  (saving this rank's rows of ``P`` for the backward, which gathers them again: :meth:`Search.saved_as_rows`);
  diagonals need no gather; a :class:`~structgp.covariance.SparseLifted` ``L B L^T`` sums its rows' latent
  vectors ``L_r^T P_r`` over the ranks (one all-gather of ``(n_in, c)``, never ``(n, c)``) and applies its rows
  of ``L`` to ``B z``, its base replicated on every rank.
- :func:`weighted_columns`: ``sum_ij W_ij A[i, S_j]`` over rows ``start:stop`` and columns ``S``, a scalar
  whose gradient reaches the operator's tensors: the control variate's ``<G, A[:, S]>``. For a kernel matrix
  it never holds more than one row block of ``A[:, S]`` (:class:`_WeightedColumns`), where
  ``(W * entries(...)).sum()`` (:func:`.indexing.entries`) would keep the whole ``n x k`` evaluation and its
  intermediates for autograd.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.indexing import entries
from structgp.covariance.kernel_operator import KernelOperator, kernel_block
from structgp.covariance.lift_products import rows_and_values
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.distributed.rows import Rows, sum_shared


def partitionable(op: Operator) -> bool:
    """Whether ``op`` is unbatched and has the rules of this module in every part."""
    return not op.batch_shape and _has_rules(op)


@functools.singledispatch
def _has_rules(op: Operator) -> bool:
    return False


@_has_rules.register(Diagonal)
@_has_rules.register(ScaledIdentity)
@_has_rules.register(KernelOperator)
def _(op: Operator) -> bool:
    return True


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


class Search:
    """This rank's rows ``local`` ``(rows, c)`` of the vectors a partitioned product multiplies, and the whole
    ``(n, c)`` gathered from every rank on first use (at most once a product)."""

    def __init__(self, local: Tensor, part: Rows) -> None:
        self.local, self.part = local, part

    @functools.cached_property
    def whole(self) -> Tensor:
        return self.part.gather(self.local)

    @contextlib.contextmanager
    def saved_as_rows(self) -> Iterator[Tensor]:
        """``whole``, which autograd saves for the backward as this rank's rows only and gathers again when the
        backward reads it: a rank keeps ``(rows, c)`` rather than ``(n, c)`` between the forward and the backward
        (one more all-gather in the backward; every rank runs the same backward, so the collectives match).
        Raises in the backward if ``local`` was modified in place after the product."""
        whole, local, part = self.whole, self.local.detach(), self.part
        # autograd keeps the hooks with each saved tensor: they hold the gathered tensor's address, not the tensor
        key = (whole.data_ptr(), whole.shape, whole.stride())
        rows = (part, local, local._version)

        def pack(t: Tensor) -> Tensor | tuple[Rows, Tensor, int]:
            return rows if (t.data_ptr(), t.shape, t.stride()) == key else t

        def unpack(saved: Tensor | tuple[Rows, Tensor, int]) -> Tensor:
            if isinstance(saved, Tensor):
                return saved
            owner, mine, version = saved
            if mine._version != version:
                raise RuntimeError(
                    "a partitioned product's search directions were modified in place before its backward; "
                    "pass a copy to the product"
                )
            return owner.gather(mine, "the search directions saved for the backward")

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield whole


@functools.singledispatch
def rows_product(op: Operator, search: Search) -> Tensor:
    """This rank's rows ``(rows, c)`` of ``op @ P`` for ``P``'s rows ``search`` (see the module); the gathered
    ``P`` is saved for the backward as this rank's rows (:meth:`Search.saved_as_rows`)."""
    with search.saved_as_rows() as whole:
        return matmul_rows(op, whole, search.part.start, search.part.stop)


@rows_product.register(Diagonal)
@rows_product.register(ScaledIdentity)
def _(op: Operator, search: Search) -> Tensor:
    return search.part.local(op.diagonal().expand(op.n), -1).unsqueeze(-1) * search.local


@rows_product.register
def _(op: AddedDiagonal, search: Search) -> Tensor:
    return rows_product(op.base, search) + rows_product(op.noise, search)


@rows_product.register
def _(op: Sum, search: Search) -> Tensor:
    return sum(rows_product(t, search) for t in op.terms)


@rows_product.register
def _(op: SparseLifted, search: Search) -> Tensor:
    part = search.part
    local, values = rows_and_values(op.lift, part)  # this rank's rows of L, applied whole
    values = values.to(search.local.dtype)
    z = sum_shared(local.tmatmul(search.local, values), part, "the latent vectors L^T p")
    return local.matmul(op.base._matmul(z), values)


@functools.singledispatch
def weighted_columns(op: Operator, start: int, stop: int, cols: Tensor, weight: Tensor) -> Tensor:
    """``sum_ij weight[i, j] op[start + i, cols[j]]`` ``()`` for ``weight`` ``(stop - start, len(cols))``."""
    here = torch.arange(start, stop, device=cols.device)
    return (weight * entries(op, here.unsqueeze(-1), cols)).sum()


@weighted_columns.register(Diagonal)
@weighted_columns.register(ScaledIdentity)
def _(op: Operator, start: int, stop: int, cols: Tensor, weight: Tensor) -> Tensor:
    # only the columns whose index falls in start:stop meet the diagonal
    j = ((cols >= start) & (cols < stop)).nonzero().squeeze(-1)
    return (weight[cols[j] - start, j] * op.diagonal().expand(op.n)[cols[j]]).sum()


# entries of one row block of A[:, S] in weighted_columns: its backward keeps a few such blocks (the kernel's
# intermediates under vjp), a fixed workspace beside the n x k weights (2 MiB a block in float64)
WEIGHTED_BLOCK_ENTRIES = 2**18


@weighted_columns.register
def _(op: KernelOperator, start: int, stop: int, cols: Tensor, weight: Tensor) -> Tensor:
    rows = max(1, WEIGHTED_BLOCK_ENTRIES // max(1, cols.numel()))
    spec = (op.kernel, op.names, start, stop, cols, rows)
    return op.scale * _WeightedColumns.apply(spec, weight, op.x, *op.params)


@weighted_columns.register
def _(op: AddedDiagonal, start: int, stop: int, cols: Tensor, weight: Tensor) -> Tensor:
    return weighted_columns(op.base, start, stop, cols, weight) + weighted_columns(op.noise, start, stop, cols, weight)


@weighted_columns.register
def _(op: Sum, start: int, stop: int, cols: Tensor, weight: Tensor) -> Tensor:
    return sum(weighted_columns(t, start, stop, cols, weight) for t in op.terms)


class _WeightedColumns(torch.autograd.Function):
    """``sum_ij W_ij k(x[start + i], x[cols[j]])`` by row blocks; the backward evaluates each block again under
    :func:`torch.func.vjp` (``spec``: ``(kernel, names, start, stop, cols, rows a block)``)."""

    @staticmethod
    def forward(spec: tuple, weight: Tensor, x: Tensor, *params: Tensor) -> Tensor:
        kernel, names, start, stop, cols, rows = spec
        total = weight.new_zeros((), dtype=torch.float64)
        for first in range(start, stop, rows):
            last = min(first + rows, stop)
            block = kernel_block(kernel, names, params, x[first:last], x[cols])
            total = total + (weight[first - start : last - start] * block).sum(dtype=torch.float64)
        return total.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        spec, weight, x, *params = inputs
        ctx.spec = spec
        ctx.save_for_backward(weight, x, *params)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kernel, names, start, stop, cols, rows = ctx.spec
        weight, x, *params = ctx.saved_tensors
        grads = [torch.zeros_like(x), *(torch.zeros_like(p) for p in params)]
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for first in range(start, stop, rows):
            last = min(first + rows, stop)

            def block(xx: Tensor, *pp: Tensor, first: int = first, last: int = last) -> Tensor:
                return kernel_block(kernel, names, pp, xx[first:last], xx[cols])

            value, pull = torch.func.vjp(block, x, *params)
            w = weight[first - start : last - start]
            grads = [g + d for g, d in zip(grads, pull((grad * w).to(value.dtype)))]
            if grad_weight is not None:
                grad_weight[first - start : last - start] = grad * value
        grads = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grads)]
        return (None, grad_weight, *grads)
