"""Rows: this rank's contiguous rows of an ``n``-vector, and the collectives over them.

A partitioned computation keeps only its rows ``start:stop`` of every ``(n, c)`` vector. Sums over the
rows of a vector are this rank's partial sums, summed over the ranks with :meth:`Rows.sum`; a product with
an operator needs the full vector, :meth:`Rows.gather`.

Every sum over ranks is an all-gather of the ranks' partial sums, added in rank order on every rank: the
ranks hold bitwise the same result (an all-reduce need not give every rank the same rounding), which keeps
their PCG recursions identical. The partial sums are small (a value a column, or ``k x k``).

Gradients. A differentiable computation spread over the ranks keeps each rank's *share* of a scalar: a
function of its own rows (with weights that may be sums over ranks, fixed). Each rank's backward yields its
share's gradient of the inputs (the operator's tensors, the right-hand side), and :func:`share_gradients` at
those inputs sums the shares over the ranks, so every rank gets the full gradient. A term computed the same
way on every rank would be counted once per rank: such a term is added on rank 0 only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from structgp.distributed import process_group
from structgp.distributed.collectives import gather_rows
from structgp.distributed.errors import explained
from structgp.distributed.partition import partition

SUM_CHUNK = 2**18  # entries of a sum over ranks gathered at a time (2 MiB a rank in float64)


@dataclasses.dataclass(frozen=True)
class Rows:
    """This rank's rows ``start:stop`` under every rank's ``parts`` (:func:`partition`)."""

    parts: tuple[tuple[int, int], ...]
    rank: int

    @classmethod
    def of(cls, n: int, unit: int = 1) -> Rows | None:
        """This rank's rows under an active process group (whole ``unit``-row blocks), else ``None``."""
        if not process_group.is_active():
            return None
        return cls(partition(n, process_group.world(), unit), process_group.rank())

    @property
    def start(self) -> int:
        return self.parts[self.rank][0]

    @property
    def stop(self) -> int:
        return self.parts[self.rank][1]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def local(self, t: Tensor, dim: int = -2) -> Tensor:
        """This rank's rows of ``t`` along ``dim`` (``(..., n, c)``: dim ``-2``; ``(..., n)``: dim ``-1``)."""
        return t.narrow(dim, self.start, self.size)

    def gather(self, t: Tensor, what: str = "the search directions") -> Tensor:
        """The full ``(..., n, c)`` from every rank's rows ``(..., rows, c)`` (no autograd)."""
        return gather_rows(t, self.parts, None, what)

    def stack(self, t: Tensor, what: str) -> Tensor:
        """``(world, ...)``: every rank's ``t`` (the same shape on every rank), in rank order, gathered into
        one buffer."""
        world = len(self.parts)
        out = t.new_empty((world, *t.shape))
        with explained(f"gathering {what}", self.rank, world):
            dist.all_gather(list(out.unbind(0)), t.contiguous())
        return out

    def sum(self, t: Tensor, what: str = "partial sums") -> Tensor:
        """``t`` summed over the ranks in rank order (bitwise the same on every rank; no autograd). A large
        ``t`` is gathered ``SUM_CHUNK`` entries at a time, so the gathered copies take ``world x SUM_CHUNK``
        entries rather than ``world`` times ``t`` (a lift's latent vectors ``L^T p``, ``(n_in, c)``: 33 MB for
        seed 002's 125 000 cells and 33 columns)."""
        flat = t.detach().reshape(-1)
        out = torch.empty_like(flat)
        for first in range(0, flat.numel(), SUM_CHUNK):
            piece = flat[first : first + SUM_CHUNK]
            torch.sum(self.stack(piece, what), 0, out=out[first : first + piece.numel()])
        return out.view(t.shape)

    def amax(self, t: Tensor, what: str = "maxima") -> Tensor:
        return self.stack(t.detach(), what).amax(0)

    def amin(self, t: Tensor, what: str = "minima") -> Tensor:
        return self.stack(t.detach(), what).amin(0)


def sum_shared(t: Tensor, rows: Rows, what: str) -> Tensor:
    """``t`` summed over the ranks (rank order), differentiable: each rank's share of the output gradient
    is summed over the ranks in the backward, so every rank's ``t`` receives the whole gradient (the total
    objective is the sum of the ranks' shares, and it depends on each rank's ``t`` through the sum)."""
    return _SumShared.apply(t, rows, what)


class _SumShared(torch.autograd.Function):
    @staticmethod
    def forward(t: Tensor, rows: Rows, what: str) -> Tensor:
        return rows.sum(t, what)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.rows, ctx.what = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.rows.sum(grad, f"the gradient of {ctx.what}"), None, None


def gather_shared(t: Tensor, rows: Rows, check: Tensor | None = None, what: str = "a product") -> Tensor:
    """The full ``(..., n, c)`` from every rank's rows ``t`` ``(..., rows, c)``, differentiable: the backward
    keeps this rank's rows of the output gradient (the same on every rank, as everything computed from the
    gathered tensor is), so ``t``'s inputs receive this rank's share (sum them with :func:`share_gradients`).
    ``check``: see :func:`~structgp.distributed.collectives.gather_rows`."""
    return _GatherShared.apply(t, rows, check, what)


class _GatherShared(torch.autograd.Function):
    @staticmethod
    def forward(t: Tensor, rows: Rows, check: Tensor | None, what: str) -> Tensor:
        return gather_rows(t, rows.parts, None if check is None else check.detach(), what)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.rows = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.rows.local(grad), None, None, None


def share_gradients(tensors: list[Tensor], rows: Rows) -> list[Tensor]:
    """``tensors`` unchanged (views); in the backward their gradients are summed over the ranks (one
    all-gather of them all), so each rank's share of a gradient becomes the whole gradient (see the module).
    Tensors that do not require grad pass through untouched."""
    which = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not which:
        return list(tensors)
    shared = _ShareGradients.apply(rows, *(tensors[i] for i in which))
    out = list(tensors)
    for i, t in zip(which, shared):
        out[i] = t
    return out


class _ShareGradients(torch.autograd.Function):
    @staticmethod
    def forward(rows: Rows, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.rows = inputs[0]
        ctx.shapes = [t.shape for t in inputs[1:]]

    @staticmethod
    def backward(ctx, *grads: Tensor):
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = ctx.rows.sum(flat, "the gradients' shares")
        out, offset = [], 0
        for shape, g in zip(ctx.shapes, grads):
            size = shape.numel()
            out.append(total[offset : offset + size].view(shape).to(g.dtype))
            offset += size
        return (None, *out)
