"""The BoTorch adapter against BoTorch's own SingleTaskGP (same data and hyperparameters, float64) and against
dense float64 references for the structured models (multitask Kronecker, grid)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("botorch")

import gpytorch  # noqa: E402
import torch  # noqa: E402
from botorch.acquisition import (  # noqa: E402
    LogExpectedImprovement,
    ScalarizedPosteriorTransform,
    qKnowledgeGradient,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
)
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models.transforms import Normalize, Standardize  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.posteriors import GPyTorchPosterior  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.kernels import RBFKernel, ScaleKernel  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402

from structgp.integrations.botorch import BoTorchModel, StructuredMarginalLogLikelihood, joint  # noqa: E402
from structgp.kernels import GridKernel, MultitaskKernel  # noqa: E402
from structgp.models import ExactGP  # noqa: E402
from tests.integrations.botorch_pairs import data, pair  # noqa: E402
from tests.models.dense_gp import DenseGP  # noqa: E402
from tests.reference import F64, assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Non-strict enforcement of botorch tensor conventions")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # not the data's seed: test points must not repeat training points


def _sampler(n: int = 8, seed: int = 1) -> SobolQMCNormalSampler:
    return SobolQMCNormalSampler(torch.Size([n]), seed=seed)


def _same_posterior(ours, ref, tol: float = 1e-9, samples: bool = True) -> None:
    assert isinstance(ours, GPyTorchPosterior)
    assert ours.mean.shape == ref.mean.shape
    assert_close(ours.mean, ref.mean, tol, tol)
    assert_close(ours.variance, ref.variance, tol, tol)
    assert_close(ours.distribution.covariance_matrix, ref.distribution.covariance_matrix, tol, tol)
    if samples:  # same base samples -> same draws (both roots are the Cholesky factor of the same matrix)
        assert_close(_sampler()(ours), _sampler()(ref), 1e-7, 1e-7)
        assert ours.base_sample_shape == ref.base_sample_shape


# -- import hygiene ---------------------------------------------------------------------------------------
def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_import_structgp_leaves_botorch_unimported():
    code = """
        import sys
        import structgp, structgp.integrations, structgp.integrations.gpytorch, structgp.models
        before = sorted(m for m in sys.modules if m.split('.')[0] == 'botorch')
        import structgp.integrations.botorch  # the adapter itself does import botorch
        print(json.dumps([before, 'botorch' in sys.modules]))
    """
    assert json.loads(_run("import json\n" + textwrap.dedent(code))) == [[], True]


def test_importing_botorch_does_not_change_structgp_results():
    """botorch sets linear_operator/gpytorch defaults (dense Cholesky up to 4096, no fast solves); structgp's
    numbers (exact GP, Kronecker grid model over 900 points, samples) are the same before and after."""
    code = """
        import json, sys, torch
        from gpytorch.kernels import RBFKernel, ScaleKernel
        from structgp.kernels import GridKernel
        from structgp.models import ExactGP
        torch.manual_seed(0)
        x = torch.rand(40, 2, dtype=torch.float64); y = torch.sin(3 * x).sum(-1)
        axes = [torch.linspace(0, 1, 30, dtype=torch.float64)] * 2
        g = torch.cartesian_prod(*axes); yg = torch.sin(4 * g).sum(-1)
        xt = torch.rand(5, 2, dtype=torch.float64)

        def results():
            out = []
            for xs, ys, k in ((x, y, ScaleKernel(RBFKernel())), (g, yg, GridKernel([RBFKernel(), RBFKernel()], axes))):
                gp = ExactGP(xs, ys, k.double())
                post = gp.posterior(xt)
                torch.manual_seed(1)
                out += [gp.marginal_log_likelihood(), post.mean, post.variance, post.rsample((3,)),
                        gp.marginal().log_prob(ys)]
            return [t.detach().flatten().tolist() for t in out]

        before = results()
        import botorch  # noqa: F401
        assert "botorch" in sys.modules
        after = results()
        print(json.dumps(max(abs(a - b) for u, v in zip(before, after) for a, b in zip(u, v))))
    """
    assert json.loads(_run(code)) == 0.0


# -- posteriors against SingleTaskGP ----------------------------------------------------------------------
def test_posterior_matches_single_task_gp():
    x, y = data()
    ours, ref = pair(x, y)
    assert ours.num_outputs == ref.num_outputs == 1 and ours.batch_shape == ref.batch_shape
    X = torch.rand(4, 3, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X))
    _same_posterior(ours.posterior(X, observation_noise=True), ref.posterior(X, observation_noise=True))
    noise = torch.full((4, 3, 1), 0.1, dtype=F64)
    _same_posterior(ours.posterior(X, observation_noise=noise), ref.posterior(X, observation_noise=noise))
    # differentiable with respect to X, with BoTorch's gradient
    grads = []
    for model in (ours, ref):
        Xg = X.clone().requires_grad_()
        post = model.posterior(Xg)
        (post.mean.sum() + post.variance.sum() + _sampler()(post).sum()).backward()
        grads.append(Xg.grad)
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[1], 1e-7, 1e-7)


def test_transforms_match_single_task_gp():
    x, y = data()
    x, y = 10 * x - 3, 5 * y + 2  # Normalize and Standardize have work to do
    bounds = torch.tensor([[-3.0, -3.0], [7.0, 7.0]], dtype=F64)
    ours, ref = pair(x, y, input_transform=Normalize(2, bounds=bounds), outcome_transform=Standardize(1))
    ref.posterior(x)  # gpytorch conditions only after a prediction has built its caches
    assert_close(ours.gp.train_y, (y.squeeze(-1) - y.mean()) / y.std(), 1e-12, 1e-12)
    X = 10 * torch.rand(3, 2, 2, dtype=F64) - 3
    _same_posterior(ours.posterior(X), ref.posterior(X))
    _same_posterior(ours.posterior(X, observation_noise=True), ref.posterior(X, observation_noise=True))
    Xn, Yn = 10 * torch.rand(2, 2, dtype=F64) - 3, 5 * torch.randn(4, 2, 1, dtype=F64)
    c_ours, c_ref = ours.condition_on_observations(Xn, Yn), ref.condition_on_observations(Xn, Yn)
    Xt = 10 * torch.rand(3, 2, dtype=F64) - 3
    _same_posterior(c_ours.posterior(Xt), c_ref.posterior(Xt), 1e-8)


def test_condition_and_fantasize_match_single_task_gp():
    x, y = data()
    ours, ref = pair(x, y)
    ref.posterior(x)  # gpytorch conditions only after a prediction has built its caches
    Xn, Yn = torch.rand(3, 2, dtype=F64), torch.randn(5, 3, 1, dtype=F64)
    c_ours, c_ref = ours.condition_on_observations(Xn, Yn), ref.condition_on_observations(Xn, Yn)
    assert c_ours.batch_shape == c_ref.batch_shape == torch.Size([5])
    assert c_ours.gp is ours.gp  # a view: the gp (and its cached training solve) is shared
    Xt = torch.rand(2, 1, 4, 2, dtype=F64)
    _same_posterior(c_ours.posterior(Xt), c_ref.posterior(Xt), 1e-8)
    # twice: fantasies of fantasies
    X2, Y2 = torch.rand(1, 2, dtype=F64), torch.randn(5, 1, 1, dtype=F64)
    _same_posterior(
        c_ours.condition_on_observations(X2, Y2).posterior(Xt),
        c_ref.condition_on_observations(X2, Y2).posterior(Xt),
        1e-8,
    )
    Xf = torch.rand(4, 2, 2, dtype=F64)
    f_ours, f_ref = ours.fantasize(Xf, _sampler(3)), ref.fantasize(Xf, _sampler(3))
    assert f_ours.batch_shape == f_ref.batch_shape == torch.Size([3, 4])
    Xt = torch.rand(3, 4, 1, 2, dtype=F64)
    _same_posterior(f_ours.posterior(Xt), f_ref.posterior(Xt), 1e-8)


def test_fixed_noise_fantasy_matches_single_task_gp():
    x, y = data()
    yvar = torch.linspace(0.01, 0.05, x.shape[0], dtype=F64).unsqueeze(-1)
    ours, ref = pair(x, y, train_yvar=yvar)
    X = torch.rand(4, 2, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X))
    f_ours, f_ref = ours.fantasize(X, _sampler(3)), ref.fantasize(X, _sampler(3))
    Xt = torch.rand(3, 4, 1, 2, dtype=F64)
    _same_posterior(f_ours.posterior(Xt), f_ref.posterior(Xt), 1e-8)


def test_gradcheck_posterior_and_conditioning():
    """Posterior mean and covariance are differentiable with respect to X, and a conditioned model's also with
    respect to the conditioning inputs (one-shot KG optimises those)."""
    x, y = data(n=6)
    ours, _ = pair(x, y)
    Yn = torch.randn(2, 1, dtype=F64)

    def posterior(X, Xn=None):
        model = ours if Xn is None else ours.condition_on_observations(Xn, Yn)
        post = model.posterior(X)
        return post.mean, post.distribution.covariance_matrix

    X = torch.rand(2, 2, 2, dtype=F64, requires_grad=True)
    Xn = torch.rand(2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(posterior, (X,))
    assert torch.autograd.gradcheck(posterior, (X, Xn))


ACQUISITIONS = {
    "qLogEI": (lambda m, x, y: qLogExpectedImprovement(m, y.max(), sampler=_sampler(16)), 2),
    "qLogNEI": (
        lambda m, x, y: qLogNoisyExpectedImprovement(
            m, x, sampler=_sampler(16), cache_root=False, prune_baseline=False
        ),
        2,
    ),
    "LogEI": (lambda m, x, y: LogExpectedImprovement(m, y.max()), 1),
    "qKG": (lambda m, x, y: qKnowledgeGradient(m, num_fantasies=3, sampler=_sampler(3)), 1),
}


@pytest.mark.parametrize("name", ACQUISITIONS)
def test_acquisition_functions(name):
    """Each acquisition function: BoTorch's value and gradient with respect to X, and optimize_acqf runs."""
    make, q = ACQUISITIONS[name]
    x, y = data()
    ours, ref = pair(x, y)
    extra = 3 if name == "qKG" else 0  # one-shot KG: q points, then the fantasies' solutions
    X = torch.rand(3, q + extra, 2, dtype=F64)
    values, grads = [], []
    for model in (ours, ref):
        Xg = X.clone().requires_grad_()
        value = make(model, x, y)(Xg)
        value.sum().backward()
        values.append(value)
        grads.append(Xg.grad)
    assert values[0].shape == (3,) and bool(torch.isfinite(values[0]).all())
    assert_close(values[0], values[1], 1e-7, 1e-7)
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[1], 1e-6, 1e-6)
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    cand, value = optimize_acqf(make(ours, x, y), bounds, q=q, num_restarts=2, raw_samples=8, options={"maxiter": 5})
    assert cand.shape == (q, 2) and bool(((cand >= 0) & (cand <= 1)).all()) and bool(torch.isfinite(value).all())


