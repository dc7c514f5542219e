"""A linear_operator ``LinearOperator`` (gpytorch's lazy covariances) as a structgp operator.

``as_operator`` calls :func:`from_linear_operator` for such objects, so ``MultivariateNormal(loc,
kernel(x))`` accepts what gpytorch kernels return. The common structures that linear_operator exposes map
to structgp's own, so the structured engines answer them:

==============================================  ==============================================
linear_operator                                 structgp
==============================================  ==============================================
``LazyEvaluatedKernelTensor`` (gpytorch)        its ``evaluate_kernel()``, converted
``DenseLinearOperator``                         ``Dense``
``DiagLinearOperator`` / ``ConstantDiag...``    ``Diagonal`` / ``ScaledIdentity``
``KroneckerProductLinearOperator``              ``Kronecker`` of the converted factors
``AddedDiagLinearOperator`` / ``Sum...``        the sum of the converted terms (``+ noise`` kept)
``RootLinearOperator`` (``LowRankRoot...``)     ``LowRank`` of the root
``BlockDiagLinearOperator``                     ``BlockDiag`` of the converted base
``ConstantMulLinearOperator`` (``c > 0``)       the converted base scaled by ``c``
structgp's own adapter                          the operator it wraps
anything else                                   ``Dense(to_dense())``, refused over the dense limit
==============================================  ==============================================

linear_operator is imported only when such an object is given (it is then already imported).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.validation import check_dense_size


def is_linear_operator(x: Any) -> bool:
    """Whether ``x`` is a ``linear_operator.LinearOperator`` (False when linear_operator is not imported)."""
    module = sys.modules.get("linear_operator")
    return module is not None and isinstance(x, module.LinearOperator)


def from_linear_operator(x: Any, name: str) -> Operator:
    """The structgp operator for a ``LinearOperator`` ``x`` of shape ``(..., n, n)`` (see the module)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name}: expected a square (..., n, n) LinearOperator, got shape {tuple(x.shape)}")
    for rule in _RULES:
        op = rule(x, name)
        if op is not None:
            return op
    return _dense(x, name)


# -- the rules, most specific first; each returns None when it does not apply ----------------------------
def _wrapped(x: Any, name: str) -> Operator | None:
    """structgp's adapter (``as_linear_operator``): its operator, broadcast to the adapter's batch."""
    op = getattr(x, "operator", None)
    if not isinstance(op, Operator):
        return None
    return op if op.batch_shape == x.batch_shape else op.expand(x.batch_shape)


def _lazy_kernel(x: Any, name: str) -> Operator | None:
    gpytorch = sys.modules.get("gpytorch")
    if gpytorch is None or not isinstance(x, gpytorch.lazy.LazyEvaluatedKernelTensor):
        return None
    return from_linear_operator(x.evaluate_kernel(), name)


def _diagonal(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    if isinstance(x, ops.ConstantDiagLinearOperator):
        return ScaledIdentity(x.diag_values.squeeze(-1), x.shape[-1])
    if isinstance(x, ops.KroneckerProductDiagLinearOperator):
        return Kronecker(*(from_linear_operator(f, name) for f in x.linear_ops))
    if isinstance(x, ops.DiagLinearOperator):
        return Diagonal(x._diag)
    return None


def _dense_tensor(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    return Dense(x.tensor, name=name) if isinstance(x, ops.DenseLinearOperator) else None


def _kronecker(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    if not isinstance(x, ops.KroneckerProductLinearOperator) or isinstance(x, ops.TriangularLinearOperator):
        return None  # a triangular Kronecker factor is not a covariance: densified
    return Kronecker(*(from_linear_operator(f, f"{name} (Kronecker factor)") for f in x.linear_ops))


def _sum(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    if not isinstance(x, ops.SumLinearOperator):
        return None
    terms = [from_linear_operator(t, f"{name} (sum term)") for t in x.linear_ops]
    total = terms[0]
    for t in terms[1:]:
        total = total + t  # structgp's sum rules: a diagonal term becomes noise (AddedDiagonal)
    return total


def _root(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    if not isinstance(x, ops.RootLinearOperator):
        return None
    return LowRank(x.root.to_dense())


def _block_diag(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    if not isinstance(x, ops.BlockDiagLinearOperator):
        return None  # its base's last batch dim indexes the blocks (linear_operator moves block_dim there)
    return BlockDiag(from_linear_operator(x.base_linear_op, f"{name} (blocks)"))


def _scaled(x: Any, name: str) -> Operator | None:
    ops = sys.modules["linear_operator"].operators
    if not isinstance(x, ops.ConstantMulLinearOperator):
        return None
    c = x._constant
    if not bool(torch.isfinite(c).all() and (c > 0).all()):
        return None  # not a covariance scaling: densified (and checked as a matrix)
    return from_linear_operator(x.base_linear_op, name) * c


_RULES = (_wrapped, _lazy_kernel, _diagonal, _dense_tensor, _kronecker, _sum, _root, _block_diag, _scaled)


def _dense(x: Any, name: str) -> Dense:
    """``Dense(x.to_dense())``, refused before materialising above ``settings(dense_limit=...)``."""
    check_dense_size(
        tuple(x.shape), x.dtype,
        f"{name}: a {type(x).__name__} of shape {tuple(x.shape)} has no structgp structure and its dense form",
        "; build the covariance from structgp operators or raise structgp.settings(dense_limit=...)",
    )
    return Dense(x.to_dense(), name=name)
