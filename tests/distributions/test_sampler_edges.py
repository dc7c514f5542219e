"""Samplers at extreme parameter values: Pyro's NUTS proposes scales ``a = exp(z)`` of ``1e300``, ``inf`` and
``0`` while it searches for a step size. Every such value must give a finite log density equal to torch's
own distribution's, or an error that Pyro's integrator records as a divergence (never NaN, never a crash);
and NUTS must then complete on every seed, with the posterior means torch's distributions give."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops import integrator

import structgp as sg
from structgp.covariance import Diagonal, Kronecker, LowRank, ScaledIdentity, SparseLifted
from structgp.covariance.errors import NumericalError
from structgp.distributions import MultivariateNormal
from structgp.distributions.pyro_divergence import HANDLER_NAME, is_numerical_error
from structgp.inference import NotPositiveDefiniteError

F64 = torch.float64
N, K, M = 12, 2, 200  # observed dimension, low-rank width, observations in the plate


def _rbf(n: int) -> torch.Tensor:
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x) ** 2 / 0.5**2) + 1e-3 * torch.eye(n, dtype=F64)


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lift = torch.zeros(N, 6, dtype=F64)
    lift[torch.arange(N), torch.arange(N) % 6] = 1.0
    lift[torch.arange(N), (torch.arange(N) + 1) % 6] = 0.5
    return {
        "w": torch.randn(N, K, dtype=F64, generator=g),
        "k1": _rbf(3),
        "k2": _rbf(4),
        "lift": lift,
        "base": _rbf(6),
        "noise": torch.randn(M, N, dtype=F64, generator=g),
    }


DATA = _data()
ONES = torch.ones(N, dtype=F64)

# case: (structgp covariance of the sampled a, torch distribution of a, the engine forced for structgp)
CASES = {
    "low_rank_scale": (
        lambda a: LowRank(a * DATA["w"]) + Diagonal(0.3 * ONES),
        lambda a: pdist.LowRankMultivariateNormal(torch.zeros(N, dtype=F64), a * DATA["w"], 0.3 * ONES),
        "low_rank_woodbury",
    ),
    "low_rank_squared_scale": (
        lambda a: (a**2) * LowRank(DATA["w"]) + Diagonal(0.3 * ONES),
        lambda a: pdist.LowRankMultivariateNormal(torch.zeros(N, dtype=F64), a * DATA["w"], 0.3 * ONES),
        "low_rank_woodbury",
    ),
    "low_rank_noise": (
        lambda a: LowRank(DATA["w"]) + ScaledIdentity(a, N),
        lambda a: pdist.LowRankMultivariateNormal(torch.zeros(N, dtype=F64), DATA["w"], a * ONES),
        "low_rank_woodbury",
    ),
    "kronecker_scale": (
        lambda a: Kronecker(a * DATA["k1"], DATA["k2"]) + ScaledIdentity(0.3, N),
        lambda a: _dense(a * torch.kron(DATA["k1"], DATA["k2"]), 0.3),
        "eigen",
    ),
    "kronecker_noise": (
        lambda a: Kronecker(DATA["k1"], DATA["k2"]) + ScaledIdentity(a, N),
        lambda a: _dense(torch.kron(DATA["k1"], DATA["k2"]), a),
        "eigen",
    ),
    "sparse_lifted_scale": (
        lambda a: a * SparseLifted(DATA["lift"].to_sparse(), DATA["base"]) + ScaledIdentity(0.3, N),
        lambda a: _dense(a * DATA["lift"] @ DATA["base"] @ DATA["lift"].T, 0.3),
        "lifted_woodbury",
    ),
    "sparse_lifted_noise": (
        lambda a: SparseLifted(DATA["lift"].to_sparse(), DATA["base"]) + ScaledIdentity(a, N),
        lambda a: _dense(DATA["lift"] @ DATA["base"] @ DATA["lift"].T, a),
        "lifted_woodbury",
    ),
}


# case: (B, p) with the covariance a^p B B^T + 0.3 I (scale sites) or B B^T + a I (noise sites), for the exact
# log density in log space (independent of both structgp and torch's dense factorisations)
ROOTS = {
    "low_rank_scale": (DATA["w"], 2),
    "low_rank_squared_scale": (DATA["w"], 2),
    "low_rank_noise": (DATA["w"], 0),
    "kronecker_scale": (torch.linalg.cholesky(torch.kron(DATA["k1"], DATA["k2"])), 1),
    "kronecker_noise": (torch.linalg.cholesky(torch.kron(DATA["k1"], DATA["k2"])), 0),
    "sparse_lifted_scale": (DATA["lift"] @ torch.linalg.cholesky(DATA["base"]), 1),
    "sparse_lifted_noise": (DATA["lift"] @ torch.linalg.cholesky(DATA["base"]), 0),
}


def _exact_log_prob(case: str, z: float, y: torch.Tensor) -> float:
    """``sum log N(y_i; 0, A)`` for ``a = e^z`` from the thin QR ``B = Q R`` (``r`` columns): ``A`` has the
    eigenvalues ``e^{log_scale} mu + e^{log_noise}`` (``mu`` those of ``R R^T``) on ``range(Q)`` and
    ``e^{log_noise}`` on its complement; every term in log space (overflow gives +-inf, never a wrong number)."""
    root, power = ROOTS[case]
    log_scale, log_noise = (power * z, math.log(0.3)) if case.endswith("scale") else (0.0, z)
    q, r = torch.linalg.qr(root)
    mu, v = torch.linalg.eigh(r @ r.mT)
    log_lam = torch.logaddexp(log_scale + mu.log(), torch.tensor(log_noise, dtype=F64))
    inside = ((y @ q @ v).square() * torch.exp(-log_lam)).sum()
    rest = (y - (y @ q) @ q.mT).square().sum()
    perp = rest * torch.exp(torch.tensor(-log_noise, dtype=F64)) if root.shape[1] < N else 0.0
    logdet = log_lam.sum() + (N - root.shape[1]) * log_noise
    return float(-0.5 * (inside + perp + M * logdet + M * N * math.log(2 * math.pi)))


def _dense(k: torch.Tensor, noise) -> pdist.MultivariateNormal:
    return pdist.MultivariateNormal(torch.zeros(N, dtype=F64), k + noise * torch.eye(N, dtype=F64))


def _observations(case: str) -> torch.Tensor:
    """Draws from the case's model at ``a = 1`` (a posterior around 1), fixed by a seed."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return CASES[case][1](torch.tensor(1.0, dtype=F64)).sample((M,))


