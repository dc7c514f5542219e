import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.priors import GammaPrior

from structgp.kernels import GridKernel, InducingPointKernel
from structgp.models import ExactGP, minimise
from tests.reference import F64


def _grid_draw(lengthscales=(0.15, 0.3), outputscale=1.0, noise=0.01, n=(24, 20), seed=0):
    """One draw of a product-RBF GP on a grid plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(0, 1, m, dtype=F64) for m in n]
    chols = []
    for ell, g in zip(lengthscales, axes):
        k = torch.exp(-0.5 * (g[:, None] - g[None, :]).square() / ell**2)
        chols.append(torch.linalg.cholesky(k + 1e-10 * torch.eye(len(g), dtype=F64)))
    f = outputscale**0.5 * (torch.kron(chols[0], chols[1]) @ torch.randn(n[0] * n[1], dtype=F64, generator=gen))
    y = f + noise**0.5 * torch.randn(f.shape, dtype=F64, generator=gen)
    return axes, torch.cartesian_prod(*axes), y


def test_lbfgs_recovers_known_hyperparameters_on_a_grid():
    axes, x, y = _grid_draw()
    ks = [ScaleKernel(RBFKernel()), RBFKernel()]
    model = ExactGP(x, y, GridKernel(ks, axes))
    history = model.fit(progress=False)
    assert history[-1] < history[0] and len(history) <= 51
    fitted = {
        "lengthscale_0": ks[0].base_kernel.lengthscale.item(),
        "lengthscale_1": ks[1].lengthscale.item(),
        "noise": model.likelihood.noise.item(),
        "outputscale": ks[0].outputscale.item(),
    }
    assert abs(fitted["lengthscale_0"] - 0.15) < 0.15 * 0.2, fitted
    assert abs(fitted["lengthscale_1"] - 0.3) < 0.3 * 0.2, fitted
    assert abs(fitted["noise"] - 0.01) < 0.01 * 0.2, fitted
    assert 0.3 < fitted["outputscale"] < 3, fitted


def test_adam_history_and_fixed_iterations():
    axes, x, y = _grid_draw(n=(10, 8))
    model = ExactGP(x, y, GridKernel([RBFKernel(), RBFKernel()], axes))
    history = model.fit("adam", iterations=15, lr=0.05, progress=False)
    assert len(history) == 16
    assert history[-1] < history[0]
    assert abs(history[-1] - float(model.loss())) < 1e-12


def test_inducing_points_move_and_loss_decreases():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(200, 1, dtype=F64, generator=gen)
    y = torch.sin(8 * x[:, 0]) + 0.1 * torch.randn(200, dtype=F64, generator=gen)
    z0 = torch.linspace(0.3, 0.7, 6, dtype=F64)[:, None]
    model = ExactGP(x, y, InducingPointKernel(ScaleKernel(RBFKernel()), z0, method="fitc"))
    history = model.fit(iterations=8, progress=False)
    assert history[-1] < history[0] - 0.3
    assert not torch.allclose(model.kernel.inducing_points, z0)


def test_priors_enter_the_loss():
    axes, x, y = _grid_draw(n=(6, 5))
    k = RBFKernel(lengthscale_prior=GammaPrior(3.0, 6.0))
    model = ExactGP(x, y, GridKernel([k, RBFKernel()], axes))  # casts the kernel and its prior to float64
    prior = torch.distributions.Gamma(torch.tensor(3.0, dtype=F64), torch.tensor(6.0, dtype=F64))
    expected = prior.log_prob(k.lengthscale).sum()
    torch.testing.assert_close(model.log_prior(), expected)
    loss = -(model.marginal_log_likelihood() + expected) / 30
    torch.testing.assert_close(model.loss(), loss)


def test_minimise_arguments():
    p = torch.nn.Parameter(torch.tensor([3.0, -2.0], dtype=F64))
    history = minimise(lambda: (p - 1).square().sum(), [p], progress=False)
    assert history[0] == 13.0 and history[-1] < 1e-12
    assert torch.allclose(p, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        minimise(lambda: p.sum(), [p], optimizer="sgd")
    with pytest.raises(ValueError, match="nothing to fit"):
        minimise(lambda: p.sum(), [torch.nn.Parameter(torch.ones(1), requires_grad=False)])
    with pytest.raises(FloatingPointError, match="not finite"):
        minimise(lambda: p.sum() * float("nan"), [p], progress=False)
    assert minimise(lambda: p.sum(), [p], iterations=0) == pytest.approx([2.0])
