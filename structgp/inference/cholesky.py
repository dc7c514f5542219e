"""Cholesky factorisation with warned jitter escalation, and the dense Cholesky engine.

The dense engine answers any operator by materialising it (within the memory budget): ``n^3 / 3`` flops,
and ``2 n^3`` more in the backward (torch's Cholesky backward: two triangular solves with ``n`` columns).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.errors import NumericalError
from structgp.covariance.operator import Operator, guard_dense
from structgp.covariance.validation import negligibly_asymmetric, value_checks_enabled
from structgp.inference import report
from structgp.inference._cache import cached
from structgp.inference.cost_model import Work, differentiated, seconds
from structgp.inference.plan import Cost, Engine, register, structurally_singular


class NotPositiveDefiniteError(NumericalError):
    """A matrix that jitter up to ``settings(max_jitter=...)`` could not make positive definite."""


class JitterWarning(UserWarning):
    """Jitter was added to a diagonal so that a Cholesky factorisation succeeds."""


def first_jitter(dtype: torch.dtype) -> float:
    """The first rung of the jitter ladder, relative to the mean diagonal."""
    return 1e-8 if dtype == torch.float64 else 1e-6


def psd_cholesky(
    matrix: Tensor, what: str | Callable[[], str] = "matrix", *, assume_symmetric: bool = False
) -> Tensor:
    """Lower Cholesky factor of the symmetric part of ``matrix`` ``(..., n, n)`` (of ``matrix`` itself where
    the two differ by less than the factorisation's rounding error, see ``negligibly_asymmetric``).

    Batch members that are not numerically positive definite get jitter ``r * mean(diag)`` added with
    ``r = 1e-8`` (float64) or ``1e-6`` (float32), raised tenfold up to ``settings(max_jitter=...)``; each
    addition is warned with its size. Raises :class:`NotPositiveDefiniteError` naming ``what`` (and the
    failing batch entries) when that is not enough; ``what`` may be a function that builds the name, so
    that the common, successful call does not format it. ``assume_symmetric``: the caller knows that
    ``matrix`` is negligibly asymmetric (then it is factorised as it is, without looking).
    """
    if assume_symmetric or _negligibly_asymmetric(matrix):
        a = matrix
    else:  # halves first: (A + A^T) / 2 overflows near the float max
        a = torch.add(matrix * 0.5, matrix.mT, alpha=0.5)
    factor, info = torch.linalg.cholesky_ex(a)
    if not value_checks_enabled(info) or not _any_failed(info):
        return factor
    if callable(what):
        what = what()
    check_factorisable(a, what)  # jitter relative to a NaN/Inf diagonal cannot help
    max_jitter = _config.current().max_jitter
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(torch.finfo(a.dtype).tiny)
    failed = info > 0
    if bool((failed & (scale <= torch.finfo(a.dtype).tiny)).any()):  # e.g. 0 * op: nothing to be relative to
        raise NotPositiveDefiniteError(f"{what} is singular with a zero diagonal: jitter relative to it cannot help")
    rel = first_jitter(a.dtype)
    while rel <= max_jitter * (1 + 1e-9):
        jitter = torch.where(failed, rel * scale, torch.zeros_like(scale))
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        factor, info = torch.linalg.cholesky_ex(a + jitter[..., None, None] * eye)
        if not bool((info > 0).any()):
            amount = float(jitter.detach().max())
            warnings.warn(
                f"{what} was not positive definite in {a.dtype}: added jitter {amount:.3g} "
                f"({rel:.0e} of the mean diagonal) to the diagonal",
                JitterWarning,
                stacklevel=3,
            )
            report.record_jitter(amount)
            return factor
        rel *= 10
    bad = failed.nonzero().tolist() if failed.dim() else []
    where = f" (batch entries {bad[:10]})" if bad else ""
    raise NotPositiveDefiniteError(
        f"{what} is not positive definite{where}: Cholesky failed even with jitter {max_jitter:g} times "
        "the mean diagonal; check that the matrix is symmetric positive semidefinite"
    )


def _any_failed(info: Tensor) -> bool:
    """Whether a factorisation failed (``info > 0``), with one host read (of the largest ``info``)."""
    if info.dim() == 0:
        return info.item() > 0
    return info.numel() > 0 and info.max().item() > 0


def _negligibly_asymmetric(matrix: Tensor) -> bool:
    """Whether ``matrix``'s symmetric part equals it up to the factorisation's own rounding error (so the
    symmetrisation, two more operations in the autograd graph, can be skipped: Cholesky's backward already
    returns a symmetric gradient). CPU only: on a GPU reading the answer would cost a synchronisation, more
    than the two kernels it saves."""
    return matrix.device.type == "cpu" and value_checks_enabled(matrix) and negligibly_asymmetric(matrix)


def check_factorisable(a: Tensor, what: str) -> None:
    """Raise :class:`NumericalError` naming ``what`` when ``a`` has NaN or Inf entries (for failure paths)."""
    finite = torch.isfinite(a).all()
    if value_checks_enabled(finite) and not bool(finite):
        raise NumericalError(
            f"{what} has non-finite entries (NaN or Inf): a parameter overflowed or is not finite; "
            "check the scales of the covariance's parameters"
        )


def inverse_from_cholesky(factor: Tensor) -> Tensor:
    """``(L L^T)^{-1}`` from a lower Cholesky factor ``(..., n, n)``, as ``L^{-T} L^{-1}``: a triangular solve
    and a product (level-3 BLAS), about ten times faster on CPU than ``torch.cholesky_inverse``."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    inv_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
    return inv_factor.mT @ inv_factor


def cholesky_logdet(factor: Tensor) -> Tensor:
    """``log det (L L^T)`` from a Cholesky factor ``(..., n, n)``."""
    return 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)


# passes over an n x n matrix besides the factorisation, each way: forward: materialise it, the symmetry
# check (reads it and its transpose), the factor's allocation; backward: the elementwise steps of torch's
# Cholesky backward, the gradient of the dense matrix and its way back to the operator
DENSE_PASSES = 3


@register(Operator)
class DenseCholesky(Engine):
    """Materialise the operator and take a Cholesky factorisation (warned jitter if needed)."""

    name = "cholesky"

    def why(self, op: Operator) -> str | None:
        if structurally_singular(op):
            return None  # plan() says why and to add noise
        return f"dense Cholesky of the {op.n} x {op.n} matrix"

    def cost(self, op: Operator) -> Cost:
        batch, n = op.batch_shape.numel(), op.n
        matrix = n * n * op.dtype.itemsize
        passes = 2 if differentiated(op) else 1
        work = Work(
            factor=batch * n**3 / 3,
            factor_backward=batch * 2.0 * n**3 * (passes - 1),
            product=passes * batch * 2.0 * n * n,  # the triangular solve of one right-hand side
            stream=passes * batch * DENSE_PASSES * matrix,
        )
        return Cost(batch * n**3 / 3, 2 * batch * matrix, seconds(work, op.device, op.dtype))

    def factor(self, op: Operator) -> Tensor:
        def compute() -> Tensor:
            guard_dense(op, "dense Cholesky")
            symmetric = op._dense_is_symmetric()
            return psd_cholesky(op._to_dense(), lambda: f"the dense matrix of {op!r}", assume_symmetric=symmetric)

        return cached(op, "cholesky", compute)

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        return torch.cholesky_solve(rhs, self.factor(op))

    def logdet(self, op: Operator) -> Tensor:
        return cholesky_logdet(self.factor(op))

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.factor(op)
        white = torch.linalg.solve_triangular(factor, rhs, upper=False)
        return white.square().sum(-2), cholesky_logdet(factor)
