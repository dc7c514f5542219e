"""MatrixFreeKernel and DenseKernel's switch to it, through ExactGP, against the dense kernel."""

from __future__ import annotations

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, KernelOperator, ScaledIdentity
from structgp.kernels import DenseKernel, MatrixFreeKernel
from structgp.models import ExactGP


def data(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def scaled_rbf():
    return gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())


def pair(x, y):
    free = ExactGP(x, y, MatrixFreeKernel(scaled_rbf())).double()
    dense = ExactGP(x, y, scaled_rbf()).double()
    dense.load_state_dict(free.state_dict())
    return free, dense


def test_exact_gp_loss_gradients_and_predictions_equal_the_dense_kernel():
    x, y = data()
    free, dense = pair(x, y)
    assert isinstance(free.train_covariance().base, KernelOperator)
    loss_free, loss_dense = free.loss(), dense.loss()
    torch.testing.assert_close(loss_free, loss_dense)
    grads = torch.autograd.grad(loss_free, list(free.parameters()))
    for a, b in zip(grads, torch.autograd.grad(loss_dense, list(dense.parameters()))):
        torch.testing.assert_close(a, b)
    xs = torch.rand(40, 2, dtype=torch.float64) * 4
    for a, b in zip(free.predict(xs), dense.predict(xs)):
        torch.testing.assert_close(a, b)


def test_iterative_fit_and_prediction_through_products_only():
    x, y = data(400, seed=1)
    free, dense = pair(x, y)
    with sg.settings(method="cg"):
        mean, var = free.predict(x[:30])
        plan = sg.plan(free.train_covariance())
    assert plan.method == "cg"
    ref_mean, ref_var = dense.predict(x[:30])
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_dense_kernel_goes_matrix_free_when_the_matrix_exceeds_the_budget():
    x, _ = data(500)
    kernel = DenseKernel(scaled_rbf()).double()
    assert isinstance(kernel(x), Dense)
    with sg.settings(memory_budget=500 * 500 * 8 - 1):
        op = kernel(x)
        assert isinstance(op, KernelOperator)
        assert "matrix-free" in repr(op) and "exceeds memory_budget" in repr(op)
        noisy = op + ScaledIdentity(torch.tensor(0.1, dtype=torch.float64), 500)
        with sg.settings(method="cg"):  # the plan says why the kernel went matrix-free
            assert "matrix-free" in sg.plan(noisy).reason
        unit = torch.eye(500, dtype=torch.float64)[:, :3]
        torch.testing.assert_close(op @ unit, kernel.base_kernel(x, x).to_dense()[:, :3])


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend"):
        MatrixFreeKernel(scaled_rbf(), backend="cuda")
