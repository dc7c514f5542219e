"""The iterative engine's vectors partitioned by rows across processes (``torch.distributed``).

Under an active process group (:mod:`structgp.distributed`), an unbatched operator made of kernel matrices
and diagonals (:func:`~structgp.covariance.local_rows.partitionable`) runs PCG with every ``(n, c)`` vector
(right-hand sides, probes, iterates, residuals, the preconditioner's factor) kept as this rank's rows only:

- a product gathers the search directions (one all-gather of ``(n, c)``) and computes this rank's rows of
  ``A P`` (:func:`~structgp.covariance.local_rows.matmul_rows`);
- the column dot products and norms are this rank's partial sums, summed over the ranks (three small
  all-gathers an iteration), and so are the preconditioner's ``V^T r`` (one more);
- the pivoted Cholesky preconditioner is built collectively (:mod:`.pivoted_cholesky`: one all-gather
  picks each pivot, each rank fills its rows) and its pivots are one process's;
- the probes are one process's (the seeded stream, drawn whole), sliced to this rank's rows.

Every rank therefore runs one process's recursion on its rows: the same pivots, and coefficients, values
and solves equal to one process's up to the order of the sums (measured in float64 at ``cg_tol=1e-12``: at
most 5.5e-12 relative; two solves agree to about the solver's tolerance). Memory a rank: about
``(n / P) (8 c + 3 k)`` numbers for the vectors, the factor and the control variate's weights, plus what does
not shrink with ``P``: the gathered ``(n, c)`` search directions and a few kernel tiles, of a fixed size
(:mod:`structgp.covariance.kernel_operator`).

The gradients are computed as shares (:mod:`structgp.distributed.rows`): the surrogates of
:mod:`.iterative` sum over this rank's rows, the control variate's sums over rows are summed over the ranks,
and :func:`shared` makes the operator's tensors and the right-hand side sum their gradients' shares over the
ranks in the backward. Operators with other parts (Kronecker, sparse lifts, dense) keep whole vectors on
every rank (their products are partitioned on their own: :mod:`structgp.covariance.lift_products`).
"""

from __future__ import annotations

import torch.utils._pytree as pytree
from torch import Tensor

from structgp import distributed
from structgp.covariance.kernel_operator import KernelOperator
from structgp.covariance.local_rows import matmul_rows, partitionable
from structgp.covariance.operator import Operator
from structgp.covariance.validation import host_readable
from structgp.distributed.rows import Rows, share_gradients


def rows_for(op: Operator, rhs: Tensor | None) -> Rows | None:
    """This rank's rows when ``op`` (and ``rhs`` ``(n, c)``) can run partitioned, else ``None``: no active
    process group, batched, not :func:`partitionable`, or under a functorch transform. The rows are whole
    row tiles of the operator's kernel matrices, so each rank's product rows are one process's sums."""
    if not distributed.is_active() or not partitionable(op) or (rhs is not None and rhs.dim() != 2):
        return None
    if not host_readable(op._first_float()):
        return None
    nodes = pytree.tree_flatten(op, is_leaf=lambda node: isinstance(node, KernelOperator))[0]
    unit = next((node.tile()[0] for node in nodes if isinstance(node, KernelOperator)), 1)
    return Rows.of(op.n, unit)


def product(op: Operator, part: Rows):
    """``P (rows, c) -> (A P)[rows]``: gathers the search directions, then this rank's rows of the product."""

    def matmul(p: Tensor) -> Tensor:
        return matmul_rows(op, part.gather(p), part.start, part.stop)

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
