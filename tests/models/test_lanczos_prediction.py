"""ExactGP variances from the Lanczos cache (iterative training solves, many test points) against dense float64."""

from __future__ import annotations

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.kernels import MatrixFreeKernel
from structgp.models import ExactGP
from structgp.models.prediction import LANCZOS_TOL


def models(n, lengthscale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    free = ExactGP(x, y, MatrixFreeKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()))).double()
    free.kernel.base_kernel.base_kernel.lengthscale = lengthscale
    free.likelihood.noise = 1e-2
    dense = ExactGP(x, y, gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())).double()
    dense.load_state_dict(free.state_dict())
    xs = torch.rand(1200, 2, generator=gen, dtype=torch.float64) * 4
    return free, dense, xs


def test_auto_uses_the_checked_cache_for_many_test_points():
    free, dense, xs = models(700, 0.6)
    with sg.settings(method="cg"):
        mean, var = free.predict(xs, chunk=300)
    error = free.training_solve().lanczos_error
    assert error is not None and error <= LANCZOS_TOL
    ref_mean, ref_var = dense.predict(xs)
    prior = free.kernel.prior_diagonal(xs)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    assert float(((var - ref_var).abs() / prior).max()) <= 10 * LANCZOS_TOL


def test_solve_method_and_few_test_points_do_not_build_the_cache():
    free, _, xs = models(300, 0.6)
    with sg.settings(method="cg"):
        free.predict(xs, chunk=100, variance_method="solve")
        free.predict(xs[:50])
    assert free.training_solve().lanczos is None


def test_a_cache_that_fails_its_check_falls_back_to_solves():
    free, dense, xs = models(900, 0.15, seed=1)  # short lengthscale: the rank-256 preconditioner leaves much out
    with sg.settings(method="cg", precond_rank=8):
        _, var = free.predict(xs[:600], chunk=150)
    assert free.training_solve().lanczos_error > LANCZOS_TOL
    _, ref_var = dense.predict(xs[:600])
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_variance_method_is_validated():
    free, _, xs = models(50, 0.6)
    with pytest.raises(ValueError, match="variance_method"):
        free.predict(xs[:5], variance_method="love")
