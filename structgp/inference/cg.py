"""Batched preconditioned conjugate gradients that also return the Lanczos tridiagonals.

For ``A x = b`` with ``A`` symmetric positive definite and a preconditioner ``P`` (``P^{-1}`` applied by
``precondition``), each column of ``rhs`` ``(..., n, c)`` runs its own PCG recursion, all columns in one
batched product per iteration (only ``matmul`` touches ``A``, so every operator gets CG through its own
structured product):

    alpha_j = r_j^T z_j / p_j^T A p_j,   x += alpha_j p_j,   r -= alpha_j A p_j,   z = P^{-1} r,
    beta_j  = r_{j+1}^T z_{j+1} / r_j^T z_j,   p = z + beta_j p.

A column stops (its ``alpha`` is masked to 0 on the device) once its relative residual
``||r|| / ||b||`` is at most ``tol``; the host looks at the masks only every few iterations, so there is no
device synchronisation per iteration.

Under ``torch.func.vmap`` (or ``torch.compile``) the values cannot be read on the host, so the loop runs
exactly ``max_iter`` iterations with the same masked updates (a converged column's ``alpha`` and ``beta``
are 0, so its solution and coefficients are those of the early-stopping run) and nothing is inspected: the
residual is computed and returned but no :class:`CGConvergenceWarning` can be raised there, and
``converged``/``breakdown`` are reported as ``True``/``False``. Keep ``max_iter`` near the iterations a
problem needs (every iteration is paid for, and the tridiagonals are ``max_iter`` long).

PCG is the Lanczos process on ``M = P^{-1/2} A P^{-1/2}`` started from ``P^{-1/2} b``; its coefficients
give the Lanczos tridiagonal ``T`` of each column without storing a basis:

    T_jj = 1 / alpha_j + beta_{j-1} / alpha_{j-1},      T_{j,j+1} = sqrt(beta_j) / alpha_j,

so that ``b^T P^{-1/2} f(M) P^{-1/2} b ~= (b^T P^{-1} b) e_1^T f(T) e_1`` (see :mod:`.slq`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from structgp.covariance.validation import host_readable, value_checks_enabled


class CGConvergenceWarning(UserWarning):
    """Conjugate gradients stopped at ``max_iter`` above the requested tolerance."""


@dataclasses.dataclass
class CGResult:
    """What a batched PCG run produced, per column of its ``(..., n, c)`` right-hand side.

    solution: ``(..., n, c)``; iterations: ``(..., c)`` iterations each column ran; residual: ``(..., c)``
    relative residual reached; rz0: ``(..., c)`` ``b^T P^{-1} b``; alphas, betas: ``(..., c, m)`` the PCG
    coefficients (entries past a column's ``iterations`` are unused); converged: every column reached the
    tolerance; breakdown: some column met ``p^T A p <= 0`` (the operator is not positive definite);
    preconditioned_rhs: ``(..., n, c)`` ``P^{-1} b``, the first preconditioned residual (kept so that a
    caller who needs ``P^{-1} b`` does not apply the preconditioner again).
    """

    solution: Tensor
    iterations: Tensor
    residual: Tensor
    rz0: Tensor
    alphas: Tensor
    betas: Tensor
    converged: bool
    breakdown: bool
    preconditioned_rhs: Tensor | None = None

    def tridiagonal(self) -> tuple[Tensor, Tensor]:
        """Lanczos tridiagonals of every column in float64: ``(diag (..., c, m), off (..., c, m - 1))``.

        A column that ran ``k < m`` iterations is padded with a decoupled identity block (diagonal 1,
        off-diagonal 0), whose eigenvectors have a zero first entry, so quadratures are unchanged.
        """
        alpha = self.alphas.double()
        beta = self.betas.double()
        m = alpha.shape[-1]
        steps = torch.arange(m, device=alpha.device)
        valid = steps < self.iterations.unsqueeze(-1)
        safe_alpha = torch.where(valid, alpha, torch.ones_like(alpha))
        ratio = torch.where(valid, beta / safe_alpha, torch.zeros_like(beta))
        shifted = torch.cat([torch.zeros_like(ratio[..., :1]), ratio[..., :-1]], dim=-1)
        diag = torch.where(valid, 1 / safe_alpha + shifted, torch.ones_like(alpha))
        off_valid = valid[..., 1:]  # T_{j, j+1} exists when step j + 1 ran
        off = torch.where(off_valid, beta[..., :-1].clamp_min(0).sqrt() / safe_alpha[..., :-1], 0.0)
        return diag, off


def _next_check(iteration: int, every: int) -> int:
    """Iterations at which the host looks at convergence: 0, 1, 2, 3, 4, 6, 9, ..., then every ``every``."""
    return iteration + max(1, min(every, iteration // 2))


def pcg(
    matmul: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor] | None = None,
    *,
    tol: float,
    max_iter: int,
    check_every: int = 10,
    what: str = "the operator",
    history: list[Tensor] | None = None,
    dot: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> CGResult:
    """Solve ``A X = rhs`` column by column with preconditioned conjugate gradients.

    matmul: ``V (..., n, c) -> A V``; rhs: ``(..., n, c)`` (its batch shape must be the full batch shape of
    the products); precondition: ``R (..., n, c) -> P^{-1} R`` (identity when None). Runs without
    autograd. Warns (:class:`CGConvergenceWarning`, with the residual reached) when some column does not
    reach ``tol`` within ``max_iter`` iterations, and when the operator shows it is not positive definite.
    ``history``, if given, receives each iteration's relative residuals ``(..., c)`` (device tensors).
    ``dot``: ``(U, V) -> (..., c)`` the column dot products (default ``(U * V).sum(-2)``): a computation
    partitioned by rows passes its sum over the ranks (:mod:`.partitioned`; every norm is then ``dot``'s).
    Where ``rhs`` cannot be read on the host (vmap, compile) it runs ``max_iter`` masked iterations and
    does not warn (see the module docstring).
    """
    precondition = precondition or (lambda r: r)
    column_norm = (lambda t: t.norm(dim=-2)) if dot is None else (lambda t: dot(t, t).sqrt())
    dot = dot or (lambda a, b: (a * b).sum(-2))
    with torch.no_grad():
        x = torch.zeros_like(rhs)
        z0 = precondition(rhs)  # may be rhs itself (no preconditioner): only r is updated in place
        r = rhs.clone()
        p = z0  # p, z and rz are rebound, never updated in place: z0 and rz0 stay P^{-1} b and b^T P^{-1} b
        rz = dot(r, z0)
        rz0 = rz
        b_norm = column_norm(rhs)
        active = b_norm > 0
        safe_b = torch.where(active, b_norm, torch.ones_like(b_norm))
        residual = torch.zeros_like(b_norm)
        iterations = torch.zeros(b_norm.shape, dtype=torch.long, device=rhs.device)
        broke = torch.zeros_like(active)
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        # the host reads values only where they are readable: not under vmap (asked at every look: the
        # products may be batched where rhs is not)
        check = _next_check(0, check_every)
        steps = 0 if host_readable(active) and not bool(active.any()) else max_iter
        for j in range(steps):
            ap = matmul(p)
            pap = dot(p, ap)
            broke = broke | (active & ~(pap > 0))
            took = active & (pap > 0)  # the columns that take step j
            alpha = torch.where(took, rz / torch.where(took, pap, torch.ones_like(pap)), 0.0)
            if value_checks_enabled(alpha):
                x.addcmul_(alpha.unsqueeze(-2), p)
                r.addcmul_(alpha.unsqueeze(-2), ap, value=-1)
            else:  # under vmap (grad) an unbatched (captured) x or r cannot take batched (wrapped) updates in place
                x = torch.addcmul(x, alpha.unsqueeze(-2), p)
                r = torch.addcmul(r, alpha.unsqueeze(-2), ap, value=-1)
            alphas.append(alpha)
            iterations = iterations + took
            residual = torch.where(took, column_norm(r) / safe_b, residual)
            active = took & (residual > tol)
            if history is not None:
                history.append(residual.clone())
            # the host looks before the next preconditioner application, which is skipped where no column
            # takes another step (the last beta enters no tridiagonal: it stays 0)
            last = j + 1 == steps
            if not last and j + 1 == check and host_readable(active):
                check = _next_check(j + 1, check_every)
                last = not bool(active.any())
            if last:
                betas.append(torch.zeros_like(alpha))
                break
            z = precondition(r)
            rz_new = dot(r, z)
            beta = torch.where(took, rz_new / torch.where(took, rz, torch.ones_like(rz)), 0.0)
            p = torch.addcmul(z, beta.unsqueeze(-2), p)
            betas.append(beta)
            rz = torch.where(took, rz_new, rz)
        readable = host_readable(active) and host_readable(broke)
        still = bool(active.any()) if readable else False
        breakdown = bool(broke.any()) if readable else False
    if still:
        worst = float(residual.max())
        warnings.warn(
            f"conjugate gradients on {what} did not converge in {max_iter} iterations: relative residual "
            f"{worst:.3g} > cg_tol {tol:g}; raise structgp.settings(max_iter=...) or use a stronger "
            "preconditioner (precond_rank=...)",
            CGConvergenceWarning,
            stacklevel=3,
        )
    if breakdown:
        warnings.warn(
            f"conjugate gradients on {what} met p^T A p <= 0: the operator is not positive definite "
            "(in its precision); the affected columns stopped early",
            CGConvergenceWarning,
            stacklevel=3,
        )
    m_shape = (*b_norm.shape, 0)
    stack = (lambda xs: torch.stack(xs, dim=-1)) if alphas else (lambda xs: b_norm.new_zeros(m_shape))
    return CGResult(x, iterations, residual, rz0, stack(alphas), stack(betas), not still, breakdown, z0)
