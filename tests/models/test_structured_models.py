"""Each structured kernel's model against its dense equivalent (float64 torch.linalg reference)."""

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

import structgp as sg
from structgp.covariance import BlockDiag, Kronecker, LowRank, SparseLifted
from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.kernels import (
    AggregationKernel,
    GridKernel,
    GroupKernel,
    InducingPointKernel,
    InterpolationKernel,
    MultitaskKernel,
)
from structgp.models import ExactGP
from tests.kernels.test_grid import product
from tests.models.dense_gp import DenseGP, diag
from tests.reference import F64, assert_close

NOISE = 0.04


def _noise(model):
    model.likelihood.noise = torch.tensor(NOISE, dtype=F64)


def _check(model, reference: DenseGP, cross, prior, xt, tol=1e-9, obs_noise=None):
    """MLL, predictive mean / variance, joint posterior covariance and observation noise vs the reference."""
    assert_close(model.marginal_log_likelihood(), reference.mll(), tol, tol)
    mean_ref, cov_ref = reference.posterior(cross, prior, model.prior_mean(xt))
    mean, var = model.predict(xt)
    assert_close(mean.flatten(-2) if model.num_tasks > 1 else mean, mean_ref, tol, tol)
    assert_close(var.flatten(-2) if model.num_tasks > 1 else var, diag(cov_ref), tol, tol)
    post = model.posterior(xt)
    assert_close(post.mean, mean_ref, tol, tol)
    assert_close(post.variance, diag(cov_ref), tol, tol)
    assert_close(post.covariance_matrix, cov_ref, tol, tol)
    if obs_noise is not None:
        noisy = model.predict(xt, observation_noise=True)[1]
        assert_close(noisy.flatten(-2) if model.num_tasks > 1 else noisy, diag(cov_ref) + obs_noise, tol, tol)


def _grid_kernels():
    ks = [ScaleKernel(RBFKernel()).double(), MaternKernel(nu=2.5).double()]
    ks[0].outputscale = torch.tensor(1.5, dtype=F64)
    ks[0].base_kernel.lengthscale = torch.tensor(0.3, dtype=F64)
    ks[1].lengthscale = torch.tensor(0.5, dtype=F64)
    return ks


def _grid_data(n1=12, n2=10):
    axes = [torch.linspace(0, 1, n1, dtype=F64), torch.linspace(-1, 1, n2, dtype=F64)]
    x = torch.cartesian_prod(*axes)
    gen = torch.Generator().manual_seed(0)
    y = torch.sin(5 * x[:, 0]) * torch.cos(2 * x[:, 1]) + 0.2 * torch.randn(x.shape[0], dtype=F64, generator=gen)
    return axes, x, y


def test_grid_model_is_exact_on_a_full_grid():
    axes, x, y = _grid_data()
    ks = _grid_kernels()
    model = ExactGP(x, y, GridKernel(ks, axes))
    _noise(model)
    a = model.train_covariance()
    assert isinstance(a.base, Kronecker) and sg.plan(a).method == "eigen"
    xt = torch.rand(7, 2, dtype=F64) * torch.tensor([1.0, 2.0], dtype=F64) - torch.tensor([0, 1], dtype=F64)
    ref = DenseGP(product(ks, x, x), NOISE * torch.eye(120, dtype=F64), model.mean(x), y)
    _check(model, ref, product(ks, xt, x), product(ks, xt, xt), xt, obs_noise=NOISE)


