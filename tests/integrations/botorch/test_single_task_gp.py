"""StructuredSingleTaskGP against BoTorch's SingleTaskGP: the same signature, defaults and state dict, equal
posteriors, fits, fantasies, warm starts, ModelListGP and acquisition values (float64), structgp kernels, BoTorch's
own test helpers, and BoTorch's closed-loop tutorial at a tiny size."""

from __future__ import annotations

import copy
import inspect

import pytest

pytest.importorskip("botorch")

import torch  # noqa: E402
from botorch.acquisition import (  # noqa: E402
    GenericMCObjective,
    qKnowledgeGradient,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.multi_objective import qLogNoisyExpectedHypervolumeImprovement  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models import ModelListGP, SingleTaskGP  # noqa: E402
from botorch.models.transforms import Normalize, Standardize  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from botorch.test_functions import Hartmann  # noqa: E402
from botorch.utils.test_helpers import get_pvar_expected  # noqa: E402
from botorch.utils.testing import get_random_data  # noqa: E402
from gpytorch.kernels import InducingPointKernel as GpytorchInducingPointKernel  # noqa: E402
from gpytorch.kernels import RBFKernel, ScaleKernel  # noqa: E402
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood, SumMarginalLogLikelihood  # noqa: E402

from structgp.integrations.botorch import StructuredSingleTaskGP  # noqa: E402
from structgp.kernels import GridKernel, InducingPointKernel  # noqa: E402
from tests.integrations.botorch_pairs import data  # noqa: E402
from tests.reference import F64, assert_close  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::botorch.exceptions.warnings.InputDataWarning"),
    pytest.mark.filterwarnings("ignore:Non-strict enforcement of botorch tensor conventions"),
    pytest.mark.filterwarnings("ignore:`cache_root` is only supported"),
]
TOL = 1e-9  # the brief asks 1e-6; both models are exact, so they agree to rounding


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _sampler(n: int = 8, seed: int = 1) -> SobolQMCNormalSampler:
    return SobolQMCNormalSampler(torch.Size([n]), seed=seed)


def _pair(x, y, **kwargs) -> tuple[StructuredSingleTaskGP, SingleTaskGP]:
    """The two models on the same data and arguments, with SingleTaskGP's hyperparameters moved off their
    defaults and loaded into ours (``load_state_dict``, BoTorch's semantics)."""
    ref = SingleTaskGP(x, y, **copy.deepcopy(kwargs))
    ours = StructuredSingleTaskGP(x, y, **copy.deepcopy(kwargs))
    kernel = ref.covar_module
    kernel.lengthscale = torch.linspace(0.3, 0.6, x.shape[-1], dtype=F64).expand_as(kernel.lengthscale)
    if not isinstance(ref.likelihood, FixedNoiseGaussianLikelihood):
        ref.likelihood.noise = torch.full_like(ref.likelihood.noise, 0.03)
    with torch.no_grad():
        ref.mean_module.constant.fill_(0.2)
    ours.load_state_dict(ref.state_dict())
    return ours.eval(), ref.eval()


def _same_posterior(ours, ref, tol: float = TOL) -> None:
    assert ours.mean.shape == ref.mean.shape
    assert_close(ours.mean, ref.mean, tol, tol)
    assert_close(ours.variance, ref.variance, tol, tol)
    assert_close(ours.distribution.covariance_matrix, ref.distribution.covariance_matrix, tol, tol)
    assert_close(_sampler()(ours), _sampler()(ref), 1e-7, 1e-7)  # same base samples, same draws


