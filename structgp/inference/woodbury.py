"""LowRank + diagonal noise by the whitened Woodbury identity and the matrix determinant lemma.

For ``A = W W^T + D`` with ``W`` ``(..., n, k)`` and positive diagonal ``D``, let ``V = D^{-1/2} W`` and the
capacitance ``C = I_k + V^T V`` (``k x k``, factorised in float64). Then

    A^{-1} = D^{-1/2} (I - V C^{-1} V^T) D^{-1/2},        log det A = log det D + log det C.

Cost ``n k^2`` flops; memory ``n k`` beyond the inputs. ``C``'s eigenvalues are at least 1, so the
factorisation never needs jitter.

Overflow. ``V^T V`` overflows once ``|V|`` nears ``sqrt(float max / n)`` (``1e152`` in float64, ``1e18`` in
float32), while ``A``'s log density stays finite. So ``V`` is first divided by ``s``, the power of two at or
above ``max |V|`` and at least 1 (detached; exact, so a moderate ``V`` gives bitwise the unscaled answers):
with ``U = V / s``, ``C = s^2 (U^T U + I / s^2) = s^2 C'`` and

    log det C = 2 k log s + log det C',      V C^{-1} V^T = U C'^{-1} U^T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal
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


def _whitened(op: AddedDiagonal) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(D^{-1/2} (..., n), U = V / s (..., n, k), chol(C') float64 (..., k, k), 2 k log s float64 (...))``."""
    inv_sqrt = op.noise.diagonal().rsqrt()
    v = inv_sqrt.unsqueeze(-1) * op.base.factor
    with torch.no_grad():  # s = 2^e >= max |V|, e >= 0 (a small V is left as it is): exact, no gradient
        exponent = torch.frexp(v.abs().amax((-2, -1)))[1].clamp_min(0).double()
        inv_scale = torch.exp2(-exponent)
    u = v * inv_scale.to(v.dtype)[..., None, None]
    chol = capacitance_cholesky(u.mT @ u, "the Woodbury capacitance I + W^T D^-1 W", inv_scale.square())
    return inv_sqrt, u, chol, exponent * (2 * u.shape[-1] * math.log(2))


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
        return (-2 * inv_sqrt.log().sum(-1) + log_scale + cholesky_logdet(chol)).to(op.dtype)

    def inv_quad_logdet(self, op: AddedDiagonal, rhs: Tensor) -> tuple[Tensor, Tensor]:
        inv_sqrt, u, chol, log_scale = _whitened(op)
        white = inv_sqrt.unsqueeze(-1) * rhs
        z = _project(chol, u, white)
        inv_quad = white.square().sum(-2).double() - z.square().sum(-2)
        logdet = -2 * inv_sqrt.log().sum(-1) + log_scale + cholesky_logdet(chol)
        return inv_quad.to(op.dtype), logdet.to(op.dtype)
