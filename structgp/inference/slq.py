"""Stochastic Lanczos quadrature (SLQ) of ``log det A`` with the preconditioner as control variate.

With a preconditioner ``P = R R^T`` (``R`` square) whose log-determinant is known exactly,

    log det A = log det P + tr log(R^{-1} A R^{-T}),

and the trace is estimated by Hutchinson's estimator with Rademacher probes ``eps_i``:
``tr f(B) = E[eps^T f(B) eps]``. Running PCG on ``A u = z`` with ``z = R eps`` is the Lanczos process on
``M = P^{-1/2} A P^{-1/2}`` from ``P^{-1/2} z``, which is orthogonally similar to ``R^{-1} A R^{-T}`` with the
start vector mapped to ``eps``; so Gauss quadrature on each probe's Lanczos tridiagonal ``T_i`` gives

    eps_i^T log(R^{-1} A R^{-T}) eps_i ~= (z_i^T P^{-1} z_i) e_1^T log(T_i) e_1.

The closer ``P`` is to ``A``, the closer ``log(R^{-1} A R^{-T})`` is to 0 and the smaller the variance; a
root ``R`` close to the symmetric one keeps the matrix near-diagonal, where Rademacher probes are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from structgp.inference.cg import CGResult


def lanczos_quadrature(diag: Tensor, off: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``e_1^T f(T) e_1`` for symmetric tridiagonals ``T`` given by ``diag`` ``(..., m)`` and ``off``
    ``(..., m - 1)`` (float64): Gauss quadrature with nodes the eigenvalues of ``T`` and weights the
    squared first entries of its eigenvectors. Returns ``(...)``."""
    if diag.shape[-1] == 0:
        return diag.new_zeros(diag.shape[:-1])
    t = torch.diag_embed(diag) + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    nodes, vectors = torch.linalg.eigh(t)
    weights = vectors[..., 0, :].square()
    return (weights * fn(nodes)).sum(-1)


def _safe_log(nodes: Tensor) -> Tensor:
    # Ritz values of an SPD matrix are positive; rounding can only push a tiny one to <= 0
    return nodes.clamp_min(torch.finfo(nodes.dtype).tiny).log()


def slq_terms(result: CGResult, columns: slice) -> Tensor:
    """Per-probe quadratures ``(z_i^T P^{-1} z_i) e_1^T log(T_i) e_1`` for the probe columns of a PCG run,
    float64 ``(..., p)``."""
    diag, off = result.tridiagonal()
    quad = lanczos_quadrature(diag[..., columns, :], off[..., columns, :], _safe_log)
    return result.rz0[..., columns].double() * quad


def slq_logdet(result: CGResult, columns: slice, precond_logdet: Tensor) -> tuple[Tensor, Tensor]:
    """``(log det A estimate, its standard error)``, both float64 ``(...)``, from the probe columns of a
    PCG run whose probes were ``z_i = R eps_i`` (``R R^T = P``) and ``log det P`` ``(...)``."""
    terms = slq_terms(result, columns)
    p = terms.shape[-1]
    stderr = terms.std(-1) / p**0.5 if p > 1 else torch.full_like(terms[..., 0], float("nan"))
    return precond_logdet.double() + terms.mean(-1), stderr
