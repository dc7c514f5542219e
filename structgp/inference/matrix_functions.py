"""Products with matrix square roots: ``A^{1/2} x`` (sampling) and ``A^{-1/2} x`` (whitening).

By structure where ``f(A) = Q f(Lambda) Q^T`` is cheap (``functools.singledispatch`` rules): a diagonal entry
by entry; a Kronecker product (plus ``s I``) from its factors' eigendecompositions, applied factor-wise
(``N sum n_i`` a column); ``W W^T + s I`` by ``f(A) = f(s) I + W V h(mu) V^T W^T`` with ``W^T W = V diag(mu) V^T``
and the divided difference ``h(mu) = (f(mu + s) - f(s)) / mu``; small operators (``n <= 256``) densely.

Otherwise Lanczos quadrature, one Krylov space per column ``b``: ``m`` steps of Lanczos (with full
reorthogonalisation) from ``q_1 = b / |b|`` give ``A Q_m = Q_m T_m + ...`` and

    f(A) b  ~=  |b| Q_m f(T_m) e_1,

stopped when the coefficients ``f(T_m) e_1`` change by less than ``tol`` (relative) from one step to the
next, or after ``min(n, settings(max_iter=...))`` steps. Everything is plain torch, so gradients flow by
autograd (through the factor eigendecompositions for the exact rules, through the Lanczos recurrence
otherwise: exact for converged spaces, as in ``torch.linalg.eigh`` only for distinct eigenvalues).

:class:`SqrtRoot` wraps ``A^{1/2}`` as a (symmetric) structured root ``R`` with ``R R^T = A``, for sampling
``R eps`` from operators without a structured root of their own. ``A`` must be positive semidefinite
(``A^{-1/2}``: positive definite).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.linear_map import OperatorMap
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator, guard_dense
from structgp.covariance.permuted import Permuted
from structgp.covariance.sum import AddedDiagonal
from structgp.inference.gram_spectrum import gram_spectrum
from structgp.inference.kronecker_spectrum import kronecker_spectra, spectral_matmul

DENSE_N = 256  # operators up to this size are decomposed densely


def sqrt_matmul(op: Operator, rhs: Tensor, *, tol: float | None = None) -> Tensor:
    """``A^{1/2} rhs`` for the symmetric PSD square root; ``rhs`` ``(n,)`` or ``(..., n, c)``."""
    return power_matmul(op, rhs, 0.5, tol=tol)


def inv_sqrt_matmul(op: Operator, rhs: Tensor, *, tol: float | None = None) -> Tensor:
    """``A^{-1/2} rhs`` (whitening: ``A^{-1/2} y`` has identity covariance when ``y ~ N(0, A)``)."""
    return power_matmul(op, rhs, -0.5, tol=tol)


def power_matmul(op: Operator, rhs: Tensor, power: float, *, tol: float | None = None) -> Tensor:
    """``A^power rhs`` for ``power`` in ``{1/2, -1/2}`` (any real power where ``A`` is positive definite)."""
    if not isinstance(op, Operator):
        raise TypeError(f"op: expected a structgp operator, got {type(op).__name__}")
    if not isinstance(rhs, Tensor) or rhs.dim() < 1 or rhs.shape[-2 if rhs.dim() > 1 else -1] != op.n:
        got = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
        raise ValueError(f"rhs: expected a tensor of shape ({op.n},) or (..., {op.n}, c), got {got}")
    if rhs.dtype != op.dtype:
        raise TypeError(f"rhs: expected dtype {op.dtype} (the operator's), got {rhs.dtype}")
    vector = rhs.dim() == 1
    x = rhs.unsqueeze(-1) if vector else rhs
    fn = _power(power)
    out = structured_function(op, x, fn)
    if out is None:
        if op.n <= DENSE_N:
            out = _dense_function(op, x, fn)
        else:
            cfg = _config.current()
            out = lanczos_function(op, x, fn, cfg.cg_tol if tol is None else tol, cfg.max_iter)
    return out.squeeze(-1) if vector else out


def _sym(a: Tensor) -> Tensor:
    return (a + a.mT) / 2


def _power(p: float) -> Callable[[Tensor], Tensor]:
    def fn(lam: Tensor) -> Tensor:
        return lam.clamp_min(0).pow(p) if p > 0 else lam.pow(p)

    return fn


# -- exact rules ---------------------------------------------------------------------------------------
@functools.singledispatch
def structured_function(op: Operator, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    """``f(op) x`` for ``x`` ``(..., n, c)`` from the structure, or None when there is no exact rule."""
    return None


def _diagonal_function(op: Operator, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return fn(op.diagonal()).unsqueeze(-1) * x


structured_function.register(Diagonal, _diagonal_function)
structured_function.register(ScaledIdentity, _diagonal_function)


@structured_function.register
def _(op: Kronecker, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    if op.is_diagonal:
        return _diagonal_function(op, x, fn)
    return _kronecker_function(op, None, x, fn)


def _kronecker_function(op: Kronecker, shift: Tensor | None, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``Q f(l_1 (x) l_2 (x) ... + s) Q^T x`` with ``Q = q_1 (x) q_2 (x) ...`` (the raw float64 factor spectra:
    ``K + s I`` may be positive definite while a factor is not)."""
    spectra = kronecker_spectra(op, psd=False, differentiable=True)
    lam = spectra.eigenvalues()
    if shift is not None:
        lam = lam + shift.double().unsqueeze(-1)
    return spectral_matmul(spectra.vectors, fn(lam), x.double()).to(x.dtype)


