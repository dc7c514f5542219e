"""The dense lower Cholesky factor ``L`` (``L L^T = A``) of a structured operator, computed from its structure.

A ``LinearOperator``'s ``cholesky()`` must return the triangular factor itself: torch's
``MultivariateNormal.log_prob`` (which gpytorch calls when ``fast_computations.log_prob`` is off, as
``import botorch`` sets) reads ``scale_tril`` as a dense tensor and solves with it. The factor is unique,
so a structure can only make *computing* it cheaper than the ``O(n^3)`` dense factorisation:

- a diagonal: ``sqrt(d)`` on the diagonal;
- a Kronecker product: ``chol(A_1) (x) chol(A_2) (x) ...`` (lower triangular with a positive diagonal);
- a block-diagonal operator (any block order: every block owns a contiguous range of rows, so the factor
  has no fill between blocks): each block's factor in place, one batched factorisation per group;
- a thin low rank plus a diagonal, ``D + W W^T`` with ``W`` ``(n, k)``, ``k << n``: a blocked
  factorisation whose off-diagonal blocks stay rank ``k`` (below), ``O(n b^2 + n k b + n k^2)`` work
  before one ``n x n x k`` product forms the factor;
- anything else: the dense factorisation (``psd_cholesky``, with its warned jitter).

The result is guarded like ``to_dense()`` (``settings(dense_limit=...)``). Rules are registered here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kron import kron_dense
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator, guard_dense
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.sum import AddedDiagonal
from structgp.inference.cholesky import psd_cholesky

BLOCK = 256  # rows per diagonal block of the low-rank-plus-diagonal factorisation
THIN = 4  # the low-rank path is taken when the rank k is at most n / THIN


def cholesky_factor(op: Operator) -> Tensor:
    """The lower Cholesky factor ``(*op.batch_shape, n, n)`` of ``op`` (refused over the dense limit)."""
    guard_dense(op, "cholesky()")
    return structured_cholesky(op)


@functools.singledispatch
def structured_cholesky(op: Operator) -> Tensor:
    """No structured rule: the dense factorisation."""
    return psd_cholesky(op.to_dense(), f"the covariance {op!r}")


@structured_cholesky.register
def _(op: Diagonal) -> Tensor:
    return torch.diag_embed(op.diag.sqrt())


@structured_cholesky.register
def _(op: ScaledIdentity) -> Tensor:
    eye = torch.eye(op.n, dtype=op.dtype, device=op.device)
    return op.scale.sqrt()[..., None, None] * eye


@structured_cholesky.register
def _(op: Kronecker) -> Tensor:
    return kron_dense([structured_cholesky(f) for f in op.factors])


@structured_cholesky.register
def _(op: BlockDiag) -> Tensor:
    factors = [structured_cholesky(g) for g in op.groups]  # (..., g_j, m_j, m_j) per group
    batch = torch.broadcast_shapes(*(f.shape[:-3] for f in factors))
    out = factors[0].new_zeros(*batch, op.n, op.n)
    for rows, factor in zip(op.group_rows(), factors, strict=True):
        out[..., rows[:, :, None], rows[:, None, :]] = factor
    return out


@structured_cholesky.register
def _(op: AddedDiagonal) -> Tensor:
    w = thin_factor(op.base)
    if w is None:
        return psd_cholesky(op.to_dense(), f"the covariance {op!r}")
    return low_rank_plus_diagonal_cholesky(w, op.noise.diagonal())


@functools.singledispatch
def thin_factor(base: Operator) -> Tensor | None:
    """A dense ``W`` ``(..., n, k)`` with ``W W^T = base`` and ``k <= n / THIN``, or None."""
    return None


@thin_factor.register
def _(base: LowRank) -> Tensor | None:
    return base.factor if base.rank * THIN <= base.n else None


@thin_factor.register
def _(base: SparseLifted) -> Tensor | None:
    if base.n_in * THIN > base.n:
        return None
    return base.root().to_dense()  # L R_B, (n_out, n_in): one factorisation of the small base


def low_rank_plus_diagonal_cholesky(w: Tensor, d: Tensor, block: int | None = None) -> Tensor:
    """The lower Cholesky factor of ``diag(d) + W W^T``; ``w`` ``(..., n, k)``, ``d`` ``(..., n)``.

    Split the rows into blocks ``j`` of ``b`` rows. With the Schur complement of the blocks done so far
    written ``D + W S W^T`` (``S = I`` at the start), block ``j`` has
    ``L_jj = chol(D_j + W_j S W_j^T)`` and, below it, ``L_ij = W_i P_j^T`` with ``P_j = L_jj^{-1} W_j S``
    (``b x k``); the remaining complement is ``D + W (S - P_j^T P_j) W^T``. So the factor is the
    block-diagonal ``L_jj`` plus the strictly block-lower part of ``W P^T``. ``block``: ``b`` (default
    ``BLOCK``).
    """
    block = BLOCK if block is None else block
    n, k = w.shape[-2:]
    batch = torch.broadcast_shapes(w.shape[:-2], d.shape[:-1])
    w = w.expand(*batch, n, k)
    d = d.expand(*batch, n)
    s = torch.eye(k, dtype=w.dtype, device=w.device).expand(*batch, k, k)
    diagonal_blocks, ps = [], []
    for start in range(0, n, block):
        wj, dj = w[..., start : start + block, :], d[..., start : start + block]
        ws = wj @ s
        ljj = psd_cholesky(torch.diag_embed(dj) + ws @ wj.mT, "a diagonal block of D + W W^T")
        pj = torch.linalg.solve_triangular(ljj, ws, upper=False)
        s = s - pj.mT @ pj
        s = (s + s.mT) / 2  # keep the k x k complement exactly symmetric
        diagonal_blocks.append(ljj)
        ps.append(pj)
    block_of = torch.arange(n, device=w.device) // block
    below = (block_of[:, None] > block_of[None, :]).to(w.dtype)  # strictly block-lower entries
    out = (w @ torch.cat(ps, dim=-2).mT) * below
    for j, ljj in enumerate(diagonal_blocks):
        rows = slice(j * block, j * block + ljj.shape[-1])
        out[..., rows, rows] = ljj
    return out
