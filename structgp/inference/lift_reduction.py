"""Lifted covariances whose lift is really another structure, answered by that structure's own engine.

A lift's :attr:`~structgp.covariance.sparse_lifted.Lift.kind` is found once when it is built. With ``c`` the
lift's columns (row ``r`` reads cell ``c[r]``) and diagonal noise ``D``:

    identity:     I B I^T + D = B + D
    permutation:  P B P^T + D = Permuted(B + P^T D P, perm = c)          (the noise moves to B's order)
    selection:    S B S^T + D = B[c, c] + D    for a base whose principal submatrix keeps its structure
                  (Dense, Diagonal, ScaledIdentity, LowRank and sums of them)

so ``SparseLifted(I, Kronecker(...)) + ScaledIdentity`` (a grid model written with an identity lift) is
answered by the per-factor eigendecomposition, not by a latent Woodbury or CG. The engine is structural
(always taken when it applies): it plans the reduced operator and calls that engine, noting the base's
method in the report. A selection of a Kronecker grid (a grid with missing cells) keeps the lifted form:
its principal submatrix has no cheaper structure (the dense form of the lifted operator then gathers the
submatrix from the grid's factors instead of forming ``L B L^T`` by sparse products).
"""

from __future__ import annotations

from torch import Tensor

from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.indexing import principal
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.permuted import Permuted
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.inference import report
from structgp.inference.plan import Cost, Engine, Plan, describe, plan_part, register

_SELECTABLE = (Dense, Diagonal, ScaledIdentity, LowRank)


@register(SparseLifted)
@register(SparseLifted, Operator)  # any diagonal noise
class LiftReduction(Engine):
    name = "lift_reduction"
    structural = True
    reads_facts = True  # the reason names the reduced structure's engine, which may read cached facts

    def why(self, op: Operator) -> str | None:
        lifted = _lifted(op)
        if not _reducible(lifted):
            return None
        reduced = reduce(op)
        return f"{lifted.lift.kind} lift: {describe(reduced)}, answered by {_plan(reduced).engine.name}"

    def cost(self, op: Operator) -> Cost:
        return _plan(reduce(op)).cost

    def solve(self, op: Operator, rhs: Tensor) -> Tensor:
        reduced = reduce(op)
        return _engine(reduced).solve(reduced, rhs)

    def logdet(self, op: Operator) -> Tensor:
        reduced = reduce(op)
        return _engine(reduced).logdet(reduced)

    def inv_quad_logdet(self, op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        reduced = reduce(op)
        return _engine(reduced).inv_quad_logdet(reduced, rhs)


def _lifted(op: Operator) -> SparseLifted:
    return op.base if isinstance(op, AddedDiagonal) else op


def _reducible(lifted: SparseLifted) -> bool:
    kind = lifted.lift.kind
    return kind in ("identity", "permutation") or (kind == "selection" and _selectable(lifted.base))


def _selectable(base: Operator) -> bool:
    """Whether ``principal(base, rows)`` keeps a structure of its own (not a lifted one again)."""
    if isinstance(base, AddedDiagonal):
        return _selectable(base.base) and _selectable(base.noise)
    if isinstance(base, Sum):
        return all(_selectable(t) for t in base.terms)
    return isinstance(base, _SELECTABLE)


def reduce(op: Operator) -> Operator:
    """The same matrix as ``op`` (a ``SparseLifted``, possibly plus diagonal noise, whose lift is an identity,
    a permutation or a selection of a selectable base) in the base's own structure."""
    lifted = _lifted(op)
    lift, base = lifted.lift, lifted.base
    if lift.kind == "identity":
        out = base
    elif lift.kind == "permutation":  # (L x)[r] = x[c[r]]: P with perm = c, whose inverse is L^T's column list
        out = Permuted._from_children([base, lift.col, lift.t_col], ())
    else:
        out = principal(base, lift.col)
    return out + op.noise if isinstance(op, AddedDiagonal) else out


def _plan(reduced: Operator, settle: bool = False) -> Plan:
    return plan_part(reduced, f"the lift's reduced form {describe(reduced)}", settle=settle)


def _engine(reduced: Operator) -> Engine:
    p = _plan(reduced, settle=True)
    report.note(f"reduced to {describe(reduced)}: {p.engine.name}")
    return p.engine