# -- construction -----------------------------------------------------------------------------------------
def test_signature_defaults_and_state_dict_are_single_task_gps():
    params = list(inspect.signature(StructuredSingleTaskGP.__init__).parameters.values())
    theirs = list(inspect.signature(SingleTaskGP.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in params] == [(p.name, p.kind, p.default) for p in theirs]
    x, y = data()
    for yvar in (None, torch.full_like(y, 0.01)):
        ours, ref = StructuredSingleTaskGP(x, y, yvar), SingleTaskGP(x, y, yvar)
        assert type(ours.likelihood) is type(ref.likelihood) and type(ours.covar_module) is type(ref.covar_module)
        assert isinstance(ours.outcome_transform, Standardize)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        for (name, _, prior, _, _), (name2, module2, prior2, closure2, _) in zip(
            ours.named_priors(), ref.named_priors(), strict=True
        ):
            assert name == name2 and type(prior) is type(prior2)
            assert_close(prior.log_prob(closure2(module2)), prior2.log_prob(closure2(module2)), 0, 0)
        ours.train()
        mll = ExactMarginalLogLikelihood(ours.likelihood, ours)
        ref.train()
        ref_mll = ExactMarginalLogLikelihood(ref.likelihood, ref)
        value = mll(ours(*ours.train_inputs), ours.train_targets, *ours.train_inputs)
        expected = ref_mll(ref(*ref.train_inputs), ref.train_targets, *ref.train_inputs)
        assert_close(value, expected, 1e-12, 1e-12)


# -- posteriors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2])
def test_posterior_matches_single_task_gp(m):
    x, y = data(m=m)
    x, y = 10 * x - 3, 5 * y + 2  # the transforms have work to do
    bounds = torch.tensor([[-3.0, -3.0], [7.0, 7.0]], dtype=F64)
    for yvar in (None, torch.full_like(y, 0.05)):
        ours, ref = _pair(x, y, train_Yvar=yvar, input_transform=Normalize(2, bounds=bounds))
        X = 10 * torch.rand(4, 3, 2, dtype=F64) - 3
        _same_posterior(ours.posterior(X), ref.posterior(X))
        _same_posterior(ours.posterior(X, observation_noise=True), ref.posterior(X, observation_noise=True))
        noise = torch.full((4, 3, m), 0.1, dtype=F64)
        _same_posterior(ours.posterior(X, observation_noise=noise), ref.posterior(X, observation_noise=noise))
    grads = []
    for model in (ours, ref):
        Xg = X.clone().requires_grad_()
        post = model.posterior(Xg)
        (post.mean.sum() + post.variance.sum()).backward()
        grads.append(Xg.grad)
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[1], 1e-8, 1e-8)


def test_subset_output_and_float32():
    x, y = data(m=2)
    ours, ref = _pair(x, y)
    X = torch.rand(3, 2, 2, dtype=F64)
    _same_posterior(ours.subset_output([1]).posterior(X), ref.subset_output([1]).posterior(X))
    single = StructuredSingleTaskGP(x.float(), y[:, :1].float())
    single.load_state_dict({k: v.float() for k, v in _pair(x, y[:, :1])[1].state_dict().items()})
    post32, post64 = single.posterior(X.float()), _pair(x, y[:, :1])[1].posterior(X)
    assert post32.mean.dtype == torch.float32
    assert_close(post32.mean, post64.mean, 1e-4, 1e-4)
    assert_close(post32.variance, post64.variance, 1e-4, 1e-4)


def test_fit_matches_single_task_gp():
    x, y = data(n=20)
    ours, ref = StructuredSingleTaskGP(x, y), SingleTaskGP(x, y)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ours.likelihood, ours))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ref.likelihood, ref))
    fitted, expected = dict(ours.named_parameters()), dict(ref.named_parameters())
    for name, value in expected.items():
        assert_close(fitted[name], value, 1e-6, 1e-6)
    assert float(ref.likelihood.noise.detach()) < 0.1  # the fit moved off the prior's mode
    X = torch.rand(3, 2, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X), 1e-5)
    x, y = get_random_data(torch.Size([2]), 2, d=2, n=10, dtype=F64)  # a batch of two-output models
    for yvar in (None, torch.full_like(y, 0.01)):
        ours, ref = StructuredSingleTaskGP(x, y, yvar), SingleTaskGP(x, y, yvar)
        for model in (ours, ref):
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        for value, expected in zip(ours.parameters(), ref.parameters(), strict=True):
            assert_close(value, expected, 1e-6, 1e-6)


