"""Gaussian-process prediction from a solved training system, never densifying the training covariance.

With ``A = K + N`` the noisy training covariance, ``alpha = A^{-1} (y - m)`` and ``C = k(x_*, X)``:

    mean      m(x_*) + C alpha
    variance  diag k(x_*, x_*) - diag(C A^{-1} C^T)                (one solve with a column per test value)

For low-rank kernels (``C = F_* F^T``, ``F`` ``(n, r)``) the solve is done once, for the training factor:
``M = F^T A^{-1} F`` (``r x r``) and ``F^T alpha``; then a test point costs ``r^2``:

    mean      m(x_*) + F_* (F^T alpha)
    variance  diag k(x_*, x_*) - rowsum((F_* M) * F_*)

Test points are processed in chunks so that ``C`` stays within a memory budget.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from structgp.covariance import Operator

CHUNK_ENTRIES = 2**24  # entries of a cross-covariance chunk (test values x training values)
MAX_FACTOR_RANK = 4096  # low-rank kernels above this rank use the general path


@dataclasses.dataclass
class TrainingSolve:
    """What predictions reuse: ``A`` (so engines keep their factorisations), ``alpha`` ``(..., N)`` and,
    for low-rank kernels, ``M = F^T A^{-1} F`` ``(..., r, r)`` and ``F^T alpha`` ``(..., r)``."""

    covariance: Operator
    alpha: Tensor
    middle: Tensor | None = None
    projected: Tensor | None = None


def solve_training(covariance: Operator, residual: Tensor, factor: Tensor | None) -> TrainingSolve:
    """``alpha = A^{-1} residual`` (``residual`` ``(..., N)``) and the low-rank terms when ``factor`` is given."""
    alpha = covariance.solve(residual.unsqueeze(-1)).squeeze(-1)
    if factor is None or factor.shape[-1] > MAX_FACTOR_RANK:
        return TrainingSolve(covariance, alpha)
    middle = factor.mT @ covariance.solve(factor)
    projected = (factor.mT @ alpha.unsqueeze(-1)).squeeze(-1)
    return TrainingSolve(covariance, alpha, (middle + middle.mT) / 2, projected)


def chunk_size(n_train: int, rank: int | None, per_point: int) -> int:
    """Test points a chunk: the cross-covariance chunk holds at most ``CHUNK_ENTRIES`` entries."""
    width = rank if rank is not None else n_train
    return max(1, CHUNK_ENTRIES // max(1, width * per_point))


def dense_terms(cross: Tensor, solved: TrainingSolve, with_variance: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(C alpha (..., n_*), diag(C A^{-1} C^T) (..., n_*))`` for ``C`` ``(..., n_*, N)``."""
    mean = (cross @ solved.alpha.unsqueeze(-1)).squeeze(-1)
    if not with_variance:
        return mean, None
    solved_cross = solved.covariance.solve(cross.mT)  # (..., N, n_*)
    return mean, (cross.mT * solved_cross).sum(-2)


def factor_terms(factor: Tensor, solved: TrainingSolve) -> tuple[Tensor, Tensor]:
    """``(F_* F^T alpha, diag(F_* M F_*^T))`` for ``F_*`` ``(..., n_*, r)``."""
    mean = (factor @ solved.projected.unsqueeze(-1)).squeeze(-1)
    return mean, ((factor @ solved.middle) * factor).sum(-1)
