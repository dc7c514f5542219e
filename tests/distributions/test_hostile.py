"""Hostile input to MultivariateNormal: each case asserts the exact exception type and that the message names
the argument, or checks the returned value against torch.distributions on the dense matrix (float64)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributions as tdist
from hypothesis import given, settings
from hypothesis import strategies as st

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.covariance.errors import NumericalError
from structgp.distributions import MultivariateNormal
from structgp.inference import JitterWarning
from tests.reference import F64, positive, spd


def _rbf(n: int, lengthscale: float) -> torch.Tensor:
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x) ** 2 / lengthscale**2)


# -- arguments ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loc, covariance, error, match",
    [
        (lambda: torch.zeros(4, dtype=F64), lambda: Dense(spd(3)), ValueError, r"^loc: expected shape \(\.\.\., 3\)"),
        (lambda: torch.zeros(3), lambda: Dense(spd(3)), TypeError, r"^loc: expected dtype torch.float64"),
        (lambda: [0.0, 0.0, 0.0], lambda: Dense(spd(3)), TypeError, r"^loc: expected a torch.Tensor"),
        (lambda: torch.zeros(3, dtype=F64), lambda: "K", TypeError, r"^covariance: expected a structgp operator"),
        (lambda: torch.zeros(3, dtype=F64), lambda: torch.ones(3, 2, dtype=F64), ValueError, "^covariance: expected"),
    ],
)
def test_bad_arguments_name_themselves(loc, covariance, error, match):
    with pytest.raises(error, match=match):
        MultivariateNormal(loc(), covariance())


def test_non_finite_or_zero_covariance_diagonal_is_numerical_and_negative_is_a_mistake():
    """Validation reads the diagonal: Inf (from a scale that overflowed in the square) and 0 are numerical
    errors (Pyro records a divergence); a negative diagonal entry is a plain ValueError."""
    loc = torch.zeros(3, dtype=F64)
    w = torch.ones(3, 1, dtype=F64)
    with pytest.raises(NumericalError, match=r"^covariance: expected a positive definite operator"):
        MultivariateNormal(loc, LowRank(1e160 * w) + Diagonal(positive(3)), validate_args=True)
    with pytest.raises(NumericalError, match=r"^covariance: expected a positive definite operator"):
        MultivariateNormal(loc, LowRank(0 * w), validate_args=True)
    negative = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"^covariance: expected a positive definite operator") as info:
        MultivariateNormal(loc, Dense(negative), validate_args=True)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_value_names_value(bad):
    op = LowRank(torch.randn(4, 2, dtype=F64)) + Diagonal(positive(4))
    value = torch.zeros(4, dtype=F64)
    value[2] = bad
    with pytest.raises(NumericalError, match=r"^value: expected finite entries \(found NaN or Inf in value - loc\)"):
        MultivariateNormal(torch.zeros(4, dtype=F64), op, validate_args=False).log_prob(value)
    with pytest.raises(ValueError, match="value"):  # torch's support check, with validation on
        MultivariateNormal(torch.zeros(4, dtype=F64), op, validate_args=True).log_prob(value)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (lambda: torch.zeros(3, dtype=torch.float32), TypeError, r"^value: expected a tensor of dtype torch.float64"),
        (lambda: [0.0, 0.0, 0.0], TypeError, r"^value: expected a tensor of dtype torch.float64 \(the cov.*got list"),
        (lambda: torch.zeros(5, dtype=F64), ValueError, r"^value: expected shape \(\.\.\., 3\) \(the event shape\)"),
        (lambda: torch.zeros(1, dtype=F64), ValueError, r"^value: expected shape \(\.\.\., 3\) \(the event shape\)"),
    ],
)
def test_bad_values(value, error, match):
    dist = MultivariateNormal(torch.zeros(3, dtype=F64), Dense(spd(3)), validate_args=False)
    with pytest.raises(error, match=match):
        dist.log_prob(value())


def test_values_whose_batch_does_not_broadcast_name_value():
    dist = MultivariateNormal(torch.zeros(4, 3, dtype=F64), Dense(spd(3)), validate_args=False)
    message = r"^value: expected shape \(\.\.\., 3\) broadcastable with the batch shape \(4,\)"
    with pytest.raises(ValueError, match=message):
        dist.log_prob(torch.zeros(2, 3, dtype=F64))


# -- singular structured priors (the README's Kronecker prior pattern) --------------------------------------
@pytest.mark.parametrize("lengthscale", [0.3, 1.0])
def test_kronecker_prior_without_noise_matches_dense_torch_with_the_same_jitter(lengthscale):
    """RBF on a 20-point grid: MultivariateNormal(0, Kronecker(K, K)).log_prob and its gradient were NaN. Now:
    a JitterWarning, and the log density, its gradient in K and the entropy of torch's MultivariateNormal on
    K (x) K + j I, with j the jitter reported."""
    k = _rbf(20, lengthscale)
    x = torch.randn(400, dtype=F64, generator=torch.Generator().manual_seed(0))
    leaf = k.clone().requires_grad_()
    with pytest.warns(JitterWarning, match="added jitter 1e-08"):
        log_prob = MultivariateNormal(torch.zeros(400, dtype=F64), Kronecker(leaf, k)).log_prob(x)
    jitter = sg.last_report().jitter
    (grad,) = torch.autograd.grad(log_prob, leaf)
    ref_leaf = k.clone().requires_grad_()
    ref = tdist.MultivariateNormal(
        torch.zeros(400, dtype=F64), torch.kron(ref_leaf, k) + jitter * torch.eye(400, dtype=F64)
    )
    ref_log_prob = ref.log_prob(x)
    (ref_grad,) = torch.autograd.grad(ref_log_prob, ref_leaf)
    assert float(log_prob.detach()) == pytest.approx(float(ref_log_prob.detach()), rel=1e-6)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-4
    with pytest.warns(JitterWarning):
        entropy = MultivariateNormal(torch.zeros(400, dtype=F64), Kronecker(k, k)).entropy()
    assert float(entropy) == pytest.approx(float(ref.entropy()), rel=1e-6)


def test_samples_from_a_singular_kronecker_prior_are_finite_and_have_its_covariance():
    """rsample uses the exact spectral root (no jitter): finite draws whose sample covariance matches K (x) K."""
    k = _rbf(5, 1.0)
    draws = MultivariateNormal(torch.zeros(25, dtype=F64), Kronecker(k, k)).rsample((20000,))
    assert torch.isfinite(draws).all()
    empirical = draws.mT @ draws / draws.shape[0]
    assert float((empirical - torch.kron(k, k)).abs().max()) < 0.05


# -- extreme scales ------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(exponent=st.floats(-300, 300), seed=st.integers(0, 2**16))
def test_noise_across_the_range_gives_torchs_value_or_a_numerical_error(exponent, seed):
    """LowRank(W) + s I for s = 10^e: the log density of torch's LowRankMultivariateNormal where that is finite
    (relative 1e-9), a NumericalError where torch's is not; never NaN."""
    s = 10.0**exponent
    g = torch.Generator().manual_seed(seed)
    w, y = torch.randn(6, 2, dtype=F64, generator=g), torch.randn(3, 6, dtype=F64, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref = float(tdist.LowRankMultivariateNormal(torch.zeros(6, dtype=F64), w, s * torch.ones(6, dtype=F64))
                        .log_prob(y).sum())
        except (ValueError, RuntimeError):
            ref = math.nan
    try:
        dist = MultivariateNormal(torch.zeros(6, dtype=F64), LowRank(w) + ScaledIdentity(s, 6))
        value = float(dist.log_prob(y).sum())
    except NumericalError:
        assert not math.isfinite(ref)
        return
    assert not math.isnan(value)
    if math.isfinite(ref):
        assert value == pytest.approx(ref, rel=1e-9)


def test_log_prob_is_bitwise_the_same_with_and_without_gradients_in_float32():
    k = _rbf(20, 10.0).float()
    x = torch.randn(400, generator=torch.Generator().manual_seed(1))
    values = []
    for grad in (True, False):
        leaf = k.clone().requires_grad_(grad)
        with pytest.warns(JitterWarning):
            dist = MultivariateNormal(torch.zeros(400), Kronecker(leaf, k) + ScaledIdentity(1e-8, 400))
            values.append(dist.log_prob(x).detach())
    assert torch.equal(values[0], values[1]) and torch.isfinite(values[0]).all()
