"""Float64 dense reference of exact GP regression (torch.linalg only), shared by the model tests."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor


@dataclasses.dataclass
class DenseGP:
    """``y ~ N(m, K + N)``; predictions from ``K_*x``, ``K_**`` and the test prior mean ``m_*``."""

    k_train: Tensor  # (..., N, N) without noise
    noise: Tensor  # (..., N, N)
    mean: Tensor  # (..., N)
    y: Tensor  # (..., N)

    @property
    def a(self) -> Tensor:
        return self.k_train + self.noise

    def mll(self) -> Tensor:
        r = self.y - self.mean
        a = self.a
        inv_quad = (r * torch.linalg.solve(a, r.unsqueeze(-1)).squeeze(-1)).sum(-1)
        return -0.5 * (inv_quad + torch.linalg.slogdet(a)[1] + r.shape[-1] * math.log(2 * math.pi))

    def posterior(self, k_cross: Tensor, k_test: Tensor, mean_test: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean (..., n_*), covariance (..., n_*, n_*))``."""
        a = self.a
        alpha = torch.linalg.solve(a, (self.y - self.mean).unsqueeze(-1)).squeeze(-1)
        mean = mean_test + (k_cross @ alpha.unsqueeze(-1)).squeeze(-1)
        cov = k_test - k_cross @ torch.linalg.solve(a, k_cross.mT)
        return mean, cov


def diag(cov: Tensor) -> Tensor:
    return cov.diagonal(dim1=-2, dim2=-1)