# -- conditioning -----------------------------------------------------------------------------------------
def test_condition_on_observations_and_fantasize_match_single_task_gp():
    x, y = data()
    bounds = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=F64)
    ours, ref = _pair(x, y, input_transform=Normalize(2, bounds=bounds))
    ref.posterior(x)  # gpytorch conditions only after a prediction has built its caches
    Xn, Yn = torch.rand(3, 2, dtype=F64), torch.randn(5, 3, 1, dtype=F64)
    c_ours, c_ref = ours.condition_on_observations(Xn, Yn), ref.condition_on_observations(Xn, Yn)
    assert c_ours.batch_shape == c_ref.batch_shape == torch.Size([5])
    assert c_ours.train_targets.shape == c_ref.train_targets.shape
    assert_close(c_ours._original_train_inputs, c_ref._original_train_inputs, 0, 0)
    assert c_ours.structured_gp() is ours.structured_gp()  # a view: the training solve is shared
    Xt = torch.rand(2, 1, 4, 2, dtype=F64)
    _same_posterior(c_ours.posterior(Xt), c_ref.posterior(Xt), 1e-8)
    X2, Y2 = torch.rand(1, 2, dtype=F64), torch.randn(5, 1, 1, dtype=F64)  # fantasies of fantasies
    _same_posterior(
        c_ours.condition_on_observations(X2, Y2).posterior(Xt), c_ref.condition_on_observations(X2, Y2).posterior(Xt),
        1e-8,
    )
    Xf, Xt = torch.rand(4, 2, 2, dtype=F64), torch.rand(3, 4, 1, 2, dtype=F64)
    f_ours, f_ref = ours.fantasize(Xf, _sampler(3)), ref.fantasize(Xf, _sampler(3))
    assert f_ours.batch_shape == f_ref.batch_shape == torch.Size([3, 4])
    _same_posterior(f_ours.posterior(Xt), f_ref.posterior(Xt), 1e-8)
    assert ours.train_targets.shape == (12,)  # the model conditioned on is unchanged


@pytest.mark.parametrize("m", [1, 2])
def test_fixed_noise_fantasies_match_single_task_gp(m):
    x, y = data(m=m)
    ours, ref = _pair(x, y, train_Yvar=torch.linspace(0.01, 0.05, 12, dtype=F64).unsqueeze(-1).expand(12, m))
    Xf, Xt = torch.rand(4, 2, 2, dtype=F64), torch.rand(3, 4, 1, 2, dtype=F64)
    f_ours, f_ref = ours.fantasize(Xf, _sampler(3)), ref.fantasize(Xf, _sampler(3))
    _same_posterior(f_ours.posterior(Xt), f_ref.posterior(Xt), 1e-8)
    _same_posterior(f_ours.posterior(Xt, observation_noise=True), f_ref.posterior(Xt, observation_noise=True), 1e-8)


# -- model lists and warm starts ----------------------------------------------------------------------------
def test_model_list_with_sum_marginal_log_likelihood():
    """Outputs on different inputs: fitted with SumMarginalLogLikelihood, conditioned through the list."""
    x1, y1 = data(n=12, seed=0)
    x2, y2 = data(n=9, seed=1)
    ours = ModelListGP(StructuredSingleTaskGP(x1, y1), StructuredSingleTaskGP(x2, y2.cos()))
    ref = ModelListGP(SingleTaskGP(x1, y1), SingleTaskGP(x2, y2.cos()))
    for model in (ours, ref):
        fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
    fitted, expected = dict(ours.named_parameters()), dict(ref.named_parameters())
    for name, value in expected.items():
        assert_close(fitted[name], value, 1e-6, 1e-6)
    X = torch.rand(3, 2, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X), 1e-5)
    ref.posterior(X)  # gpytorch's caches, for conditioning
    Xn, Yn = [torch.rand(2, 2, dtype=F64)] * 2, torch.randn(2, 2, dtype=F64)
    _same_posterior(
        ours.condition_on_observations(Xn, Yn).posterior(X), ref.condition_on_observations(Xn, Yn).posterior(X), 1e-5
    )


