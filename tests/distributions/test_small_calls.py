"""The cheap small-call path (MultivariateNormal over a small Dense) keeps every check and every answer."""

import math

import pytest
import torch

from structgp.covariance import Dense
from structgp.covariance.validation import check_symmetric, negligibly_asymmetric
from structgp.distributions import MultivariateNormal
from structgp.inference import JitterWarning, NotPositiveDefiniteError, psd_cholesky
from tests.reference import F64, spd


def test_value_and_gradient_match_torch_distributions():
    s = spd(16, seed=0).requires_grad_(True)
    mu, y = torch.randn(16, dtype=F64), torch.randn(16, dtype=F64)
    ours = MultivariateNormal(mu, Dense(s)).log_prob(y)
    (grad,) = torch.autograd.grad(ours, s)
    ref = torch.distributions.MultivariateNormal(mu, covariance_matrix=s).log_prob(y)
    (ref_grad,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_bad_inputs_are_still_caught():
    s = spd(4)
    with pytest.raises(ValueError, match="finite"):
        Dense(torch.where(torch.eye(4, dtype=torch.bool), math.nan, s))
    asym = s.clone()
    asym[0, 1] += 0.1
    with pytest.raises(ValueError, match="symmetric"):
        Dense(asym)
    with pytest.raises(ValueError, match="loc"):
        MultivariateNormal(torch.tensor([0.0, math.nan, 0.0, 0.0], dtype=F64), Dense(s), validate_args=True)
    dist = MultivariateNormal(torch.zeros(4, dtype=F64), Dense(s), validate_args=True)
    with pytest.raises(ValueError, match="value"):
        dist.log_prob(torch.tensor([0.0, 0.0, math.nan, 0.0], dtype=F64))
    # infinities are real values for real_vector, as in torch.distributions
    MultivariateNormal(torch.tensor([0.0, math.inf, 0.0, 0.0], dtype=F64), Dense(s), validate_args=True)


def test_value_shape_must_broadcast_with_the_batch():
    dist = MultivariateNormal(torch.zeros(3, 4, dtype=F64), Dense(spd(4)), validate_args=True)
    with pytest.raises(ValueError, match="broadcast"):
        dist.log_prob(torch.zeros(2, 4, dtype=F64))
    assert dist.log_prob(torch.zeros(5, 1, 4, dtype=F64)).shape == (5, 3)


def test_not_positive_definite_is_jittered_with_a_warning_or_refused():
    w = torch.randn(6, 2, dtype=F64)
    singular = w @ w.T  # exactly symmetric, rank 2
    with pytest.warns(JitterWarning):
        value = MultivariateNormal(torch.zeros(6, dtype=F64), Dense(singular)).log_prob(torch.zeros(6, dtype=F64))
    assert torch.isfinite(value)
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        MultivariateNormal(torch.zeros(3, dtype=F64), Dense(indefinite), validate_args=True)
    with pytest.raises(NotPositiveDefiniteError, match="the dense matrix of Dense"):
        Dense(indefinite + 0.0 * torch.eye(3, dtype=F64)).logdet()


def test_negligible_asymmetry_is_remembered_until_the_matrix_changes():
    s = spd(5)
    s = (s + s.mT) / 2
    assert check_symmetric(s, "s") and Dense(s)._dense_is_symmetric()
    nearly = s.clone()
    nearly[0, 1] += 1e-12  # symmetric within the tolerance, but beyond rounding: its symmetric part is factorised
    assert not check_symmetric(nearly, "nearly") and not Dense(nearly)._dense_is_symmetric()
    torch.testing.assert_close(Dense(nearly).logdet(), torch.linalg.slogdet((nearly + nearly.mT) / 2)[1],
                               rtol=0, atol=1e-14)
    op = Dense(s.clone())
    with torch.no_grad():
        op.matrix[0, 1] += 1e-9  # in place, after the constructor's check
    assert not op._dense_is_symmetric()
    sym = (op.matrix + op.matrix.mT) / 2
    torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(sym)[1], rtol=0, atol=1e-13)
    assert not Dense(s).expand(2)._dense_is_symmetric()  # rebuilt from children: not known


def test_rounding_asymmetry_is_negligible():
    """A kernel matrix from a matrix product is symmetric only to rounding; it is factorised as it is (as
    torch.distributions does), which agrees with its symmetric part's factor to rounding."""
    x = torch.rand(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    sq = x.square().sum(-1)
    k = torch.exp(-0.5 * (sq[:, None] + sq[None, :] - 2 * x @ x.mT).clamp_min(0) / 0.05**2)
    k = k + 1e-2 * torch.eye(64, dtype=F64)
    # whether x @ x^T comes out bitwise symmetric depends on the BLAS kernel: add a rounding-level asymmetry
    k = k + k.abs() * 2e-16 * torch.triu(torch.rand(64, 64, dtype=F64, generator=torch.Generator().manual_seed(1)), 1)
    assert not torch.equal(k, k.mT)
    assert negligibly_asymmetric(k) and Dense(k)._dense_is_symmetric()
    y = torch.randn(64, dtype=F64)
    ours = MultivariateNormal(torch.zeros(64, dtype=F64), Dense(k)).log_prob(y)
    sym = torch.distributions.MultivariateNormal(torch.zeros(64, dtype=F64), covariance_matrix=(k + k.mT) / 2)
    torch.testing.assert_close(ours, sym.log_prob(y), rtol=1e-12, atol=0)


def test_psd_cholesky_builds_the_name_only_when_it_fails():
    calls = []

    def name():
        calls.append(1)
        return "the test matrix"

    psd_cholesky(spd(3), name)
    assert not calls
    with pytest.raises(NotPositiveDefiniteError, match="the test matrix"):
        psd_cholesky(-torch.eye(3, dtype=F64), name)


def test_inference_mode():
    s, y = spd(4), torch.randn(4, dtype=F64)
    with torch.inference_mode():
        op = Dense(s.clone())
        torch.testing.assert_close(op.logdet(), torch.linalg.slogdet(s)[1])
        value = MultivariateNormal(torch.zeros(4, dtype=F64), op).log_prob(y)
    ref = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=F64), covariance_matrix=s).log_prob(y)
    torch.testing.assert_close(value, ref)