# -- fitting ----------------------------------------------------------------------------------------------
def test_fit_gpytorch_mll_matches_botorch_fit():
    """fit_gpytorch_mll (scipy L-BFGS-B) on the structured loss reaches BoTorch's fit of SingleTaskGP."""
    x, y = data(n=20)
    ours, ref = pair(x, y)
    fit_gpytorch_mll(StructuredMarginalLogLikelihood(ours))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(ref.likelihood, ref))
    assert not ours.training
    ref_mll = ExactMarginalLogLikelihood(ref.likelihood, ref).train()
    ref.train()
    ref_value = ref_mll(ref(*ref.train_inputs), ref.train_targets)
    assert_close(-ours.gp.loss(), ref_value, 1e-6, 1e-6)
    assert_close(ours.gp.likelihood.noise, ref.likelihood.noise.squeeze(), 1e-3, 1e-4)
    ls = ours.gp.kernel.base_kernel.base_kernel.lengthscale
    assert_close(ls, ref.covar_module.base_kernel.lengthscale, 1e-3, 1e-3)


def test_fit_paths_agree():
    """structgp's own fit and fit_gpytorch_mll with gpytorch's ExactMarginalLogLikelihood (model with a
    gpytorch likelihood: the model's compute_custom_loss is used) reach the same optimum."""
    x, y = data(n=20)
    a = BoTorchModel(ExactGP(x, y.squeeze(-1), ScaleKernel(RBFKernel()).double()))
    b = copy.deepcopy(a)
    b.gp.likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    b.gp.likelihood.noise = a.gp.likelihood.noise.detach()
    start = float(a.gp.loss().detach())
    a.gp.fit(progress=False)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(b.likelihood, b))
    assert float(a.gp.loss().detach()) < start - 0.1
    assert_close(a.gp.loss(), b.gp.loss(), 1e-5, 1e-5)


