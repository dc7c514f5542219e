"""The lift Gram ``M = L^T diag(w) L`` ``(..., n_in, n_in)`` of a sparse lift, differentiable in its values and the
weights, by rows: all of them in one process, each rank's own under an active :mod:`structgp.distributed`
process group (each rank forms its rows' ``sum_r w_r l_r l_r^T`` and one all-reduce sums them; the
backward visits only its rows and one all-reduce assembles the gradients, each entry one rank's: exact).
The latent Woodbury engine's gram form (:mod:`structgp.inference.lifted_woodbury`) is its user.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp import distributed
from structgp.covariance import lift_products
from structgp.covariance.sparse_lifted import Lift


def lift_gram(lift: Lift, values: Tensor, weights: Tensor | None = None) -> Tensor:
    """``L^T diag(w) L`` ``(..., n_in, n_in)`` for the lift's pattern with ``values`` ``(nnz,)`` and
    ``weights`` ``(..., n_out)`` (None: ``L^T L``); differentiable in both, memory ``O(n_in^2 + chunk)``."""
    return _LiftGram.apply(values, weights, lift)


class _LiftGram(torch.autograd.Function):
    """``M = L^T W L``: forward by a sparse-sparse product (one per batch member of ``w``); backward from
    the row blocks, ``dM = G``:

        grad w_r = l_r^T G l_r,      grad v_a = w_r t_a,      t = (G + G^T)[c_r, c_r] v_r (per row r),

    gathering ``sum_r nnz_r^2`` entries of ``G + G^T`` in chunks; partitioned by rows under a process group
    (see the module docstring)."""

    @staticmethod
    def forward(values: Tensor, weights: Tensor | None, lift: Lift) -> Tensor:
        mine = lift_products.own_rows(lift)
        if mine is None:
            return _gram(lift, values, weights)
        local, start, a, b, _ = mine
        w = None if weights is None else weights[..., start : start + local.n_out]
        return distributed.all_reduce_sum([_gram(local, values[a:b], w)], "the lift Gram L^T D^-1 L")[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        values, weights, ctx.lift = inputs
        ctx.save_for_backward(values, weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, weights = ctx.saved_tensors
        lift, needs = ctx.lift, ctx.needs_input_grad[:2]
        w = None if weights is None else weights.reshape(-1, lift.n_out)
        mine = lift_products.own_rows(lift)
        if mine is None:
            grad_v, grad_w = _gram_backward(lift, values, w, grad, needs)
        else:
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad, values, weights)):
                raise NotImplementedError(
                    "create_graph: second derivatives through the lift Gram L^T D^-1 L are not available while "
                    "the lift's rows are partitioned across processes (structgp.distributed)"
                )
            local, start, a, b, _ = mine
            stop = start + local.n_out
            own_v, own_w = _gram_backward(local, values[a:b], None if w is None else w[:, start:stop], grad, needs)
            grad_v = grad_w = None
            if own_v is not None:
                grad_v = values.new_zeros(values.shape)
                grad_v[a:b] = own_v
            if own_w is not None:
                grad_w = w.new_zeros(w.shape)
                grad_w[:, start:stop] = own_w
            grad_v, grad_w = distributed.all_reduce_sum([grad_v, grad_w], "the lift Gram's gradients")
        return grad_v, None if grad_w is None else grad_w.view(weights.shape), None


def _gram(lift: Lift, values: Tensor, weights: Tensor | None) -> Tensor:
    """``L^T diag(w) L`` ``(..., n_in, n_in)`` by sparse-sparse products (one per batch member of ``w``)."""
    lt = lift.csr(values, transpose=True)
    if weights is None:
        return (lt @ lift.csr(values, transpose=False)).to_dense()
    flat = weights.reshape(-1, lift.n_out)
    grams = [(lt @ lift.csr(values * w[lift.row], transpose=False)).to_dense() for w in flat]
    return torch.stack(grams).view(*weights.shape[:-1], lift.n_in, lift.n_in)


def _gram_backward(
    lift: Lift, values: Tensor, w: Tensor | None, grad: Tensor, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients ``(nnz,)`` and ``(B, n_out)`` of ``M = L^T diag(w) L`` in the values and the weights ``w``
    ``(B, n_out)`` (None: ``w = 1``) for ``dM = grad`` ``(..., n_in, n_in)``, row block by row block."""
    n = lift.n_in
    sym = (grad + grad.mT).reshape(-1, n * n)  # (B, n^2)
    grad_v = torch.zeros_like(values) if needs[0] else None
    grad_w = torch.zeros_like(w) if w is not None and needs[1] else None
    for rows, pos in lift.row_blocks(max(1, Lift.CHUNK // sym.shape[0])):
        v, c = values[pos], lift.col[pos]  # (k, m)
        block = sym[:, c.unsqueeze(-1) * n + c.unsqueeze(-2)]  # (B, k, m, m)
        t = (block @ v.unsqueeze(-1)).squeeze(-1)  # (B, k, m)
        if grad_w is not None:
            grad_w[:, rows] = 0.5 * (t * v).sum(-1)
        if grad_v is not None:
            grad_v[pos] = t.sum(0) if w is None else (w[:, rows, None] * t).sum(0)
    return grad_v, grad_w
