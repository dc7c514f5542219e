"""``op.root()``: a structured ``R`` with ``R R^T = op``, per structure (``functools.singledispatch``).

Roots keep the structure so that sampling ``R eps`` costs what a product with the operator costs:
a sum's root is the side-by-side concatenation of its terms' roots (one independent draw per term),
a Kronecker product's root is the Kronecker product of its factors' Cholesky factors (when no gradient is
needed and a factor is singular in float64, its truncated spectral root instead: no jitter), a block-diagonal
operator's root is block diagonal, a lifted one's is ``L R_B`` and a permuted one's is ``P R_B``.

Every rule of the table is registered in this module, so the table is complete once it is imported.
"""

from __future__ import annotations

import functools

import torch

from structgp import _config
from structgp.covariance.block_diag import BlockDiag, BlockDiagRoot
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.linear_map import Product
from structgp.covariance.low_rank import LowRank
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator
from structgp.covariance.permuted import Permuted
from structgp.covariance.root import ConcatRoot, DenseRoot, DiagonalRoot, KroneckerRoot
from structgp.covariance.sparse_lifted import LiftedRoot, SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.inference.block_failures import not_positive_definite
from structgp.inference.cholesky import NotPositiveDefiniteError, psd_cholesky
from structgp.inference.spectral_root import exact_root


@functools.singledispatch
def root(op: Operator) -> LinearMap:
    """A structured root of ``op``; operators without a rule get a dense Cholesky factor."""
    from structgp.inference.cholesky import DenseCholesky

    _check_budget(op)
    return DenseRoot(DenseCholesky().factor(op))


def root_nbytes(op: Operator) -> int:
    """Bytes the root of ``op`` allocates (a Cholesky factor and the symmetrised copy it is taken from, as the
    dense engine's cost counts; 0 for a LowRank factor, which is reused), from shapes only: the check of
    ``settings(memory_budget=...)`` before anything is factorised."""
    batch, n, size = op.batch_shape.numel(), op.n, op.dtype.itemsize
    if isinstance(op, LowRank):
        return 0
    if op.is_diagonal:
        return batch * n * size
    if isinstance(op, Kronecker):
        return 2 * batch * sum(f.n * f.n for f in op.factors) * size
    if isinstance(op, (AddedDiagonal, Sum)):
        return sum(root_nbytes(t) for t in ((op.base, op.noise) if isinstance(op, AddedDiagonal) else op.terms))
    if isinstance(op, BlockDiag):
        return sum(root_nbytes(g) for g in op.groups)
    if isinstance(op, (SparseLifted, Permuted)):
        return root_nbytes(op.base)
    return 2 * batch * n * n * size


def _check_budget(op: Operator) -> None:
    """Refuse a root over ``settings(memory_budget=...)`` before factorising (a ``MemoryError`` saying what to do)."""
    nbytes, budget = root_nbytes(op), _config.current().memory_budget
    if nbytes > budget:
        raise MemoryError(
            f"root(): the Cholesky factors of {op!r} would take {_size(nbytes)}, over the memory budget of "
            f"{_size(budget)}; sample through a structure whose root is small (Kronecker, LowRank, "
            "SparseLifted), use fewer or smaller blocks, or raise structgp.settings(memory_budget=...)"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


@root.register
def _(op: Dense) -> LinearMap:
    _check_budget(op)
    return DenseRoot(psd_cholesky(op.matrix, "the Dense matrix"))


@root.register
def _(op: Diagonal) -> LinearMap:
    return DiagonalRoot(op.diag.sqrt())


@root.register
def _(op: ScaledIdentity) -> LinearMap:
    return DiagonalRoot(op.diagonal().sqrt())


@root.register
def _(op: LowRank) -> LinearMap:
    return DenseRoot(op.factor)


@root.register
def _(op: Kronecker) -> LinearMap:
    if op.is_diagonal:
        return DiagonalRoot(op.diagonal().sqrt())
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in op._tensors())):
        # no gradients needed (sampling, prediction): a singular factor gets the exact spectral root
        # instead of a jittered Cholesky factor
        found = exact_root(op)
        if found is not None:
            return KroneckerRoot([f.to(op.dtype) for f in found[0].factors])
    mats = op.factor_matrices()
    chols = [
        psd_cholesky(m.double(), f"Kronecker factor {i}").to(m.dtype) for i, m in enumerate(mats)
    ]
    return KroneckerRoot(chols)


@root.register
def _(op: AddedDiagonal) -> LinearMap:
    return ConcatRoot([root(op.base), root(op.noise)])


@root.register
def _(op: Sum) -> LinearMap:
    return ConcatRoot([root(t) for t in op.terms])


@root.register
def _(op: BlockDiag) -> LinearMap:
    _check_budget(op)  # all blocks together, before the first is factorised
    parts = []
    for j, group in enumerate(op.groups):
        try:
            parts.append(root(group))
        except NotPositiveDefiniteError as err:
            raise not_positive_definite(op, j, err) from err
    return BlockDiagRoot(parts, op.perm, op.inverse)


@root.register
def _(op: SparseLifted) -> LinearMap:
    return LiftedRoot(op.lift, root(op.base))


@root.register
def _(op: Permuted) -> LinearMap:
    return Product(op.permutation(), root(op.base))
