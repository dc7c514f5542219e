"""The exact marginal log likelihood against dense float64 torch references and gpytorch's."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.priors import GammaPrior

import structgp as sg
from structgp.covariance import Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import (
    ExactMarginalLogLikelihood,
    FixedNoiseGaussianLikelihood,
    GaussianLikelihood,
    MultivariateNormal,
    marginal_log_likelihood,
)
from tests.reference import positive, spd

F64 = torch.float64


def _dense_log_prob(mean, cov, y):
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(y)


def test_function_matches_dense_reference():
    w, d = torch.randn(9, 3, dtype=F64), positive(9)
    mean, y = torch.randn(9, dtype=F64), torch.randn(4, 9, dtype=F64)
    op = LowRank(w) + Diagonal(d)
    ref = _dense_log_prob(mean, op.to_dense(), y)
    torch.testing.assert_close(marginal_log_likelihood(mean, op, y), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(marginal_log_likelihood(mean, op, y, normalize=True), ref / 9)
    zero = _dense_log_prob(torch.zeros(9, dtype=F64), op.to_dense(), y)
    torch.testing.assert_close(marginal_log_likelihood(None, op, y), zero, rtol=1e-12, atol=1e-12)
    assert sg.last_report().method == "woodbury"


def test_module_matches_dense_reference_with_priors():
    k1, k2 = spd(3, seed=1), spd(4, seed=2)
    prior = GammaPrior(2.0, 4.0)
    lik = GaussianLikelihood(noise_prior=prior, initial_noise=0.2).double()
    mll = ExactMarginalLogLikelihood(lik)
    mean, y = torch.randn(12, dtype=F64), torch.randn(12, dtype=F64)
    f = MultivariateNormal(mean, Kronecker(k1, k2))
    value = mll(f, y)
    noise = lik.noise.detach()  # 0.2 up to the float32 round trip of the initial raw value
    torch.testing.assert_close(noise, torch.tensor(0.2, dtype=F64), rtol=1e-6, atol=0)
    dense = torch.kron(k1, k2) + noise * torch.eye(12, dtype=F64)
    expected = (_dense_log_prob(mean, dense, y) + prior.log_prob(noise)) / 12
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    raw = ExactMarginalLogLikelihood(lik, normalize=False)(f, y)
    torch.testing.assert_close(raw, expected * 12, rtol=1e-10, atol=1e-10)


def test_module_matches_gpytorch_exact_mll():
    """Same data, kernel matrix and noise through gpytorch's ExactGP + ExactMarginalLogLikelihood."""
    torch.manual_seed(0)
    x, y = torch.rand(10, 1, dtype=F64), torch.randn(10, dtype=F64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs)
            )

    g_lik = gpytorch.likelihoods.GaussianLikelihood().double()
    g_lik.noise = 0.3
    model = GP(g_lik).double().train()
    with gpytorch.settings.max_cholesky_size(10_000):
        expected = gpytorch.mlls.ExactMarginalLogLikelihood(g_lik, model)(model(x), y)
        k = model.covar_module(x).to_dense().detach()
        mean = model.mean_module(x).detach()
    lik = GaussianLikelihood(initial_noise=0.3).double()
    value = ExactMarginalLogLikelihood(lik)(MultivariateNormal(mean, k + 1e-12 * torch.eye(10, dtype=F64)), y)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-8, atol=1e-8)


def test_model_priors_are_added():
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(), outputscale_prior=GammaPrior(2.0, 1.0)
    )
    kernel = kernel.double()
    lik = GaussianLikelihood(initial_noise=0.2).double()
    f = MultivariateNormal(torch.zeros(4, dtype=F64), Diagonal(positive(4)))
    y = torch.randn(4, dtype=F64)
    with_prior = ExactMarginalLogLikelihood(lik, kernel, normalize=False)(f, y)
    without = ExactMarginalLogLikelihood(lik, normalize=False)(f, y)
    expected = GammaPrior(2.0, 1.0).log_prob(kernel.outputscale).to(F64)
    torch.testing.assert_close(with_prior - without, expected)


def test_gradients_reach_kernel_tensors_and_noise():
    k1, k2 = spd(2, seed=3), spd(3, seed=4)
    noise = torch.tensor(0.3, dtype=F64)
    y = torch.randn(6, dtype=F64)

    def mll(k1, k2, noise):
        cov = Kronecker(k1, k2) + ScaledIdentity(noise, 6)
        return marginal_log_likelihood(None, cov, y, normalize=True)

    inputs = [t.clone().requires_grad_() for t in (k1, k2, noise)]
    assert torch.autograd.gradcheck(mll, inputs, fast_mode=True)


def test_fixed_noise_module_batch():
    noise = positive(3, 5)
    lik = FixedNoiseGaussianLikelihood(noise)
    w = torch.randn(5, 2, dtype=F64)
    f = MultivariateNormal(torch.zeros(5, dtype=F64), LowRank(w))
    y = torch.randn(3, 5, dtype=F64)
    value = ExactMarginalLogLikelihood(lik)(f, y)
    dense = (w @ w.T) + torch.diag_embed(noise)
    expected = _dense_log_prob(torch.zeros(5, dtype=F64), dense, y) / 5
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_errors():
    lik = GaussianLikelihood()
    with pytest.raises(TypeError, match="function_dist"):
        ExactMarginalLogLikelihood(lik)(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="likelihood"):
        ExactMarginalLogLikelihood(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="y"):
        marginal_log_likelihood(None, Diagonal(positive(3)), [0.0, 0.0, 0.0])
