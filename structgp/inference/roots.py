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

    return DenseRoot(DenseCholesky().factor(op))


@root.register
def _(op: Dense) -> LinearMap:
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
