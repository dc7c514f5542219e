"""Seed 002's model at a small size (an identity sparse lift of an m^3 RBF grid + learned noise and constant
mean) through ``ExactGP`` (``AggregationKernel`` with the identity as its weights: ``SparseLifted(I, Kronecker)``)
and through a Pyro model, against dense float64 torch (value and gradients)."""

from __future__ import annotations

import math

import gpytorch
import pyro
import pytest
import torch
import torch.distributions as tdist

import structgp as sg
from structgp.covariance import Kronecker, ScaledIdentity, SparseLifted
from structgp.distributions import MultivariateNormal
from structgp.kernels import AggregationKernel
from structgp.models import ExactGP

M = 8  # 512 cells
F64 = torch.float64


def seed002_data(dtype: torch.dtype):
    axis = torch.linspace(-5, 5, M, dtype=dtype)
    x = torch.cartesian_prod(axis, axis, axis)
    gen = torch.Generator().manual_seed(0)
    f = torch.sin(x[:, 0]) * torch.cos(0.7 * x[:, 1]) + 0.3 * x[:, 2].div(5).square()
    y = f + 0.3 * torch.randn(M**3, generator=gen, dtype=F64).to(dtype)
    n = M**3
    idx = torch.arange(n)
    identity = torch.sparse_coo_tensor(torch.stack([idx, idx]), torch.ones(n, dtype=dtype), (n, n)).to_sparse_csr()
    return axis, y, identity


def dense_loglik(axis, y, lengthscale, noise, mean) -> torch.Tensor:
    """log N(y | mean, K (x) K (x) K + noise I) in float64 by torch.distributions."""
    a = axis.double()
    k = torch.exp(-0.5 * (a[:, None] - a[None, :]).square() / lengthscale.double().square())
    cov = torch.kron(torch.kron(k, k), k) + noise.double() * torch.eye(a.numel() ** 3, dtype=F64)
    return tdist.MultivariateNormal(mean.double().expand(y.numel()), cov).log_prob(y.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_gp_matches_dense(dtype):
    axis, y, identity = seed002_data(dtype)
    rbf = gpytorch.kernels.RBFKernel()
    kernel = AggregationKernel([rbf, rbf, rbf], [axis, axis, axis])  # one lengthscale for the three axes
    model = ExactGP(identity, y, kernel)
    cov = model.train_covariance()
    assert isinstance(cov.base, SparseLifted) and cov.base.lift.kind == "identity"
    plan = sg.plan(cov)
    assert plan.engine.name == "lift_reduction" and "identity lift" in plan.reason, str(plan)

    value = model.marginal_log_likelihood()
    params = [p for _, p in sorted(model.named_parameters())]
    assert len(params) == 3  # lengthscale, noise, mean constant
    grads = torch.autograd.grad(value, params)
    # the reference differentiates through the same parameter transforms, with the dense float64 maths
    ref = dense_loglik(axis, y, rbf.lengthscale.reshape(()), model.likelihood.noise.reshape(()),
                       model.mean.constant.reshape(()))
    ref_grads = torch.autograd.grad(ref, params)
    rtol = 1e-9 if dtype == F64 else 2e-5
    torch.testing.assert_close(value.double(), ref.detach(), rtol=rtol, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-7 if dtype == F64 else 2e-3,
                                   atol=1e-9 * float(r.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pyro_model_matches_dense(dtype):
    """``pyro.sample("y", MultivariateNormal(mean, SparseLifted(I, Kronecker) + s I), obs=y)``: the trace's log
    density and its gradients in the lengthscale, noise and mean equal torch.distributions' dense ones."""
    axis, y, identity = seed002_data(dtype)
    n = y.numel()
    pyro.clear_param_store()

    def model(y):
        ls = pyro.param("ls", torch.tensor(0.7, dtype=dtype), constraint=tdist.constraints.positive)
        noise = pyro.param("noise", torch.tensor(0.2, dtype=dtype), constraint=tdist.constraints.positive)
        mean = pyro.param("mean", torch.tensor(0.1, dtype=dtype))
        k = torch.exp(-0.5 * (axis[:, None] - axis[None, :]).square() / ls.square())
        cov = SparseLifted(identity, Kronecker(k, k, k)) + ScaledIdentity(noise, n)
        return pyro.sample("y", MultivariateNormal(mean.expand(n), cov), obs=y)

    trace = pyro.poutine.trace(model).get_trace(y)
    value = trace.log_prob_sum()
    report = sg.last_report()
    assert "identity lift" in report.reason, str(report)
    names = ("ls", "noise", "mean")
    unconstrained = [pyro.param(name).unconstrained() for name in names]
    grads = torch.autograd.grad(value, unconstrained)

    raw = [u.detach().double().clone().requires_grad_() for u in unconstrained]
    ref = dense_loglik(axis, y, raw[0].exp(), raw[1].exp(), raw[2])
    ref_grads = torch.autograd.grad(ref, raw)
    rtol = 1e-9 if dtype == F64 else 2e-5
    torch.testing.assert_close(value.double(), ref.detach(), rtol=rtol, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-7 if dtype == F64 else 2e-3, atol=1e-9 * r.abs().max())
    assert math.isfinite(float(value))
    pyro.clear_param_store()
