"""The entry points behind ``op.solve``, ``op.logdet`` and ``op.inv_quad_logdet``.

Each validates its right-hand side, asks :func:`structgp.plan` which engine answers the operator (memoised
per structure: :mod:`structgp.inference.plan_memo`), records what ran (``structgp.last_report()``) and calls
the engine.
"""

from __future__ import annotations

from torch import Tensor

from structgp.covariance.operator import Operator
from structgp.inference import report
from structgp.inference.plan import settled
from structgp.inference.plan_memo import planned


def _check_rhs(op: Operator, rhs: Tensor, layout: str) -> None:
    if not isinstance(rhs, Tensor):
        raise TypeError(f"rhs: expected a torch.Tensor {layout}, got {type(rhs).__name__}")
    dtype = op.dtype
    if rhs.dtype != dtype:
        raise TypeError(f"rhs: expected dtype {dtype} (the operator's), got {rhs.dtype}")
    device = op.device
    if rhs.device != device:
        raise ValueError(f"rhs: expected device {device} (the operator's), got {rhs.device}")


def solve(op: Operator, rhs: Tensor) -> Tensor:
    """``op^{-1} rhs``; ``rhs`` is ``(..., n)`` when its leading dims equal ``op.batch_shape`` or it is 1-D
    (as in ``torch.linalg.solve``), else ``(..., n, c)``."""
    _check_rhs(op, rhs, "(..., n) or (..., n, c)")
    vector = rhs.dim() == 1 or rhs.shape[:-1] == op.batch_shape
    if vector:
        if rhs.shape[-1] != op.n:
            raise ValueError(f"rhs: expected shape (..., {op.n}), got {tuple(rhs.shape)}")
        rhs = rhs.unsqueeze(-1)
    elif rhs.dim() < 2 or rhs.shape[-2] != op.n:
        raise ValueError(f"rhs: expected shape (..., {op.n}) or (..., {op.n}, c), got {tuple(rhs.shape)}")
    p = settled(planned(op), op)
    report.start("solve", p.method, p.reason)
    out = p.engine.solve(op, rhs)
    return out.squeeze(-1) if vector else out


def logdet(op: Operator) -> Tensor:
    """``log det op``, shape ``op.batch_shape``."""
    p = settled(planned(op), op)
    report.start("logdet", p.method, p.reason)
    return p.engine.logdet(op)


def inv_quad_logdet(op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """``(rhs^T op^{-1} rhs, log det op)``; ``rhs`` ``(..., n)`` gives inv_quad ``(...)``."""
    _check_rhs(op, rhs, "(..., n)")
    if rhs.dim() < 1 or rhs.shape[-1] != op.n:
        raise ValueError(f"rhs: expected shape (..., {op.n}), got {tuple(rhs.shape)}")
    p = settled(planned(op), op)
    report.start("inv_quad_logdet", p.method, p.reason)
    columns, unfold = _fold_extra_batch(rhs, len(op.batch_shape))
    inv_quad, logdet = p.engine.inv_quad_logdet(op, columns)
    return unfold(inv_quad), logdet


def _fold_extra_batch(rhs: Tensor, op_batch_dims: int):
    """Vectors ``(*extra, *batch, n)`` as columns ``(*batch, n, E)``, so that many right-hand sides
    (e.g. samples) share one factorisation instead of broadcasting it; and the map back ``(*batch, E)``
    -> ``(*extra, *batch)``."""
    if rhs.dim() <= 1 + op_batch_dims:  # no extra dimensions: one column
        return rhs.unsqueeze(-1), _squeeze_last
    extra = rhs.shape[: rhs.dim() - 1 - op_batch_dims]
    inner = rhs.shape[len(extra) :]
    columns = rhs.reshape(-1, *inner).movedim(0, -1)

    def unfold(values: Tensor) -> Tensor:
        return values.movedim(-1, 0).reshape((*extra, *values.shape[:-1]))

    return columns, unfold


def _squeeze_last(values: Tensor) -> Tensor:
    return values.squeeze(-1)
