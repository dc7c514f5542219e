"""A Lanczos cache of ``A^{-1}`` for many quadratic forms ``c^T A^{-1} c`` (LOVE-style predictive variances).

With a preconditioner ``P = R R^T`` (the iterative engine's, :mod:`.preconditioners`), ``M = R^{-1} A R^{-1}`` is
close to the identity except for a few outlying eigenvalues, which ``m`` steps of Lanczos on ``M`` (from a seeded
Rademacher start, full reorthogonalisation) find: ``M ~= Q T Q^T`` on the Krylov space, ``I`` off it. Then

    c^T A^{-1} c = (R^{-1} c)^T M^{-1} (R^{-1} c) ~= c^T P^{-1} c + (B^T c)^T (T^{-1} - I) (B^T c),

with ``B = R^{-1} Q`` ``(..., n, m)``. Neither ``R^{-1}`` nor ``Q`` is formed: the recursion runs on
``u_j = R q_j`` and ``b_j = R^{-1} q_j = P^{-1} u_j`` (``q_i^T q_j = b_i^T u_j``), one product with ``A`` and one
``P^{-1}`` a step. Each quadratic form then costs one ``P^{-1}`` application and ``n m`` flops, instead of a CG
solve; the cache costs ``m`` products with ``A`` once.

Error: exact when ``M - I`` has rank below ``m`` (the Krylov space is then invariant and holds all of it); otherwise
the neglected part is
``(R^{-1} c)_perp^T (M^{-1} - I) (R^{-1} c)_perp`` off the Krylov space, small when the preconditioner captures
what Lanczos does not. The cache records the size of the last Lanczos residual ``beta_m`` (relative to
``||T||``) so callers can say how converged it is; :func:`lanczos_inverse` stops early once it is below ``tol``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.operator import Operator
from structgp.inference.iterative import rademacher
from structgp.inference.preconditioners import Preconditioner, build

DEFAULT_STEPS = 40
DEFAULT_TOL = 1e-6


@dataclasses.dataclass
class LanczosInverse:
    """``c^T A^{-1} c`` for many ``c`` from a Lanczos cache (see the module docstring).

    preconditioner: ``P``; basis: ``B`` ``(n, m)``; middle: ``T^{-1} - I`` ``(m, m)``; residual: the last
    Lanczos coefficient relative to ``||T||`` (0: the Krylov space is invariant, the cache is exact).
    """

    preconditioner: Preconditioner
    basis: Tensor
    middle: Tensor
    residual: float

    def quadratic_forms(self, columns: Tensor) -> Tensor:
        """``diag(C^T A^{-1} C)`` ``(s,)`` for ``C`` ``(n, s)`` (no autograd)."""
        with torch.no_grad():
            first = (columns * self.preconditioner.solve(columns)).sum(-2)
            projected = self.basis.mT @ columns  # (m, s)
            return first + (projected * (self.middle @ projected)).sum(-2)


def lanczos_inverse(op: Operator, steps: int = DEFAULT_STEPS, tol: float = DEFAULT_TOL) -> LanczosInverse:
    """The Lanczos cache of ``op`` ``(n, n)`` (unbatched) with at most ``steps`` steps, stopping once the
    Lanczos residual is below ``tol`` relative to ``||T||``; runs without autograd."""
    if op.batch_shape:
        raise ValueError(f"op: the Lanczos cache takes an unbatched operator, got batch shape {tuple(op.batch_shape)}")
    cfg = _config.current()
    steps = max(1, min(steps, op.n))
    with torch.no_grad():
        precond = build(op, cfg)
        like = torch.empty((), dtype=op.dtype, device=op.device)
        u = rademacher((op.n, 1), like, cfg.seed)
        b = precond.solve(u)
        norm = (u * b).sum().sqrt()
        us, bs, alphas, betas = [u / norm], [b / norm], [], []
        residual = 0.0
        for j in range(steps):
            w = op._matmul(bs[j])
            alphas.append((bs[j] * w).sum())
            basis_u, basis_b = torch.cat(us, dim=-1), torch.cat(bs, dim=-1)
            for _ in range(2):  # full reorthogonalisation, twice (is enough): w -= U (B^T w)
                w = w - basis_u @ (basis_b.mT @ w)
            z = precond.solve(w)
            beta = (w * z).sum().clamp_min(0).sqrt()
            scale = torch.stack(alphas).abs().max()
            residual = float(beta / scale)
            if residual <= tol or j + 1 == steps:
                break
            betas.append(beta)
            us.append(w / beta)
            bs.append(z / beta)
        tri = torch.diag(torch.stack(alphas).double())
        if betas:
            off = torch.stack(betas).double()
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        eye = torch.eye(tri.shape[-1], dtype=tri.dtype, device=tri.device)
        middle = (torch.linalg.inv(tri) - eye).to(op.dtype)
    return LanczosInverse(precond, torch.cat(bs, dim=-1), middle, residual)