@structured_function.register
def _(op: AddedDiagonal, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    if not isinstance(op.noise, ScaledIdentity):
        return None
    s = op.noise.scale
    if isinstance(op.base, Kronecker) and not op.base.is_diagonal:
        return _kronecker_function(op.base, s, x, fn)
    if isinstance(op.base, LowRank):
        return _low_rank_function(op.base.factor, s, x, fn)
    return None


def _low_rank_function(w: Tensor, s: Tensor, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``f(W W^T + s I) x = f(s) x + W V h(mu) V^T W^T x`` with ``h(mu) = (f(mu + s) - f(s)) / mu`` (and its
    limit ``f'(s)``, by a central difference, where ``mu`` is ~0)."""
    gram = gram_spectrum(w)
    mu, s64 = gram.values, s.double().unsqueeze(-1)  # s64: (..., 1)
    fs = fn(s64)
    small = mu <= 1e-8 * (s64 + mu.amax(-1, keepdim=True))
    eps = 1e-6 * s64
    slope = (fn(s64 + eps) - fn(s64 - eps)) / (2 * eps)
    safe_mu = torch.where(small, torch.ones_like(mu), mu)
    h = torch.where(small, slope, (fn(mu + s64) - fs) / safe_mu)  # (..., r)
    x64 = x.double()
    return (fs.unsqueeze(-1) * x64 + gram.spectral_matmul(h, x64)).to(x.dtype)


def _dense_function(op: Operator, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    guard_dense(op, "matrix function (dense eigh)")
    lam, q = torch.linalg.eigh(_sym(op._to_dense().double()))
    return (q @ (fn(lam).unsqueeze(-1) * (q.mT @ x.double()))).to(x.dtype)


# -- Lanczos quadrature -------------------------------------------------------------------------------
def lanczos_function(op: Operator, x: Tensor, fn: Callable[[Tensor], Tensor], tol: float, max_iter: int) -> Tensor:
    """``f(A) x`` ``(..., n, c)`` by Lanczos quadrature, an independent Krylov space per column."""
    n = op.n
    batch = torch.broadcast_shapes(op.batch_shape, x.shape[:-2])
    x = x.expand(*batch, *x.shape[-2:])
    norm = x.norm(dim=-2)  # (..., c)
    q = x / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(-2)
    basis, alphas, betas = [q], [], []
    done = norm <= 0  # columns whose Krylov space is exhausted
    previous = None
    steps = max(1, min(n, max_iter))
    for j in range(steps):
        w = op._matmul(q)
        alpha = (q * w).sum(-2)
        alphas.append(torch.where(done, torch.ones_like(alpha), alpha))  # exhausted columns: harmless 1s
        w = w - alpha.unsqueeze(-2) * q
        if betas:
            w = w - betas[-1].unsqueeze(-2) * basis[-2]
        stack = torch.stack(basis, dim=-3)  # (..., j+1, n, c)
        for _ in range(2):  # full reorthogonalisation, per column
            w = w - (stack * (stack * w.unsqueeze(-3)).sum(-2, keepdim=True)).sum(-3)
        beta = w.norm(dim=-2)
        coef = _quadrature(alphas, betas, fn)  # (..., c, j+1)
        scale = alphas[0].abs().detach() + beta.detach() + torch.finfo(x.dtype).tiny
        done = done | (beta.detach() <= 100 * torch.finfo(x.dtype).eps * scale)
        if previous is not None:
            change = (coef[..., :-1] - previous).norm(dim=-1).square() + coef[..., -1].square()
            if bool((change.detach().sqrt() <= tol * coef.detach().norm(dim=-1)).all()):
                break
        if bool(done.all()) or j == steps - 1:
            break
        previous = coef
        q = torch.where(done.unsqueeze(-2), torch.zeros_like(w), w / torch.where(done, 1, beta).unsqueeze(-2))
        betas.append(torch.where(done, torch.zeros_like(beta), beta))
        basis.append(q)
    stack = torch.stack(basis[: coef.shape[-1]], dim=-1)  # (..., n, c, m)
    return norm.unsqueeze(-2) * (stack * coef.to(x.dtype).unsqueeze(-3)).sum(-1)


def _quadrature(alphas: list[Tensor], betas: list[Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``f(T) e_1`` ``(..., c, m)`` (float64) for the tridiagonal ``T`` of each column."""
    diag = torch.stack(alphas, dim=-1).double()  # (..., c, m)
    t = torch.diag_embed(diag)
    if betas:
        off = torch.stack(betas, dim=-1).double()
        t = t + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    theta, s = torch.linalg.eigh(t)
    return (s * (fn(theta) * s[..., 0, :]).unsqueeze(-2)).sum(-1)  # S f(Theta) S^T e_1


class SqrtRoot(OperatorMap):
    """``A^{1/2}`` ``(..., n, n)`` as a root (``R R^T = A``, ``R`` symmetric) applied by :func:`sqrt_matmul`:
    samples ``R eps`` of ``N(0, A)`` for operators without a structured root of their own."""

    def _matmul(self, x: Tensor) -> Tensor:
        return sqrt_matmul(self.op, x)

    tmatmul = _matmul

    def to_dense(self) -> Tensor:
        guard_dense(self.op, "SqrtRoot.to_dense()")
        eye = torch.eye(self.op.n, dtype=self.op.dtype, device=self.op.device)
        return _dense_function(self.op, eye, _power(0.5))

    def _transpose(self) -> SqrtRoot:
        return self


# -- Permuted: f(P B P^T) x = P f(B) P^T x ------------------------------------------------------------
@structured_function.register
def _(op: Permuted, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    out = structured_function(op.base, op.to_base_order(x), fn)
    return None if out is None else op.from_base_order(out)
