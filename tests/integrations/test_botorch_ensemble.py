"""Pyro NUTS over a structgp gp's hyperparameters -> a BoTorch ensemble model (float64, small)."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("botorch")

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from botorch.acquisition import (  # noqa: E402
    LogExpectedImprovement,
    qKnowledgeGradient,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
)
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.posteriors.fully_bayesian import GaussianMixturePosterior  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.kernels import MaternKernel, ScaleKernel  # noqa: E402
from gpytorch.priors import GammaPrior  # noqa: E402

from structgp.integrations.botorch import (  # noqa: E402
    BoTorchModel,
    EnsembleModel,
    batch_hyperparameters,
    hyperparameter_sites,
    nuts_ensemble,
    nuts_model,
)
from tests.integrations.botorch.value_prior import ValuePrior  # noqa: E402
from tests.integrations.botorch_pairs import data, pair  # noqa: E402
from tests.reference import F64, assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Non-strict enforcement of botorch tensor conventions")

OUTPUTSCALE = "kernel.base_kernel.outputscale"
LENGTHSCALE = "kernel.base_kernel.base_kernel.lengthscale"
NOISE = "likelihood.noise_covar.noise"
CONSTANT = "mean.constant"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # not the data's seed: test points must not repeat training points


def _model():
    x, y = data()
    return pair(x, y)[0], x, y


def test_sites():
    model, _, _ = _model()
    sites = {s.name: s for s in hyperparameter_sites(model.gp)}
    assert set(sites) == {OUTPUTSCALE, LENGTHSCALE, NOISE, CONSTANT}
    assert sites[OUTPUTSCALE].lower == 0.0 and sites[CONSTANT].lower is None
    assert sites[NOISE].lower == pytest.approx(1e-4)  # the noise's GreaterThan(1e-4): z = log(v - 1e-4)
    assert sites[LENGTHSCALE].shape == (1, 2)
    assert {s.name for s in hyperparameter_sites(model.gp, exclude=[CONSTANT])} == {OUTPUTSCALE, LENGTHSCALE, NOISE}
    prior = ValuePrior(GammaPrior(torch.tensor(3.0, dtype=F64), torch.tensor(6.0, dtype=F64)), 0.0, (1, 2))
    draws = prior.sample((4000,))
    assert draws.shape == (4000, 1, 2) and abs(float(draws.exp().mean()) - 0.5) < 0.02  # Gamma(3, 6): mean 1/2


def test_nuts_model_log_density_against_dense_reference():
    """log p(z) + log p(y | z) of the Pyro model equals a dense float64 computation: a prior given for z, a
    prior the model registers on a value (carried to z with its Jacobian), default priors elsewhere."""
    model, x, y = _model()
    gp = model.gp
    ls_prior = GammaPrior(torch.tensor(3.0, dtype=F64), torch.tensor(6.0, dtype=F64))
    gp.kernel.base_kernel.base_kernel.register_prior("lengthscale_prior", ls_prior, lambda m: m.lengthscale)
    prior_outputscale = dist.Normal(torch.tensor(0.0, dtype=F64), 2.0)
    fn, sites = nuts_model(gp, priors={OUTPUTSCALE: prior_outputscale})
    params = dict(gp.named_parameters())
    z = {s.name: (s.from_raw(params[s.raw_name]) + 0.1).detach() for s in sites}
    trace = pyro.poutine.trace(pyro.poutine.condition(fn, data=z)).get_trace()
    # reference: the hyperparameters z stands for, a dense kernel matrix and torch's MultivariateNormal
    outputscale, lengthscale = z[OUTPUTSCALE].exp(), z[LENGTHSCALE].exp()
    noise, constant = 1e-4 + z[NOISE].exp(), z[CONSTANT]
    k = MaternKernel(nu=2.5, ard_num_dims=2).double()
    k.lengthscale = lengthscale
    cov = outputscale * k(x).to_dense().detach() + noise * torch.eye(x.shape[0], dtype=F64)
    expected = torch.distributions.MultivariateNormal(constant.expand(x.shape[0]), cov).log_prob(y[:, 0])
    expected = expected + prior_outputscale.log_prob(z[OUTPUTSCALE])
    expected = expected + (ls_prior.log_prob(lengthscale) + z[LENGTHSCALE]).sum()  # v = e^z: + log dv/dz
    for name in (NOISE, CONSTANT):  # default priors: Normal(z_now, 1)
        now = next(s for s in sites if s.name == name)
        expected = expected + dist.Normal(now.from_raw(params[now.raw_name]).detach(), 1.0).log_prob(z[name]).sum()
    assert_close(trace.log_prob_sum(), expected, 1e-10, 1e-10)


def _ensemble_of(model, s=3):
    """An ensemble of ``s`` known hyperparameter settings, and each setting as a plain model."""
    params = dict(model.gp.named_parameters())
    scale = torch.linspace(0.7, 1.4, s, dtype=F64)
    values = {
        "kernel.base_kernel.raw_outputscale": params["kernel.base_kernel.raw_outputscale"] + scale.log(),
        "kernel.base_kernel.base_kernel.raw_lengthscale": params["kernel.base_kernel.base_kernel.raw_lengthscale"]
        * scale[:, None, None],
        "mean.raw_constant": params["mean.raw_constant"] + scale - 1,
    }
    ensemble = EnsembleModel(batch_hyperparameters(model.gp, values))
    members = []
    for j in range(s):
        gp = copy.deepcopy(model.gp)
        with torch.no_grad():
            for name, value in values.items():
                gp.get_parameter(name).copy_(value[j])
        members.append(BoTorchModel(gp))
    return ensemble, members


def test_ensemble_is_the_mixture_of_its_members():
    model, x, y = _model()
    ensemble, members = _ensemble_of(model)
    assert ensemble._is_ensemble and ensemble.num_samples == 3 and ensemble.batch_shape == torch.Size([3])
    X = torch.rand(4, 2, 2, dtype=F64)
    post = ensemble.posterior(X)
    assert isinstance(post, GaussianMixturePosterior) and post.mean.shape == (4, 3, 2, 1)
    for j, member in enumerate(members):
        one = member.posterior(X)
        assert_close(post.mean[:, j], one.mean, 1e-10, 1e-10)
        assert_close(post.distribution.covariance_matrix[:, j], one.distribution.covariance_matrix, 1e-10, 1e-10)
    Xa = torch.rand(5, 1, 2, dtype=F64)
    logei = LogExpectedImprovement(ensemble, y.max())(Xa)
    each = torch.stack([LogExpectedImprovement(m, y.max())(Xa) for m in members], -1)
    assert_close(logei, torch.logsumexp(each, -1) - math.log(3), 1e-10, 1e-10)
    # conditioning each member on the same data
    Xn, Yn = torch.rand(2, 2, dtype=F64), torch.randn(2, 1, dtype=F64)
    cond = ensemble.condition_on_observations(Xn, Yn)
    assert not cond._is_ensemble  # a fantasy model's sample dim is a batch dim (see EnsembleModel)
    cpost = cond.posterior(X)
    for j, member in enumerate(members):
        assert_close(cpost.mean[:, j], member.condition_on_observations(Xn, Yn).posterior(X).mean, 1e-9, 1e-9)


def test_nuts_ensemble_drives_acquisition_functions():
    model, x, y = _model()
    state = torch.random.get_rng_state()
    ensemble = nuts_ensemble(model, num_samples=4, warmup_steps=8, max_tree_depth=3, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's randomness is its own
    assert isinstance(ensemble, EnsembleModel) and ensemble.batch_shape == torch.Size([4])
    z = ensemble.mcmc_samples[LENGTHSCALE]
    assert z.shape == (4, 1, 2) and bool(torch.isfinite(z).all())
    assert_close(ensemble.gp.kernel.base_kernel.base_kernel.lengthscale, z.exp(), 1e-12, 1e-12)
    assert not torch.equal(ensemble.mcmc_samples[NOISE][0], ensemble.mcmc_samples[NOISE][-1])  # the chain moves
    again = nuts_ensemble(model, num_samples=4, warmup_steps=8, max_tree_depth=3, seed=3)
    assert torch.equal(again.mcmc_samples[LENGTHSCALE], z)  # reproducible from the seed
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    sampler = SobolQMCNormalSampler(torch.Size([8]), seed=0)
    acqfs = [
        (qLogExpectedImprovement(ensemble, y.max(), sampler=sampler), 2, 0),
        (qLogNoisyExpectedImprovement(ensemble, x, sampler=sampler, cache_root=False), 2, 0),
        (LogExpectedImprovement(ensemble, y.max()), 1, 0),
        (qKnowledgeGradient(ensemble, num_fantasies=2, sampler=SobolQMCNormalSampler(torch.Size([2]), seed=0)), 1, 2),
    ]
    for acqf, q, extra in acqfs:
        X = torch.rand(3, q + extra, 2, dtype=F64, requires_grad=True)
        value = acqf(X)
        assert value.shape == (3,) and bool(torch.isfinite(value).all()), type(acqf).__name__
        value.sum().backward()
        assert X.grad.abs().sum() > 0, type(acqf).__name__
        cand, _ = optimize_acqf(acqf, bounds, q=q, num_restarts=2, raw_samples=8, options={"maxiter": 3})
        assert cand.shape == (q, 2)


def test_bad_arguments():
    model, _, _ = _model()
    with pytest.raises(ValueError, match="priors: unknown site"):
        nuts_model(model.gp, priors={"kernel.nothing": dist.Normal(0.0, 1.0)})
    with pytest.raises(ValueError, match="values: 'nope' is not a parameter"):
        batch_hyperparameters(model.gp, {"nope": torch.zeros(2)})
    with pytest.raises(ValueError, match="expected one number of samples"):
        batch_hyperparameters(
            model.gp,
            {"mean.raw_constant": torch.zeros(2, dtype=F64), "kernel.base_kernel.raw_outputscale": torch.zeros(3)},
        )
    with pytest.raises(ValueError, match="num_samples: expected a positive int"):
        nuts_ensemble(model, num_samples=0)
    bounded = BoTorchModel.from_data(*data(), ScaleKernel(MaternKernel(lengthscale_constraint=_interval())))
    site = next(s for s in hyperparameter_sites(bounded.gp) if s.name == LENGTHSCALE)  # bounded sites are
    assert (site.lower, site.upper) == pytest.approx((0.01, 2.0))  # supported: tests/integrations/botorch/


def _interval():
    from gpytorch.constraints import Interval

    return Interval(0.01, 2.0)
