"""NUTS sites for hyperparameters with bounded constraints (Interval, LessThan, element-wise bounds): the Pyro
model's log density against a hand-written float64 reference, restricted-prior draws, and a NUTS chain whose
posterior is known (a prior-only site: the prior restricted to the interval)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("botorch")

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from botorch.acquisition import qLogExpectedImprovement  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.constraints import Interval, LessThan  # noqa: E402
from gpytorch.kernels import MaternKernel, ScaleKernel  # noqa: E402
from gpytorch.means import ConstantMean  # noqa: E402
from gpytorch.priors import GammaPrior, NormalPrior  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributions import constraints, transforms  # noqa: E402

from structgp.distributions import GaussianLikelihood  # noqa: E402
from structgp.integrations.botorch import BoTorchModel, hyperparameter_sites, nuts_ensemble, nuts_model  # noqa: E402
from structgp.integrations.botorch.site_prior import TransformedValuePrior  # noqa: E402
from tests.integrations.botorch_pairs import data, pair  # noqa: E402
from tests.reference import F64, assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Non-strict enforcement of botorch tensor conventions")

OUTPUTSCALE = "kernel.base_kernel.outputscale"
LENGTHSCALE = "kernel.base_kernel.base_kernel.lengthscale"
NOISE = "likelihood.noise_covar.noise"
CONSTANT = "mean.constant"
OFFSET = "mean.offset"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(2468)


def _bounded_model(n: int = 8) -> BoTorchModel:
    """Interval outputscale and noise, element-wise Interval lengthscales, a LessThan constant mean."""
    x, y = data(n=n)
    lengthscale = Interval(torch.tensor([0.05, 0.1]), torch.tensor([3.0, 2.0]))
    kernel = ScaleKernel(
        MaternKernel(nu=2.5, ard_num_dims=2, lengthscale_constraint=lengthscale),
        outputscale_constraint=Interval(0.1, 5.0),
    ).double()
    kernel.outputscale, kernel.base_kernel.lengthscale = 1.3, torch.tensor([[0.4, 0.6]], dtype=F64)
    gamma = GammaPrior(torch.tensor(3.0, dtype=F64), torch.tensor(6.0, dtype=F64))
    kernel.base_kernel.register_prior("lengthscale_prior", gamma, lambda m: m.lengthscale)
    noise_prior = GammaPrior(torch.tensor(1.5, dtype=F64), torch.tensor(20.0, dtype=F64))
    likelihood = GaussianLikelihood(noise_constraint=Interval(1e-3, 0.5).double(), noise_prior=noise_prior).double()
    likelihood.noise = torch.tensor(0.03, dtype=F64)
    mean = ConstantMean(constant_constraint=LessThan(2.0)).double()
    mean.constant = torch.tensor(0.2, dtype=F64)
    return BoTorchModel.from_data(x, y, kernel, likelihood=likelihood, mean=mean)


def _bounds(constraint) -> tuple[torch.Tensor, torch.Tensor]:
    return constraint.lower_bound.to(F64), constraint.upper_bound.to(F64)


def test_bounded_sites():
    gp = _bounded_model().gp
    sites = {s.name: s for s in hyperparameter_sites(gp)}
    assert (sites[OUTPUTSCALE].lower, sites[OUTPUTSCALE].upper) == pytest.approx((0.1, 5.0))
    assert (sites[CONSTANT].lower, sites[CONSTANT].upper) == (None, 2.0)
    lower, upper = sites[LENGTHSCALE].lower, sites[LENGTHSCALE].upper  # element-wise: tensors
    assert_close(lower, torch.tensor([0.05, 0.1], dtype=torch.float32), 0, 0)
    assert_close(upper, torch.tensor([3.0, 2.0], dtype=torch.float32), 0, 0)
    params = dict(gp.named_parameters())
    for site in sites.values():  # z -> raw -> z, and z -> value inside the bounds
        raw = params[site.raw_name]
        z = site.from_raw(raw)
        assert_close(site.to_raw(z, raw), raw, 1e-10, 1e-10)
        far = torch.full_like(z, 30.0)
        value = site.transform(raw)(torch.stack([-far, far]))
        assert bool(site.values(raw).check(value).all()), site.name
    with pytest.raises(ValueError, match="finite for some elements only"):
        bad = BoTorchModel.from_data(
            *data(), ScaleKernel(MaternKernel(ard_num_dims=2, lengthscale_constraint=_half_bounded())).double()
        )
        hyperparameter_sites(bad.gp)


def _half_bounded() -> Interval:
    constraint = Interval(torch.tensor([0.1, 0.1]), torch.tensor([1.0, 2.0]))
    constraint.upper_bound[1] = math.inf  # (Interval refuses infinite bounds; edited afterwards)
    return constraint


def test_log_density_against_hand_written_reference():
    """log p(z) + log p(y | z): intervals map z by a + (b - a) sigmoid(z) with log-Jacobian
    log(b - a) + log s + log(1 - s); LessThan by u - exp(z) with log-Jacobian z."""
    model = _bounded_model()
    gp = model.gp
    prior_outputscale = dist.Normal(torch.tensor(0.5, dtype=F64), 2.0)
    fn, sites = nuts_model(gp, priors={OUTPUTSCALE: prior_outputscale})
    params = dict(gp.named_parameters())
    shift = {OUTPUTSCALE: 0.3, LENGTHSCALE: torch.tensor([[-0.4, 0.7]], dtype=F64), NOISE: -0.5, CONSTANT: 0.2}
    z = {s.name: (s.from_raw(params[s.raw_name]) + shift[s.name]).detach() for s in sites}
    trace = pyro.poutine.trace(pyro.poutine.condition(fn, data=z)).get_trace()

    def interval(name, constraint):
        a, b = _bounds(constraint)
        s = torch.sigmoid(z[name])
        return a + (b - a) * s, torch.log(b - a) + torch.log(s) + torch.log1p(-s)

    outputscale, _ = interval(OUTPUTSCALE, gp.kernel.base_kernel.raw_outputscale_constraint)
    lengthscale, jac_ls = interval(LENGTHSCALE, gp.kernel.base_kernel.base_kernel.raw_lengthscale_constraint)
    noise, jac_noise = interval(NOISE, gp.likelihood.noise_covar.noise_constraint)
    constant = 2.0 - z[CONSTANT].exp()
    x, y = gp.train_x, gp.train_y
    k = MaternKernel(nu=2.5, ard_num_dims=2).double()
    k.lengthscale = lengthscale
    cov = outputscale * k(x).to_dense().detach() + noise * torch.eye(x.shape[0], dtype=F64)
    expected = torch.distributions.MultivariateNormal(constant.expand(x.shape[0]), cov).log_prob(y)
    expected = expected + prior_outputscale.log_prob(z[OUTPUTSCALE])  # given: a prior over z itself
    gamma = torch.distributions.Gamma(torch.tensor(3.0, dtype=F64), torch.tensor(6.0, dtype=F64))
    expected = expected + (gamma.log_prob(lengthscale) + jac_ls).sum()
    gamma = torch.distributions.Gamma(torch.tensor(1.5, dtype=F64), torch.tensor(20.0, dtype=F64))
    expected = expected + gamma.log_prob(noise) + jac_noise
    now = next(s for s in sites if s.name == CONSTANT).from_raw(params["mean.raw_constant"]).detach()
    expected = expected + torch.distributions.Normal(now, 1.0).log_prob(z[CONSTANT])  # default prior on z
    assert_close(trace.log_prob_sum(), expected, 1e-10, 1e-10)
    # the model's gradient in z (what NUTS follows) is finite
    zs = {name: value.clone().requires_grad_() for name, value in z.items()}
    trace = pyro.poutine.trace(pyro.poutine.condition(fn, data=zs)).get_trace()
    grads = torch.autograd.grad(trace.log_prob_sum(), list(zs.values()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def _truncated_moments(prior: torch.distributions.Distribution, a: float, b: float) -> tuple[float, float]:
    """Mean and standard deviation of ``prior`` restricted to ``(a, b)``, by quadrature."""
    grid = torch.linspace(a, b, 20001, dtype=F64)
    w = prior.log_prob(grid).exp()
    mass = torch.trapezoid(w, grid)
    mean = torch.trapezoid(grid * w, grid) / mass
    var = torch.trapezoid((grid - mean) ** 2 * w, grid) / mass
    return float(mean), float(var.sqrt())


def test_restricted_prior_draws():
    """Draws of a prior with mass outside the interval, mapped to z and back, follow the restricted prior."""
    a, b = 0.2, 1.5
    normal = NormalPrior(torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64))
    site_prior = TransformedValuePrior(
        normal,
        transforms.ComposeTransform([transforms.SigmoidTransform(), transforms.AffineTransform(a, b - a)]),
        constraints.interval(a, b),
        torch.Size([2]),
    )
    z = site_prior.sample((20000,))
    assert z.shape == (20000, 2) and bool(torch.isfinite(z).all())
    v = a + (b - a) * torch.sigmoid(z)
    mean, sd = _truncated_moments(normal, a, b)
    assert abs(float(v.mean()) - mean) < 0.01 and abs(float(v.std()) - sd) < 0.01
    assert abs(float(v[:, 0].mean()) - float(v[:, 1].mean())) < 0.02  # elements drawn independently
    assert float((v[:, 0] - v[:, 1]).abs().min()) > 0
    assert site_prior.log_prob(z[:3]).shape == (3,)
    # a correlated prior over the whole (2,) site (an event): log density and draws, kept or redrawn as a whole
    # (redrawing elements alone would give element 1 the mean 0.68 of its own restricted marginal, not 0.58)
    joint = torch.distributions.MultivariateNormal(
        torch.tensor([1.0, 0.4], dtype=F64), torch.tensor([[0.3, 0.25], [0.25, 0.3]], dtype=F64)
    )
    interval = transforms.ComposeTransform([transforms.SigmoidTransform(), transforms.AffineTransform(a, b - a)])
    site_prior = TransformedValuePrior(joint, interval, constraints.interval(a, b), torch.Size([2]))
    z = site_prior.sample((5000,))
    v = interval(z)
    assert bool(((v > a) & (v < b)).all())
    s = torch.sigmoid(z[:4])
    expected = joint.log_prob(v[:4]) + (math.log(b - a) + s.log() + (-s).log1p()).sum(-1)
    assert_close(site_prior.log_prob(z[:4]), expected, 1e-12, 1e-12)
    grid = torch.linspace(a, b, 401, dtype=F64)
    pairs = torch.cartesian_prod(grid, grid)
    w = joint.log_prob(pairs).exp()
    assert abs(float(v[:, 1].mean()) - float((w * pairs[:, 1]).sum() / w.sum())) < 0.02


def test_nuts_samples_a_prior_only_interval_site():
    """A bounded hyperparameter the likelihood does not depend on: its posterior is its prior Normal(1, 0.5)
    restricted to (0.2, 1.5), whose mean (0.917) and spread NUTS reproduces; without the sigmoid's Jacobian
    the chain would pile up at the upper bound (mean ~1.46)."""
    x, y = data(n=5)
    model = pair(x, y)[0]
    mean = model.gp.mean
    mean.register_parameter("raw_offset", nn.Parameter(torch.zeros((), dtype=F64)))
    mean.register_constraint("raw_offset", Interval(0.2, 1.5).double())
    normal = NormalPrior(torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64))
    mean.register_prior("offset_prior", normal, lambda m: m.raw_offset)
    others = [s.name for s in hyperparameter_sites(model.gp) if s.name != OFFSET]
    ensemble = nuts_ensemble(model, exclude=others, num_samples=400, warmup_steps=100, max_tree_depth=3, seed=0)
    v = 0.2 + 1.3 * torch.sigmoid(ensemble.mcmc_samples[OFFSET])
    ref_mean, ref_sd = _truncated_moments(normal, 0.2, 1.5)
    assert abs(float(v.mean()) - ref_mean) < 0.06  # standard error ~0.017 (400 draws, sd 0.33)
    assert abs(float(v.std()) - ref_sd) < 0.04
    # Kolmogorov-Smirnov distance to the restricted prior's CDF
    grid = torch.linspace(0.2, 1.5, 20001, dtype=F64)
    cdf = torch.cumsum(normal.log_prob(grid).exp(), 0)
    cdf = cdf / cdf[-1]
    ref = cdf[torch.searchsorted(grid, v.sort().values).clamp_max(grid.numel() - 1)]
    empirical = torch.arange(1, v.numel() + 1, dtype=F64) / v.numel()
    assert float((ref - empirical).abs().max()) < 0.1


def test_nuts_ensemble_with_bounded_hyperparameters():
    """A chain over interval/LessThan sites on real data: values inside the bounds, the ensemble's gp holds
    exactly the draws' values, and acquisition functions run on it."""
    model = _bounded_model()
    ensemble = nuts_ensemble(model, num_samples=4, warmup_steps=8, max_tree_depth=3, seed=1)
    z = ensemble.mcmc_samples[LENGTHSCALE]
    a, b = _bounds(model.gp.kernel.base_kernel.base_kernel.raw_lengthscale_constraint)
    assert_close(ensemble.gp.kernel.base_kernel.base_kernel.lengthscale, a + (b - a) * torch.sigmoid(z), 1e-10, 1e-10)
    assert_close(ensemble.gp.mean.constant, 2.0 - ensemble.mcmc_samples[CONSTANT].exp(), 1e-10, 1e-10)
    lengthscale = ensemble.gp.kernel.base_kernel.base_kernel.lengthscale
    assert bool(((lengthscale > a) & (lengthscale < b)).all())
    assert not torch.equal(z[0], z[-1])  # the chain moves
    X = torch.rand(3, 2, 2, dtype=F64, requires_grad=True)
    acqf = qLogExpectedImprovement(ensemble, model.gp.train_y.max(), sampler=SobolQMCNormalSampler(torch.Size([8])))
    value = acqf(X)
    value.sum().backward()
    assert value.shape == (3,) and bool(torch.isfinite(value).all()) and X.grad.abs().sum() > 0


def test_constant_mean_prior_is_found():
    """gpytorch's ConstantMean registers its prior as ``mean_prior``: the site must carry it (not the default)."""
    x, y = data(n=6)
    prior = NormalPrior(torch.tensor(0.5, dtype=F64), torch.tensor(0.25, dtype=F64))
    mean = ConstantMean(constant_prior=prior).double()
    model = BoTorchModel.from_data(x, y, ScaleKernel(MaternKernel(nu=2.5)).double(), mean=mean)
    site = next(s for s in hyperparameter_sites(model.gp) if s.name == CONSTANT)
    assert site.model_prior is prior
    fn, sites = nuts_model(model.gp)
    z = {s.name: s.from_raw(dict(model.gp.named_parameters())[s.raw_name]).detach() for s in sites}
    trace = pyro.poutine.trace(pyro.poutine.condition(fn, data=z)).get_trace()
    # the unbounded constant: z is the value itself, so its log density is the model's prior
    assert_close(trace.nodes[CONSTANT]["fn"].log_prob(z[CONSTANT]), prior.log_prob(z[CONSTANT]), 1e-12, 1e-12)