def test_float32_agrees_with_float64():
    x, y = data()
    models = [
        BoTorchModel.from_data(x.to(dtype), y.to(dtype), ScaleKernel(RBFKernel()).to(dtype))
        for dtype in (torch.float32, F64)
    ]
    X = torch.rand(4, 3, 2, dtype=F64, requires_grad=True)
    p32, p64 = models[0].posterior(X.float()), models[1].posterior(X)
    assert p32.mean.dtype == torch.float32 and p32.distribution.lazy_covariance_matrix.dtype == torch.float32
    assert_close(p32.mean, p64.mean, 1e-5, 1e-5)
    assert_close(p32.distribution.covariance_matrix, p64.distribution.covariance_matrix, 1e-5, 1e-5)
    _sampler()(p32).sum().backward()
    assert bool(torch.isfinite(X.grad).all()) and X.grad.abs().sum() > 0


# -- multiple outputs -------------------------------------------------------------------------------------
def test_independent_outputs_match_single_task_gp():
    x, y = data(m=2)
    ours, ref = pair(x, y)
    assert ours.num_outputs == ref.num_outputs == 2 and ours.batch_shape == ref.batch_shape == torch.Size()
    X = torch.rand(4, 3, 2, dtype=F64)
    _same_posterior(ours.posterior(X), ref.posterior(X))
    full = ref.posterior(X)  # (SingleTaskGP's posterior(X, output_indices=[1]) and subset_output raise here)
    for one in (ours.posterior(X, output_indices=[1]), ours.subset_output([1]).posterior(X)):
        assert one.mean.shape == (4, 3, 1)
        assert_close(one.mean, full.mean[..., 1:], 1e-9, 1e-9)
        assert_close(one.variance, full.variance[..., 1:], 1e-9, 1e-9)
        block = full.distribution.covariance_matrix[..., 3:, 3:]  # output-major: output 1's q x q block
        assert_close(one.distribution.covariance_matrix, block, 1e-9, 1e-9)
    f_ours, f_ref = ours.fantasize(X, _sampler(3)), ref.fantasize(X, _sampler(3))
    Xt = torch.rand(3, 4, 1, 2, dtype=F64)
    _same_posterior(f_ours.posterior(Xt), f_ref.posterior(Xt), 1e-8)


