import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from structgp.covariance import Dense
from structgp.kernels import DenseKernel, GridKernel, as_kernel
from tests.reference import F64, assert_close


def _kernel(batch=()):
    k = ScaleKernel(MaternKernel(nu=2.5, batch_shape=torch.Size(batch)), batch_shape=torch.Size(batch)).double()
    k.base_kernel.lengthscale = 0.7
    k.outputscale = 1.9
    return k


def test_dense_kernel_matches_gpytorch():
    k = _kernel()
    x, xt = torch.rand(9, 2, dtype=F64), torch.rand(4, 2, dtype=F64)
    dk = DenseKernel(k)
    op = dk(x)
    assert isinstance(op, Dense)
    ref = k(x, x).to_dense()
    assert_close(op.to_dense(), ref, 1e-12, 1e-12)
    assert_close(dk.cross(xt, x), k(xt, x).to_dense(), 1e-12, 1e-12)
    assert_close(dk.prior_diagonal(xt), k(xt, xt).to_dense().diagonal(), 1e-12, 1e-12)
    assert_close(dk.prior(xt).to_dense(), k(xt, xt).to_dense(), 1e-12, 1e-12)
    assert dk.cross_factor(x) is None


def test_dense_kernel_batch_and_float32():
    k = _kernel(batch=(3,))
    x = torch.rand(5, 2, dtype=F64)
    op = DenseKernel(k)(x)
    assert op.shape == (3, 5, 5)
    assert_close(op.to_dense(), k(x).to_dense(), 1e-12, 1e-12)
    k32 = RBFKernel()
    op32 = DenseKernel(k32)(torch.rand(6, 1))
    assert op32.dtype == torch.float32


def test_gradients_reach_the_hyperparameters():
    k = _kernel()
    x = torch.rand(6, 2, dtype=F64)
    op = DenseKernel(k)(x) + Dense(0.1 * torch.eye(6, dtype=F64))
    logdet = op.logdet()
    (g,) = torch.autograd.grad(logdet, k.raw_outputscale)
    a = k(x).to_dense() + 0.1 * torch.eye(6, dtype=F64)
    (ref,) = torch.autograd.grad(torch.logdet(a), k.raw_outputscale)
    assert_close(g, ref, 1e-10, 1e-10)


def test_as_kernel():
    k = RBFKernel()
    wrapped = as_kernel(k)
    assert isinstance(wrapped, DenseKernel) and wrapped.base_kernel is k
    grid = GridKernel([RBFKernel()], [torch.linspace(0, 1, 3)])
    assert as_kernel(grid) is grid
    with pytest.raises(TypeError, match="kernel: expected a structgp kernel or a gpytorch"):
        as_kernel(torch.eye(3))
    with pytest.raises(TypeError, match="base_kernel: expected a gpytorch.kernels.Kernel"):
        DenseKernel(gpytorch.means.ConstantMean())


def test_bad_inputs():
    dk = DenseKernel(RBFKernel())
    with pytest.raises(ValueError, match="x: expected a non-empty"):
        dk.check_inputs(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="finite"):
        dk.check_inputs(torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(TypeError, match="floating"):
        dk.check_inputs(torch.arange(3))
    assert dk.check_inputs(torch.rand(4)).shape == (4, 1)
