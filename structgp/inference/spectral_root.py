"""A jitter-free root of a singular Kronecker or dense covariance, from its truncated eigendecomposition.

A smooth kernel on a fine grid (an RBF factor whose lengthscale spans many grid points) is singular to
working precision: its Cholesky factorisation needs jitter, which changes the covariance by ``jitter * I``
(relative errors of 1e-6 in a log-likelihood, measured). The spectral root

    R = R_1 (x) ... (x) R_d,      R_i = Q_i[:, keep] diag(lambda_i[keep])^{1/2}

keeps the eigenpairs with ``lambda > max(n_i eps_64, eps_data) lambda_max``: the dropped part is below the
accuracy of ``eigh`` itself or of the data's own rounding, so ``R R^T = K`` as exactly as ``K`` is known,
and ``R`` has only as many columns as ``K`` has numerical rank (a smaller capacitance for the engines
that use it). It is computed without an autograd graph (``eigh``'s backward divides by eigenvalue gaps,
infinite for the clustered tiny eigenvalues of exactly these matrices); the engines that use it add
first-order surrogate terms for the covariance's gradients instead (see
:mod:`structgp.inference.lifted_woodbury`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.dense import Dense
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator
from structgp.covariance.root import DenseRoot, KroneckerRoot
from structgp.covariance.validation import host_readable
from structgp.inference._cache import cached, lookup
from structgp.inference.cholesky import NotPositiveDefiniteError
from structgp.inference.kronecker_spectrum import factor_names, factor_spectra, kronecker_spectra
from structgp.inference.spectral_jitter import kronecker_uncertainty


def spectral_matrices(op: Operator) -> tuple[list[Tensor], list[str]] | None:
    """The dense factors ``(..., n_i, n_i)`` of a Kronecker (or a Dense) covariance and their names, or None
    for operators whose root has another rule (diagonal, low-rank, ...)."""
    if isinstance(op, Kronecker) and not op.is_diagonal:
        return op.factor_matrices(), factor_names(len(op.factors))
    if isinstance(op, Dense):
        return [op.matrix], ["the Dense matrix"]
    return None


def cholesky_root(mats: list[Tensor]) -> list[Tensor] | None:
    """Differentiable float64 Cholesky factors of the symmetric parts of ``mats``, or None when one of them
    (any batch member) is not positive definite in float64 without jitter."""
    factors = []
    for m in mats:
        m64 = m.double()
        factor, info = torch.linalg.cholesky_ex((m64 + m64.mT) / 2)
        if bool((info > 0).any()):
            return None
        factors.append(factor)
    return factors


def _truncated(lam: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
    """``Q[:, keep] diag(lambda[keep])^{1/2}`` ``(..., n, k)``; ``k`` is the largest count over the batch of
    eigenvalues above ``max(n eps_64, eps_data) lambda_max`` (eigenvalues ascending, clamped at 0): below
    ``n eps_64`` ``eigh`` cannot resolve them; below ``eps_data`` (the rounding of the data's entries, for
    float32 data) they are rounding noise of either sign, and keeping only the positive ones biases the
    covariance (measured on a float32 SKI log-likelihood: rank 1369, error 7e-7 against rank 81, 9e-7)."""
    n = lam.shape[-1]
    rel = max(n * torch.finfo(torch.float64).eps, torch.finfo(dtype).eps)
    tol = rel * lam.amax(-1, keepdim=True)
    k = max(1, int((lam > tol).sum(-1).max()))
    return q[..., -k:] * lam[..., -k:].sqrt().unsqueeze(-2)


def spectral_root(op: Operator) -> LinearMap:
    """The truncated spectral root (float64, no graph) of a Kronecker or Dense covariance ``(..., n, n)``;
    raises ``NotPositiveDefiniteError`` naming the factor that is not positive semidefinite."""
    found = spectral_matrices(op)
    if found is None:
        raise TypeError(f"spectral_root: expected a Kronecker or Dense covariance, got {type(op).__name__}")
    mats, names = found

    def compute() -> LinearMap:
        # a Kronecker product's factor spectra are cached on it, shared with the eigen engine
        eig = kronecker_spectra(op) if isinstance(op, Kronecker) else factor_spectra(mats, names)
        factors = [_truncated(lam, q, m.dtype) for lam, q, m in zip(eig.values, eig.vectors, mats)]
        uncertainty = kronecker_uncertainty(eig.values, eig.clamped, op.dtype)
        cached(op, "spectral_uncertainty", lambda: uncertainty, detached=True)
        return KroneckerRoot(factors) if isinstance(op, Kronecker) else DenseRoot(factors[0])

    return cached(op, "spectral_root", compute, detached=True)


def spectral_uncertainty(op: Operator) -> Tensor:
    """How far ``R R^T`` of :func:`spectral_root` may be off ``op`` ``(...)`` (float64): the eigenvalues it
    dropped or clamped at 0, and the accuracy of ``eigh`` and of the data's rounding (computed with the root)."""
    spectral_root(op)
    found = lookup(op, "spectral_uncertainty")
    if found is not None:
        return found
    mats, _ = spectral_matrices(op)  # nothing cached (e.g. torch.func transforms): from the spectra again
    eig = kronecker_spectra(op) if isinstance(op, Kronecker) else factor_spectra(mats)
    return kronecker_uncertainty(eig.values, eig.clamped, op.dtype)


def exact_root(op: Operator) -> tuple[LinearMap, bool] | None:
    """For a Kronecker or Dense covariance: its differentiable Cholesky root (float64) when every factor is
    positive definite without jitter, ``(root, True)``; otherwise its spectral root, ``(root, False)``
    (no graph: the caller owes surrogate gradients). None for other operators, where values cannot be read
    (vmap, compile), under ``settings(spectral_root=False)`` and for factors indefinite beyond rounding: there
    the caller's default root applies (a Cholesky factor with warned jitter, which raises when jitter cannot
    help)."""
    found = spectral_matrices(op)
    if found is None or not host_readable(found[0][0]):  # torch.func.grad allows the reads; vmap does not
        return None
    if not _config.current().spectral_root:  # asked for the jittered Cholesky root (exact Hessians)
        return None
    known = known_root_rank(op)
    if known is None or not known[1]:  # a base known to be singular skips the Cholesky attempt
        chols = cholesky_root(found[0])
        if chols is not None:
            _remember(op, (op.n, False))
            return (KroneckerRoot(chols) if isinstance(op, Kronecker) else DenseRoot(chols[0])), True
    try:
        r = spectral_root(op)
    except NotPositiveDefiniteError:  # indefinite beyond rounding: the caller's jittered Cholesky decides
        return None
    _remember(op, (r.shape[-1], True))
    return r, False


def known_root_rank(op: Operator) -> tuple[int, bool] | None:
    """What :func:`exact_root` found for ``op`` with its current values, without computing anything:
    ``(columns, spectral)`` (``(n, False)`` for a Cholesky root), or None when it has not run (for the planner,
    which reads only cached facts)."""
    return lookup(op, "exact_root_rank")


def _remember(op: Operator, fact: tuple[int, bool]) -> None:
    cached(op, "exact_root_rank", lambda: fact, detached=True)
