import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

from structgp.covariance import SparseLifted
from structgp.kernels import InterpolationKernel
from structgp.kernels.interpolation_weights import axis_weights, grid_weights, keys_cubic
from tests.reference import F64, assert_close


def _setup(kind="cubic"):
    axes = [torch.linspace(-0.3, 1.3, 12, dtype=F64), torch.linspace(-1.4, 1.4, 9, dtype=F64)]
    ks = [ScaleKernel(RBFKernel()).double(), RBFKernel().double()]
    ks[0].outputscale, ks[0].base_kernel.lengthscale, ks[1].lengthscale = 1.4, 0.5, 0.9
    return InterpolationKernel(ks, axes, kind=kind), ks, axes


def _latent(ks, axes):
    """K_1 (x) K_2 by torch.kron of gpytorch evaluations."""
    return torch.kron(ks[0](axes[0][:, None]).to_dense(), ks[1](axes[1][:, None]).to_dense())


def test_keys_kernel_values():
    t = torch.tensor([0.0, 1.0, 2.0, 2.5, -1.0, 0.5, 1.5], dtype=F64)
    # u(0) = 1, u(+-1) = u(2) = 0, zero beyond 2; u(1/2) = 9/16, u(3/2) = -1/16 (a = -1/2)
    assert_close(keys_cubic(t), torch.tensor([1, 0, 0, 0, 0, 9 / 16, -1 / 16], dtype=F64), 0, 1e-15)


@pytest.mark.parametrize("kind,degree", [("cubic", 2), ("linear", 1)])
def test_weights_reproduce_polynomials(kind, degree):
    axis = torch.linspace(-1, 2, 13, dtype=F64)
    lo, hi = (axis[1], axis[-2]) if kind == "cubic" else (axis[0], axis[-1])
    x = torch.cat([lo + (hi - lo) * torch.rand(50, dtype=F64), torch.stack([lo, hi]), axis[1:-1]])
    idx, w = axis_weights(axis, x, kind, "x", 0)
    assert idx.shape == (x.shape[0], 4 if kind == "cubic" else 2)
    for p in range(degree + 1):  # exact for polynomials up to the kind's degree
        assert_close((w * axis[idx] ** p).sum(-1), x**p, 1e-12, 1e-12)


def test_tensor_product_weights_in_two_dims():
    kernel, _, axes = _setup()
    x = torch.rand(20, 2, dtype=F64)
    idx, w = grid_weights(axes, x, "cubic", "x")
    assert idx.shape == w.shape == (20, 16)
    grid = torch.cartesian_prod(*axes)
    for f in (lambda z: z[..., 0] * z[..., 1], lambda z: z[..., 0] ** 2 + z[..., 1] ** 2 - z[..., 1]):
        assert_close((w * f(grid[idx])).sum(-1), f(x), 1e-12, 1e-12)
    csr = kernel.interpolation(x)
    assert csr.layout == torch.sparse_csr and csr._nnz() == 20 * 16


@pytest.mark.parametrize("kind", ["cubic", "linear"])
def test_covariance_is_w_k_wt(kind):
    kernel, ks, axes = _setup(kind)
    x, xt = torch.rand(15, 2, dtype=F64), torch.rand(6, 2, dtype=F64)
    op = kernel(kernel.check_inputs(x))
    assert isinstance(op, SparseLifted)
    w, wt = kernel.interpolation(x).to_dense(), kernel.interpolation(xt).to_dense()
    k = _latent(ks, axes)
    assert_close(op.to_dense(), w @ k @ w.mT, 1e-12, 1e-12)
    assert_close(kernel.cross(xt, x), wt @ k @ w.mT, 1e-12, 1e-12)
    assert_close(kernel.prior_diagonal(xt), (wt @ k @ wt.mT).diagonal(), 1e-12, 1e-12)
    assert_close(kernel.prior(xt).to_dense(), wt @ k @ wt.mT, 1e-12, 1e-12)


def test_ski_approximates_the_exact_kernel_on_a_fine_grid():
    axes = [torch.linspace(-0.2, 1.2, 60, dtype=F64)]
    k = RBFKernel().double()
    k.lengthscale = 0.3
    kernel = InterpolationKernel([k], axes)
    x = torch.rand(30, 1, dtype=F64)
    err = (kernel(x).to_dense() - k(x).to_dense()).abs().max()
    assert err < 1e-4


def test_cross_is_differentiable_in_the_test_inputs():
    kernel, _, _ = _setup()
    x = torch.rand(5, 2, dtype=F64)
    xt = (0.2 + 0.6 * torch.rand(3, 2, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kernel.cross(z, x), (xt,))
    assert torch.autograd.gradcheck(lambda z: kernel.prior_diagonal(z), (xt,))


def test_points_outside_the_grid_are_refused():
    kernel, _, _ = _setup()
    with pytest.raises(ValueError, match=r"train_x: point 1 is outside the interpolation grid: coordinate 0 = 1.2"):
        kernel.check_inputs(torch.tensor([[0.0, 0.0], [1.2, 0.0]], dtype=F64), "train_x")
    with pytest.raises(ValueError, match="outside the interpolation grid: coordinate 1"):
        kernel.check_test_inputs(torch.tensor([[0.0, -1.39]], dtype=F64))
    linear, _, _ = _setup("linear")
    linear.check_test_inputs(torch.tensor([[1.29, -1.39]], dtype=F64))  # linear needs no outer points


def test_bad_construction():
    with pytest.raises(ValueError, match="kind: expected one of"):
        InterpolationKernel([RBFKernel()], [torch.linspace(0, 1, 5)], kind="quintic")
    with pytest.raises(ValueError, match="grid\\[0\\]: expected a regular grid"):
        InterpolationKernel([RBFKernel()], [torch.tensor([0.0, 0.1, 0.5, 0.6, 1.0])])
    with pytest.raises(ValueError, match="at least 4 grid points"):
        InterpolationKernel([RBFKernel()], [torch.linspace(0, 1, 3)])
