"""A lift's products ``L x``, ``L^T y`` and the gradient of its values, by rows: all of them in one process,
each rank's own rows under an active :mod:`structgp.distributed` process group.

Partitioned (``P`` ranks, rank ``p`` owning the contiguous rows ``start:stop`` of :func:`~structgp.distributed.
partition` and so the entries ``a:b``), every input and output is whole and the same on every rank, as for a
:class:`~structgp.covariance.KernelOperator`:

    L x      (n_out, c)   rank p computes L[start:stop] x and the row blocks are all-gathered (bitwise the
                          one-process product: each row is the same sum)
    L^T y    (n_in, c)    rank p computes L[start:stop]^T y[start:stop]; one all-reduce sums the latent vectors
    dvalues  (nnz,)       rank p computes its entries' sampled products; one all-reduce of the zero-padded
                          vector assembles them (exact: each entry is one rank's)

so ``L B L^T v`` costs one all-reduce of the latent vector and one all-gather of the observation rows, and
each rank touches only its ``nnz_p`` entries of ``L``. Everything else (the base, CG, the capacitance) is
replicated and computes the same thing on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from structgp import distributed

if TYPE_CHECKING:
    from structgp.covariance.sparse_lifted import Lift
    from structgp.distributed.rows import Rows


def own_rows(lift: Lift) -> tuple[Lift, int, int, int, tuple[tuple[int, int], ...]] | None:
    """This rank's rows of ``lift``: ``(their lift, start row, first entry a, last entry b, every rank's rows)``,
    or None without an active process group, for a lift with fewer rows than ranks (a few test points:
    applied whole on every rank), or for a lift that is itself some rows of one (:meth:`Lift.rows`: a rank's
    part in a partitioned computation, which applies it whole)."""
    if not distributed.is_active() or lift.n_out < distributed.world() or "rows of" in lift._cache:
        return None
    parts = distributed.row_range(lift.n_out)
    start, stop = parts[distributed.rank()]
    local, a, b = lift.rows(start, stop)
    return local, start, a, b, parts


def rows_and_values(lift: Lift, part: Rows | None) -> tuple[Lift, Tensor]:
    """``lift`` and its values ``(nnz,)``, or, for a partitioned computation's rows ``part``, the lift of those
    rows (:meth:`Lift.rows`, applied whole) and its slice of the values (differentiable)."""
    if part is None:
        return lift, lift.values
    local, a, b = lift.rows(part.start, part.stop)
    return local, lift.values[a:b]


def product(values: Tensor, x: Tensor, lift: Lift, transpose: bool) -> Tensor:
    """``L x`` ``(n_out, c)`` for ``x`` ``(n_in, c)`` or, with ``transpose``, ``L^T x`` ``(n_in, c)`` for ``x``
    ``(n_out, c)``, with the lift's pattern and ``values`` ``(nnz,)``; partitioned by rows under an active
    process group (see the module docstring). No autograd: the caller's function differentiates."""
    mine = own_rows(lift)
    if mine is None:
        return lift.csr(values, transpose) @ x
    local, start, a, b, parts = mine
    if transpose:
        partial = local.csr(values[a:b], transpose=True) @ x[start : start + local.n_out]
        return distributed.all_reduce_sum([partial], "the latent vectors L^T y of a lift product")[0]
    check = x.sum(-2)  # the same on every rank, or they diverged (see gather_rows)
    return distributed.gather_rows(local.csr(values[a:b]) @ x, parts, check, "a lift product L x")


def values_gradient(g: Tensor, x: Tensor, lift: Lift, transpose: bool) -> Tensor:
    """The gradient ``(nnz,)`` of ``<g, L x>`` (``<g, L^T x>`` with ``transpose``) in the lift's values:
    ``sum_c g[i, c] x[j, c]`` for each stored entry ``(i, j)`` of ``L`` (of ``L^T``); partitioned, each rank its
    own entries, summed over the ranks. First order only under a process group (the sum is a collective)."""
    out_idx, in_idx = (lift.col, lift.row) if transpose else (lift.row, lift.col)
    mine = own_rows(lift)
    if mine is None:
        return _sampled_rowdot(g, x, out_idx, in_idx, lift.CHUNK)
    if torch.is_grad_enabled() and (g.requires_grad or x.requires_grad):
        raise NotImplementedError(
            "create_graph: second derivatives in a lift's values are not available while its rows are "
            "partitioned across processes (structgp.distributed); take them in one process"
        )
    _, _, a, b, _ = mine
    grad = g.new_zeros(lift.nnz)
    grad[a:b] = _sampled_rowdot(g, x, out_idx[a:b], in_idx[a:b], lift.CHUNK)
    return distributed.all_reduce_sum([grad], "the gradient of a lift's values")[0]


def _sampled_rowdot(g: Tensor, x: Tensor, g_idx: Tensor, x_idx: Tensor, chunk: int) -> Tensor:
    """``sum_c g[g_idx[k], c] x[x_idx[k], c]`` for each ``k`` (``chunk`` elements at a time), shape ``(k,)``."""
    step = max(1, chunk // max(1, g.shape[-1]))
    parts = [(g[g_idx[s : s + step]] * x[x_idx[s : s + step]]).sum(-1) for s in range(0, g_idx.shape[0], step)]
    return torch.cat(parts) if parts else g.new_zeros(0)
