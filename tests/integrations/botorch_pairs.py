"""A structgp BoTorchModel and a BoTorch SingleTaskGP with the same data and hyperparameters (float64)."""

from __future__ import annotations

import copy

import gpytorch
import torch
from botorch.models import SingleTaskGP
from gpytorch.kernels import MaternKernel, ScaleKernel

from structgp.distributions import GaussianLikelihood
from structgp.integrations.botorch import BoTorchModel
from tests.reference import F64

NOISE = 0.02
CONSTANT = 0.3


def data(n: int = 12, d: int = 2, m: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, dtype=F64, generator=gen)
    cols = [torch.sin(3 * (k + 1) * x[:, 0]) * torch.cos(2 * x[:, 1]) for k in range(m)]
    y = torch.stack(cols, -1) + 0.05 * torch.randn(n, m, dtype=F64, generator=gen)
    return x, y


def kernel(d: int = 2, m: int = 1) -> ScaleKernel:
    batch = torch.Size([m]) if m > 1 else torch.Size()
    k = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=d, batch_shape=batch), batch_shape=batch).double()
    k.outputscale = torch.full(batch, 1.4, dtype=F64)
    k.base_kernel.lengthscale = torch.linspace(0.3, 0.5, d, dtype=F64).expand(*batch, 1, d)
    return k


def mean(m: int = 1) -> gpytorch.means.ConstantMean:
    mu = gpytorch.means.ConstantMean(batch_shape=torch.Size([m]) if m > 1 else torch.Size()).double()
    with torch.no_grad():
        mu.constant.fill_(CONSTANT)
    return mu


def pair(x, y, *, input_transform=None, outcome_transform=None, train_yvar=None):
    """``(BoTorchModel, SingleTaskGP)`` over ``x`` ``(n, d)``, ``y`` ``(n, m)``, hyperparameters equal."""
    d, m = x.shape[-1], y.shape[-1]
    batch = (m,) if m > 1 else ()
    ours_lik = None
    if train_yvar is None:
        ours_lik = GaussianLikelihood(batch_shape=batch).double()
        ours_lik.noise = torch.tensor(NOISE, dtype=F64)
    ours = BoTorchModel.from_data(
        x,
        y,
        kernel(d, m),
        train_Yvar=train_yvar,
        likelihood=ours_lik,
        mean=mean(m),
        input_transform=copy.deepcopy(input_transform),
        outcome_transform=copy.deepcopy(outcome_transform),
    )
    ref_lik = None
    if train_yvar is None:
        ref_lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size(batch)).double()
        ref_lik.noise = torch.tensor(NOISE, dtype=F64)
    ref = SingleTaskGP(
        x,
        y,
        train_Yvar=train_yvar,
        likelihood=ref_lik,
        covar_module=kernel(d, m),
        mean_module=mean(m),
        input_transform=copy.deepcopy(input_transform),
        outcome_transform=copy.deepcopy(outcome_transform),
    )
    return ours.eval(), ref.eval()