def _multitask_model(n=8, t=2):
    x = torch.rand(n, 2, dtype=F64)
    y = torch.stack([torch.sin(4 * x[:, 0]), torch.cos(3 * x[:, 1]) + x[:, 0]], -1)[:, :t]
    kernel = MultitaskKernel(RBFKernel(), num_tasks=t, rank=1).double()
    with torch.no_grad():
        kernel.task_kernel.covar_factor.copy_(torch.tensor([[1.0], [0.7]], dtype=F64)[:t])
    kernel.data_kernel.lengthscale = 0.4
    gp = ExactGP(x, y, kernel)
    gp.likelihood.task_noises = torch.tensor([0.02, 0.05], dtype=F64)[:t]
    return BoTorchModel(gp), x, y


def _multitask_reference(model, x, y):
    """Dense float64 GP over the ``n t`` values (point-major) from the kernel's and likelihood's parameters."""
    gp = model.gp
    b = gp.kernel.task_kernel.covar_factor @ gp.kernel.task_kernel.covar_factor.mT + torch.diag(
        gp.kernel.task_kernel.var
    )
    lik = gp.likelihood
    noise = torch.diag(lik.task_noises + lik.noise).detach()
    t = y.shape[-1]

    def k(a, c):
        return torch.kron(gp.kernel.data_kernel(a, c).to_dense(), b).detach()

    mean = gp.mean(x).detach().flatten()
    dense = DenseGP(k(x, x), torch.kron(torch.eye(x.shape[0], dtype=F64), noise), mean, y.flatten())
    return dense, k, lambda xt: gp.mean(xt).detach().flatten(-2), noise, t


