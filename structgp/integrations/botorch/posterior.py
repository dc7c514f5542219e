"""BoTorch posteriors from a dense joint mean and covariance.

The covariance handed to BoTorch is a square-root operator ``L L^T`` with ``L`` the ``q x q`` (``q m x q m``)
Cholesky factor, taken by :func:`structgp.inference.cholesky.psd_cholesky` in float64 (jitter warned). Its root
is square, so BoTorch's samplers draw ``mean + L eps`` with base samples of the event's own size, exactly as
for its own GPs (a wide root, e.g. one draw per term of a sum, would break their base-sample bookkeeping).
Independent outputs become a block-diagonal operator (output-major, as in BoTorch's batched models) whose root
is the block-diagonal of the roots.
"""

from __future__ import annotations

import torch
from botorch.posteriors import GPyTorchPosterior
from botorch.posteriors.fully_bayesian import GaussianMixturePosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import BlockDiagLinearOperator, CholLinearOperator, TriangularLinearOperator
from torch import Tensor

from structgp.inference.cholesky import psd_cholesky
from structgp.integrations.botorch.layout import Layout


def botorch_posterior(
    mean: Tensor, cov: Tensor, layout: Layout, q: int, outputs: list[int] | None, mixture: bool = False
) -> GPyTorchPosterior:
    """The posterior over ``q`` points from values ``mean`` and ``cov`` in ``layout``'s order.

    outputs: the output indices kept (None: all); mixture: a ``GaussianMixturePosterior`` (ensembles).
    """
    mean, cov, kept = _select(mean, cov, layout, q, outputs)
    root = _root(cov, mean.shape[:-1])
    mean = mean.expand(*root.shape[:-1])
    if layout.kind == "single" or kept == 1:
        dist = MultivariateNormal(mean, root)
    elif layout.kind == "tasks":
        dist = MultitaskMultivariateNormal(mean.unflatten(-1, (q, kept)), root, interleaved=True)
    else:
        block = BlockDiagLinearOperator(root, block_dim=-3)  # output-major, as BoTorch's batched models
        dist = MultitaskMultivariateNormal(mean.movedim(-2, -1), block, interleaved=False)
    return GaussianMixturePosterior(dist) if mixture else GPyTorchPosterior(dist)


def _root(cov: Tensor, mean_batch: torch.Size) -> CholLinearOperator:
    """``L L^T`` broadcast to the mean's batch: a covariance shared by fantasies is factorised once."""
    chol = psd_cholesky(cov.double(), "the posterior covariance").to(cov.dtype)
    batch = torch.broadcast_shapes(mean_batch, chol.shape[:-2])
    return CholLinearOperator(TriangularLinearOperator(chol.expand(*batch, *chol.shape[-2:])))


def _select(mean: Tensor, cov: Tensor, layout: Layout, q: int, outputs: list[int] | None):
    """Keep ``outputs``; a single kept output of a multi-output layout is returned as ``(*B, q)``/``(*B, q, q)``."""
    if layout.kind == "single":
        return mean, cov, 1
    m = layout.outputs
    idx = torch.arange(m, device=mean.device) if outputs is None else torch.as_tensor(outputs, device=mean.device)
    k = idx.numel()
    if layout.kind == "tasks":
        if k < m:
            mean = mean.unflatten(-1, (q, m)).index_select(-1, idx).flatten(-2)
            cov = cov.unflatten(-1, (q, m)).unflatten(-3, (q, m)).index_select(-3, idx).index_select(-1, idx)
            cov = cov.flatten(-2).flatten(-3, -2)
        return mean, cov, k
    mean, cov = mean.index_select(-2, idx), cov.index_select(-3, idx)
    if k == 1:
        mean, cov = mean.squeeze(-2), cov.squeeze(-3)
    return mean, cov, k
