"""``kl_divergence`` between structgp MultivariateNormals (and with torch's), through the engines.

For ``p = N(m_p, S_p)`` and ``q = N(m_q, S_q)`` over ``n`` dims:

    KL(p || q) = 1/2 (tr(S_q^{-1} S_p) + (m_q - m_p)^T S_q^{-1} (m_q - m_p) - n + log det S_q - log det S_p)

With a root ``R`` of ``S_p`` (``R R^T = S_p``, ``(n, k)``, structured: ``op.root()``) the trace is
``sum_j r_j^T S_q^{-1} r_j``: ``S_q.inv_quad_logdet`` over the ``k`` columns (in the covariances' batch),
then over ``m_q - m_p`` (in the distributions' batch) with ``log det S_q``: one factorisation of ``S_q`` by
the engine that fits its structure (the engines cache it on the operator). When the root is wider than
``n`` (a sum's side-by-side root) the ``n`` columns of the dense Cholesky factor of ``S_p`` are used
instead. ``log det S_p`` is ``S_p.logdet()`` (the engine reuses the
factorisation behind the root where it has one).

Importing this module registers the rules with ``torch.distributions.kl.register_kl``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal as TorchMultivariateNormal
from torch.distributions.kl import register_kl

from structgp.covariance.dense import Dense
from structgp.covariance.operator import Operator
from structgp.distributions.multivariate_normal import MultivariateNormal
from structgp.inference.cholesky import psd_cholesky


@register_kl(MultivariateNormal, MultivariateNormal)
def kl_multivariate_normal(p: MultivariateNormal, q: MultivariateNormal) -> Tensor:
    """``KL(p || q)`` of shape ``broadcast(p.batch_shape, q.batch_shape)``."""
    n = p.event_shape[0]
    if q.event_shape[0] != n:
        raise ValueError(f"q: expected event shape ({n},) to match p's, got {tuple(q.event_shape)}")
    sp, sq = p._unbroadcasted_covariance, q._unbroadcasted_covariance
    if sp.dtype != sq.dtype:
        raise TypeError(f"q: expected dtype {sp.dtype} (p's), got {sq.dtype}")
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    diff = (q.loc - p.loc).expand(*batch, n)
    if sp is sq:  # one covariance: the trace is n and the log-determinants cancel
        return 0.5 * sq.inv_quad_logdet(diff)[0].expand(batch)
    columns = _root_columns(sp)  # (*batch_p, n, k)
    inner = torch.broadcast_shapes(sp.batch_shape, sq.batch_shape)  # the vectors line up with S_q's batch
    vectors = columns.expand(*inner, *columns.shape[-2:]).movedim(-1, 0)  # (k, *inner, n), a view
    trace = sq.inv_quad_logdet(vectors)[0].sum(0)
    mahalanobis, logdet_q = sq.inv_quad_logdet(diff)  # S_q's factorisation is cached: not repeated
    return 0.5 * (trace + mahalanobis - n + logdet_q - sp.logdet()).expand(batch)


def _root_columns(op: Operator) -> Tensor:
    """Dense columns ``R`` ``(..., n, k)`` with ``R R^T = op``: the structured root when ``k <= n``, else the
    dense Cholesky factor (``n`` columns)."""
    root = op.root()
    k = root.shape[-1]
    if k <= op.n:  # the columns through the map's own product (no larger than the n x k the trace needs)
        return root @ torch.eye(k, dtype=op.dtype, device=op.device)
    return psd_cholesky(op.to_dense(), f"the covariance {op!r}")


@register_kl(MultivariateNormal, TorchMultivariateNormal)
def _kl_structgp_torch(p: MultivariateNormal, q: TorchMultivariateNormal) -> Tensor:
    return kl_multivariate_normal(p, _from_torch(q))


@register_kl(TorchMultivariateNormal, MultivariateNormal)
def _kl_torch_structgp(p: TorchMultivariateNormal, q: MultivariateNormal) -> Tensor:
    return kl_multivariate_normal(_from_torch(p), q)


def _from_torch(d: TorchMultivariateNormal) -> MultivariateNormal:
    """A torch (or Pyro) MultivariateNormal as a structgp one over ``Dense(L L^T)``."""
    tril = d._unbroadcasted_scale_tril
    return MultivariateNormal(d.loc, Dense(tril @ tril.mT, name="covariance"))
