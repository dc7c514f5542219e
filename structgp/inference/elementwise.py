"""Diagonal operators answered entry by entry: ``n`` flops."""

from __future__ import annotations

from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.operator import Operator
from structgp.inference.plan import Cost, Engine, register


@register(Diagonal)
@register(ScaledIdentity)
@register(Kronecker)  # of diagonal factors
class Elementwise(Engine):
    name = "diagonal"
    structural = True

    def why(self, op: Operator) -> str | None:
        return "a diagonal matrix is solved entry by entry" if op.is_diagonal else None

    def cost(self, op: Operator) -> Cost:
        return Cost(op.batch_shape.numel() * op.n, 0)

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        return rhs / op.diagonal().unsqueeze(-1)

    def logdet(self, op: Operator) -> Tensor:
        if isinstance(op, ScaledIdentity):
            return op.n * op.scale.log()
        if isinstance(op, Kronecker):  # log det (D_1 (x) D_2) = n_2 log det D_1 + n_1 log det D_2
            n = op.n
            return sum(n // f.n * self.logdet(f) for f in op.factors)
        return op.diagonal().log().sum(-1)

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        return (rhs.square() / op.diagonal().unsqueeze(-1)).sum(-2), self.logdet(op)