def test_multitask_kronecker_against_dense_reference():
    model, x, y = _multitask_model()
    dense, k, mean_at, noise, t = _multitask_reference(model, x, y)
    X = torch.rand(3, 2, 2, dtype=F64)
    post = model.posterior(X)
    assert model.num_outputs == 2 and post.mean.shape == (3, 2, 2)
    for i in range(3):
        ref_mean, ref_cov = dense.posterior(k(X[i], x), k(X[i], X[i]), mean_at(X[i]))
        assert_close(post.mean[i].flatten(), ref_mean, 1e-9, 1e-9)
        assert_close(post.distribution.covariance_matrix[i], ref_cov, 1e-9, 1e-9)  # interleaved = point-major
    one = model.posterior(X, output_indices=[1])
    assert one.mean.shape == (3, 2, 1)
    assert_close(one.variance.squeeze(-1), post.variance[..., 1], 1e-12, 1e-12)
    assert_close(model.subset_output([1]).posterior(X).mean, one.mean, 1e-12, 1e-12)
    weights = torch.tensor([0.3, -1.2], dtype=F64)
    scalar = model.posterior(X, posterior_transform=ScalarizedPosteriorTransform(weights))
    assert_close(scalar.mean.squeeze(-1), post.mean @ weights, 1e-12, 1e-12)
    cov = post.distribution.covariance_matrix.unflatten(-1, (2, 2)).unflatten(-3, (2, 2))
    expected = torch.einsum("bitjs,t,s->bij", cov, weights, weights).diagonal(dim1=-2, dim2=-1)
    assert_close(scalar.variance.squeeze(-1), expected, 1e-10, 1e-10)
    # conditioning = the dense GP on the union of the data
    Xn, Yn = torch.rand(2, 2, dtype=F64), torch.randn(2, t, dtype=F64)
    cond = model.condition_on_observations(Xn, Yn).posterior(X[0])
    xu = torch.cat([x, Xn])
    union = DenseGP(
        k(xu, xu), torch.kron(torch.eye(xu.shape[0], dtype=F64), noise), mean_at(xu), torch.cat([y, Yn]).flatten()
    )
    ref_mean, ref_cov = union.posterior(k(X[0], xu), k(X[0], X[0]), mean_at(X[0]))
    assert_close(cond.mean.flatten(), ref_mean, 1e-9, 1e-9)
    assert_close(cond.distribution.covariance_matrix, ref_cov, 1e-9, 1e-9)


