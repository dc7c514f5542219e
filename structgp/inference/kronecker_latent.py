"""The lifted Woodbury capacitance through a Kronecker spectral root that is never formed.

For ``A = L K L^T + D`` with ``K = K_1 (x) ... (x) K_d`` singular in float64, its truncated spectral root
``R = R_1 (x) ... (x) R_d`` (``R_i = Q_i[:, keep_i] diag(l_i[keep_i])^{1/2}``, ``n_i x k_i``, ``r = prod k_i``,
see :mod:`.spectral_root`) and ``M = L^T D^{-1} L``, the capacitance

    C = I_r + R^T M R

is formed ``c`` columns at a time: ``R_j = R E_j`` (a Kronecker product applied to ``c`` identity columns),
``Z_j = L^T D^{-1} (L R_j)`` by two sparse products, ``C[:, j] = R^T Z_j`` by mode products with the narrow
``R_i^T`` (the first one ``2 n_in k_1 c`` flops, the rest smaller). Memory ``O((n_out + n_in) c + r^2)``:
nothing ``n_in x r`` (at ``n_in = 64^3``, ``r ~ 2000`` that would be 4 GiB in float64).

The base's gradients (:mod:`.lifted_woodbury`: ``log det A`` owes ``<G, dK>`` with ``G = M - P C^{-1} P^T``,
``P = M R``) reach the factors: ``d<G, K>/dK_i`` is the partial trace of ``G`` against the other factors,

    T_i[a, b] = sum G[(.., a, ..), (.., b, ..)] prod_{k != i} K_k[., .]           (n_i x n_i)

- the ``M`` part from the lift's row pairs (``M = sum_r d_r^{-1} l_r l_r^T``; ``sum_r nnz_r^2`` pairs in row
  blocks, the exact ``K_k``);
- the ``P C^{-1} P^T`` part with ``K_k = R_k R_k^T`` (as exact as the root itself): the projections
  ``P~_i = P x_{k != i} R_k^T`` (``n_i x prod_{k != i} k_k x r``, ``r^2 n_i / k_i`` entries, filled during the
  column pass) give ``T_i = sum_m P~_i[:, m] C^{-1} P~_i[:, m]^T``.

The surrogate ``sum_i <K_i, T_i>`` with detached ``T_i`` then has the gradient ``T_i`` in each ``K_i``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.kron import kron_matmul
from structgp.covariance.sparse_lifted import Lift

# elements of one column chunk's n_out x c and n_in x c temporaries (256 MiB in float64): wide enough that the sparse
# products run near their best rate per column (about 3x slower per column at c = 16 than at c = 83, measured)
CHUNK_ELEMENTS = 2**25


def chunk_width(lift: Lift, rank: int) -> int:
    """Columns ``c`` of ``R`` processed at a time: ``max(n_out, n_in) c <= CHUNK_ELEMENTS``."""
    return max(1, min(rank, CHUNK_ELEMENTS // max(lift.n_out, lift.n_in)))


def kronecker_capacitance(
    lift: Lift, values: Tensor, weights: Tensor | None, roots: list[Tensor], projections: bool
) -> tuple[Tensor, list[Tensor] | None]:
    """``R^T L^T W L R`` ``(r, r)`` for ``R = R_1 (x) ... (x) R_d`` (``roots``: ``(n_i, k_i)`` float64, unbatched)
    and ``W = diag(weights)`` (``(n_out,)``, None for ``I``), with, if asked, the projections ``P~_i``
    ``(n_i, prod_{k != i} k_k, r)`` of ``P = L^T W L R``; nothing carries a graph."""
    sizes, ranks = [f.shape[0] for f in roots], [f.shape[1] for f in roots]
    r = math.prod(ranks)
    step = chunk_width(lift, r)
    eye = torch.eye(r, dtype=torch.float64, device=values.device)
    out = torch.empty(r, r, dtype=torch.float64, device=values.device)
    proj = None
    if projections:
        proj = [out.new_empty(n, r // k, r) for n, k in zip(sizes, ranks)]
    with torch.no_grad():
        for s in range(0, r, step):
            cols = kron_matmul(roots, eye[:, s : s + step])  # R_j (n_in, c)
            rows = lift.matmul(cols, values)  # L R_j (n_out, c)
            del cols
            if weights is not None:
                rows.mul_(weights.unsqueeze(-1))
            z = lift.tmatmul(rows, values)  # Z_j = L^T W L R_j (n_in, c)
            del rows
            if proj is None:
                out[:, s : s + step] = kron_matmul([f.mT for f in roots], z)
                continue
            c = z.shape[-1]
            parts = _leave_one_out(z.view(*sizes, c), [f.mT for f in roots], list(range(len(roots))))
            for i, part in parts.items():
                proj[i][:, :, s : s + step] = part.movedim(i, 0).reshape(sizes[i], -1, c)
            out[:, s : s + step] = _mode_product(parts[0], roots[0].mT, 0).reshape(r, c)
    return out, proj


def _mode_product(x: Tensor, mat: Tensor, mode: int) -> Tensor:
    """``x`` ``(s_0, ..., s_{d-1}, c)`` times ``mat`` ``(k, s_mode)`` along ``mode`` (one GEMM)."""
    return torch.tensordot(mat, x, dims=([1], [mode])).movedim(0, mode)


def _leave_one_out(x: Tensor, mats: list[Tensor], modes: list[int]) -> dict[int, Tensor]:
    """For each ``i`` in ``modes``: ``x`` with ``mats[k]`` applied along every other mode ``k`` in ``modes``.
    Halving the modes shares the products: two full-size mode products for ``d = 3`` instead of six."""
    if len(modes) == 1:
        return {modes[0]: x}
    half = len(modes) // 2
    out: dict[int, Tensor] = {}
    for keep, reduce in ((modes[:half], modes[half:]), (modes[half:], modes[:half])):
        y = x
        for k in reduce:
            y = _mode_product(y, mats[k], k)
        out.update(_leave_one_out(y, mats, keep))
    return out


def projected_traces(projections: list[Tensor], chol: Tensor) -> list[Tensor]:
    """``T_i = sum_m P~_i[:, m] C^{-1} P~_i[:, m]^T`` ``(n_i, n_i)`` for ``C = chol chol^T`` ``(r, r)``: one
    triangular solve with the ``r x (n_i prod_{k != i} k_k)`` projection, then one product."""
    out = []
    for p in projections:
        n, rest, r = p.shape
        w = torch.linalg.solve_triangular(chol, p.reshape(n * rest, r).mT, upper=False)  # (r, n rest)
        w = w.view(r, n, rest).transpose(0, 1).reshape(n, r * rest)
        out.append(w @ w.mT)
    return out


def pair_traces(lift: Lift, values: Tensor, inv_noise: Tensor, mats: list[Tensor]) -> list[Tensor]:
    """``T_i`` of ``M = L^T D^{-1} L = sum_r d_r^{-1} l_r l_r^T`` against ``mats`` (the float64 factors
    ``(n_i, n_i)``, detached) from the lift's within-row pairs, a row block at a time: ``(n_i, n_i)`` each.
    ``inv_noise`` ``(1,)`` for ``s I`` or ``(n_out,)``."""
    sizes = [m.shape[-1] for m in mats]
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    out = [m.new_zeros(n * n) for m, n in zip(mats, sizes)]
    scalar = inv_noise.numel() == 1
    for rows, pos in lift.row_blocks():
        v, cols = values[pos], lift.col[pos]  # (k, m)
        w = v.unsqueeze(-1) * v.unsqueeze(-2) * (inv_noise if scalar else inv_noise[rows][:, None, None])
        idx = [(cols // st) % n for st, n in zip(strides, sizes)]
        blocks = [m[i.unsqueeze(-1), i.unsqueeze(-2)] for m, i in zip(mats, idx)]  # (k, m, m) each
        for i, n in enumerate(sizes):
            others = w
            for j, b in enumerate(blocks):
                if j != i:
                    others = others * b
            out[i].index_add_(0, (idx[i].unsqueeze(-1) * n + idx[i].unsqueeze(-2)).reshape(-1), others.reshape(-1))
    return [t.view(n, n) for t, n in zip(out, sizes)]


def kronecker_surrogate(
    lift: Lift, values: Tensor, inv_noise: Tensor, factors: list[Tensor], projections: list[Tensor], chol: Tensor
) -> Tensor:
    """``sum_i <K_i, T_i>`` ``()`` with ``T_i`` of ``G = M - P C^{-1} P^T`` (detached): its gradient in each
    factor ``K_i`` (``factors``, float64, carrying the graph) is ``d<G, K>/dK_i``; its value means nothing
    (callers add ``s - s.detach()``)."""
    with torch.no_grad():
        detached = [f.detach() for f in factors]
        pairs = pair_traces(lift, values, inv_noise, detached)
        low = projected_traces(projections, chol)
    return sum((f * (a - b)).sum() for f, a, b in zip(factors, pairs, low))
