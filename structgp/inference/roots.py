"""``op.root()``: a structured ``R`` with ``R R^T = op``, per structure (``functools.singledispatch``).

Roots keep the structure so that sampling ``R eps`` costs what a product with the operator costs:
a sum's root is the side-by-side concatenation of its terms' roots (one independent draw per term),
a Kronecker product's root is the Kronecker product of its factors' Cholesky factors.
"""

from __future__ import annotations

import functools

from structgp.covariance._operator import Operator
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.root import ConcatRoot, DenseRoot, DiagonalRoot, KroneckerRoot, Root
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.inference.cholesky import psd_cholesky


@functools.singledispatch
def root(op: Operator) -> Root:
    """A structured root of ``op``; operators without a rule get a dense Cholesky factor."""
    from structgp.inference.cholesky import DenseCholesky

    return DenseRoot(DenseCholesky().factor(op))


@root.register
def _(op: Dense) -> Root:
    return DenseRoot(psd_cholesky(op.matrix, "the Dense matrix"))


@root.register
def _(op: Diagonal) -> Root:
    return DiagonalRoot(op.diag.sqrt())


@root.register
def _(op: ScaledIdentity) -> Root:
    return DiagonalRoot(op.diagonal().sqrt())


@root.register
def _(op: LowRank) -> Root:
    return DenseRoot(op.factor)


@root.register
def _(op: Kronecker) -> Root:
    if op.is_diagonal:
        return DiagonalRoot(op.diagonal().sqrt())
    mats = op.factor_matrices()
    chols = [
        psd_cholesky(m.double(), f"Kronecker factor {i}").to(m.dtype) for i, m in enumerate(mats)
    ]
    return KroneckerRoot(chols)


@root.register
def _(op: AddedDiagonal) -> Root:
    return ConcatRoot([root(op.base), root(op.noise)])


@root.register
def _(op: Sum) -> Root:
    return ConcatRoot([root(t) for t in op.terms])
