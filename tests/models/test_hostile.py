"""Hostile input to ExactGP: test inputs of the wrong dimension, dtype, type or with NaNs, and a singular grid
prior with tiny noise. Each error case asserts the exact exception type and that the message names the
argument; returned values are checked against the float64 dense reference (``tests.models.dense_gp``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gpytorch.kernels import RBFKernel

from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.kernels import DenseKernel, GridKernel
from structgp.models import ExactGP
from tests.models.dense_gp import DenseGP, diag
from tests.reference import F64, assert_close


def _model(d: int = 2) -> ExactGP:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, d, dtype=F64, generator=gen)
    y = torch.sin(3 * x).sum(-1) + 0.1 * torch.randn(20, dtype=F64, generator=gen)
    return ExactGP(x, y, DenseKernel(RBFKernel()))


@pytest.mark.parametrize("method", ["predict", "posterior", "sample"])
@pytest.mark.parametrize(
    "x, error, match",
    [
        (lambda: torch.rand(5, 3, dtype=F64), ValueError, r"^x: expected 2 input dimensions \(the training inputs'"),
        (lambda: torch.rand(5, dtype=F64), ValueError, r"^x: expected 2 input dimensions .* got shape \(5, 1\)"),
        (lambda: torch.rand(5, 2), TypeError, r"^x: expected dtype torch.float64 \(the training inputs'\)"),
        (lambda: torch.ones(5, 2, dtype=torch.int64), TypeError, r"^x: expected a floating dtype"),
        (lambda: [[0.1, 0.2]], TypeError, r"^x: expected a torch.Tensor of shape \(\.\.\., n, d\), got list"),
        (lambda: torch.full((2, 2), math.nan, dtype=F64), ValueError, r"^x: expected finite inputs"),
        (lambda: torch.rand(0, 2, dtype=F64), ValueError, r"^x: expected a non-empty"),
    ],
)
def test_bad_test_inputs_name_x(method, x, error, match):
    """The input-dimension mismatch used to surface as gpytorch's internal shape message."""
    model = _model()
    with pytest.raises(error, match=match):
        getattr(model, method)(x())


def test_grid_kernel_inputs_of_the_wrong_dimension_name_x():
    axes = [torch.linspace(0, 1, 5, dtype=F64), torch.linspace(0, 1, 4, dtype=F64)]
    x = torch.cartesian_prod(*axes)
    model = ExactGP(x, torch.sin(x).sum(-1), GridKernel([RBFKernel(), RBFKernel()], axes))
    with pytest.raises(ValueError, match=r"^x: expected 2 columns \(one per grid dimension\), got shape \(3, 3\)"):
        model.predict(torch.rand(3, 3, dtype=F64))


def test_a_singular_grid_prior_with_tiny_noise_predicts_like_the_dense_reference():
    """RBF lengthscale 1 on a 12 x 10 grid (singular in float64) with fixed noise 1e-6: the marginal likelihood,
    the predictive mean and variance are finite and equal the float64 dense reference."""
    axes = [torch.linspace(0, 1, 12, dtype=F64), torch.linspace(0, 1, 10, dtype=F64)]
    x = torch.cartesian_prod(*axes)
    y = torch.sin(3 * x).sum(-1)
    noise = torch.full((120,), 1e-6, dtype=F64)
    kernels = [RBFKernel(), RBFKernel()]
    for k in kernels:
        k.lengthscale = 1.0
    model = ExactGP(x, y, GridKernel(kernels, axes), likelihood=FixedNoiseGaussianLikelihood(noise))
    xt = torch.rand(7, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mll = model.marginal_log_likelihood()
        mean, var = model.predict(xt)

    def rbf(a, b):
        return torch.exp(-0.5 * (a[:, None, :] - b[None, :, :]).square().sum(-1))

    with torch.no_grad():
        dense = DenseGP(rbf(x, x), torch.diag(noise), torch.zeros(120, dtype=F64), y)
        ref_mean, ref_cov = dense.posterior(rbf(xt, x), rbf(xt, xt), torch.zeros(7, dtype=F64))
        assert float(mll) == pytest.approx(float(dense.mll()), rel=1e-6)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    assert_close(mean, ref_mean, 1e-5, 1e-6)
    assert_close(var, diag(ref_cov).clamp_min(0), 1e-4, 1e-7)
