"""BoTorchModel follows BoTorch's conventions: the multitask from_data path (item 5), input transforms applied
in forward only while training (item 6), SingleTaskGP's signature and defaults, gpytorch's marginal likelihoods
and likelihood calls, and warm starts across data sizes (item 7); NUTS on a VFE gp."""

from __future__ import annotations

import pytest

pytest.importorskip("botorch")

import pyro  # noqa: E402
import torch  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models import ModelListGP, SingleTaskGP  # noqa: E402
from botorch.models.transforms import Normalize, Standardize  # noqa: E402
from botorch.utils.test_helpers import get_pvar_expected  # noqa: E402
from gpytorch.kernels import RBFKernel, ScaleKernel  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood, SumMarginalLogLikelihood  # noqa: E402

from structgp.distributions import GaussianLikelihood  # noqa: E402
from structgp.integrations.botorch import BoTorchModel, nuts_model  # noqa: E402
from structgp.kernels import InducingPointKernel, MultitaskKernel  # noqa: E402
from structgp.models import ExactGP  # noqa: E402
from tests.integrations.botorch_pairs import data  # noqa: E402
from tests.reference import F64, assert_close  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::botorch.exceptions.warnings.InputDataWarning"),
    pytest.mark.filterwarnings("ignore:Non-strict enforcement of botorch tensor conventions"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_from_data_with_a_multitask_kernel():
    """Item 5: train_Y (n, t) of a multitask kernel is the gp's (n, t) targets."""
    x, y = data(m=2)
    kernel = MultitaskKernel(ScaleKernel(RBFKernel()), num_tasks=2)
    model = BoTorchModel.from_data(x, y, kernel, outcome_transform=None)
    assert model.num_outputs == 2 and model.gp.train_y.shape == (12, 2)
    gp = ExactGP(x, y, kernel)
    X = torch.rand(3, 2, dtype=F64)
    post, (mean, var) = model.posterior(X), gp.predict(X)
    assert_close(post.mean, mean, 1e-10, 1e-10)
    assert_close(post.variance, var, 1e-10, 1e-10)
    noisy = BoTorchModel.from_data(x, y, kernel, train_Yvar=torch.full_like(y, 0.01))  # and observed noise
    assert noisy.posterior(X).mean.shape == (3, 2)


def test_forward_transforms_inputs_only_while_training():
    """Item 6: in eval mode model(X) takes transformed X, so BoTorch's get_pvar_expected agrees."""
    x, y = data()
    x = 10 * x - 3
    bounds = torch.tensor([[-3.0, -3.0], [7.0, 7.0]], dtype=F64)
    model = BoTorchModel.from_data(x, y, ScaleKernel(RBFKernel()).double(), input_transform=Normalize(2, bounds=bounds))
    X = 10 * torch.rand(4, 2, dtype=F64) - 3
    posterior = model.posterior(X, observation_noise=True)
    assert_close(posterior.variance, get_pvar_expected(posterior, model, X, 1), 1e-12, 1e-12)
    model.eval()
    eval_mean = model(model.transform_inputs(X)).mean  # the posterior (outcome-transformed) at X
    assert_close(model.outcome_transform.untransform(eval_mean.unsqueeze(-1))[0], model.posterior(X).mean, 1e-12, 0)
    model.train()
    assert_close(model(X).mean, eval_mean, 1e-12, 1e-12)  # training mode: X is transformed here


def test_single_task_gp_signature_and_defaults():
    """Item 7: BoTorchModel(train_X, train_Y, train_Yvar, ..., input_transform=...) builds SingleTaskGP's model
    (default kernel, likelihood, priors and Standardize): fitted, it matches SingleTaskGP."""
    x, y = data(n=20)
    x = 10 * x - 3
    bounds = torch.tensor([[-3.0, -3.0], [7.0, 7.0]], dtype=F64)
    ours = BoTorchModel(x, y, None, input_transform=Normalize(2, bounds=bounds))
    ref = SingleTaskGP(x, y, None, input_transform=Normalize(2, bounds=bounds))
    assert isinstance(ours.outcome_transform, Standardize)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ours.likelihood, ours))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ref.likelihood, ref))
    assert_close(ours.gp.covar_module.lengthscale, ref.covar_module.lengthscale, 1e-5, 1e-5)
    assert_close(ours.likelihood.noise, ref.likelihood.noise, 1e-5, 1e-5)
    X = 10 * torch.rand(3, 2, 2, dtype=F64) - 3
    assert_close(ours.posterior(X).mean, ref.posterior(X).mean, 1e-5, 1e-5)
    observed = BoTorchModel(x, y, torch.full_like(y, 0.01))
    assert observed.gp.likelihood.noise.shape == (20,)
    default = BoTorchModel.from_data(x, y)  # from_data: SingleTaskGP's kernel and Standardize by default
    assert isinstance(default.outcome_transform, Standardize)
    assert type(default.gp.covar_module) is type(ref.covar_module)
    with pytest.raises(TypeError, match="go with train_X, not with a gp"):
        BoTorchModel(default.gp, y)


