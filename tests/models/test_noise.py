import gpytorch
import pytest
import torch

from structgp.covariance import Diagonal, Kronecker, ScaledIdentity
from structgp.distributions import FixedNoiseGaussianLikelihood, GaussianLikelihood
from structgp.models import noise_operator
from tests.reference import F64, assert_close

KW = {"dtype": F64, "device": torch.device("cpu")}


def test_homoskedastic():
    for lik in (GaussianLikelihood(), gpytorch.likelihoods.GaussianLikelihood()):
        lik.noise = torch.tensor(0.3)
        op = noise_operator(lik, 4, 1, **KW)
        assert isinstance(op, ScaledIdentity) and op.dtype == F64
        assert_close(op.to_dense(), 0.3 * torch.eye(4, dtype=F64), 1e-6, 1e-6)
        assert noise_operator(lik, 4, 3, **KW).shape == (12, 12)
        with pytest.raises(ValueError, match="only used with a fixed-noise likelihood"):
            noise_operator(lik, 4, 1, test_noise=torch.ones(4), **KW)


def test_fixed_noise_train_and_test():
    noise = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    for lik in (FixedNoiseGaussianLikelihood(noise), gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)):
        op = noise_operator(lik, 3, 1, **KW)
        assert isinstance(op, Diagonal)
        assert_close(op.diagonal(), noise, 0, 0)
        test = noise_operator(lik, 2, 1, test_noise=torch.tensor([1.0, 2.0], dtype=F64), **KW)
        assert_close(test.diagonal(), torch.tensor([1.0, 2.0], dtype=F64), 0, 0)
        with pytest.raises(ValueError, match="expected 4 per-point variances"):
            noise_operator(lik, 4, 1, **KW)
    extra = FixedNoiseGaussianLikelihood(noise, learn_additional_noise=True, initial_noise=0.5)
    assert_close(noise_operator(extra, 3, 1, **KW).diagonal(), noise + 0.5, 1e-6, 1e-6)
    g = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise, learn_additional_noise=True).double()
    g.second_noise = torch.tensor(0.25, dtype=F64)
    assert_close(noise_operator(g, 3, 1, **KW).diagonal(), noise + 0.25, 1e-12, 1e-12)


def test_multitask_noise_is_kronecker_structured():
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3, rank=0).double()
    lik.task_noises = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    lik.noise = torch.tensor(0.05, dtype=F64)
    op = noise_operator(lik, 4, 3, **KW)
    assert isinstance(op, Kronecker) and op.is_diagonal
    expected = torch.kron(torch.eye(4, dtype=F64), torch.diag(torch.tensor([0.15, 0.25, 0.35], dtype=F64)))
    assert_close(op.to_dense(), expected, 1e-12, 1e-12)
    with pytest.raises(ValueError, match="rank > 0"):
        noise_operator(gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3, rank=1), 4, 3, **KW)
    with pytest.raises(ValueError, match="num_tasks=2"):
        noise_operator(lik, 4, 2, **KW)


def test_unknown_likelihood():
    with pytest.raises(TypeError, match="likelihood: expected a Gaussian likelihood"):
        noise_operator(gpytorch.likelihoods.BernoulliLikelihood(), 3, 1, **KW)