def _model(case: str, backend: str, y: torch.Tensor):
    structured, reference, _ = CASES[case]

    def model():
        a = pyro.sample("a", pdist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("obs", M):
            if backend == "structgp":
                d = MultivariateNormal(torch.zeros(N, dtype=F64), structured(a))
            else:
                d = reference(a)
            pyro.sample("y", d, obs=y)

    return model


def _accepted_by_pyro(err: Exception) -> bool:
    return any(handler(err) for handler in integrator._EXCEPTION_HANDLERS.values())


# -- the log density at the values NUTS's step-size search proposes ------------------------------------
EXTREMES = [-800.0, -745.0, -700.0, -460.0, -230.0, 0.0, 230.0, 345.0, 351.0, 360.0, 460.0, 700.0, 800.0]


@pytest.mark.parametrize("case", list(CASES))
def test_log_density_at_extreme_scales_is_exact_or_a_divergence(case):
    """a = exp(z) over the float64 range (0, subnormal, 1e-300 .. 1e300, inf) and NaN: structgp's log density
    (with the structured engine forced) equals the exact one in log space (relative 1e-9) and torch's where
    torch's is finite, or is an error Pyro records as a divergence; it is never NaN nor a different number."""
    structured, reference, method = CASES[case]
    y = _observations(case)
    outcomes = []
    for z in [*EXTREMES, math.nan]:
        a = torch.tensor(z, dtype=F64).exp()
        exact = _exact_log_prob(case, z, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own warnings at these values
            try:
                ref = float(reference(a).log_prob(y).sum())
            except (ValueError, RuntimeError):
                ref = math.nan
        if math.isfinite(ref):
            assert ref == pytest.approx(exact, rel=1e-9), f"the references disagree at a = exp({z})"
        try:
            with sg.settings(method=method), warnings.catch_warnings():
                warnings.simplefilter("error")  # no jitter: the structured answer must be exact
                value = float(MultivariateNormal(torch.zeros(N, dtype=F64), structured(a)).log_prob(y).sum())
        except Exception as err:  # noqa: BLE001 (the assertion says which errors are allowed)
            assert _accepted_by_pyro(err), f"a = exp({z}): {type(err).__name__}: {err}"
            outcomes.append("divergence")
            continue
        assert not math.isnan(value), f"a = exp({z}): NaN log density"
        assert value == pytest.approx(exact, rel=1e-9), f"a = exp({z})"
        outcomes.append("value")
    assert "value" in outcomes and "divergence" in outcomes  # both branches are exercised


def test_finite_huge_scale_gives_the_finite_log_density_and_gradient():
    """LowRank(7.9e152 W) + 0.3 I: W^T D^-1 W overflows, the log density does not. Against the closed form from
    the singular values s_i of D^-1/2 W (float64): log det = n log 0.3 + sum log(a^2 s_i^2 + 1), computed as
    2 log a + 2 log s_i + log1p(1 / (a s_i)^2), and the inverse quadratic form through the left singular vectors."""
    w, y, d = DATA["w"], _observations("low_rank_scale"), 0.3
    a = torch.tensor(7.9e152, dtype=F64, requires_grad=True)
    log_prob = MultivariateNormal(torch.zeros(N, dtype=F64), LowRank(a * w) + Diagonal(d * ONES)).log_prob(y).sum()
    (grad,) = torch.autograd.grad(log_prob, a)
    u, s, _ = torch.linalg.svd(w / math.sqrt(d), full_matrices=False)
    white = y / math.sqrt(d)
    a64 = 7.9e152
    shrink = 1 / (1 + 1 / (a64 * s) ** 2)  # (a s)^2 / (1 + (a s)^2)
    inv_quad = white.square().sum(-1) - ((white @ u).square() * shrink).sum(-1)
    logdet = N * math.log(d) + (2 * math.log(a64) + 2 * s.log() + torch.log1p(1 / (a64 * s) ** 2)).sum()
    ref = -0.5 * (inv_quad.sum() + M * logdet + M * N * math.log(2 * math.pi))
    assert float(log_prob.detach()) == pytest.approx(float(ref), rel=1e-12)
    # d/da: -M k / a from the determinant (k = 2), plus an O(1 / a^3) term from the quadratic form
    assert float(grad) == pytest.approx(-M * K / a64, rel=1e-9)


def test_handler_accepts_structgp_numerical_errors_and_nothing_else():
    """Registered with Pyro's integrator under its name; accepts NumericalError, NotPositiveDefiniteError and
    Pyro's re-raised ValueError whose cause is one; refuses other ValueErrors and TypeErrors."""
    assert integrator._EXCEPTION_HANDLERS[HANDLER_NAME] is is_numerical_error
    numerical = NumericalError("scale: expected finite entries (found NaN or Inf)")
    try:
        try:
            raise numerical
        except ValueError as err:  # as pyro.poutine.trace_struct re-raises an error of log_prob
            raise ValueError("Error while computing log_prob_sum at site 'y'") from err
    except ValueError as wrapped:
        assert is_numerical_error(wrapped)
    assert is_numerical_error(NotPositiveDefiniteError("matrix is not positive definite"))
    assert not is_numerical_error(ValueError("scale: expected strictly positive entries (found a negative entry)"))
    assert not is_numerical_error(TypeError("rhs: expected dtype torch.float64"))
    chained = ValueError("outer")
    chained.__cause__ = ValueError("inner")
    assert not is_numerical_error(chained)


def test_potential_grad_turns_numerical_errors_into_divergences_and_raises_the_rest():
    """Pyro's own potential_grad (what velocity_verlet calls): NaN energy and zero gradients for a structgp
    numerical error, the error itself for a mistake (a negative scale)."""

    def potential(z):
        return -MultivariateNormal(torch.zeros(N, dtype=F64), LowRank(DATA["w"]) + ScaledIdentity(z["s"], N)).log_prob(
            DATA["noise"]
        ).sum()

    grads, energy = integrator.potential_grad(potential, {"s": torch.tensor(math.inf, dtype=F64)})
    assert math.isnan(float(energy)) and float(grads["s"]) == 0.0
    with pytest.raises(ValueError, match="scale: expected strictly positive entries"):
        integrator.potential_grad(potential, {"s": torch.tensor(-1.0, dtype=F64)})
    _, energy = integrator.potential_grad(potential, {"s": torch.tensor(0.5, dtype=F64)})
    assert math.isfinite(float(energy))


# -- NUTS on every seed ------------------------------------------------------------------------------------
SEEDS = range(8)
# the cases of the report (before the fix NUTS died on these), where the step-size search on these seeds is
# known to propose a scale that raises a numerical error (measured: 2, 4 and 2 proposals over the 8 seeds)
REACHES_THE_EDGE = {"low_rank_scale", "low_rank_squared_scale", "low_rank_noise"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_nuts_completes_on_every_seed_with_torchs_posterior_means(case, monkeypatch):
    """a ~ LogNormal(0, 1), 200 observations in a plate, NUTS(num_samples=40, warmup_steps=40), float64, with
    the structured engine forced: completes on all 8 seeds; on each seed the posterior mean of a equals the
    one NUTS finds with torch's own distribution (the same proposals, so to rounding); and, for the reported
    cases, the search met at least one value that raised a numerical error (the path this test is about).
    About 15 s a case."""
    method = CASES[case][2]
    y = _observations(case)
    handled = []

    def counting(err: BaseException) -> bool:
        accepted = is_numerical_error(err)
        handled.append(accepted)
        return accepted

    monkeypatch.setitem(integrator._EXCEPTION_HANDLERS, HANDLER_NAME, counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in SEEDS:
            means = {}
            for backend in ("structgp", "torch"):
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                mcmc = MCMC(NUTS(_model(case, backend, y)), num_samples=40, warmup_steps=40, disable_progbar=True)
                with warnings.catch_warnings(), sg.settings(method=method):
                    warnings.simplefilter("ignore")
                    mcmc.run()
                means[backend] = float(mcmc.get_samples()["a"].mean())
            # the same proposals: rounding-level differences of the log density grow along a chain
            assert means["structgp"] == pytest.approx(means["torch"], rel=1e-5), f"seed {seed}"
    finally:
        torch.set_num_threads(threads)
    if case in REACHES_THE_EDGE:
        assert any(handled), "no proposal raised a numerical error: the test did not reach the edge"
