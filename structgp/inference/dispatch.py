"""The entry points behind ``op.solve``, ``op.logdet`` and ``op.inv_quad_logdet``.

Each validates its right-hand side, asks :func:`structgp.plan` which engine answers the operator (memoised
per structure: :mod:`structgp.inference.plan_memo`), records what ran (``structgp.last_report()``) and calls
the engine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.errors import NumericalError
from structgp.covariance.operator import Operator
from structgp.covariance.validation import value_checks_enabled
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


def _check_values(what: str, op: Operator, rhs: Tensor | None, *outs: Tensor) -> None:
    """Refuse a NaN/Inf right-hand side and a NaN answer (an intermediate over/underflowed), after the engine
    ran: a NaN/Inf ``rhs`` makes the answer non-finite too, so one finite sum of the answers clears both (one
    host read; none where values cannot be read: vmap, compile, ``check_values=False``)."""
    if not (_config.current().check_values and value_checks_enabled(outs[0])):
        return
    with torch.no_grad():
        total = outs[0].sum() if len(outs) == 1 else outs[0].sum() + outs[1].sum()
        if math.isfinite(total.item()):
            return
        if rhs is not None and not bool(rhs.isfinite().all()):
            raise NumericalError(f"rhs: expected finite entries (found NaN or Inf) in {what} with {op!r}")
        if not any(bool(out.isnan().any()) for out in outs):
            return  # an answer that overflowed to Inf (or a sum of such) is the float answer
    raise NumericalError(
        f"{what} of {op!r} is NaN: an intermediate value overflowed or underflowed (a scale or noise at the edge "
        "of the floating-point range, e.g. noise below 1e-300 in float64); rescale the parameters"
    )


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
    _check_values("solve", op, rhs, out)
    return out.squeeze(-1) if vector else out


def logdet(op: Operator) -> Tensor:
    """``log det op``, shape ``op.batch_shape``."""
    p = settled(planned(op), op)
    report.start("logdet", p.method, p.reason)
    out = p.engine.logdet(op)
    _check_values("logdet", op, None, out)
    return out


def inv_quad_logdet(op: Operator, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """``(rhs^T op^{-1} rhs, log det op)``; ``rhs`` ``(..., n)`` gives inv_quad ``(...)``."""
    _check_rhs(op, rhs, "(..., n)")
    if rhs.dim() < 1 or rhs.shape[-1] != op.n:
        raise ValueError(f"rhs: expected shape (..., {op.n}), got {tuple(rhs.shape)}")
    p = settled(planned(op), op)
    report.start("inv_quad_logdet", p.method, p.reason)
    columns, unfold = _fold_extra_batch(rhs, len(op.batch_shape))
    inv_quad, logdet = p.engine.inv_quad_logdet(op, columns)
    _check_values("inv_quad_logdet", op, rhs, inv_quad, logdet)
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
