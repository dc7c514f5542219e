"""Partial pivoted Cholesky: a rank-``k`` factor ``L`` with ``L L^T ~= A`` from ``k`` columns of ``A``.

Greedy: at step ``j`` pick the largest remaining diagonal ``d_i`` (the diagonal of the Schur complement
``A - L L^T``), take column ``i`` of ``A`` and set ``l_j = (a_i - L L[i]^T) / sqrt(d_i)``, ``d -= l_j^2``.
Cost ``n k^2`` flops plus ``k`` columns of the operator. Columns come from :func:`column`, a
``functools.singledispatch`` with rules for operators that can read a column directly (a dense row, a
Kronecker product of factor columns); other operators pay one product with a unit vector.

Any size works (no dead zone): at ``k >= n`` it is a full pivoted Cholesky, and a batch member whose
remaining diagonal falls to rounding level gets zero columns from then on (no host synchronisation).

Partitioned by rows across processes (``rows``, :class:`~structgp.distributed.rows.Rows`): each rank keeps its
rows of ``L`` and ``d``; at each step one all-gather of every rank's largest remaining diagonal, its index and
its row of ``L`` picks the pivot (the largest, the lowest index among equals: what one process picks) and
hands every rank the pivot's row of ``L``; each rank fills its rows of the new column. The pivots, and
each rank's rows of ``L``, are bitwise one process's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from structgp.covariance.dense import Dense
from structgp.covariance.kernel_operator import KernelOperator
from structgp.covariance.kron import kron_vector
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator
from structgp.covariance.sum import AddedDiagonal, Sum
from structgp.covariance.validation import host_readable
from structgp.distributed.rows import Rows


@functools.singledispatch
def column(op: Operator, index: Tensor) -> Tensor:
    """Column ``index`` (a long tensor of shape ``batch`` broadcastable with the operator's batch shape;
    one index per batch member) of ``op``: ``(*batch, n)``."""
    batch = torch.broadcast_shapes(op.batch_shape, index.shape)
    unit = torch.zeros(*batch, op.n, 1, dtype=op.dtype, device=op.device)
    unit.scatter_(-2, index.expand(batch)[..., None, None], 1.0)
    return op._matmul(unit).squeeze(-1)


@column.register
def _(op: Dense, index: Tensor) -> Tensor:
    # advanced indexing rather than a gather on the matrix expanded to the index's batch: its backward
    # accumulates into the matrix's own shape (a gather's would allocate one n x n matrix per index)
    batch = torch.broadcast_shapes(op.batch_shape, index.shape)
    if op.matrix.dim() == 2:  # index_select: its backward is an index_add (faster than index_put's)
        return op.matrix.index_select(0, index.reshape(-1)).reshape(*index.shape, op.n)
    members = op.matrix.shape[:-2]
    flat = op.matrix.reshape(-1, op.n, op.n)
    which = torch.arange(flat.shape[0], device=index.device).reshape(members)
    # one trailing entry: a 0-d index tensor would be read as a Python integer (a host read under vmap)
    rows = flat[which.expand(batch).unsqueeze(-1), index.expand(batch).unsqueeze(-1)]
    return rows.squeeze(-2)  # a row of a symmetric matrix is its column


@column.register
def _(op: LowRank, index: Tensor) -> Tensor:
    batch = torch.broadcast_shapes(op.batch_shape, index.shape)
    factor = op.factor.expand(*batch, *op.factor.shape[-2:])
    row = factor.gather(-2, index.expand(batch)[..., None, None].expand(*batch, 1, op.rank))
    return (factor @ row.mT).squeeze(-1)


@column.register
def _(op: Kronecker, index: Tensor) -> Tensor:
    # row-major multi-index: the last factor varies fastest
    parts, rest = [], index
    for f in reversed(op.factors):
        parts.append(column(f, rest % f.n))
        rest = rest // f.n
    return kron_vector(list(reversed(parts)))


@column.register
def _(op: KernelOperator, index: Tensor) -> Tensor:
    if index.dim() == 0 or not op.batch_shape:  # rows of the kernel: O(n d) each
        return op.rows(index.reshape(-1)).reshape(*op.batch_shape, *index.shape, op.n)
    batch = torch.broadcast_shapes(op.batch_shape, index.shape)
    flat = index.expand(batch).reshape(-1)  # one row per batch member: pick each member's own row
    rows = op.rows(flat).expand(*batch, flat.numel(), op.n)
    picked = torch.arange(flat.numel(), device=index.device).reshape(batch)
    return rows.gather(-2, picked[..., None, None].expand(*batch, 1, op.n)).squeeze(-2)


@column.register
def _(op: AddedDiagonal, index: Tensor) -> Tensor:
    base = column(op.base, index)
    noise = op.noise.diagonal()
    batch = torch.broadcast_shapes(base.shape[:-1], noise.shape[:-1], index.shape)
    unit = torch.zeros(*batch, op.n, dtype=op.dtype, device=op.device)
    picked = noise.expand(*batch, op.n).gather(-1, index.expand(batch)[..., None])
    return base + unit.scatter_(-1, index.expand(batch)[..., None], picked)


@column.register
def _(op: Sum, index: Tensor) -> Tensor:
    return sum(column(t, index) for t in op.terms)


class PivotedCholesky(NamedTuple):
    """A partial pivoted Cholesky factorisation and the discrete choices it made (partitioned: ``factor``
    and ``remainder`` hold this rank's rows, ``pivots`` are global indices)."""

    factor: Tensor  # L (..., n, k), float64
    remainder: Tensor  # diagonal of op - L L^T (..., n), clamped at 0, float64
    pivots: Tensor  # index of column j of L (..., k), long
    active: Tensor  # whether column j is nonzero (..., k), bool: false where a member stopped


def pivoted_cholesky(
    op: Operator, rank: int, stop: Tensor | None = None, check_every: int = 8
) -> tuple[Tensor, Tensor]:
    """``(L (..., n, k), d (..., n))``: the partial pivoted Cholesky factor of ``op`` with
    ``k <= min(rank, n)`` and the diagonal of the remainder ``op - L L^T`` (clamped at 0). With ``stop``
    (``(...)``), the factorisation ends early once every batch member's remainder trace ``sum d`` is at
    most ``stop`` or at the rounding level of ``op``'s dtype (looked at every ``check_every`` steps).
    Runs without autograd and in float64 whatever the data's dtype (in float32 the remainder's diagonal
    ``d - l^2`` cancels to noise early); both results are float64."""
    result = pivoted_cholesky_pivots(op, rank, stop, check_every)
    return result.factor, result.remainder


def pivoted_cholesky_pivots(
    op: Operator, rank: int, stop: Tensor | None = None, check_every: int = 8, part: Rows | None = None
) -> PivotedCholesky:
    """:func:`pivoted_cholesky` with its pivots and the mask of nonzero columns: with them fixed,
    ``L L^T`` is the Nystrom form ``A[:, S] A[S, S]^{-1} A[S, :]`` over the active pivots ``S``. ``part``:
    this rank's rows of an unbatched ``op`` (see the module)."""
    with torch.no_grad():
        d = op.diagonal().expand(*op.batch_shape, op.n)
        d = (d if part is None else part.local(d, -1)).to(torch.float64, copy=True)
        k = min(rank, op.n)
        batch = d.shape[:-1]
        # L^T: row j is column j of L, contiguous for the products below; step j writes row j before any
        # read of it (zero-filled all the same, for a few microseconds).
        rows = d.new_zeros(*batch, k, d.shape[-1])
        pivots = d.new_zeros(*batch, k, dtype=torch.long)  # new_zeros: batched like d under vmap
        active = d.new_zeros(*batch, k, dtype=torch.bool)
        largest = d.abs().amax(-1) if part is None else part.amax(d.abs().amax(-1), "the largest diagonal")
        floor = 10 * torch.finfo(op.dtype).eps * largest  # pivots below it are rounding noise
        # under vmap/compile the values cannot end the loop: all ``k`` steps run, and a member that would
        # have stopped gets zero columns (the same L L^T)
        readable = host_readable(d)
        done = None if readable else torch.zeros(batch, dtype=torch.bool, device=d.device)
        if stop is not None:
            stop = torch.maximum(torch.as_tensor(stop, dtype=d.dtype, device=d.device), op.n * floor)
        for j in range(k):
            if stop is not None and j % check_every == 0:
                trace = d.sum(-1) if part is None else part.sum(d.sum(-1), "the remainder's trace")
                if readable and bool((trace <= stop).all()):
                    return PivotedCholesky(rows[..., :j, :].mT, d, pivots[..., :j], active[..., :j])
                if not readable:
                    done = done | (trace <= stop)
            if part is None:
                pivot_value, pivot = d.max(-1)
                col = column(op, pivot).expand_as(d).double()
            else:  # the full column (computed as one process does), this rank's rows of it
                pivot_value, pivot, row = _pick(d, rows[:j], part)
                col = part.local(column(op, pivot), -1).double()
            if j:  # minus the part of column ``pivot`` the first j columns of L already explain
                if part is None:
                    row = rows[..., :j, :].gather(-1, pivot[..., None, None].expand(*batch, j, 1))
                col = col - (rows[..., :j, :].mT @ row).squeeze(-1)
            ok = pivot_value > floor if done is None else (pivot_value > floor) & ~done
            # a member whose pivot is rounding noise (or that is done, under vmap) adds a zero column
            scale = torch.where(ok, pivot_value, 1.0).rsqrt()
            l_j = torch.where(ok.unsqueeze(-1), col * scale.unsqueeze(-1), 0.0)
            # |l_ij| <= sqrt(d_i) holds for a positive semidefinite remainder (Cauchy-Schwarz on the Schur
            # complement); entries beyond it are amplified rounding noise (float32 data): clip them
            bound = d.sqrt()
            l_j = torch.maximum(torch.minimum(l_j, bound), -bound)
            rows[..., j, :] = l_j
            pivots[..., j], active[..., j] = pivot, ok
            d = torch.addcmul(d, l_j, l_j, value=-1).clamp_min_(0)
        return PivotedCholesky(rows.mT, d, pivots, active)


def _pick(d: Tensor, rows: Tensor, part: Rows) -> tuple[Tensor, Tensor, Tensor]:
    """``(value, global index, L[index, :j] (j, 1))`` of the largest remaining diagonal over every rank's rows
    ``d`` ``(rows,)`` (``rows``: this rank's ``L^T`` ``(j, rows)``); among equal values the lowest index."""
    value, local = d.max(-1)
    mine = torch.cat([value.reshape(1), (local + part.start).double().reshape(1), rows[:, local]])
    every = part.stack(mine, "the pivot candidates")  # (world, j + 2), in rank order
    winner = every[:, 0].argmax()  # the first rank holding the largest: the lowest index among equals
    best = every[winner]
    return best[0], best[1].long(), best[2:].unsqueeze(-1)
