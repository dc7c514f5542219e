"""Conditioning a GP posterior on further observations without refactoring the training covariance.

For a Gaussian posterior ``f ~ N(mu, C)`` (the gp's, from its cached structured training solve) and new
observations ``y_n = f(X_n) + e``, ``e ~ N(0, diag(s))``, the updated posterior at points ``X_a`` is

    S     = C_nn + diag(s)                                  (n' x n', factorised in float64)
    mean  = mu_a + C_an S^{-1} (y_n - mu_n)
    cov   = C_aa - C_an S^{-1} C_na

with ``mu`` and ``C`` the previous posterior's at ``[X_a; X_n]``. This is exactly the GP trained on the union
of the data (same hyperparameters), so BoTorch's fantasy models (``y_n`` with leading fantasy dims) reuse the
training factorisation of any structure (Kronecker, low rank, grids, ...): a step costs a posterior at
``q + n'`` points and an ``n' x n'`` Cholesky. Steps chain (fantasies of fantasies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from structgp.inference.cholesky import psd_cholesky
from structgp.integrations.botorch.layout import Layout

Joint = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclasses.dataclass(frozen=True)
class Observations:
    """New data in model coordinates: inputs ``x`` ``(*B, n, d)``, values ``y`` (``(*B, V)`` in the layout's
    values order) and their noise variances ``noise`` (same shape), or None for the likelihood's noise."""

    x: Tensor
    y: Tensor
    noise: Tensor | None = None


def conditioned_joint(
    base: Joint, steps: Sequence[Observations], layout: Layout, noise_at: Callable[[int], Tensor], x: Tensor
) -> tuple[Tensor, Tensor]:
    """``(mean, covariance)`` at ``x`` (model coordinates ``(*b, P, d)``) of the posterior ``base`` conditioned
    on each of ``steps`` in turn; ``noise_at(n)`` gives the likelihood's noise values of ``n`` points."""
    if not steps:
        return base(x)
    obs = steps[-1]
    batch = torch.broadcast_shapes(x.shape[:-2], obs.x.shape[:-2])
    both = torch.cat([x.expand(*batch, *x.shape[-2:]), obs.x.expand(*batch, *obs.x.shape[-2:])], dim=-2)
    mean, cov = conditioned_joint(base, steps[:-1], layout, noise_at, both)
    k = x.shape[-2] * layout.per_point
    noise = obs.noise if obs.noise is not None else noise_at(obs.x.shape[-2])
    return condition(mean, cov, k, obs.y, noise)


def condition(mean: Tensor, cov: Tensor, k: int, y: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Condition ``N(mean, cov)`` over ``(a, n)`` values (the first ``k`` are ``a``) on ``y = f_n + e``,
    ``e ~ N(0, diag(noise))``; returns the posterior of ``f_a``. Leading dims of ``y`` (fantasies) broadcast."""
    m_a, m_n = mean[..., :k], mean[..., k:]
    c_aa, c_na, c_nn = cov[..., :k, :k], cov[..., k:, :k], cov[..., k:, k:]
    s = c_nn.double() + torch.diag_embed(noise.double())
    chol = psd_cholesky(s, "the covariance of the observations being conditioned on")
    w = torch.linalg.solve_triangular(chol, c_na.double(), upper=False)  # L^{-1} C_na
    residual = (y - m_n).double().unsqueeze(-1)
    v = torch.linalg.solve_triangular(chol, residual, upper=False)
    new_mean = m_a + (w.mT @ v).squeeze(-1).to(mean.dtype)
    new_cov = c_aa - (w.mT @ w).to(cov.dtype)
    return new_mean, new_cov
