"""ExactGP with a dense kernel against gpytorch's ExactGP (same kernel and hyperparameters, float64)."""

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

import structgp as sg
from structgp.distributions import FixedNoiseGaussianLikelihood, MultivariateNormal
from structgp.kernels import DenseKernel
from structgp.models import ExactGP, PosteriorCovariance
from tests.models.dense_gp import DenseGP, diag
from tests.reference import F64, assert_close


class GpytorchGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=y.shape[:-1])
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _kernel(batch=()):
    b = torch.Size(batch)
    return ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=2, batch_shape=b), batch_shape=b).double()


def _set(kernel, mean, likelihood_noise_setter):
    kernel.outputscale = torch.tensor(1.7, dtype=F64)  # tensors: gpytorch's setters round floats to float32
    kernel.base_kernel.lengthscale = torch.tensor([0.4, 0.9], dtype=F64)
    with torch.no_grad():
        mean.constant.fill_(0.3)
    likelihood_noise_setter(torch.tensor(0.05, dtype=F64))


def _data(n=25, batch=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, dtype=F64, generator=gen)
    y = torch.sin(4 * x[:, 0]) * x[:, 1] + 0.1 * torch.randn(*batch, n, dtype=F64, generator=gen)
    return x, y


def _pair(batch=()):
    x, y = _data(batch=batch)
    model = ExactGP(x, y, _kernel(batch))
    _set(model.kernel.base_kernel, model.mean, lambda v: setattr(model.likelihood, "noise", v))
    lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size(batch)).double()
    ref = GpytorchGP(x, y, lik, _kernel(batch)).double()
    _set(ref.covar_module, ref.mean_module, lambda v: setattr(lik, "noise", v))
    return model, ref, x, y


def test_mll_matches_gpytorch():
    model, ref, x, y = _pair()
    ref.train()
    expected = gpytorch.mlls.ExactMarginalLogLikelihood(ref.likelihood, ref)(ref(x), y) * x.shape[0]
    assert isinstance(model.kernel, DenseKernel)
    assert_close(model.marginal_log_likelihood(), expected, 1e-12, 1e-12)
    assert_close(-model.loss() * x.shape[0], expected, 1e-12, 1e-12)


def test_posterior_matches_gpytorch():
    model, ref, x, y = _pair()
    ref.eval()
    xt = torch.rand(8, 2, dtype=F64)
    with gpytorch.settings.fast_pred_var(False), gpytorch.settings.skip_posterior_variances(False):
        f = ref(xt)
        obs = ref.likelihood(f)
    mean, var = model.predict(xt)
    assert_close(mean, f.mean, 1e-10, 1e-10)
    assert_close(var, f.variance, 1e-10, 1e-10)
    post = model.posterior(xt)
    assert isinstance(post, MultivariateNormal) and isinstance(post.covariance, PosteriorCovariance)
    assert_close(post.mean, f.mean, 1e-10, 1e-10)
    assert_close(post.variance, f.variance, 1e-10, 1e-10)
    assert_close(post.covariance_matrix, f.covariance_matrix, 1e-10, 1e-10)
    assert_close(model.predict(xt, observation_noise=True)[1], obs.variance, 1e-10, 1e-10)
    noisy = model.posterior(xt, observation_noise=True)
    assert_close(noisy.covariance_matrix, obs.covariance_matrix, 1e-10, 1e-10)
    value = torch.randn(8, dtype=F64)
    assert_close(noisy.log_prob(value), obs.log_prob(value), 1e-9, 1e-9)
    assert_close(model(xt).mean, f.mean, 1e-10, 1e-10)


def test_prediction_in_chunks_and_mean_only():
    model, ref, x, y = _pair()
    xt = torch.rand(11, 2, dtype=F64)
    mean, var = model.predict(xt)
    chunked = model.predict(xt, chunk=3)
    assert_close(chunked[0], mean, 1e-13, 1e-13)
    assert_close(chunked[1], var, 1e-13, 1e-13)
    only, none = model.predict(xt, variance=False)
    assert none is None
    assert_close(only, mean, 1e-13, 1e-13)


def test_batch_of_gps_matches_each_member():
    model, ref, x, y = _pair(batch=(3,))
    ref.train()
    expected = gpytorch.mlls.ExactMarginalLogLikelihood(ref.likelihood, ref)(ref(x), y) * x.shape[0]
    assert_close(model.marginal_log_likelihood(), expected, 1e-12, 1e-12)
    ref.eval()
    xt = torch.rand(5, 2, dtype=F64)
    with gpytorch.settings.fast_pred_var(False):
        f = ref(xt)
    mean, var = model.predict(xt)
    assert mean.shape == var.shape == (3, 5)
    assert_close(mean, f.mean, 1e-10, 1e-10)
    assert_close(var, f.variance, 1e-10, 1e-10)
    assert_close(model.posterior(xt).covariance_matrix, f.covariance_matrix, 1e-10, 1e-10)


def test_float32_runs_and_agrees_with_float64():
    x, y = _data()
    k32 = ScaleKernel(RBFKernel())
    model32 = ExactGP(x.float(), y.float(), k32)
    model64 = ExactGP(x, y, ScaleKernel(RBFKernel()).double())
    model64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model32.state_dict().items()})
    xt = torch.rand(6, 2, dtype=F64)
    m32, v32 = model32.predict(xt.float())
    m64, v64 = model64.predict(xt)
    assert m32.dtype == torch.float32
    assert_close(m32, m64, 1e-3, 1e-3)
    assert_close(v32, v64, 1e-3, 1e-3)
    assert_close(model32.marginal_log_likelihood(), model64.marginal_log_likelihood(), 1e-4, 1e-3)


