import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel

from structgp.covariance import Kronecker
from structgp.kernels import MultitaskKernel
from tests.reference import F64, assert_close


def _setup(rank=2):
    kernel = MultitaskKernel(RBFKernel(), num_tasks=3, rank=rank).double()
    with torch.no_grad():
        kernel.task_kernel.covar_factor.copy_(torch.randn(3, rank, dtype=F64))
        kernel.task_kernel.raw_var.copy_(torch.randn(3, dtype=F64))
    kernel.data_kernel.lengthscale = 0.5
    return kernel


def test_matches_gpytorch_multitask_kernel():
    kernel = _setup()
    ref_kernel = gpytorch.kernels.MultitaskKernel(RBFKernel(), num_tasks=3, rank=2).double()
    with torch.no_grad():
        ref_kernel.task_covar_module.covar_factor.copy_(kernel.task_kernel.covar_factor)
        ref_kernel.task_covar_module.raw_var.copy_(kernel.task_kernel.raw_var)
        ref_kernel.data_covar_module.raw_lengthscale.copy_(kernel.data_kernel.raw_lengthscale)
    x = torch.rand(5, 2, dtype=F64)
    op = kernel(x)
    assert isinstance(op, Kronecker) and op.sizes == (5, 3)
    assert_close(op.to_dense(), ref_kernel(x).to_dense(), 1e-12, 1e-12)


def test_cross_and_prior():
    kernel = _setup()
    x, xt = torch.rand(4, 2, dtype=F64), torch.rand(3, 2, dtype=F64)
    b = kernel.task_covariance()
    k = kernel.data_kernel
    v = kernel.task_kernel.covar_factor
    assert_close(b, v @ v.mT + torch.diag(kernel.task_kernel.var), 1e-12, 1e-12)
    assert_close(kernel.cross(xt, x), torch.kron(k(xt, x).to_dense(), b), 1e-12, 1e-12)
    assert_close(kernel.prior_diagonal(xt), torch.kron(k(xt).to_dense(), b).diagonal(), 1e-12, 1e-12)
    assert_close(kernel.prior(xt).to_dense(), torch.kron(k(xt).to_dense(), b), 1e-12, 1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_tasks: expected a positive int"):
        MultitaskKernel(RBFKernel(), num_tasks=0)
