"""LowRank + diagonal noise by the whitened Woodbury identity and the matrix determinant lemma.

For ``A = W W^T + D`` with ``W`` ``(..., n, k)`` and positive diagonal ``D``, let ``V = D^{-1/2} W`` and the
capacitance ``C = I_k + V^T V`` (``k x k``, factorised in float64). Then

    A^{-1} = D^{-1/2} (I - V C^{-1} V^T) D^{-1/2},        log det A = log det D + log det C.

Cost ``n k^2`` flops; memory ``n k`` beyond the inputs. ``C``'s eigenvalues are at least 1, so the
factorisation never needs jitter.

Overflow. ``V^T V`` overflows once ``|V|`` nears ``sqrt(float max / n)`` (``1e152`` in float64, ``1e18`` in
float32), while ``A``'s log density stays finite. When the plain capacitance's factor is not finite, ``V`` is
divided by ``s``, the power of two at or above ``max |V|`` and at least 1 (detached, exact): with
``U = V / s``, ``C = s^2 (U^T U + I / s^2) = s^2 C'`` and

    log det C = 2 k log s + log det C',      V C^{-1} V^T = U C'^{-1} U^T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.errors import NumericalError
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal
from structgp.covariance.validation import value_checks_enabled
from structgp.inference.cholesky import cholesky_logdet, psd_cholesky
from structgp.inference.plan import Cost, Engine, register


def capacitance_cholesky(gram: Tensor, what: str, shift: Tensor | None = None) -> Tensor:
    """Lower Cholesky factor (float64) of ``gram + shift I`` (``shift`` ``(...)``, 1 when None) for a PSD
    ``gram`` ``(..., k, k)``."""
    gram = gram.double()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    if shift is not None:
        eye = shift[..., None, None] * eye
    return psd_cholesky(eye + gram, what)


_WHAT = "the Woodbury capacitance I + W^T D^-1 W"


def _whitened(op: AddedDiagonal) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(D^{-1/2} (..., n), U = V / s (..., n, k), chol(C') float64 (..., k, k), 2 k log s float64 (...))``;
    ``s = 1`` (and None for its log) unless ``V^T V`` overflowed: the common case pays for no scaling."""
    inv_sqrt = op.noise.diagonal().rsqrt()
    v = inv_sqrt.unsqueeze(-1) * op.base.factor
    if value_checks_enabled(v):  # the plain formulas; their factor is non-finite (or refused) on an overflow
        try:
            chol = capacitance_cholesky(v.mT @ v, _WHAT)
        except NumericalError:
            chol = None
        if chol is not None and bool(torch.isfinite(chol.diagonal(dim1=-2, dim2=-1)).all()):
            return inv_sqrt, v, chol, None
    return (inv_sqrt, *_rescaled(v))


def _rescaled(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U = V / s, chol(U^T U + I / s^2), 2 k log s)`` for ``s = 2^e >= max |V|``, ``e >= 0`` (exact; no
    gradient of its own): branch-free, so also what runs where values cannot be read (vmap, compile)."""
    with torch.no_grad():
        exponent = torch.frexp(v.abs().amax((-2, -1)))[1].clamp_min(0).double()
        inv_scale = torch.exp2(-exponent)
    u = v * inv_scale.to(v.dtype)[..., None, None]
    chol = capacitance_cholesky(u.mT @ u, _WHAT, inv_scale.square())
    return u, chol, exponent * (2 * u.shape[-1] * math.log(2))


def _plus(x: Tensor, log_scale: Tensor | None) -> Tensor:
    return x if log_scale is None else x + log_scale


def _project(chol: Tensor, u: Tensor, x: Tensor) -> Tensor:
    """``L'^{-1} U^T x`` in float64 for ``x`` ``(..., n, c)`` (``= L^{-1} V^T x``, ``L = s L'``)."""
    return torch.linalg.solve_triangular(chol, (u.mT @ x).double(), upper=False)


@register(LowRank, Operator)  # any diagonal noise (the noise of a sum is diagonal by construction)
class LowRankWoodbury(Engine):
    name = "low_rank_woodbury"
    method = "woodbury"

    def why(self, op: AddedDiagonal) -> str:
        k = op.base.rank
        return f"LowRank + {type(op.noise).__name__}: Woodbury and determinant lemma with a {k} x {k} capacitance"

    def cost(self, op: AddedDiagonal) -> Cost:
        batch, n, k = op.batch_shape.numel(), op.n, op.base.rank
        return Cost(batch * (2 * n * k * k + k**3 / 3), batch * (n * k + 2 * k * k) * 8)

    def solve(self, op: AddedDiagonal, rhs: Tensor) -> Tensor:
        inv_sqrt, u, chol, _ = _whitened(op)
        white = inv_sqrt.unsqueeze(-1) * rhs
        inner = torch.cholesky_solve((u.mT @ white).double(), chol).to(rhs.dtype)
        return inv_sqrt.unsqueeze(-1) * (white - u @ inner)

    def logdet(self, op: AddedDiagonal) -> Tensor:
        inv_sqrt, _, chol, log_scale = _whitened(op)
        return _plus(-2 * inv_sqrt.log().sum(-1) + cholesky_logdet(chol), log_scale).to(op.dtype)

    def inv_quad_logdet(self, op: AddedDiagonal, rhs: Tensor) -> tuple[Tensor, Tensor]:
        inv_sqrt, u, chol, log_scale = _whitened(op)
        white = inv_sqrt.unsqueeze(-1) * rhs
        z = _project(chol, u, white)
        inv_quad = white.square().sum(-2).double() - z.square().sum(-2)
        logdet = _plus(-2 * inv_sqrt.log().sum(-1) + cholesky_logdet(chol), log_scale)
        return inv_quad.to(op.dtype), logdet.to(op.dtype)
