"""Kernel formulas (the fused evaluation of stationary gpytorch kernels) against gpytorch's own evaluation."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from structgp.covariance.kernel_formula import evaluate_formula, kernel_formula


def kernel(which: str, dtype=torch.float64):
    if which == "rbf":
        k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=3))
        k.base_kernel.lengthscale = torch.tensor([[0.3, 0.7, 2.0]])
        k.outputscale = 1.7
    elif which == "rbf_plain":
        k = gpytorch.kernels.RBFKernel()
        k.lengthscale = 0.5
    else:
        nu = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}[which]
        k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=nu))
        k.base_kernel.lengthscale = 0.4
        k.outputscale = 0.6
    return k.to(dtype)


def formula_of(k, params=None):
    named = list(k.named_parameters())
    return kernel_formula(k, [n for n, _ in named], params or [p for _, p in named])


@pytest.mark.parametrize("which", ["rbf", "rbf_plain", "matern12", "matern32", "matern52"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_gpytorch(which, dtype):
    k = kernel(which, dtype)
    gen = torch.Generator().manual_seed(0)
    x1 = (3 * torch.rand(40, 3, generator=gen)).to(dtype).requires_grad_()
    x2 = torch.cat([x1.detach()[:5], (3 * torch.rand(30, 3, generator=gen)).to(dtype)]).requires_grad_()
    # the reference in float64 (gpytorch's float32 product formula is 1e-3 off at coincident Matern points)
    k64 = kernel(which)
    x1_64, x2_64 = x1.detach().double().requires_grad_(), x2.detach().double().requires_grad_()
    ref = k64(x1_64, x2_64).to_dense()
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * w).sum(), [x1_64, x2_64, *k64.parameters()])
    ref, w = ref.detach().to(dtype), w.to(dtype)
    ref_grads = [g.to(dtype) for g in ref_grads]
    got = evaluate_formula(formula_of(k), x1, x2)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got, ref, **tol)
    grads = torch.autograd.grad((got * w).sum(), [x1, x2, *k.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **(tol if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-3}))
    with torch.no_grad():  # the in-place path gives the same values
        torch.testing.assert_close(evaluate_formula(formula_of(k), x1, x2), got.detach())


def test_gradcheck_with_coincident_points():
    k = kernel("matern52")
    x = torch.rand(6, 3, dtype=torch.float64)
    x = torch.cat([x, x[:2]]).requires_grad_()  # equal points: the distance's gradient at 0
    params = [p.detach().clone().requires_grad_() for p in k.parameters()]

    def f(x, *params):
        return evaluate_formula(formula_of(k, list(params)), x, x)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_kernels_without_a_formula():
    periodic = gpytorch.kernels.PeriodicKernel()
    assert formula_of(periodic) is None
    batched = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))
    assert formula_of(batched) is None
    assert formula_of(gpytorch.kernels.MaternKernel(nu=1.5, active_dims=[0])) is None
