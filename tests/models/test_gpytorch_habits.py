"""What a gpytorch user does with a structgp ExactGP: the gpytorch training loop (items 8), gpytorch's names,
targets, training-data and fantasy API, optimiser names, SGPR/VFE, SKI grid choice and quiet progress (item 9)."""

from __future__ import annotations

import copy
import sys

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.utils.grid import choose_grid_size as gpytorch_choose_grid_size

from structgp.distributions import (
    ExactMarginalLogLikelihood,
    FixedNoiseGaussianLikelihood,
    GaussianLikelihood,
    MultivariateNormal,
)
from structgp.kernels import (
    InducingPointKernel,
    InterpolationKernel,
    MultitaskKernel,
    choose_grid_size,
    interpolation_grid,
)
from structgp.models import ExactGP
from structgp.models.fit import show_progress
from tests.reference import F64, assert_close


def _data(n: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, dtype=F64, generator=gen)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, dtype=F64, generator=gen)
    return x, y


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _gpytorch_loop(model, mll, x, y, steps: int = 40, lr: float = 0.1) -> None:
    """The loop of gpytorch's tutorials."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
    model.eval()


# -- item 8: model(x) is the prior while training, the posterior in eval mode -------------------------------
def test_model_call_is_the_prior_in_training_mode_and_the_posterior_in_eval_mode():
    x, y = _data()
    model = ExactGP(x, y, ScaleKernel(RBFKernel()))
    assert not model.training  # ready to predict
    assert_close(model(x).mean, model.posterior(x).mean, 0, 0)
    model.train()
    prior = model(x)
    assert isinstance(prior, MultivariateNormal)
    assert_close(prior.covariance_matrix, model.covar_module(x).to_dense(), 1e-12, 1e-12)
    assert_close(prior.mean, model.mean(x), 0, 0)
    model.fit(iterations=2)
    assert not model.training  # fit() leaves it ready to predict
    gmodel = ExactGP(x, y, ScaleKernel(RBFKernel()), likelihood=gpytorch.likelihoods.GaussianLikelihood())
    assert isinstance(gmodel(x), gpytorch.distributions.MultivariateNormal)  # the likelihood's library
    lower, upper = gmodel.likelihood(gmodel(x)).confidence_region()
    assert bool((lower < upper).all())


def test_gpytorch_loop_optimises_the_same_objective_as_fit():
    """The tutorial loop with structgp's ExactMarginalLogLikelihood, and with gpytorch's (given a gpytorch
    Gaussian likelihood), takes the same Adam steps as fit("adam"): the same hyperparameters."""
    x, y = _data()
    for likelihood in (GaussianLikelihood(), gpytorch.likelihoods.GaussianLikelihood()):
        looped = ExactGP(x, y, ScaleKernel(RBFKernel()), likelihood=likelihood)
        fitted = copy.deepcopy(looped)
        if isinstance(likelihood, GaussianLikelihood):
            mll = ExactMarginalLogLikelihood(looped.likelihood, looped)
        else:
            mll = gpytorch.mlls.ExactMarginalLogLikelihood(looped.likelihood, looped)
        _gpytorch_loop(looped, mll, x, y)
        fitted.fit("adam", iterations=40, lr=0.1)
        ours, ref = _params(looped), _params(fitted)
        assert ours.keys() == ref.keys()
        for name in ours:
            assert_close(ours[name], ref[name], 1e-10, 1e-10)
        start = ExactGP(x, y, ScaleKernel(RBFKernel()).double())
        assert float(looped.loss().detach()) < float(start.loss().detach()) - 0.3


# -- item 9 -------------------------------------------------------------------------------------------------
def test_targets_with_one_column():
    x, y = _data()
    a, b = ExactGP(x, y, ScaleKernel(RBFKernel())), ExactGP(x, y.unsqueeze(-1), ScaleKernel(RBFKernel()))
    assert b.train_y.shape == (30,)
    assert_close(a.marginal_log_likelihood(), b.marginal_log_likelihood(), 0, 0)
    with pytest.raises(ValueError, match=r"train_y: expected shape \(\.\.\., 30\)"):
        ExactGP(x, torch.zeros(30, 2, dtype=F64), ScaleKernel(RBFKernel()))


def test_confidence_region_is_two_standard_deviations():
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    mean = torch.tensor([1.0, -1.0], dtype=F64)
    lower, upper = MultivariateNormal(mean, cov).confidence_region()
    ref = gpytorch.distributions.MultivariateNormal(mean, cov).confidence_region()
    assert_close(lower, ref[0], 1e-15, 1e-15)
    assert_close(upper, ref[1], 1e-15, 1e-15)
    assert_close(upper - mean, 2 * cov.diagonal().sqrt(), 1e-15, 1e-15)


def test_set_train_data():
    x, y = _data()
    model = ExactGP(x, y, ScaleKernel(RBFKernel()))
    xt = torch.rand(5, 1, dtype=F64)
    before = model.predict(xt)[0]
    model.set_train_data(x, -y)  # same shapes: the cached solve is dropped
    assert_close(model.predict(xt)[0], 2 * model.mean.constant.detach() - before, 1e-10, 1e-10)
    with pytest.raises(ValueError, match="strict=True keeps the shape"):
        model.set_train_data(x[:20], y[:20])
    model.set_train_data(x[:20], y[:20], strict=False)
    fresh = ExactGP(x[:20], y[:20], ScaleKernel(RBFKernel()))
    fresh.load_state_dict(model.state_dict())  # hyperparameters only: the data are not in the state dict
    assert_close(model.predict(xt)[0], fresh.predict(xt)[0], 1e-12, 1e-12)
    with pytest.raises(ValueError, match="pass the new targets too"):
        model.set_train_data(x, strict=False)


def test_get_fantasy_model_matches_gpytorch():
    x, y = _data(n=12)
    model = ExactGP(x, y, ScaleKernel(RBFKernel()), likelihood=gpytorch.likelihoods.GaussianLikelihood())
    model.likelihood.noise = 0.05
    ref = _GpytorchGP(x, y, copy.deepcopy(model.likelihood), copy.deepcopy(model.covar_module))
    ref.mean_module.load_state_dict(model.mean.state_dict())
    ref.eval()
    xt = torch.rand(4, 1, dtype=F64)
    ref(xt)  # gpytorch fantasises only after a prediction
    xn, yn = torch.rand(3, 1, dtype=F64), torch.randn(5, 3, dtype=F64)  # 5 fantasies at the same 3 points
    ours, theirs = model.get_fantasy_model(xn, yn), ref.get_fantasy_model(xn, yn)
    assert ours.train_y.shape == theirs.train_targets.shape == (5, 15)
    with gpytorch.settings.fast_pred_var(False):
        f = theirs(xt)
    mean, var = ours.predict(xt)
    assert_close(mean, f.mean, 1e-9, 1e-9)
    assert_close(var.expand(5, 4), f.variance, 1e-9, 1e-9)  # (the variances do not depend on the targets)
    assert model.train_y.shape == (12,)  # the original is unchanged


def test_get_fantasy_model_with_fixed_noise():
    x, y = _data(n=12)
    noise = torch.full((12,), 0.02, dtype=F64)
    model = ExactGP(x, y, ScaleKernel(RBFKernel()), likelihood=FixedNoiseGaussianLikelihood(noise))
    xn, yn = torch.rand(2, 1, dtype=F64), torch.randn(2, dtype=F64)
    with pytest.raises(ValueError, match="needs the noise variances"):
        model.get_fantasy_model(xn, yn)
    new = model.get_fantasy_model(xn, yn, noise=torch.tensor([0.1, 0.2], dtype=F64))
    full = ExactGP(
        torch.cat([x, xn]), torch.cat([y, yn]), ScaleKernel(RBFKernel()),
        likelihood=FixedNoiseGaussianLikelihood(torch.cat([noise, torch.tensor([0.1, 0.2], dtype=F64)])),
    )
    full.load_state_dict(model.state_dict())
    xt = torch.rand(4, 1, dtype=F64)
    assert_close(new.predict(xt)[1], full.predict(xt)[1], 1e-12, 1e-12)


class _GpytorchGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean().double()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_optimizer_names_and_classes():
    x, y = _data()
    runs = {}
    for key in ("adam", "Adam", "ADAM", torch.optim.Adam, "lbfgs", "LBFGS", torch.optim.LBFGS):
        model = ExactGP(x, y, ScaleKernel(RBFKernel()))
        runs[key] = model.fit(key, iterations=3)
    assert runs["adam"] == runs["Adam"] == runs["ADAM"] == runs[torch.optim.Adam]
    assert runs["lbfgs"] == runs["LBFGS"] == runs[torch.optim.LBFGS]
    sgd = ExactGP(x, y, ScaleKernel(RBFKernel())).fit(torch.optim.SGD, iterations=4, lr=0.01)
    assert len(sgd) == 5 and sgd[-1] < sgd[0]
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        ExactGP(x, y, ScaleKernel(RBFKernel())).fit("sgd")


def test_hyperparameters_where_gpytorch_has_them():
    x, y = _data()
    kernel = ScaleKernel(RBFKernel())
    model = ExactGP(x, y, kernel)
    assert model.covar_module is kernel and model.mean_module is model.mean
    assert model.covar_module.base_kernel.lengthscale is not None
    model.covar_module.outputscale = 2.0
    assert_close(model.kernel.outputscale, torch.tensor(2.0, dtype=F64), 1e-12, 1e-12)  # read through the wrapper
    model.kernel.outputscale = 3.0  # written through the wrapper, to the gpytorch kernel
    assert_close(kernel.outputscale, torch.tensor(3.0, dtype=F64), 1e-12, 1e-12)
    assert "outputscale" not in model.kernel.__dict__
    with pytest.raises(AttributeError):
        _ = model.kernel.no_such_hyperparameter
    model.covar_module = RBFKernel().double()  # gpytorch's name assigns the kernel
    assert isinstance(model.covar_module, RBFKernel) and "covar_module" not in model._modules
    multitask = MultitaskKernel(RBFKernel(), num_tasks=2)
    assert multitask.data_covar_module is multitask.data_kernel
    assert multitask.task_covar_module is multitask.task_kernel


# -- SGPR / VFE -----------------------------------------------------------------------------------------------
def _vfe_model():
    x, y = _data(n=40, seed=3)
    z = torch.linspace(0.1, 0.9, 6, dtype=F64).unsqueeze(-1)
    model = ExactGP(x, y, InducingPointKernel(ScaleKernel(RBFKernel()), z, method="vfe"))
    model.likelihood.noise = 0.05
    model.covar_module.base_kernel.outputscale = 1.3
    model.covar_module.base_kernel.base_kernel.lengthscale = 0.2
    with torch.no_grad():
        model.mean.constant.fill_(0.1)
    return model, x, y, z


def test_vfe_bound_against_dense_float64():
    """log N(y | m, Q + s I) - tr(K - Q) / (2 s), every matrix dense in float64."""
    model, x, y, z = _vfe_model()
    k = model.covar_module.base_kernel
    with torch.no_grad():
        kxx, kxz, kzz = k(x, x).to_dense(), k(x, z).to_dense(), k(z, z).to_dense()
        q = kxz @ torch.linalg.solve(kzz, kxz.mT)
        s = model.likelihood.noise
        dense = torch.distributions.MultivariateNormal(
            torch.full((40,), 0.1, dtype=F64), q + s * torch.eye(40, dtype=F64)
        )
        expected = dense.log_prob(y) - (kxx - q).diagonal().sum() / (2 * s)
        assert_close(model.marginal_log_likelihood(), expected, 1e-10, 1e-10)
        dtc = ExactGP(x, y, InducingPointKernel(copy.deepcopy(k), z, method="dtc"))
        dtc.load_state_dict(model.state_dict())
        assert_close(dtc.marginal_log_likelihood(), dense.log_prob(y), 1e-10, 1e-10)
        assert_close(dtc.predict(x[:5])[1], model.predict(x[:5])[1], 1e-12, 1e-12)  # VFE predicts as DTC


def test_vfe_matches_gpytorch_sgpr_and_the_gpytorch_loop():
    model, x, y, z = _vfe_model()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.05
    sgpr = _GpytorchGP(
        x, y, lik, gpytorch.kernels.InducingPointKernel(copy.deepcopy(model.covar_module.base_kernel), z, lik)
    )
    with torch.no_grad():
        sgpr.mean_module.constant.fill_(0.1)
    sgpr.train()
    with gpytorch.settings.max_cholesky_size(10_000):
        expected = gpytorch.mlls.ExactMarginalLogLikelihood(lik, sgpr)(sgpr(x), y)
    assert_close(model.marginal_log_likelihood() / 40, expected.detach(), 1e-8, 1e-8)
    model.train()  # the gpytorch loop's objective includes the trace term (an added loss term)
    value = ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    assert_close(value, model.marginal_log_likelihood() / 40, 1e-12, 1e-12)
    value.backward()
    assert model.covar_module.inducing_points.grad.abs().sum() > 0


# -- SKI grid choice --------------------------------------------------------------------------------------
def test_interpolation_grid_from_the_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 2, dtype=F64, generator=gen) * torch.tensor([2.0, 5.0], dtype=F64) - 1
    for shape in ((400, 2), (30, 1), (1000, 3)):
        probe = torch.rand(*shape, dtype=F64)
        assert choose_grid_size(probe) == gpytorch_choose_grid_size(probe)
        assert choose_grid_size(probe, 2.0, kronecker_structure=False) == gpytorch_choose_grid_size(probe, 2.0, False)
    axes = interpolation_grid(x)
    assert [a.shape[0] for a in axes] == [20, 20]
    for j, axis in enumerate(axes):  # cubic: the data span exactly [g_1, g_{n-2}]
        assert_close(axis[1], x[:, j].min(), 1e-12, 1e-12)
        assert_close(axis[-2], x[:, j].max(), 1e-12, 1e-12)
        assert_close(axis.diff(), axis.diff().mean().expand(19), 1e-9, 1e-12)
    linear = interpolation_grid(x, size=[8, 5], kind="linear")
    assert_close(torch.stack([linear[0][0], linear[0][-1]]), torch.stack([x[:, 0].min(), x[:, 0].max()]), 1e-12, 0)
    wide = interpolation_grid(x, bounds=torch.tensor([[-2.0, -2.0], [2.0, 5.0]], dtype=F64))
    assert_close(wide[1][1], torch.tensor(-2.0, dtype=F64), 1e-12, 1e-12)
    y = torch.sin(3 * x[:, 0]) * torch.cos(x[:, 1])
    model = ExactGP(x, y, InterpolationKernel([RBFKernel(), RBFKernel()], axes))  # no hand-made padding
    exact = ExactGP(x, y, RBFKernel(active_dims=[0]) * RBFKernel(active_dims=[1]))
    xt = torch.rand(6, 2, dtype=F64) * torch.tensor([2.0, 5.0], dtype=F64) - 1
    assert_close(model.predict(xt)[0], exact.predict(xt)[0], 1e-2, 1e-2)
    with pytest.raises(ValueError, match="size: expected an int >= 4"):
        interpolation_grid(x, size=3)


# -- quiet progress -----------------------------------------------------------------------------------------
def test_progress_bar_only_on_a_terminal_or_when_asked(capsys, monkeypatch):
    x, y = _data()
    ExactGP(x, y, ScaleKernel(RBFKernel())).fit(iterations=3)
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
    ExactGP(x, y, ScaleKernel(RBFKernel())).fit(iterations=3, progress=True)
    assert "fit DenseKernel" in capsys.readouterr().err

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(None) and not show_progress(False)