def test_training_solve_is_cached_and_invalidated():
    model, _, x, y = _pair()
    xt = torch.rand(4, 2, dtype=F64)
    first = model.training_solve()
    assert model.training_solve() is first  # nothing changed
    mean0, _ = model.predict(xt)
    model.kernel.base_kernel.base_kernel.lengthscale = torch.tensor([0.2, 0.5], dtype=F64)  # writes through .data
    assert model.training_solve() is not first
    fresh = ExactGP(x, y, model.kernel.base_kernel, likelihood=model.likelihood, mean=model.mean)
    assert_close(model.predict(xt)[0], fresh.predict(xt)[0], 1e-12, 1e-12)
    assert not torch.allclose(model.predict(xt)[0], mean0)
    second = model.training_solve()
    with torch.no_grad():
        model.mean.constant.add_(1.0)  # an in-place update, as an optimiser's
    assert model.training_solve() is not second
    third = model.training_solve()
    model.train_y = model.train_y + 1.0  # new training targets
    assert model.training_solve() is not third
    assert model.training_solve(cache=False) is not model.training_solve()


def test_cached_predictions_are_differentiable_in_the_test_inputs():
    model, _, _, _ = _pair()
    xt = torch.rand(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: model.predict(z), (xt,))


def test_uncached_predictions_are_differentiable_in_the_hyperparameters():
    model, _, x, y = _pair()
    xt = torch.rand(3, 2, dtype=F64)
    raw = model.kernel.base_kernel.base_kernel.raw_lengthscale
    mean, var = model.predict(xt, cache=False)
    (grad,) = torch.autograd.grad(mean.sum() + 2 * var.sum(), raw)
    k = model.kernel.base_kernel
    dense = DenseGP(k(x).to_dense(), 0.05 * torch.eye(25, dtype=F64), model.mean(x), y)
    ref_mean, ref_cov = dense.posterior(k(xt, x).to_dense(), k(xt).to_dense(), model.mean(xt))
    (expected,) = torch.autograd.grad(ref_mean.sum() + 2 * diag(ref_cov).sum(), raw)
    assert_close(grad, expected, 1e-8, 1e-8)


def test_samples():
    model, _, _, _ = _pair()
    xt = torch.rand(4, 2, dtype=F64)
    torch.manual_seed(0)
    draws = model.sample(xt, (20000,))
    assert draws.shape == (20000, 4)
    post = model.posterior(xt)
    assert_close(draws.mean(0), post.mean, 0, 0.02)
    assert_close(torch.cov(draws.mT), post.covariance_matrix, 0, 0.02)
    noisy = model.sample(xt, (2, 3), observation_noise=True)
    assert noisy.shape == (2, 3, 4)


def test_fixed_noise_likelihoods_need_the_test_noise():
    x, y = _data()
    noise = 0.01 + 0.1 * torch.rand(25, dtype=F64)
    for likelihood in (FixedNoiseGaussianLikelihood(noise), gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)):
        model = ExactGP(x, y, _kernel(), likelihood=likelihood)
        k = model.kernel.base_kernel
        dense = DenseGP(k(x).to_dense(), torch.diag(noise), model.mean(x), y)
        assert_close(model.marginal_log_likelihood(), dense.mll(), 1e-11, 1e-11)
        xt = torch.rand(3, 2, dtype=F64)
        with pytest.raises(ValueError, match="pass the per-point test noise"):
            model.predict(xt, observation_noise=True)
        test_noise = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
        _, cov = dense.posterior(k(xt, x).to_dense(), k(xt).to_dense(), model.mean(xt))
        var = model.predict(xt, observation_noise=True, noise=test_noise)[1]
        assert_close(var, diag(cov) + test_noise, 1e-10, 1e-10)


def test_bad_inputs_are_refused_clearly():
    x, y = _data()
    k = RBFKernel()
    with pytest.raises(ValueError, match=r"train_y: expected shape \(\.\.\., 25\) to match the 25 training inputs"):
        ExactGP(x, y[:-1], k)
    bad = y.clone()
    bad[4] = float("nan")
    nan_message = r"train_y: expected finite targets, found 1 NaN/Inf value\(s\) \(first at index \(4,\)\)"
    with pytest.raises(ValueError, match=nan_message):
        ExactGP(x, bad, k)
    with pytest.raises(ValueError, match="train_x: expected a non-empty"):
        ExactGP(x[:0], y[:0], k)
    with pytest.raises(TypeError, match="train_y: expected dtype float32 or float64"):
        ExactGP(x, y.long(), k)
    with pytest.raises(TypeError, match="kernel: expected a structgp kernel or a gpytorch"):
        ExactGP(x, y, "rbf")
    with pytest.raises(TypeError, match="likelihood: expected a Gaussian likelihood"):
        ExactGP(x, y, k, likelihood=gpytorch.likelihoods.BernoulliLikelihood())
    with pytest.raises(ValueError, match="training noise: expected 25 per-point variances"):
        ExactGP(x, y, k, likelihood=FixedNoiseGaussianLikelihood(torch.ones(24, dtype=F64)))
    with pytest.raises(ValueError, match=r"train_x: batch dims \(2,\) do not broadcast with those of train_y \(3,\)"):
        ExactGP(x.expand(2, 25, 2), y.expand(3, 25), k)
    model = ExactGP(x, y, k)
    with pytest.raises(TypeError, match="x: expected dtype torch.float64"):
        model.predict(torch.rand(3, 2))
    with pytest.raises(ValueError, match="x: expected a non-empty"):
        model.predict(torch.rand(0, 2, dtype=F64))


def test_plan_is_the_kernel_structure():
    model, _, _, _ = _pair()
    assert sg.plan(model.train_covariance()).method == "cholesky"
