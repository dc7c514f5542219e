import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from structgp.covariance import Kronecker, SparseLifted
from structgp.kernels import GridKernel
from tests.reference import F64, assert_close


def _axes():
    middle = torch.tensor([-1.0, -0.2, 0.5], dtype=F64)  # irregular spacing is fine on a grid
    return [torch.linspace(0, 1, 4, dtype=F64), middle, torch.linspace(2, 3, 2, dtype=F64)]


def _kernels(batch=()):
    b = torch.Size(batch)
    ks = [ScaleKernel(RBFKernel(batch_shape=b), batch_shape=b), MaternKernel(nu=1.5, batch_shape=b)]
    ks.append(RBFKernel(batch_shape=b))
    ks = [k.double() for k in ks]
    ks[0].outputscale, ks[0].base_kernel.lengthscale = 1.7, 0.3
    ks[1].lengthscale, ks[2].lengthscale = 0.8, 0.6
    return ks


def product(ks, x1, x2):
    """The dense product kernel, one gpytorch evaluation per dimension."""
    out = 1.0
    for j, k in enumerate(ks):
        out = out * k(x1[:, j : j + 1], x2[:, j : j + 1]).to_dense()
    return out


def test_full_grid_is_kronecker():
    ks, axes = _kernels(), _axes()
    x = torch.cartesian_prod(*axes)
    kernel = GridKernel(ks, axes)
    op = kernel(kernel.check_inputs(x))
    assert isinstance(op, Kronecker) and op.sizes == (4, 3, 2)
    assert_close(op.to_dense(), product(ks, x, x), 1e-12, 1e-12)


def test_subset_of_cells_is_a_lifted_selection():
    ks, axes = _kernels(), _axes()
    full = torch.cartesian_prod(*axes)
    x = full[torch.tensor([5, 0, 23, 7, 7, 11])]  # any order, repeated cells, missing cells
    kernel = GridKernel(ks, axes)
    op = kernel(kernel.check_inputs(x))
    assert isinstance(op, SparseLifted)
    assert_close(op.to_dense(), product(ks, x, x), 1e-12, 1e-12)
    assert_close(kernel(full[:-1]).to_dense(), product(ks, full[:-1], full[:-1]), 1e-12, 1e-12)


def test_cross_and_prior_at_points_off_the_grid():
    ks, axes = _kernels(), _axes()
    x = torch.cartesian_prod(*axes)[::3]
    kernel = GridKernel(ks, axes)
    kernel.check_inputs(x)  # located: the cross uses the gathered path
    xt = torch.rand(5, 3, dtype=F64) * torch.tensor([1.0, 1.5, 1.0], dtype=F64) + torch.tensor([0, -1, 2], dtype=F64)
    assert_close(kernel.cross(xt, x), product(ks, xt, x), 1e-12, 1e-12)
    assert_close(kernel.cross(xt, xt), product(ks, xt, xt), 1e-12, 1e-12)
    assert_close(kernel.prior_diagonal(xt), product(ks, xt, xt).diagonal(), 1e-12, 1e-12)
    assert_close(kernel.prior(xt).to_dense(), product(ks, xt, xt), 1e-12, 1e-12)


def test_batched_hyperparameters():
    ks, axes = _kernels(batch=(2,)), _axes()
    x = torch.cartesian_prod(*axes)
    op = GridKernel(ks, axes)(x)
    assert op.shape == (2, 24, 24)
    assert_close(op.to_dense(), product(ks, x, x), 1e-12, 1e-12)


def test_points_off_the_grid_are_refused():
    kernel = GridKernel(_kernels(), _axes())
    x = torch.cartesian_prod(*_axes())
    x[3, 1] += 0.01
    with pytest.raises(ValueError, match=r"train_x: point 3 is not on the grid: coordinate 1"):
        kernel.check_inputs(x, "train_x")
    with pytest.raises(ValueError, match="expected 3 columns"):
        kernel.check_inputs(torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="unbatched inputs"):
        kernel.check_inputs(torch.zeros(2, 4, 3, dtype=F64))
    kernel.check_test_inputs(torch.rand(4, 3, dtype=F64))  # anywhere


def test_float32_grid_tolerates_rounding():
    axes = [torch.linspace(0, 7, 8), torch.linspace(100, 101, 5)]
    x = torch.cartesian_prod(*axes) + 1e-6
    kernel = GridKernel([RBFKernel(), RBFKernel()], axes)
    assert isinstance(kernel(kernel.check_inputs(x)), Kronecker)


def test_bad_construction():
    with pytest.raises(TypeError, match="kernels: expected a list"):
        GridKernel(RBFKernel(), [torch.linspace(0, 1, 3)])
    with pytest.raises(ValueError, match="one kernel per grid dimension"):
        GridKernel([RBFKernel()], [torch.linspace(0, 1, 3)] * 2)
    with pytest.raises(ValueError, match="grid\\[0\\]: expected finite, strictly increasing"):
        GridKernel([RBFKernel()], [torch.tensor([0.0, 0.0, 1.0])])
    with pytest.raises(TypeError, match="grid\\[0\\]: expected a 1-D floating tensor"):
        GridKernel([RBFKernel()], [torch.arange(3)])