def test_load_state_dict_warm_start_across_data_sizes():
    """A model on more data takes the fitted hyperparameters (and, as BoTorch's keep_transforms, the outcome
    transform) of one on less: the training data are not in the state dict."""
    x, y = data(n=20)
    yvar = torch.full_like(y, 0.02)
    for train_yvar in (None, yvar):
        small = StructuredSingleTaskGP(x[:8], y[:8], None if train_yvar is None else yvar[:8])
        fit_gpytorch_mll(ExactMarginalLogLikelihood(small.likelihood, small))
        ours, ref = StructuredSingleTaskGP(x, y, train_yvar), SingleTaskGP(x, y, train_yvar)
        ours.load_state_dict(small.state_dict())
        ref.load_state_dict(small.state_dict())
        assert_close(ours.train_targets, ref.train_targets, 0, 0)
        X = torch.rand(3, 2, 2, dtype=F64)
        _same_posterior(ours.posterior(X), ref.posterior(X))


# -- acquisition functions ------------------------------------------------------------------------------------
ACQUISITIONS = {  # name: (factory(model, x, y), outputs, q); qLogNEI without BoTorch's root caching on both
    "qLogEI": (lambda m, x, y: qLogExpectedImprovement(m, y[:, 0].max(), sampler=_sampler(16)), 1, 2),
    "qUCB": (lambda m, x, y: qUpperConfidenceBound(m, 0.5, sampler=_sampler(16)), 1, 2),
    "qLogNEI": (
        lambda m, x, y: qLogNoisyExpectedImprovement(
            m, x, sampler=_sampler(16), cache_root=False, prune_baseline=False
        ),
        1,
        2,
    ),
    "qKG": (lambda m, x, y: qKnowledgeGradient(m, num_fantasies=3, sampler=_sampler(3)), 1, 1 + 3),
    "qNEHVI": (
        lambda m, x, y: qLogNoisyExpectedHypervolumeImprovement(
            m, y.min(0).values - 0.1, x, sampler=_sampler(16), prune_baseline=False, cache_root=False
        ),
        2,
        2,
    ),
}


@pytest.mark.parametrize("name", ACQUISITIONS)
def test_acquisition_functions_match_single_task_gp(name):
    make, m, q = ACQUISITIONS[name]
    x, y = data(m=m)
    ours, ref = _pair(x, y)
    X = torch.rand(3, q, 2, dtype=F64)
    values, grads = [], []
    for model in (ours, ref):
        Xg = X.clone().requires_grad_()
        value = make(model, x, y)(Xg)
        value.sum().backward()
        values.append(value.detach())
        grads.append(Xg.grad)
    assert values[0].shape == (3,) and bool(torch.isfinite(values[0]).all())
    assert_close(values[0], values[1], 1e-8, 1e-8)
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[1], 1e-7, 1e-7)
    if name == "qLogEI":
        bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
        cand, value = optimize_acqf(make(ours, x, y), bounds, q=q, num_restarts=2, raw_samples=8)
        assert cand.shape == (q, 2) and bool(torch.isfinite(value).all())