def test_grid_model_takes_batched_inputs_and_conditions_off_the_grid():
    """A grid kernel takes unbatched inputs only: the adapter poses BoTorch's batches as chunks of one input
    (the joint of each chunk, its diagonal blocks kept) and conditions on points off the grid exactly."""
    axes = [torch.linspace(0, 1, 6, dtype=F64), torch.linspace(0, 1, 5, dtype=F64)]
    ks = [ScaleKernel(RBFKernel()).double(), RBFKernel().double()]
    ks[0].outputscale, ks[0].base_kernel.lengthscale, ks[1].lengthscale = 1.3, 0.3, 0.4
    x = torch.cartesian_prod(*axes)
    y = torch.sin(4 * x[:, 0]) * x[:, 1]
    model = BoTorchModel(ExactGP(x, y, GridKernel(ks, axes)))
    model.gp.likelihood.noise = torch.tensor(0.01, dtype=F64)

    def k(a, b):  # differentiable in a and b (the reference for gradients too)
        return ks[0](a[:, :1], b[:, :1]).to_dense() * ks[1](a[:, 1:], b[:, 1:]).to_dense()

    c = float(model.gp.mean.constant.detach())
    eye = 0.01 * torch.eye(x.shape[0], dtype=F64)
    dense = DenseGP(k(x, x).detach(), eye, torch.full_like(y, c), y)
    X = torch.rand(5, 3, 2, dtype=F64)
    chunk = joint.CHUNK_VALUES
    joint.CHUNK_VALUES = 6  # two point sets a chunk: the chunked path is exercised
    try:
        post = model.posterior(X)
    finally:
        joint.CHUNK_VALUES = chunk
    for i in range(5):
        ref_mean, ref_cov = dense.posterior(k(X[i], x), k(X[i], X[i]), torch.full((3,), c, dtype=F64))
        assert_close(post.mean[i, :, 0], ref_mean, 1e-9, 1e-9)
        assert_close(post.distribution.covariance_matrix[i], ref_cov, 1e-9, 1e-9)
    Xg = X[:2].clone().requires_grad_()
    post = model.posterior(Xg)
    (post.mean.sum() + post.distribution.covariance_matrix.sum()).backward()
    ref_grad = torch.zeros_like(Xg)
    for i in range(2):
        Xi = X[i].clone().requires_grad_()
        ref_mean, ref_cov = dense.posterior(k(Xi, x), k(Xi, Xi), torch.full((3,), c, dtype=F64))
        (ref_mean.sum() + ref_cov.sum()).backward()
        ref_grad[i] = Xi.grad
    assert_close(Xg.grad, ref_grad, 1e-8, 1e-8)
    Xn, Yn = torch.rand(2, 2, dtype=F64), torch.randn(2, 1, dtype=F64)
    cond = model.condition_on_observations(Xn, Yn).posterior(X)
    xu = torch.cat([x, Xn])
    union = DenseGP(
        k(xu, xu),
        0.01 * torch.eye(xu.shape[0], dtype=F64),
        torch.full((xu.shape[0],), c, dtype=F64),
        torch.cat([y, Yn[:, 0]]),
    )
    ref_mean, ref_cov = union.posterior(k(X[2], xu), k(X[2], X[2]), torch.full((3,), c, dtype=F64))
    assert_close(cond.mean[2, :, 0], ref_mean, 1e-9, 1e-9)
    assert_close(cond.distribution.covariance_matrix[2], ref_cov, 1e-9, 1e-9)


# -- arguments --------------------------------------------------------------------------------------------
def test_bad_arguments():
    x, y = data()
    ours, _ = pair(x, y)
    with pytest.raises(TypeError, match="gp: expected a structgp.models.ExactGP"):
        BoTorchModel(object())
    with pytest.raises(ValueError, match="batched_outputs: expected the gp's train_y"):
        BoTorchModel(ours.gp, batched_outputs=True)
    with pytest.raises(ValueError, match=r"Y: expected shape \(..., n, 1\)"):
        ours.condition_on_observations(torch.rand(2, 2, dtype=F64), torch.rand(2, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"idcs: expected indices in \[0, 1\)"):
        ours.subset_output([1])
    assert ours.subset_output([0]) is ours
    with pytest.raises(ValueError, match="X: expected a tensor"):
        ours.posterior(torch.rand(2, dtype=F64))
    with pytest.raises(TypeError, match="model: expected a structgp BoTorchModel"):
        StructuredMarginalLogLikelihood(object())
