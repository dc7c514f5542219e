"""Kronecker products plus (Kronecker-structured) diagonal noise by per-factor eigendecomposition.

Covers ``A = K_1 (x) ... (x) K_d + D`` where ``D`` is ``s I``, a Kronecker product of diagonals
``D_1 (x) ... (x) D_d`` (e.g. per-task noise), or absent. A Kronecker-structured ``D`` is symmetrised:
``A = D^{1/2} (M + I) D^{1/2}`` with ``M = (x)_i D_i^{-1/2} K_i D_i^{-1/2}``; in every case the work is on
``B = M_1 (x) ... (x) M_d + sigma I``. With ``M_i = Q_i diag(l_i) Q_i^T`` (by :mod:`.kronecker_spectrum`: in
float64, detached, PSD-checked, cached while the tensors are unchanged):

    eigenvalues of B:  lambda = l_1 (x) ... (x) l_d + sigma
    B^{-1} r = Q diag(1/lambda) Q^T r       (factor-wise products, N sum n_i flops)
    log det B = sum log lambda

Cost ``sum n_i^3`` for the factorisations and ``N sum n_i`` a solve.

Gradients are written from ``d log det B = tr(B^{-1} dB)`` and ``d B^{-1} = -B^{-1} dB B^{-1}`` in the
eigenbasis, never through ``eigh``'s backward (whose ``1 / (l_a - l_b)`` terms blow up for the repeated or
tiny eigenvalues of a grid RBF kernel). They are delivered by first-order surrogates made of plain torch
operations, so they compose with ``torch.func.grad``/``vmap``: with ``S`` the detached inverse,

    logdet:    sum log lambda + <w, m> - <w, m>.detach(),  w = 1/lambda, m = (x)_i diag(Q_i^T M_i Q_i) + sigma
    solve:     x0 + (c - c.detach()),  c = S (r - B x0),  x0 = S r detached
    inv_quad:  r.x0 + (g - g.detach()),  g = 2 r.x0 - x0^T B x0

Each surrogate's value is exactly 0, so the value is the same with and without gradients (``g`` itself
cancels catastrophically in float32 where ``B`` is ill-conditioned), and the first derivatives are exact
(``tr(B^{-1} dB)`` only needs the diagonal of ``Q^T dB Q``).

Singular ``B`` (a Kronecker product without noise, or with noise below what the data's precision resolves)
gets the dense path's warned jitter (:mod:`.spectral_jitter`), never a division by a zero eigenvalue.

Second derivatives of these paths are not supported: ``create_graph=True`` raises (see
:mod:`structgp.inference.first_order`) rather than returning wrong Hessians.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from structgp.covariance.diagonal import ScaledIdentity
from structgp.covariance.kron import kron_matmul, kron_vector
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal
from structgp.covariance.validation import host_readable
from structgp.inference._cache import cached
from structgp.inference.first_order import first_order_only
from structgp.inference.kronecker_spectrum import (
    FactorSpectra,
    factor_spectra,
    from_eigenbasis,
    kronecker_spectra,
    to_eigenbasis,
)
from structgp.inference.plan import Cost, Engine, register
from structgp.inference.spectral_jitter import eigenvalue_jitter, kronecker_uncertainty

_WHAT = "the Kronecker eigen path"


@dataclasses.dataclass
class _Problem:
    """``A = diag(outer) (M_1 (x) ... + sigma I) diag(outer)``, all differentiable; ``B`` gets the warned
    ``jitter`` when its smallest eigenvalue is not above the eigenvalues' uncertainty."""

    mats: list[Tensor]  # M_i (..., n_i, n_i)
    sigma: Tensor | None  # (...) or None for no shift
    outer: list[Tensor] | None  # D_i^{-1/2} (..., n_i), or None when D = s I / absent
    eig: FactorSpectra  # of the M_i: float64, detached, PSD-checked
    jitter: Tensor | None = None  # (...) float64, detached: added to B's diagonal