# -- structgp kernels -----------------------------------------------------------------------------------------
def test_grid_kernel_is_a_kronecker_single_task_gp():
    """A grid kernel (Kronecker training covariance, eigen engine) against SingleTaskGP with the same product
    kernel held densely: fit, posteriors off the grid, and conditioning on points off the grid."""
    axes = [torch.linspace(0, 1, 6, dtype=F64), torch.linspace(0, 1, 5, dtype=F64)]
    x = torch.cartesian_prod(*axes)
    y = (torch.sin(4 * x[:, 0]) * torch.cos(3 * x[:, 1]) + 0.05 * torch.randn(30, dtype=F64)).unsqueeze(-1)
    grid = GridKernel([ScaleKernel(RBFKernel()), RBFKernel()], axes)
    dense = ScaleKernel(RBFKernel(active_dims=[0]) * RBFKernel(active_dims=[1]))
    ours = StructuredSingleTaskGP(x, y, covar_module=grid)
    ref = SingleTaskGP(x, y, covar_module=dense)
    ours.train()
    assert type(ours(*ours.train_inputs).lazy_covariance_matrix.operator).__name__ == "Kronecker"
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ours.likelihood, ours))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ref.likelihood, ref))
    first, second = grid.grid.kernels
    assert_close(first.outputscale, dense.outputscale, 1e-5, 1e-5)
    assert_close(first.base_kernel.lengthscale, dense.base_kernel.kernels[0].lengthscale, 1e-5, 1e-5)
    assert_close(second.lengthscale, dense.base_kernel.kernels[1].lengthscale, 1e-5, 1e-5)
    assert_close(ours.likelihood.noise, ref.likelihood.noise, 1e-5, 1e-5)
    X = torch.rand(3, 4, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X), 1e-5)
    ref.posterior(X)
    Xn, Yn = torch.rand(2, 2, dtype=F64), torch.randn(2, 1, dtype=F64)
    _same_posterior(
        ours.condition_on_observations(Xn, Yn).posterior(X), ref.condition_on_observations(Xn, Yn).posterior(X), 1e-5
    )


def test_vfe_kernel_fits_the_collapsed_bound():
    """structgp's VFE inducing-point kernel in the gpytorch training objective: (log N(y; 0, Q + s I) -
    tr(K - Q) / (2 s) + log priors) / n against dense float64, the trace term being an added loss term as in
    gpytorch's SGPR (whose value counts the noise prior twice: the likelihood is also a child of its kernel)."""
    x, y = data(n=30)
    z = torch.rand(5, 2, dtype=F64)
    ours = StructuredSingleTaskGP(x, y, covar_module=InducingPointKernel(ScaleKernel(RBFKernel()), z, method="vfe"))
    ref = SingleTaskGP(x, y)
    ref.covar_module = GpytorchInducingPointKernel(copy.deepcopy(ours.covar_module.base_kernel), z, ref.likelihood)
    for model in (ours, ref):
        model.likelihood.noise = torch.tensor(0.05, dtype=F64)
        model.train()
    value, sgpr = (
        ExactMarginalLogLikelihood(model.likelihood, model)(model(*model.train_inputs), model.train_targets)
        for model in (ours, ref)
    )
    k, s, t = ours.covar_module.base_kernel, 0.05, ours.train_targets
    with torch.no_grad():
        kxx, kxz, kzz = k(x, x).to_dense(), k(x, z).to_dense(), k(z, z).to_dense()
        q = kxz @ torch.linalg.solve(kzz, kxz.mT)
        dense = torch.distributions.MultivariateNormal(torch.zeros(30, dtype=F64), q + s * torch.eye(30, dtype=F64))
        noise_prior = ours.likelihood.noise_covar.noise_prior.log_prob(ours.likelihood.noise).sum()
        expected = (dense.log_prob(t) - (kxx - q).diagonal().sum() / (2 * s) + noise_prior) / 30
    assert_close(value, expected, 1e-10, 1e-10)
    assert_close(value, (sgpr - noise_prior / 30).detach(), 1e-10, 1e-10)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ours.likelihood, ours))
    assert not ours.training
    assert ours.posterior(torch.rand(3, 2, dtype=F64)).mean.shape == (3, 1)


