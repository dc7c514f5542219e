"""The Lanczos cache of A^{-1} against dense float64 quadratic forms."""

from __future__ import annotations

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, KernelOperator, ScaledIdentity
from structgp.inference.lanczos_inverse import lanczos_inverse


def problem(n, lengthscale, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 4
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    k.base_kernel.lengthscale = lengthscale
    op = KernelOperator(k, x) + ScaledIdentity(torch.tensor(noise, dtype=torch.float64), n)
    xs = torch.rand(300, 2, generator=gen, dtype=torch.float64) * 4
    return op, k(x, xs).to_dense().detach(), k(xs, xs, diag=True).detach()


@pytest.mark.parametrize(("lengthscale", "noise", "tol"), [(0.5, 1e-2, 1e-5), (1.0, 1e-3, 1e-6)])
def test_variances_from_the_cache_match_dense_solves(lengthscale, noise, tol):
    op, cross, prior = problem(800, lengthscale, noise)
    exact = (cross * torch.linalg.solve(op.to_dense(), cross)).sum(0)
    cache = lanczos_inverse(op)
    approx = cache.quadratic_forms(cross)
    assert float(((approx - exact).abs() / prior).max()) <= tol


def test_more_steps_are_more_accurate_and_an_invariant_space_is_exact():
    op, cross, prior = problem(600, 0.5, 1e-2, seed=1)
    exact = (cross * torch.linalg.solve(op.to_dense(), cross)).sum(0)
    errors = [float((lanczos_inverse(op, steps=s).quadratic_forms(cross) - exact).abs().max()) for s in (2, 8, 30)]
    assert errors[0] > errors[1] > errors[2]
    # I plus a rank-3 term: the Krylov space is invariant after 4 steps, and the cache is exact
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    lam = torch.ones(50, dtype=torch.float64)
    lam[:3] = torch.tensor([5.0, 40.0, 0.2], dtype=torch.float64)
    small = Dense((q * lam) @ q.mT)
    c = torch.randn(50, 4, dtype=torch.float64)
    with sg.settings(preconditioner="none"):  # M = A
        cache = lanczos_inverse(small, steps=10)
    assert cache.residual <= 1e-6 and cache.basis.shape[-1] <= 5
    torch.testing.assert_close(cache.quadratic_forms(c), (c * torch.linalg.solve(small.to_dense(), c)).sum(0))


def test_batched_operators_are_refused():
    with pytest.raises(ValueError, match="op: the Lanczos cache takes an unbatched"):
        lanczos_inverse(Dense(torch.eye(3, dtype=torch.float64).expand(2, 3, 3)))