def _kron_diag_noise(op: AddedDiagonal) -> list[Tensor] | None:
    """The factor diagonals ``d_i`` when the noise is a Kronecker product of diagonals matching the base."""
    noise, base = op.noise, op.base
    if not isinstance(noise, Kronecker) or len(noise.factors) != len(base.factors):
        return None
    if any(f.n != g.n for f, g in zip(noise.factors, base.factors)):
        return None
    return [f.diagonal() for f in noise.factors]


def _problem(op: Operator) -> _Problem:
    if isinstance(op, Kronecker):
        p = _Problem(op.factor_matrices(), None, None, kronecker_spectra(op))
        what = f"the Kronecker product {op!r}"
    elif isinstance(op.noise, ScaledIdentity):
        p = _Problem(op.base.factor_matrices(), op.noise.scale, None, kronecker_spectra(op.base))
        what = f"the Kronecker product plus noise {op!r}"
    else:
        # the symmetrised factors D_i^{-1/2} K_i D_i^{-1/2} belong to this sum, so their spectra are cached on it
        outer = [d.rsqrt() for d in _kron_diag_noise(op)]
        mats = [t.unsqueeze(-1) * m * t.unsqueeze(-2) for t, m in zip(outer, op.base.factor_matrices())]
        eig = cached(op, "eigh", lambda: factor_spectra(mats), detached=True)
        p = _Problem(mats, torch.ones((), dtype=op.dtype, device=op.device), outer, eig)
        what = f"the symmetrised D^-1/2 K D^-1/2 + I of {op!r}"
    p.jitter = _jitter(p, op.dtype, what)
    return p


def _jitter(p: _Problem, dtype: torch.dtype, what: str) -> Tensor | None:
    """The warned jitter of ``B`` (see :mod:`.spectral_jitter`), or None where none is added. The smallest
    eigenvalue of ``B`` is ``prod_i min l_i + sigma`` (the ``l_i`` are clamped at 0)."""
    values = p.eig.values
    low, mean_diag = values[0].amin(-1), p.mats[0].detach().diagonal(dim1=-2, dim2=-1).mean(-1).double()
    for v, m in zip(values[1:], p.mats[1:]):  # a loop, not math.prod over a generator: torch.compile traces it
        low = low * v.amin(-1)
        mean_diag = mean_diag * m.detach().diagonal(dim1=-2, dim2=-1).mean(-1).double()
    if p.sigma is not None:
        sigma = p.sigma.detach().double()
        low, mean_diag = low + sigma, mean_diag + sigma
    uncertainty = kronecker_uncertainty(values, p.eig.clamped, dtype)
    jitter = eigenvalue_jitter(low, uncertainty, mean_diag, dtype, what)
    if host_readable(jitter) and not bool((low <= uncertainty).any()):
        return None
    return jitter


def _eigenvalues(p: _Problem) -> Tensor:
    """``lambda`` (float64, detached) of shape ``(..., N)``."""
    lam = p.eig.eigenvalues()
    if p.sigma is not None:
        lam = lam + p.sigma.detach().double().unsqueeze(-1)
    if p.jitter is not None:
        lam = lam + p.jitter.unsqueeze(-1)
    return lam


def _inverse(p: _Problem, rhs: Tensor) -> Tensor:
    """Detached ``B^{-1} rhs`` for ``rhs`` ``(..., N, c)``."""
    with torch.no_grad():
        return _inverse_differentiable_rhs(p, rhs.detach())


def _apply_b(p: _Problem, x: Tensor) -> Tensor:
    """Differentiable ``B x``."""
    out = kron_matmul(p.mats, x)
    if p.sigma is not None:
        out = out + p.sigma[..., None, None] * x
    if p.jitter is not None:
        out = out + p.jitter.to(x.dtype)[..., None, None] * x
    return out


