"""A structgp Gaussian likelihood seen as a gpytorch one, for the BoTorch and gpytorch code that asks for one.

gpytorch's ``ExactMarginalLogLikelihood`` (and so BoTorch's ``SumMarginalLogLikelihood``) refuses a likelihood
that is not a gpytorch ``_GaussianLikelihoodBase``, and BoTorch calls ``likelihood(mvn, X, noise=...)``
(``get_pvar_expected``, observation noise). :class:`GPyTorchLikelihoodView` is such a likelihood over a structgp
``GaussianLikelihood`` / ``FixedNoiseGaussianLikelihood``: it holds the structgp likelihood (the same
parameters, nothing copied) and adds its noise as a diagonal ``LinearOperator``:

    learned noise s            s I
    fixed noise  d_i (+ s)     diag(d + s) at the training points; elsewhere the mean of d (+ s), as BoTorch's
                               models add a fixed-noise likelihood's observation noise
    noise=... given            diag(noise)

A :class:`~.model.BoTorchModel` is fitted through its own structured loss (``compute_custom_loss``), which
includes the structgp likelihood's prior; the view only has to pass gpytorch's checks and add noise.
"""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.likelihoods import _GaussianLikelihoodBase
from gpytorch.likelihoods.noise_models import Noise
from linear_operator.operators import DiagLinearOperator
from torch import Tensor, nn

from structgp.models.noise import is_fixed_noise


class StructgpNoise(Noise):
    """gpytorch's noise-model protocol (``noise_covar(*params, shape=..., noise=...)``) over a structgp
    likelihood ``likelihood``."""

    def __init__(self, likelihood: nn.Module) -> None:
        super().__init__()
        self.likelihood = likelihood

    def forward(self, *params: Any, shape: torch.Size | None = None, noise: Tensor | None = None, **kwargs: Any):
        if noise is not None:
            return DiagLinearOperator(noise)
        if shape is None:  # as gpytorch: the shape of the first parameter (the inputs), less their last dim
            p = params[0] if torch.is_tensor(params[0]) else params[0][0]
            shape = p.shape if p.dim() == 1 else p.shape[:-1]
        diag = self._variances(shape[-1])
        return DiagLinearOperator(diag.expand(*torch.broadcast_shapes(diag.shape[:-1], shape[:-1]), shape[-1]))

    def _variances(self, n: int) -> Tensor:
        """The noise variances at ``n`` points ``(*batch, n)``."""
        lik = self.likelihood
        dtype, device = lik.noise.dtype, lik.noise.device
        if is_fixed_noise(lik) and lik.noise.shape[-1] != n:  # not the training points
            train = lik.noise_operator(lik.noise.shape[-1], dtype=dtype, device=device).diagonal()
            return train.mean(-1, keepdim=True).expand(*train.shape[:-1], n)
        return lik.noise_operator(n, dtype=dtype, device=device).diagonal()


class GPyTorchLikelihoodView(_GaussianLikelihoodBase):
    """A structgp Gaussian likelihood as a gpytorch Gaussian likelihood (see the module docstring);
    ``structgp_likelihood`` is the likelihood viewed."""

    def __init__(self, likelihood: nn.Module) -> None:
        super().__init__(noise_covar=StructgpNoise(likelihood))

    @property
    def structgp_likelihood(self) -> nn.Module:
        return self.noise_covar.likelihood

    @property
    def noise(self) -> Tensor:
        """The structgp likelihood's noise (learned variance, or the fixed per-point variances)."""
        return self.structgp_likelihood.noise