def test_grid_model_with_heteroskedastic_noise_matches_the_dense_model():
    axes, x, y = _grid_data()
    ks = _grid_kernels()
    noise = 0.01 + 0.2 * torch.rand(120, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = ExactGP(x, y, GridKernel(ks, axes), likelihood=FixedNoiseGaussianLikelihood(noise))
    a = model.train_covariance()
    assert isinstance(a.base, Kronecker)
    xt = torch.rand(6, 2, dtype=F64)
    ref = DenseGP(product(ks, x, x), torch.diag(noise), model.mean(x), y)
    _check(model, ref, product(ks, xt, x), product(ks, xt, xt), xt)
    # the same model through the iterative engine (Kronecker + Diagonal has no exact structured method)
    mean_ref, cov_ref = ref.posterior(product(ks, xt, x), product(ks, xt, xt), model.mean(xt))
    with sg.settings(method="cg", cg_tol=1e-11, max_iter=500):
        mean, var = model.predict(xt, cache=False)
    assert_close(mean, mean_ref, 1e-7, 1e-7)
    assert_close(var, diag(cov_ref), 1e-7, 1e-7)


def test_grid_model_with_missing_cells():
    axes, x, y = _grid_data(6, 5)
    keep = torch.randperm(30, generator=torch.Generator().manual_seed(2))[:21]
    ks = _grid_kernels()
    model = ExactGP(x[keep], y[keep], GridKernel(ks, axes))
    _noise(model)
    assert isinstance(model.train_covariance().base, SparseLifted)
    xt = torch.rand(5, 2, dtype=F64)
    xk = x[keep]
    ref = DenseGP(product(ks, xk, xk), NOISE * torch.eye(21, dtype=F64), model.mean(xk), y[keep])
    _check(model, ref, product(ks, xt, xk), product(ks, xt, xt), xt, obs_noise=NOISE)


@pytest.mark.parametrize("kind", ["cubic", "linear"])
def test_interpolation_model_matches_dense_w_k_wt(kind):
    axes = [torch.linspace(-0.25, 1.25, 11, dtype=F64), torch.linspace(-0.3, 1.3, 9, dtype=F64)]
    ks = _grid_kernels()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(40, 2, dtype=F64, generator=gen)
    y = torch.sin(3 * x).sum(-1) + 0.1 * torch.randn(40, dtype=F64, generator=gen)
    kernel = InterpolationKernel(ks, axes, kind=kind)
    model = ExactGP(x, y, kernel)
    _noise(model)
    assert isinstance(model.train_covariance().base, SparseLifted)
    xt = torch.rand(6, 2, dtype=F64)
    grid = torch.cartesian_prod(*axes)
    latent = product(ks, grid, grid)
    w, wt = kernel.interpolation(x).to_dense(), kernel.interpolation(xt).to_dense()
    ref = DenseGP(w @ latent @ w.mT, NOISE * torch.eye(40, dtype=F64), model.mean(x), y)
    _check(model, ref, wt @ latent @ w.mT, wt @ latent @ wt.mT, xt, obs_noise=NOISE)


def test_aggregation_model_matches_dense_a_k_at():
    axes = [torch.linspace(0, 1, 5, dtype=F64), torch.linspace(0, 1, 4, dtype=F64)]
    ks = _grid_kernels()
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(16, 20, dtype=F64, generator=gen)
    a = a * (a > 0.7)
    at = torch.rand(5, 20, dtype=F64, generator=gen)
    y = torch.randn(16, dtype=F64, generator=gen)
    model = ExactGP(a.to_sparse_csr(), y, AggregationKernel(ks, axes))
    _noise(model)
    grid = torch.cartesian_prod(*axes)
    latent = product(ks, grid, grid)
    ref = DenseGP(a @ latent @ a.mT, NOISE * torch.eye(16, dtype=F64), model.mean(a), y)
    _check(model, ref, at @ latent @ a.mT, at @ latent @ at.mT, at.to_sparse(), obs_noise=NOISE)
    chunked = model.predict(at.to_sparse_csr(), chunk=2)
    assert_close(chunked[1], model.predict(at)[1], 1e-12, 1e-12)


@pytest.mark.parametrize("method", ["sor", "dtc", "fitc"])
def test_inducing_point_model_matches_its_dense_equivalent(method):
    k = ScaleKernel(RBFKernel()).double()
    k.outputscale, k.base_kernel.lengthscale = torch.tensor(1.2, dtype=F64), torch.tensor(0.3, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    x, z = torch.rand(50, 2, dtype=F64, generator=gen), torch.rand(7, 2, dtype=F64, generator=gen)
    y = torch.sin(4 * x[:, 0]) + 0.1 * torch.randn(50, dtype=F64, generator=gen)
    model = ExactGP(x, y, InducingPointKernel(k, z, method=method))
    _noise(model)
    a = model.train_covariance()
    assert isinstance(a.base, LowRank) and sg.plan(a).method == "woodbury"
    assert model.training_solve().middle.shape == (7, 7)  # predictions use the m x m form

    def q(x1, x2):
        return k(x1, z).to_dense() @ torch.linalg.solve(k(z).to_dense(), k(z, x2).to_dense())

    xt = torch.rand(6, 2, dtype=F64)
    train = q(x, x) + (torch.diag(diag(k(x).to_dense() - q(x, x))) if method == "fitc" else 0)
    prior = q(xt, xt) if method == "sor" else k(xt).to_dense()
    ref = DenseGP(train, NOISE * torch.eye(50, dtype=F64), model.mean(x), y)
    _check(model, ref, q(xt, x), prior, xt, tol=1e-8, obs_noise=NOISE)


def test_group_model_matches_block_dense():
    k = MaternKernel(nu=1.5).double()
    k.lengthscale = torch.tensor(0.4, dtype=F64)
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 9, dtype=F64)
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.rand(20, 1, dtype=F64, generator=gen), labels[:, None]], -1)
    y = torch.randn(20, dtype=F64, generator=gen)
    model = ExactGP(x, y, GroupKernel(k))
    _noise(model)
    a = model.train_covariance()
    assert isinstance(a, BlockDiag) and sg.plan(a).method == "blockwise"
    xt = torch.cat([torch.rand(5, 1, dtype=F64), torch.tensor([[2.0], [0.0], [1.0], [3.0], [0.0]], dtype=F64)], -1)

    def masked(x1, x2):
        return k(x1[:, :1], x2[:, :1]).to_dense() * (x1[:, 1:] == x2[:, 1:].mT)

    ref = DenseGP(masked(x, x), NOISE * torch.eye(20, dtype=F64), model.mean(x), y)
    _check(model, ref, masked(xt, x), masked(xt, xt), xt, obs_noise=NOISE)


