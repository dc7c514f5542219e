"""Gaussian-process prediction from a solved training system, never densifying the training covariance.

With ``A = K + N`` the noisy training covariance, ``alpha = A^{-1} (y - m)`` and ``C = k(x_*, X)``:

    mean      m(x_*) + C alpha
    variance  diag k(x_*, x_*) - diag(C A^{-1} C^T)                (one solve with a column per test value)

For low-rank kernels (``C = F_* F^T``, ``F`` ``(n, r)``) the solve is done once, for the training factor:
``M = F^T A^{-1} F`` (``r x r``) and ``F^T alpha``; then a test point costs ``r^2``:

    mean      m(x_*) + F_* (F^T alpha)
    variance  diag k(x_*, x_*) - rowsum((F_* M) * F_*)

Test points are processed in chunks so that ``C`` stays within a memory budget.

Where the training system is solved iteratively and there are many test points, the variances come from a
Lanczos cache of ``A^{-1}`` (:mod:`structgp.inference.lanczos_inverse`, LOVE-style: each test point costs
``n m`` flops instead of a CG solve). The cache is checked against CG solves at the first ``CHECK_POINTS`` test
points of each call: where its variance error there exceeds ``LANCZOS_TOL`` times the prior variance, the call
falls back to the solves. The measured error is kept as ``TrainingSolve.lanczos_error``
(``model.training_solve().lanczos_error``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from structgp.covariance import Operator
from structgp.inference import plan
from structgp.inference.lanczos_inverse import LanczosInverse, lanczos_inverse

CHUNK_ENTRIES = 2**24  # entries of a cross-covariance chunk (test values x training values)
MAX_FACTOR_RANK = 4096  # low-rank kernels above this rank use the general path
LANCZOS_MIN_TEST = 256  # iterative training solves: more test points than this use the Lanczos cache
CHECK_POINTS = 8  # test points whose cached variance is checked against CG solves, each call
LANCZOS_TOL = 1e-4  # largest checked variance error, relative to the prior variance, the cache may have
VARIANCE_METHODS = ("auto", "solve", "lanczos")


@dataclasses.dataclass
class TrainingSolve:
    """What predictions reuse: ``A`` (so engines keep their factorisations), ``alpha`` ``(..., N)`` and,
    for low-rank kernels, ``M = F^T A^{-1} F`` ``(..., r, r)`` and ``F^T alpha`` ``(..., r)``."""

    covariance: Operator
    alpha: Tensor
    middle: Tensor | None = None
    projected: Tensor | None = None
    lanczos: LanczosInverse | None = None
    lanczos_error: float | None = None  # the largest relative variance error last checked (None: not used)


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


def dense_terms(
    cross: Tensor, solved: TrainingSolve, with_variance: bool = True, lanczos: LanczosInverse | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(C alpha (..., n_*), diag(C A^{-1} C^T) (..., n_*))`` for ``C`` ``(..., n_*, N)``; the variance term
    from ``lanczos`` (a checked cache) when given, else by solves."""
    mean = (cross @ solved.alpha.unsqueeze(-1)).squeeze(-1)
    if not with_variance:
        return mean, None
    if lanczos is not None:
        return mean, lanczos.quadratic_forms(cross.mT)
    solved_cross = solved.covariance.solve(cross.mT)  # (..., N, n_*)
    return mean, (cross.mT * solved_cross).sum(-2)


def use_lanczos(solved: TrainingSolve, method: str, n_test: int, chunks: int) -> bool:
    """Whether this call's variances come from the Lanczos cache (see the module docstring): asked for, or
    ``"auto"`` with an iterative training solve and enough test values that the solves would take several
    chunks (each chunk's solve costs about what building the cache does)."""
    if method not in VARIANCE_METHODS:
        raise ValueError(f"variance_method: expected one of {VARIANCE_METHODS}, got {method!r}")
    if method == "solve" or solved.middle is not None or solved.covariance.batch_shape:
        return False
    many = n_test > LANCZOS_MIN_TEST and chunks >= 3
    return method == "lanczos" or (many and not plan(solved.covariance).engine.exact)


def checked_lanczos(solved: TrainingSolve, cross: Tensor, prior_variance: Tensor, forced: bool) -> bool:
    """Build the cache (once) and check it at the first test points of ``cross`` ``(n_*, N)`` against CG
    solves; False (use the solves) when its relative variance error there exceeds ``LANCZOS_TOL``."""
    with torch.no_grad():
        if solved.lanczos is None:
            solved.lanczos = lanczos_inverse(solved.covariance)
        probe = cross[:CHECK_POINTS]
        cached = solved.lanczos.quadratic_forms(probe.mT)
        exact = (probe.mT * solved.covariance.solve(probe.mT)).sum(-2)
        solved.lanczos_error = float(((cached - exact).abs() / prior_variance[:CHECK_POINTS]).max())
    return forced or solved.lanczos_error <= LANCZOS_TOL


def factor_terms(factor: Tensor, solved: TrainingSolve) -> tuple[Tensor, Tensor]:
    """``(F_* F^T alpha, diag(F_* M F_*^T))`` for ``F_*`` ``(..., n_*, r)``."""
    mean = (factor @ solved.projected.unsqueeze(-1)).squeeze(-1)
    return mean, ((factor @ solved.middle) * factor).sum(-1)