# -- BoTorch's own test helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch_shape, m", [((), 1), ((2,), 2)])
def test_botorch_test_helpers(batch_shape, m):
    """BoTorch's get_random_data (batched data) and get_pvar_expected (the observation-noise variance from
    model(X) and the likelihood, the way BoTorch's model tests check it)."""
    x, y = get_random_data(torch.Size(batch_shape), m, d=2, n=10, dtype=F64)
    ours, ref = _pair(x, y)
    X = torch.rand(*batch_shape, 3, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X))
    posterior = ours.posterior(X, observation_noise=True)
    assert_close(posterior.variance, get_pvar_expected(posterior, ours, X, m), 1e-12, 1e-12)
    assert_close(posterior.variance, get_pvar_expected(posterior, ref, X, m), 1e-9, 1e-9)


# -- BoTorch's closed-loop tutorial, tiny ---------------------------------------------------------------------
NOISE_SE = 0.25
_HARTMANN = Hartmann(negate=True).to(F64)


def _observe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy objective (negated Hartmann 6) and outcome constraint ``sum(x) - 3 <= 0``."""
    obj, con = _HARTMANN(x).unsqueeze(-1), (x.sum(-1) - 3).unsqueeze(-1)
    return obj + NOISE_SE * torch.randn_like(obj), con + NOISE_SE * torch.randn_like(con)


def _model_list(cls, x, obj, con, state=None):
    """The tutorial's model: one GP for the objective, one for the constraint, known noise; warm-started."""
    yvar = torch.full_like(obj, NOISE_SE**2)
    model = ModelListGP(cls(x, obj, yvar), cls(x, con, yvar))
    if state is not None:
        model.load_state_dict(state)
    return SumMarginalLogLikelihood(model.likelihood, model), model


def _closed_loop(cls, iterations: int = 1, q: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(8, 6, dtype=F64)
    obj, con = _observe(x)
    objective, constraints = GenericMCObjective(lambda Z, X: Z[..., 0]), [lambda Z: Z[..., 1]]
    bounds = torch.tensor([[0.0] * 6, [1.0] * 6], dtype=F64)
    mll, model = _model_list(cls, x, obj, con)
    for it in range(iterations):
        fit_gpytorch_mll(mll)
        feasible = obj[con <= 0]
        best = feasible.max() if feasible.numel() else obj.min()
        sampler = _sampler(16, seed=it)
        acqfs = (
            qLogExpectedImprovement(model, best, sampler=sampler, objective=objective, constraints=constraints),
            qLogNoisyExpectedImprovement(
                model, x, sampler=sampler, objective=objective, constraints=constraints, cache_root=False
            ),
        )
        new = torch.cat([
            optimize_acqf(a, bounds, q=q, num_restarts=2, raw_samples=16, options={"maxiter": 10})[0] for a in acqfs
        ])
        o, c = _observe(new)
        x, obj, con = torch.cat([x, new]), torch.cat([obj, o]), torch.cat([con, c])
        mll, model = _model_list(cls, x, obj, con, model.state_dict())
    fit_gpytorch_mll(mll)  # the warm-started model on the grown data
    return x, obj, model.posterior(x[-q:]).mean


def test_closed_loop_tutorial_runs_as_with_single_task_gp():
    """The tutorial's loop (ModelListGP, SumMarginalLogLikelihood, constrained qLogEI and qLogNEI, optimize_acqf,
    warm starts by load_state_dict on growing data) chooses the same points with either model."""
    x_ours, obj_ours, mean_ours = _closed_loop(StructuredSingleTaskGP)
    x_ref, obj_ref, mean_ref = _closed_loop(SingleTaskGP)
    assert x_ours.shape == (12, 6)
    assert_close(x_ours, x_ref, 1e-5, 1e-5)
    assert_close(obj_ours, obj_ref, 1e-5, 1e-5)
    assert_close(mean_ours, mean_ref, 1e-5, 1e-5)  # the refitted, warm-started models agree too
