"""The iterative engine's vectors partitioned by rows across processes (``torch.distributed``).

Under an active process group (:mod:`structgp.distributed`), an unbatched operator made of kernel matrices
and diagonals (:func:`~structgp.covariance.local_rows.partitionable`), or ``L B L^T + D`` (:func:`lifted_sum`),
runs PCG with every ``(n, c)`` vector (right-hand sides, probes, iterates, residuals, the preconditioner's
factor) kept as this rank's rows only:

- a product computes this rank's rows of ``A P`` from this rank's rows of ``P``
  (:func:`~structgp.covariance.local_rows.rows_product`): a kernel matrix gathers the search directions (one
  all-gather of ``(n, c)``); a lift sums its rows' latent vectors ``L_r^T P_r`` over the ranks (one all-gather
  of ``(n_in, c)``) and applies its rows of ``L`` to ``B z``;
- the column dot products and norms are this rank's partial sums, summed over the ranks (three small
  all-gathers an iteration), and so are the preconditioner's ``V^T r`` (one more);
- the pivoted Cholesky preconditioner is built collectively (:mod:`.pivoted_cholesky`: one all-gather
  picks each pivot, each rank fills its rows) and its pivots are one process's; the lifted eigen
  preconditioner of ``L B L^T + D`` takes this rank's rows of ``F = L U Lambda^{1/2}``;
- the probes are one process's (the seeded stream), this rank's rows of them only (on the CPU drawn a block of
  rows at a time, :func:`.iterative.rademacher`).

Every rank therefore runs one process's recursion on its rows: the same pivots, and coefficients, values
and solves equal to one process's up to the order of the sums (measured in float64 at ``cg_tol=1e-12``: at
most 1.9e-12 of the largest entry for kernel matrices, 5.9e-13 for lifts; two solves agree to about the
solver's tolerance). Memory a rank: about
``(n / P) (8 c + 3 k)`` numbers for the vectors, the factor and the control variate's weights, plus what does
not shrink with ``P``: the gathered ``(n, c)`` search directions while a product runs (a differentiable
product keeps only this rank's rows of them for its backward and gathers them again there), and a few kernel
tiles, of a fixed size (:mod:`structgp.covariance.kernel_operator`).

The gradients are computed as shares (:mod:`structgp.distributed.rows`): the surrogates of
:mod:`.iterative` sum over this rank's rows, the control variate's sums over rows are summed over the ranks,
and :func:`shared` makes the operator's tensors and the right-hand side sum their gradients' shares over the
ranks in the backward. Other operators (Kronecker, dense, sums with lifts, a lift under a pivoted Cholesky
preconditioner) keep whole vectors on every rank (a lift's products are partitioned on their own:
:mod:`structgp.covariance.lift_products`).
"""

from __future__ import annotations

import torch.utils._pytree as pytree
from torch import Tensor

from structgp import _config, distributed
from structgp.covariance.kernel_operator import KernelOperator
from structgp.covariance.local_rows import Search, partitionable, rows_product
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.validation import host_readable
from structgp.distributed.rows import Rows, share_gradients
from structgp.inference.preconditioners import is_lifted_sum, planned_kind


def rows_for(op: Operator, rhs: Tensor | None) -> Rows | None:
    """This rank's rows when ``op`` (and ``rhs`` ``(n, c)``) can run partitioned, else ``None``: no active
    process group, batched, neither :func:`partitionable` nor a :func:`lifted_sum`, or under a functorch
    transform. The rows are whole row tiles of the operator's kernel matrices, so each rank's product rows
    are one process's sums."""
    if not distributed.is_active() or (rhs is not None and rhs.dim() != 2):
        return None
    if not (partitionable(op) or lifted_sum(op)) or not host_readable(op._first_float()):
        return None
    nodes = pytree.tree_flatten(op, is_leaf=lambda node: isinstance(node, KernelOperator))[0]
    unit = next((node.tile()[0] for node in nodes if isinstance(node, KernelOperator)), 1)
    return Rows.of(op.n, unit)


def lifted_sum(op: Operator) -> bool:
    """Whether ``op`` is ``L B L^T + D`` that runs partitioned: unbatched, diagonal noise, at least as many rows
    as ranks, a preconditioner that runs on rows (``auto``/``lifted_eigen``: the lifted eigen preconditioner,
    which is what one process takes for it under ``auto`` too, except for a grid with missing cells;
    ``jacobi``; ``none``), and a base whose products hold no collective of their own (no kernel matrix or lift
    inside it: its products are replicated on every rank, inside each rank's share)."""
    if not is_lifted_sum(op) or op.batch_shape or not partitionable(op.noise) or op.n < distributed.world():
        return False
    # the preconditioners that run on rows; under "auto" a grid with missing cells takes its own masked one
    if planned_kind(op, _config.current()) not in ("lifted_eigen", "jacobi", "none"):
        return False
    nodes = pytree.tree_flatten(op.base.base, is_leaf=lambda node: isinstance(node, KernelOperator | SparseLifted))[0]
    return not any(isinstance(node, KernelOperator | SparseLifted) for node in nodes)


def product(op: Operator, part: Rows):
    """``P (rows, c) -> (A P)[rows]``: this rank's rows of the product from this rank's rows of ``P``
    (:func:`~structgp.covariance.local_rows.rows_product`)."""

    def matmul(p: Tensor) -> Tensor:
        return rows_product(op, Search(p, part))

    return matmul


def dot(part: Rows):
    """``(U, V) -> (c,)``: column dot products of two ``(rows, c)`` blocks, summed over the ranks."""

    def column_dot(a: Tensor, b: Tensor) -> Tensor:
        return part.sum((a * b).sum(-2), "the dot products of conjugate gradients")

    return column_dot


def shared(op: Operator, rhs: Tensor | None, part: Rows) -> tuple[Operator, Tensor | None]:
    """``op`` and ``rhs`` whose tensors sum their gradients' shares over the ranks in the backward."""
    leaves, spec = pytree.tree_flatten(op)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    tensors = [leaves[i] for i in where] + ([] if rhs is None else [rhs])
    out = share_gradients(tensors, part)
    for i, t in zip(where, out):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, spec), (None if rhs is None else out[-1])
