"""Gaussian likelihoods: structure of the noisy covariance, constraints, priors, gradients."""

from __future__ import annotations

import pytest
import torch
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.priors import GammaPrior

from structgp.covariance import AddedDiagonal, Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import FixedNoiseGaussianLikelihood, GaussianLikelihood, MultivariateNormal
from tests.reference import positive, spd

F64 = torch.float64


def test_gaussian_likelihood_adds_scaled_identity_noise():
    lik = GaussianLikelihood(initial_noise=0.25).double()
    base = LowRank(torch.randn(6, 2, dtype=F64))
    noisy = lik(base)
    assert isinstance(noisy, AddedDiagonal) and isinstance(noisy.noise, ScaledIdentity)
    torch.testing.assert_close(noisy.to_dense(), base.to_dense() + 0.25 * torch.eye(6, dtype=F64))
    torch.testing.assert_close(lik.noise, torch.tensor(0.25, dtype=F64))


def test_noise_goes_through_the_gpytorch_constraint():
    lik = GaussianLikelihood()
    constraint = lik.noise_covar.noise_constraint
    assert isinstance(constraint, GreaterThan) and float(constraint.lower_bound) == pytest.approx(1e-4)
    with torch.no_grad():
        lik.noise_covar.raw_noise.fill_(-30.0)  # softplus underflows: the bound holds
    assert lik.noise >= 1e-4
    custom = GaussianLikelihood(noise_constraint=Interval(0.01, 0.5), initial_noise=0.2)
    torch.testing.assert_close(custom.noise, torch.tensor(0.2))
    with pytest.raises(ValueError, match="noise"):
        custom.noise = 0.9
    with pytest.raises(TypeError, match="noise_constraint"):
        GaussianLikelihood(noise_constraint="positive")


def test_marginal_of_a_multivariate_normal_and_gradient_to_raw_noise():
    lik = GaussianLikelihood(batch_shape=(2,)).double()
    lik.noise = torch.tensor([0.1, 0.3], dtype=F64)
    k = Kronecker(spd(2, seed=1), spd(3, seed=2))
    f = MultivariateNormal(torch.zeros(6, dtype=F64), k)
    y_dist = lik(f)
    assert isinstance(y_dist, MultivariateNormal) and y_dist.batch_shape == (2,)
    y = torch.randn(6, dtype=F64)
    noise = torch.tensor([0.1, 0.3], dtype=F64)
    dense = k.to_dense() + noise[:, None, None] * torch.eye(6, dtype=F64)
    ref = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=F64), dense)
    torch.testing.assert_close(y_dist.log_prob(y), ref.log_prob(y), rtol=1e-10, atol=1e-10)
    y_dist.log_prob(y).sum().backward()
    assert lik.noise_covar.raw_noise.grad is not None and lik.noise_covar.raw_noise.grad.abs().min() > 0


def test_noise_is_cast_to_the_covariance_dtype():
    lik = GaussianLikelihood(initial_noise=0.5)  # float32 parameter
    noisy = lik(Dense(spd(3, seed=3)))
    assert noisy.dtype == F64
    torch.testing.assert_close(noisy.diagonal() - spd(3, seed=3).diagonal(), torch.full((3,), 0.5, dtype=F64))


def test_prior_log_density():
    prior = GammaPrior(2.0, 4.0)
    lik = GaussianLikelihood(noise_prior=prior, initial_noise=0.3)
    torch.testing.assert_close(lik.log_prior(), prior.log_prob(torch.tensor(0.3)))
    assert GaussianLikelihood().log_prior() == 0
    with pytest.raises(TypeError, match="noise_prior"):
        GaussianLikelihood(noise_prior=0.3)


def test_fixed_noise_gives_a_diagonal():
    noise = positive(5)
    lik = FixedNoiseGaussianLikelihood(noise)
    base = LowRank(torch.randn(5, 2, dtype=F64))
    noisy = lik(base)
    assert isinstance(noisy, AddedDiagonal) and isinstance(noisy.noise, Diagonal)
    torch.testing.assert_close(noisy.to_dense(), base.to_dense() + torch.diag(noise))
    assert lik.second_noise is None and lik.log_prior() == 0
    assert dict(lik.named_parameters()) == {}


def test_fixed_plus_learned_noise():
    noise = positive(5)
    prior = GammaPrior(2.0, 4.0)
    lik = FixedNoiseGaussianLikelihood(
        noise, learn_additional_noise=True, initial_noise=0.2, noise_prior=prior
    )
    lik = lik.double()
    base = Dense(spd(5, seed=4))
    noisy = lik(base)
    torch.testing.assert_close(noisy.to_dense(), base.to_dense() + torch.diag(noise + 0.2))
    torch.testing.assert_close(lik.log_prior(), prior.log_prob(torch.tensor(0.2, dtype=F64)).to(F64))
    noisy.logdet().backward()
    assert lik.second_noise_covar.raw_noise.grad is not None


def test_fixed_noise_validation():
    with pytest.raises(ValueError, match="noise"):
        FixedNoiseGaussianLikelihood(torch.tensor([0.1, -0.1], dtype=F64))
    with pytest.raises(ValueError, match="noise"):
        FixedNoiseGaussianLikelihood(torch.tensor(0.1, dtype=F64))
    with pytest.raises(ValueError, match="learn_additional_noise"):
        FixedNoiseGaussianLikelihood(positive(3), initial_noise=0.1)
    lik = FixedNoiseGaussianLikelihood(positive(3))
    with pytest.raises(ValueError, match="noise: expected 4"):
        lik(Dense(spd(4, seed=5)))
    with pytest.raises(TypeError, match="input"):
        lik("covariance")
