"""Permuted operators ``A = P B P^T`` answered by the base ``B``'s own method.

With ``(P x)[i] = x[perm[i]]`` (see :class:`~structgp.covariance.Permuted`):

    A^{-1} y = P B^{-1} (P^T y),     log det A = log det B,     y^T A^{-1} y = (P^T y)^T B^{-1} (P^T y).

The engine is structural (always taken): it plans the base with :func:`structgp.plan` (a method forced by
``structgp.settings(method=...)`` applies to the base) and calls that engine directly, so the report of the
call stays this one (with a note naming the base's method) and right-hand sides keep their column layout.
Cost: the base's plan cost (two gathers of the right-hand side besides).
"""

from __future__ import annotations

from torch import Tensor

from structgp.covariance.permuted import Permuted
from structgp.inference import report
from structgp.inference.plan import Cost, Engine, Plan, describe, plan_part, register


@register(Permuted)
class PermutedEngine(Engine):
    name = "permuted"
    structural = True

    def why(self, op: Permuted) -> str:
        return f"rows permuted: P B P^T answered by the base {describe(op.base)} with {base_plan(op).method}"

    def cost(self, op: Permuted) -> Cost:
        return base_plan(op).cost

    def solve(self, op: Permuted, rhs: Tensor) -> Tensor:
        return op.from_base_order(_engine(op).solve(op.base, op.to_base_order(rhs)))

    def logdet(self, op: Permuted) -> Tensor:
        return _engine(op).logdet(op.base)

    def inv_quad_logdet(self, op: Permuted, rhs: Tensor) -> tuple[Tensor, Tensor]:
        return _engine(op).inv_quad_logdet(op.base, op.to_base_order(rhs))


def base_plan(op: Permuted, settle: bool = False) -> Plan:
    """The plan of the base (settled when it is about to run); an error there names the permuted operator."""
    return plan_part(op.base, f"the base of {op!r}", settle=settle)


def _engine(op: Permuted) -> Engine:
    p = base_plan(op, settle=True)
    report.note(f"base {describe(op.base)}: {p.method}")
    return p.engine
