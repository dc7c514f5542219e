"""Block-diagonal operators answered block by block, each group of stacked blocks by its own plan.

For ``A = diag(A_1, ..., A_b)``: ``A^{-1} y`` solves each block on its own rows,
``log det A = sum_i log det A_i`` and ``y^T A^{-1} y = sum_i y_i^T A_i^{-1} y_i``. A
:class:`~structgp.covariance.BlockDiag` holds its blocks in groups stacked along a batch dimension, so
each group is one batched call of the engine :func:`structgp.plan` picks for it (one batched Cholesky
for dense blocks, one batched Woodbury for low-rank-plus-noise blocks; a method forced by
``structgp.settings(method=...)`` applies to the groups). Cost: the sum of the groups' costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

from structgp import _config
from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.operator import Operator
from structgp.inference import report
from structgp.inference.block_failures import blocks_in, describe_group, not_positive_definite
from structgp.inference.cholesky import NotPositiveDefiniteError
from structgp.inference.plan import Cost, Engine, Plan, plan_part, register

T = TypeVar("T")
_MAX_NOTES = 8


@register(BlockDiag)
class Blockwise(Engine):
    name = "blockwise"
    structural = True

    def why(self, op: BlockDiag) -> str:
        kinds = ", ".join(f"{blocks_in(g)} x {g.n}" for g in op.groups)
        return f"block diagonal ({kinds}): each group of stacked blocks by its own batched method"

    def cost(self, op: BlockDiag) -> Cost:
        costs = [group_plan(op, j).cost for j in range(len(op.groups))]
        return Cost(sum(c.flops for c in costs), sum(c.bytes for c in costs))

    def solve(self, op: BlockDiag, rhs: Tensor) -> Tensor:
        parts = op.split_rows(rhs)
        out = [_run(op, j, lambda e, g, x=x: e.solve(g, x)) for j, x in enumerate(parts)]
        return op.merge_rows(out)

    def logdet(self, op: BlockDiag) -> Tensor:
        parts = [_run(op, j, lambda e, g: e.logdet(g)).sum(-1) for j in range(len(op.groups))]
        return sum(parts[1:], parts[0]).expand(op.batch_shape)

    def inv_quad_logdet(self, op: BlockDiag, rhs: Tensor) -> tuple[Tensor, Tensor]:
        inv_quad, logdet = [], []
        for j, x in enumerate(op.split_rows(rhs)):
            q, ld = _run(op, j, lambda e, g, x=x: e.inv_quad_logdet(g, x))
            inv_quad.append(q.sum(-2))
            logdet.append(ld.sum(-1))
        return sum(inv_quad[1:], inv_quad[0]), sum(logdet[1:], logdet[0]).expand(op.batch_shape)


def group_plan(op: BlockDiag, j: int, settle: bool = False) -> Plan:
    """The plan of group ``j`` (settled when it is about to run); ``method="blockwise"`` means "block by
    block", so the groups plan freely."""
    context = f"block group {j} ({describe_group(op, j)}) of {op!r}"
    if _config.current().method == "blockwise":
        with _config.settings(method="auto"):
            return plan_part(op.groups[j], context, settle=settle)
    return plan_part(op.groups[j], context, settle=settle)


def _run(op: BlockDiag, j: int, question: Callable[[Engine, Operator], T]) -> T:
    """Answer ``question`` for group ``j`` with its planned engine; a non-PSD block is named."""
    p = group_plan(op, j, settle=True)
    _note(f"group {j} ({describe_group(op, j)}): {p.method}", j)
    try:
        return question(p.engine, op.groups[j])
    except NotPositiveDefiniteError as err:
        raise not_positive_definite(op, j, err) from err


def _note(text: str, j: int) -> None:
    """Note group ``j``'s method in the report; past ``_MAX_NOTES`` groups one line says more were not listed."""
    if j <= _MAX_NOTES:
        report.note(text if j < _MAX_NOTES else "(more groups not listed)")
