"""The KeOps backend of KernelOperator against the torch backend and the dense kernel (skipped without pykeops)."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from structgp.covariance import KernelOperator
from structgp.covariance.keops_backend import keops_available
from structgp.covariance.kernel_formula import kernel_formula
from structgp.kernels import MatrixFreeKernel

needs_keops = pytest.mark.skipif(not keops_available(), reason="pykeops is not installed")


def kernels():
    rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
    rbf.base_kernel.lengthscale = torch.tensor([[0.3, 0.7]])
    rbf.outputscale = 1.7
    matern = gpytorch.kernels.MaternKernel(nu=2.5)
    matern.lengthscale = 0.4
    return [rbf.double(), matern.double()]


def test_formula_translation_without_keops():
    rbf, matern = kernels()
    named = list(rbf.named_parameters())
    family, nu, lengthscale, scale = kernel_formula(rbf, [n for n, _ in named], [p for _, p in named])
    assert family == "rbf" and nu is None
    torch.testing.assert_close(lengthscale, rbf.base_kernel.lengthscale)
    torch.testing.assert_close(scale, rbf.outputscale)
    periodic = gpytorch.kernels.PeriodicKernel()
    named = list(periodic.named_parameters())
    assert kernel_formula(periodic, [n for n, _ in named], [p for _, p in named]) is None


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        KernelOperator(kernels()[1], torch.rand(5, 2, dtype=torch.float64), backend="cuda")


@needs_keops
@pytest.mark.parametrize("which", [0, 1])
def test_keops_products_and_gradients_match_the_torch_backend(which):
    kernel = kernels()[which]
    torch.manual_seed(0)
    x = torch.rand(200, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(200, 3, dtype=torch.float64)
    dense = kernel(x, x).to_dense()
    ref = dense @ v
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *kernel.parameters()])
    out = KernelOperator(kernel, x, backend="keops") @ v
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), [x, *kernel.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


@needs_keops
def test_keops_refuses_kernels_it_cannot_express():
    with pytest.raises(ValueError, match="backend: KeOps cannot express"):
        periodic = gpytorch.kernels.PeriodicKernel().double()
        KernelOperator(periodic, torch.rand(5, 1, dtype=torch.float64), backend="keops")


def test_auto_backend_is_torch_on_the_cpu():
    op = MatrixFreeKernel(kernels()[1])(torch.rand(10, 2, dtype=torch.float64))
    assert op.backend == "torch"
