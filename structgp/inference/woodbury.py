"""LowRank + diagonal noise by the whitened Woodbury identity and the matrix determinant lemma.

For ``A = W W^T + D`` with ``W`` ``(..., n, k)`` and positive diagonal ``D``, let ``V = D^{-1/2} W`` and the
capacitance ``C = I_k + V^T V`` (``k x k``, factorised in float64). Then

    A^{-1} = D^{-1/2} (I - V C^{-1} V^T) D^{-1/2},        log det A = log det D + log det C.

Cost ``n k^2`` flops; memory ``n k`` beyond the inputs. ``C``'s eigenvalues are at least 1, so the
factorisation never needs jitter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal
from structgp.inference.cholesky import cholesky_logdet, psd_cholesky
from structgp.inference.plan import Cost, Engine, register


def capacitance_cholesky(gram: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor (float64) of ``I + gram`` for a PSD ``gram`` ``(..., k, k)``."""
    gram = gram.double()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return psd_cholesky(eye + gram, what)


def _whitened(op: AddedDiagonal) -> tuple[Tensor, Tensor, Tensor]:
    """``(D^{-1/2} (..., n), V (..., n, k), chol(C) float64 (..., k, k))``."""
    inv_sqrt = op.noise.diagonal().rsqrt()
    v = inv_sqrt.unsqueeze(-1) * op.base.factor
    chol = capacitance_cholesky(v.mT @ v, "the Woodbury capacitance I + W^T D^-1 W")
    return inv_sqrt, v, chol


def _project(chol: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """``L^{-1} V^T x`` in float64 for ``x`` ``(..., n, c)``."""
    return torch.linalg.solve_triangular(chol, (v.mT @ x).double(), upper=False)


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
        inv_sqrt, v, chol = _whitened(op)
        white = inv_sqrt.unsqueeze(-1) * rhs
        inner = torch.cholesky_solve((v.mT @ white).double(), chol).to(rhs.dtype)
        return inv_sqrt.unsqueeze(-1) * (white - v @ inner)

    def logdet(self, op: AddedDiagonal) -> Tensor:
        inv_sqrt, _, chol = _whitened(op)
        return (-2 * inv_sqrt.log().sum(-1) + cholesky_logdet(chol)).to(op.dtype)

    def inv_quad_logdet(self, op: AddedDiagonal, rhs: Tensor) -> tuple[Tensor, Tensor]:
        inv_sqrt, v, chol = _whitened(op)
        white = inv_sqrt.unsqueeze(-1) * rhs
        z = _project(chol, v, white)
        inv_quad = white.square().sum(-2).double() - z.square().sum(-2)
        logdet = -2 * inv_sqrt.log().sum(-1) + cholesky_logdet(chol)
        return inv_quad.to(op.dtype), logdet.to(op.dtype)