def test_gpytorch_marginal_likelihoods_and_likelihood_calls_accept_structgp_likelihoods():
    """Item 7: a structgp likelihood is seen as a gpytorch one (same parameters): ExactMarginalLogLikelihood,
    SumMarginalLogLikelihood in a ModelListGP, and likelihood(mvn, X) work."""
    x, y = data(n=15)
    models = [
        BoTorchModel.from_data(x, col, ScaleKernel(RBFKernel()).double(), likelihood=GaussianLikelihood())
        for col in (y, y.cos())
    ]
    fit_gpytorch_mll(ExactMarginalLogLikelihood(models[0].likelihood, models[0]))
    assert models[0].likelihood.noise_covar.likelihood is models[0].gp.likelihood
    X = torch.rand(4, 2, dtype=F64)
    models[0].eval()
    noisy = models[0].likelihood(models[0](X), X)
    assert_close(noisy.variance, models[0](X).variance + models[0].gp.likelihood.noise, 1e-12, 1e-12)
    given = models[0].likelihood(models[0](X), X, noise=torch.full((4,), 0.5, dtype=F64))
    assert_close(given.variance, models[0](X).variance + 0.5, 1e-12, 1e-12)
    model_list = ModelListGP(*models)
    fit_gpytorch_mll(SumMarginalLogLikelihood(model_list.likelihood, model_list))
    assert model_list.posterior(X).mean.shape == (4, 2)
    Xn, Yn = [torch.rand(2, 2, dtype=F64)] * 2, torch.randn(2, 2, dtype=F64)  # through get_fantasy_model
    conditioned = model_list.condition_on_observations(Xn, Yn)
    direct = models[1].condition_on_observations(Xn[1], Yn[:, 1:])
    mean = conditioned.posterior(X).mean
    assert mean.shape == (1, 4, 2)  # as SingleTaskGP's in a ModelListGP (BoTorch adds a batch dim there)
    assert_close(mean[0, :, 1:], direct.posterior(X).mean, 1e-10, 1e-10)


@pytest.mark.parametrize("observed", [False, True])
def test_load_state_dict_warm_start_across_data_sizes(observed):
    """Item 7: the training data (and observed noise) are not in the state dict; the outcome transform loads as
    in BoTorch's models (the targets are re-standardized with the loaded statistics), so BoTorchModel's targets
    equal SingleTaskGP's after the same warm start."""
    x, y = data(n=20)
    yvar = torch.full_like(y, 0.02) if observed else None
    small = BoTorchModel(x[:8], y[:8], None if yvar is None else yvar[:8])
    fit_gpytorch_mll(ExactMarginalLogLikelihood(small.likelihood, small))
    big = BoTorchModel(x, y, yvar)
    big.load_state_dict(small.state_dict())
    ref_small = SingleTaskGP(x[:8], y[:8], None if yvar is None else yvar[:8])
    ref = SingleTaskGP(x, y, yvar)
    ref.load_state_dict(ref_small.state_dict())
    assert_close(big.gp.train_y, ref.train_targets, 1e-12, 1e-12)
    if observed:
        assert_close(big.gp.likelihood.noise, ref.likelihood.noise, 1e-12, 1e-12)
    assert_close(big.gp.covar_module.lengthscale, small.gp.covar_module.lengthscale, 0, 0)
    assert big.posterior(torch.rand(3, 2, dtype=F64)).mean.shape == (3, 1)


def test_nuts_density_of_a_vfe_gp_has_the_trace_term():
    """NUTS samples the density fit() maximises: for a VFE kernel, the collapsed bound (its trace term a factor)."""
    x, y = data(n=15)
    gp = ExactGP(x, y.squeeze(-1), InducingPointKernel(ScaleKernel(RBFKernel()), torch.rand(4, 2), method="vfe"))
    fn, sites = nuts_model(gp, exclude=["kernel.inducing_points"])
    params = dict(gp.named_parameters())
    values = {s.name: s.from_raw(params[s.raw_name]).detach() for s in sites}
    trace = pyro.poutine.trace(pyro.poutine.condition(fn, data=values)).get_trace()
    trace.compute_log_prob()
    assert_close(trace.nodes["bound_correction"]["log_prob"], gp.bound_correction().detach(), 1e-10, 1e-10)