def _needs_grad(p: _Problem, *tensors: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    pieces = [*p.mats, *tensors, *(p.outer or [])] + ([p.sigma] if p.sigma is not None else [])
    return any(t.requires_grad for t in pieces)


def _solve_b(p: _Problem, rhs: Tensor) -> Tensor:
    x0 = _inverse(p, rhs)
    if not _needs_grad(p, rhs):
        return x0
    # the gradient only: the correction's value (a residual formed in the data's precision) is dropped
    correction = _inverse_differentiable_rhs(p, rhs - _apply_b(p, x0))
    return first_order_only(x0 + (correction - correction.detach()), _WHAT)


def _inverse_differentiable_rhs(p: _Problem, r: Tensor) -> Tensor:
    """``S r`` with the detached inverse ``S`` but gradients flowing through ``r``."""
    q = [v.to(r.dtype) for v in p.eig.vectors]
    return from_eigenbasis(q, to_eigenbasis(q, r) / _eigenvalues(p).to(r.dtype).unsqueeze(-1))


def _logdet_b(p: _Problem) -> Tensor:
    lam = _eigenvalues(p)
    value = lam.log().sum(-1)
    if not _needs_grad(p):
        return value
    w = lam.reciprocal()
    diag = [
        (v.to(m.dtype).mT @ m @ v.to(m.dtype)).diagonal(dim1=-2, dim2=-1)
        for v, m in zip(p.eig.vectors, p.mats)
    ]
    m_hat = kron_vector(diag)
    surrogate = (w.to(m_hat.dtype) * m_hat).sum(-1)
    if p.sigma is not None:
        surrogate = surrogate + p.sigma * w.sum(-1).to(p.sigma.dtype)
    return first_order_only(value + (surrogate - surrogate.detach()).double(), _WHAT)


def _logdet(op: Operator, p: _Problem) -> Tensor:
    """``log det A = log det B + log det D``, in ``op``'s dtype."""
    value = _logdet_b(p)
    if p.outer is not None:  # log det D = -2 sum log (x)_i D_i^{-1/2}
        n = op.n
        value = value - 2 * sum(n // t.shape[-1] * t.log().sum(-1) for t in p.outer)
    return value.to(op.dtype)


def _outer(p: _Problem) -> Tensor | None:
    return None if p.outer is None else kron_vector(p.outer)


@register(Kronecker)
@register(Kronecker, ScaledIdentity)
@register(Kronecker, Kronecker)  # noise: a Kronecker product of diagonals
class KroneckerEigen(Engine):
    name = "eigen"

    def why(self, op: Operator) -> str | None:
        if isinstance(op, Kronecker):
            if op.is_diagonal:
                return None  # entry by entry
            return f"Kronecker {_sizes(op)}: per-factor eigendecomposition (singular unless noise is added)"
        if op.base.is_diagonal:
            return None
        if isinstance(op.noise, ScaledIdentity):
            return f"Kronecker {_sizes(op.base)} + ScaledIdentity: per-factor eigendecomposition"
        if _kron_diag_noise(op) is not None:
            return f"Kronecker {_sizes(op.base)} + Kronecker-structured diagonal: symmetrised eigendecomposition"
        return None

    def cost(self, op: Operator) -> Cost:
        kron = op if isinstance(op, Kronecker) else op.base
        batch, n = op.batch_shape.numel(), op.n
        flops = batch * (sum(9 * s**3 for s in kron.sizes) + 4 * n * sum(kron.sizes))
        return Cost(flops, batch * (3 * n * 8 + sum(s * s for s in kron.sizes) * 8))

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        p = _problem(op)
        outer = _outer(p)
        if outer is None:
            return _solve_b(p, rhs)
        outer = outer.to(rhs.dtype).unsqueeze(-1)
        return outer * _solve_b(p, outer * rhs)

    def logdet(self, op: Operator) -> Tensor:
        return _logdet(op, _problem(op))

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        p = _problem(op)
        outer = _outer(p)
        r = rhs if outer is None else outer.to(rhs.dtype).unsqueeze(-1) * rhs
        x0 = _inverse(p, r)
        inv_quad = (r.detach() * x0).sum(-2)
        if _needs_grad(p, r):  # the gradient only, by a term of value 0 (its value cancels catastrophically)
            g = 2 * (r * x0).sum(-2) - (x0 * _apply_b(p, x0)).sum(-2)
            inv_quad = first_order_only(inv_quad + (g - g.detach()), _WHAT)
        return inv_quad, _logdet(op, p)


def _sizes(kron: Kronecker) -> str:
    return " x ".join(str(s) for s in kron.sizes) + f" (N = {math.prod(kron.sizes)})"
