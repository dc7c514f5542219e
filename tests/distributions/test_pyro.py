"""MultivariateNormal as a Pyro sample site: SVI, NUTS, plates, Predictive, JIT, against closed forms."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as pdist
import pytest
import torch
import torch.distributions as tdist
from pyro.infer import MCMC, NUTS, SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from structgp.covariance import Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import MultivariateNormal
from tests.reference import positive, spd

F64 = torch.float64


def _rbf(n: int, lengthscale: float = 0.4) -> torch.Tensor:
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x[None]) ** 2 / lengthscale**2) + 1e-4 * torch.eye(n, dtype=F64)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    # tiny problems: the per-op overhead of a second thread costs more than it saves (and far more on a
    # loaded machine), so these run single-threaded; the setting is restored afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
    torch.set_num_threads(threads)


def test_svi_autonormal_on_kronecker_prior_reaches_the_mean_field_optimum():
    """f ~ N(0, K1 (x) K2), y ~ N(f, s^2 I). For a Gaussian posterior the optimal mean-field Gaussian has the
    exact posterior mean and variances 1 / diag(K^-1 + I / s^2); AutoNormal must get there."""
    k1, k2, sigma = _rbf(3), _rbf(4), 0.3
    k = torch.kron(k1, k2)
    n = k.shape[0]
    y = torch.linalg.cholesky(k) @ torch.randn(n, dtype=F64) + sigma * torch.randn(n, dtype=F64)

    def model(y):
        f = pyro.sample("f", MultivariateNormal(torch.zeros(n, dtype=F64), Kronecker(k1, k2)))
        pyro.sample("y", pdist.Normal(f, sigma).to_event(1), obs=y)

    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)  # particles run inside a plate
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}), elbo)
    for _ in range(300):
        svi.step(y)
    precision = torch.linalg.inv(k) + torch.eye(n, dtype=F64) / sigma**2
    mean = torch.linalg.solve(precision, y / sigma**2)
    sd = precision.diagonal().rsqrt()
    loc, scale = pyro.param("AutoNormal.locs.f").detach(), pyro.param("AutoNormal.scales.f").detach()
    assert ((loc - mean) / sd).abs().max() < 0.3
    assert (scale / sd - 1).abs().max() < 0.15


def test_svi_recovers_the_scale_of_a_low_rank_plus_diagonal_likelihood():
    """y_r ~ N(0, s W W^T + D) (r in a plate) with log s ~ N(0, 1): the AutoNormal posterior of log s matches
    the exact posterior (quadrature of the dense float64 likelihood) and covers the true s = 2."""
    n, reps, s_true = 8, 128, 2.0
    w, d = torch.randn(n, 2, dtype=F64), positive(n, low=0.5)
    y = tdist.MultivariateNormal(torch.zeros(n, dtype=F64), s_true * w @ w.T + torch.diag(d)).sample((reps,))

    def model(y):
        log_s = pyro.sample("log_s", pdist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("reps", reps):
            # s W W^T as LowRank(sqrt(s) W): log_s carries the particle batch dims, (P, 1) -> (P, 1, n, 2)
            cov = LowRank((0.5 * log_s).exp()[..., None, None] * w) + Diagonal(d)
            pyro.sample("y", MultivariateNormal(torch.zeros(n, dtype=F64), cov), obs=y)

    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99}), elbo)
    for _ in range(250):
        svi.step(y)
    grid = torch.linspace(-1.0, 2.5, 701, dtype=F64)
    covs = grid.exp()[:, None, None] * (w @ w.T) + torch.diag(d)
    log_post = tdist.MultivariateNormal(torch.zeros(n, dtype=F64), covs).log_prob(y[:, None]).sum(0)
    log_post = log_post + tdist.Normal(0.0, 1.0).log_prob(grid)
    weights = torch.softmax(log_post, 0)
    post_mean = (weights * grid).sum()
    post_sd = (weights * (grid - post_mean) ** 2).sum().sqrt()
    loc = pyro.param("AutoNormal.locs.log_s").detach()
    scale = pyro.param("AutoNormal.scales.log_s").detach()
    assert abs(loc - post_mean) < 0.3 * post_sd
    assert abs(scale / post_sd - 1) < 0.2
    assert abs(loc - math.log(s_true)) < 4 * post_sd


def test_nuts_with_structured_prior_and_observed_structured_likelihood_in_a_plate():
    """f ~ N(0, K1 (x) K2); y_r ~ N(f, W W^T + D) for r in a plate: NUTS's posterior mean is the exact one."""
    k1, k2 = spd(2, seed=1), spd(3, seed=2)
    n, reps = 6, 5
    w, d = 0.5 * torch.randn(n, 2, dtype=F64), positive(n)
    y = torch.randn(reps, n, dtype=F64)

    def model(y):
        f = pyro.sample("f", MultivariateNormal(torch.zeros(n, dtype=F64), Kronecker(k1, k2)))
        with pyro.plate("reps", reps):
            pyro.sample("y", MultivariateNormal(f, LowRank(w) + Diagonal(d)), obs=y)

    mcmc = MCMC(NUTS(model), warmup_steps=30, num_samples=30, disable_progbar=True)
    mcmc.run(y)
    f = mcmc.get_samples()["f"]
    assert f.shape == (30, n)
    noise = w @ w.T + torch.diag(d)
    precision = torch.linalg.inv(torch.kron(k1, k2)) + reps * torch.linalg.inv(noise)
    mean = torch.linalg.solve(precision, torch.linalg.solve(noise, y.sum(0)))
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    assert ((f.mean(0) - mean) / sd).abs().max() < 4 / math.sqrt(30)
    assert ((f.std(0) / sd).log().abs() < math.log(2)).all()


def _grid_model(n1: int = 2, n2: int = 3):
    k1, k2 = spd(n1, seed=3), spd(n2, seed=4)
    n = n1 * n2

    def model(y=None):
        cov = Kronecker(k1, k2) + ScaledIdentity(torch.tensor(0.1, dtype=F64), n)
        f = pyro.sample("f", MultivariateNormal(torch.zeros(n, dtype=F64), cov))
        return pyro.sample("y", pdist.Normal(f, 0.3).to_event(1), obs=y)

    return model, n


def test_predictive_draws_from_the_structured_prior_in_parallel():
    model, n = _grid_model()
    draws = Predictive(model, num_samples=7, parallel=True)()
    assert draws["f"].shape == (7, n) and draws["y"].shape == (7, n)
    assert not torch.allclose(draws["f"][0], draws["f"][1])


def test_jit_trace_elbo_matches_trace_elbo():
    model, n = _grid_model()
    y = torch.randn(n, dtype=F64)
    guide = AutoNormal(model)
    guide(y)
    jit = JitTrace_ELBO(ignore_jit_warnings=True)
    for seed in range(3):  # the first call traces, the others run the compiled trace
        pyro.set_rng_seed(seed)
        expected = Trace_ELBO().loss(model, guide, y)
        pyro.set_rng_seed(seed)
        assert jit.loss(model, guide, y) == pytest.approx(expected, rel=1e-12)