def test_multitask_model_with_per_task_noise_is_exact():
    kernel = MultitaskKernel(RBFKernel(), num_tasks=3, rank=1).double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        kernel.task_kernel.covar_factor.copy_(torch.randn(3, 1, dtype=F64, generator=gen))
    x = torch.rand(15, 2, dtype=F64, generator=gen)
    y = torch.randn(15, 3, dtype=F64, generator=gen)
    model = ExactGP(x, y, kernel)
    lik = model.likelihood
    assert isinstance(lik, gpytorch.likelihoods.MultitaskGaussianLikelihood)
    lik.task_noises = torch.tensor([0.01, 0.1, 0.3], dtype=F64)
    lik.noise = torch.tensor(0.02, dtype=F64)
    task_noise = torch.tensor([0.03, 0.12, 0.32], dtype=F64)
    a = model.train_covariance()
    assert isinstance(a.base, Kronecker) and isinstance(a.noise, Kronecker)
    with sg.settings(method="eigen"):
        assert "symmetrised" in sg.plan(a).reason
    b = kernel.task_covariance()
    kx = kernel.data_kernel
    xt = torch.rand(4, 2, dtype=F64)
    noise = torch.kron(torch.eye(15, dtype=F64), torch.diag(task_noise))
    ref = DenseGP(torch.kron(kx(x).to_dense(), b), noise, model.prior_mean(x), y.flatten())
    cross, prior = torch.kron(kx(xt, x).to_dense(), b), torch.kron(kx(xt).to_dense(), b)
    _check(model, ref, cross, prior, xt, obs_noise=task_noise.repeat(4))
    mean, var = model.predict(xt)
    assert mean.shape == var.shape == (4, 3)
    with sg.settings(method="eigen"):  # the structured path (auto picks dense Cholesky at this size)
        assert_close(model.marginal_log_likelihood(), ref.mll(), 1e-9, 1e-9)
        mean_ref, cov_ref = ref.posterior(cross, prior, model.prior_mean(xt))
        mean, var = model.predict(xt, cache=False)
        assert_close(mean.flatten(), mean_ref, 1e-9, 1e-9)
        assert_close(var.flatten(), diag(cov_ref), 1e-9, 1e-9)


def test_inputs_outside_a_grid_are_refused_by_the_model():
    axes, x, y = _grid_data(4, 3)
    off = x.clone()
    off[2, 0] = 0.5
    with pytest.raises(ValueError, match="train_x: point 2 is not on the grid"):
        ExactGP(off, y, GridKernel(_grid_kernels(), axes))
    ski_axes = [torch.linspace(-0.5, 1.5, 6, dtype=F64), torch.linspace(-2, 2, 6, dtype=F64)]
    ski = ExactGP(x, y, InterpolationKernel(_grid_kernels(), ski_axes))
    with pytest.raises(ValueError, match="x: point 0 is outside the interpolation grid"):
        ski.predict(torch.tensor([[1.4, 0.0]], dtype=F64))


def test_batch_of_grid_gps():
    axes, x, y = _grid_data(5, 4)
    b = torch.Size([2])
    ks = [ScaleKernel(RBFKernel(batch_shape=b), batch_shape=b).double(), RBFKernel(batch_shape=b).double()]
    ks[0].base_kernel.lengthscale = torch.tensor([[[0.2]], [[0.6]]], dtype=F64)
    ys = torch.stack([y, 2 * y])
    model = ExactGP(x, ys, GridKernel(ks, axes))
    model.likelihood.noise = torch.tensor([0.05, 0.2], dtype=F64)
    xt = torch.rand(3, 2, dtype=F64)
    noise = torch.tensor([0.05, 0.2], dtype=F64)[:, None, None] * torch.eye(20, dtype=F64)
    ref = DenseGP(product(ks, x, x), noise, model.mean(x), ys)
    _check(model, ref, product(ks, xt, x), product(ks, xt, xt), xt)
    assert model.predict(xt)[0].shape == (2, 3)
