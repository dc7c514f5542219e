"""Conditioning and fantasizing ``subset_output`` views (float64): independent outputs against BoTorch's
SingleTaskGP / ModelListGP on the kept outputs' data and hyperparameters; correlated tasks against a dense
float64 GP on the heterotopic union of the data."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("botorch")

import gpytorch  # noqa: E402
import torch  # noqa: E402
from botorch.models import ModelListGP, SingleTaskGP  # noqa: E402
from botorch.models.transforms import Standardize  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel  # noqa: E402

from structgp.distributions import GaussianLikelihood  # noqa: E402
from structgp.integrations.botorch import BoTorchModel, EnsembleModel, batch_hyperparameters  # noqa: E402
from structgp.kernels import MultitaskKernel  # noqa: E402
from structgp.models import ExactGP  # noqa: E402
from tests.integrations.botorch_pairs import data  # noqa: E402
from tests.models.dense_gp import DenseGP  # noqa: E402
from tests.reference import F64, assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Non-strict enforcement of botorch tensor conventions")

# three independent outputs, each with its own hyperparameters
OUTPUTSCALE = torch.tensor([1.4, 0.8, 2.0], dtype=F64)
LENGTHSCALE = torch.tensor([[0.3, 0.5], [0.6, 0.25], [0.4, 0.4]], dtype=F64)
NOISE = torch.tensor([0.02, 0.05, 0.01], dtype=F64)
CONSTANT = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
M = 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)  # not the data's seed: test points must not repeat training points


def _sampler(n: int) -> SobolQMCNormalSampler:
    return SobolQMCNormalSampler(torch.Size([n]), seed=1)


def _kernel(idcs: list[int]) -> ScaleKernel:
    batch = torch.Size([len(idcs)]) if len(idcs) > 1 else torch.Size()
    k = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=2, batch_shape=batch), batch_shape=batch).double()
    k.outputscale = OUTPUTSCALE[idcs].reshape(batch)
    k.base_kernel.lengthscale = LENGTHSCALE[idcs].reshape(*batch, 1, 2)
    return k


def _mean(idcs: list[int]) -> gpytorch.means.ConstantMean:
    batch = torch.Size([len(idcs)]) if len(idcs) > 1 else torch.Size()
    mu = gpytorch.means.ConstantMean(batch_shape=batch).double()
    with torch.no_grad():
        mu.constant.copy_(CONSTANT[idcs].reshape(batch))
    return mu


def _ours(x, y, yvar=None, standardize=False) -> BoTorchModel:
    """The structgp model of all ``M`` outputs (independent, as the gp's last batch dim)."""
    lik = None
    if yvar is None:
        lik = GaussianLikelihood(batch_shape=(M,)).double()
        lik.noise = NOISE
    tf = Standardize(M) if standardize else None
    idcs = list(range(M))
    model = BoTorchModel.from_data(
        x, y, _kernel(idcs), train_Yvar=yvar, likelihood=lik, mean=_mean(idcs), outcome_transform=tf
    )
    return model.eval()


def _single_task(x, y, idcs, yvar=None, standardize=False) -> SingleTaskGP:
    """BoTorch's SingleTaskGP on the outputs ``idcs`` only (their data and hyperparameters)."""
    k = len(idcs)
    lik = None
    if yvar is None:
        lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([k]) if k > 1 else torch.Size()).double()
        lik.noise = NOISE[idcs].unsqueeze(-1) if k > 1 else NOISE[idcs]
    model = SingleTaskGP(
        x,
        y[:, idcs],
        train_Yvar=None if yvar is None else yvar[:, idcs],
        likelihood=lik,
        covar_module=_kernel(idcs),
        mean_module=_mean(idcs),
        outcome_transform=Standardize(k) if standardize else None,
    ).eval()
    model.posterior(x)  # gpytorch conditions only after a prediction has built its caches
    return model


def _model_list(x, y, standardize=False) -> ModelListGP:
    return ModelListGP(*[_single_task(x, y, [j], standardize=standardize) for j in range(M)])


def _same(ours, ref, tol: float = 1e-10, samples: bool = True) -> None:
    assert ours.mean.shape == ref.mean.shape
    assert_close(ours.mean, ref.mean, tol, tol)
    assert_close(ours.distribution.covariance_matrix, ref.distribution.covariance_matrix, tol, tol)
    if samples:  # same base samples -> same draws
        assert_close(_sampler(4)(ours), _sampler(4)(ref), 1e-8, 1e-8)


# -- independent outputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("idcs", [[2, 0], [1]])
@pytest.mark.parametrize("standardize", [False, True])
def test_independent_view_conditioning_matches_single_task_gp(idcs, standardize):
    x, y = data(n=10, m=M)
    view = _ours(x, y, standardize=standardize).subset_output(idcs)
    ref = _single_task(x, y, idcs, standardize=standardize)
    Xn, Yn = torch.rand(3, 2, dtype=F64), torch.randn(4, 3, len(idcs), dtype=F64)
    c_ours, c_ref = view.condition_on_observations(Xn, Yn), ref.condition_on_observations(Xn, Yn)
    assert c_ours.num_outputs == c_ref.num_outputs == len(idcs)
    assert c_ours.batch_shape == c_ref.batch_shape == torch.Size([4])
    Xt = torch.rand(2, 1, 5, 2, dtype=F64)
    _same(c_ours.posterior(Xt), c_ref.posterior(Xt))
    # a second step (fantasies of fantasies)
    X2, Y2 = torch.rand(2, 2, dtype=F64), torch.randn(4, 2, len(idcs), dtype=F64)
    _same(c_ours.condition_on_observations(X2, Y2).posterior(Xt), c_ref.condition_on_observations(X2, Y2).posterior(Xt))
    # fantasize on the view
    Xf = torch.rand(4, 2, 2, dtype=F64)
    f_ours, f_ref = view.fantasize(Xf, _sampler(3)), ref.fantasize(Xf, _sampler(3))
    assert f_ours.batch_shape == f_ref.batch_shape == torch.Size([3, 4])
    Xt = torch.rand(3, 4, 1, 2, dtype=F64)
    _same(f_ours.posterior(Xt), f_ref.posterior(Xt))
    # ModelListGP of the outputs gives the same conditioned posterior
    listed = _model_list(x, y, standardize).subset_output(idcs)
    c_list = listed.condition_on_observations([Xn] * len(idcs) if len(idcs) > 1 else Xn, Yn)
    _same(c_ours.posterior(Xt), c_list.posterior(Xt), samples=False)


def test_independent_view_comparison_can_fail():
    """The reference on the outputs in the other order, or conditioning the other output, differs."""
    x, y = data(n=10, m=M)
    view = _ours(x, y).subset_output([2, 0])
    Xn, Yn, Xt = torch.rand(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64), torch.rand(4, 3, 2, dtype=F64)
    post = view.condition_on_observations(Xn, Yn).posterior(Xt)
    with pytest.raises(AssertionError):
        _same(post, _single_task(x, y, [0, 2]).condition_on_observations(Xn, Yn).posterior(Xt), samples=False)
    with pytest.raises(AssertionError):  # the data of output 2 given to output 0 and vice versa
        swapped = _single_task(x, y, [2, 0]).condition_on_observations(Xn, Yn.flip(-1)).posterior(Xt)
        _same(post, swapped, samples=False)


def test_chains_of_full_and_view_steps_match_model_list_gp():
    """Full-model step, then a view's step, then a view of that view's step: the conditioned posterior is the
    ModelListGP's under the same chain (each output sees its own data only)."""
    x, y = data(n=10, m=M)
    ours, ref = _ours(x, y), _model_list(x, y)
    Xa, Ya = torch.rand(2, 2, dtype=F64), torch.randn(2, M, dtype=F64)
    Xn, Yn = torch.rand(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    Xm, Ym = torch.rand(2, 2, dtype=F64), torch.randn(2, 1, dtype=F64)
    a = ours.condition_on_observations(Xa, Ya).subset_output([2, 1]).condition_on_observations(Xn, Yn)
    b = ref.condition_on_observations([Xa] * M, Ya).subset_output([2, 1]).condition_on_observations([Xn] * 2, Yn)
    Xt = torch.rand(4, 3, 2, dtype=F64)
    _same(a.posterior(Xt), b.posterior(Xt), samples=False)
    a1, b1 = a.subset_output([1]), b.subset_output([1])  # output 1 of the gp
    _same(a1.posterior(Xt), b1.posterior(Xt), samples=False)
    _same(a1.condition_on_observations(Xm, Ym).posterior(Xt), b1.condition_on_observations(Xm, Ym).posterior(Xt))
    _same(a.posterior(Xt, output_indices=[0]), b.subset_output([0]).posterior(Xt), samples=False)


def test_independent_view_with_observed_noise_matches_single_task_gp():
    x, y = data(n=10, m=M)
    yvar = torch.linspace(0.01, 0.05, x.shape[0], dtype=F64).unsqueeze(-1) * torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    view, ref = _ours(x, y, yvar=yvar).subset_output([2, 0]), _single_task(x, y, [2, 0], yvar=yvar)
    Xn, Yn = torch.rand(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    noise = torch.tensor([[0.03, 0.2]], dtype=F64).expand(3, 2)
    Xt = torch.rand(4, 3, 2, dtype=F64)
    _same(
        view.condition_on_observations(Xn, Yn, noise=noise).posterior(Xt),
        ref.condition_on_observations(Xn, Yn, noise=noise).posterior(Xt),
    )
    # posterior with a per-output noise tensor in the view's columns, and fantasize with observation noise
    obs_noise = torch.tensor([0.07, 0.01], dtype=F64).expand(4, 3, 2)
    _same(view.posterior(Xt, observation_noise=obs_noise), ref.posterior(Xt, observation_noise=obs_noise))
    Xf = torch.rand(4, 2, 2, dtype=F64)
    fant_noise = torch.tensor([[0.04, 0.09]], dtype=F64)
    f_ours = view.fantasize(Xf, _sampler(3), observation_noise=fant_noise)
    f_ref = ref.fantasize(Xf, _sampler(3), observation_noise=fant_noise)
    Xt = torch.rand(3, 4, 1, 2, dtype=F64)
    _same(f_ours.posterior(Xt), f_ref.posterior(Xt))
    # default noise: the mean of each kept output's training noise (ours is a structgp fixed-noise likelihood,
    # so BoTorch's fantasize asks the posterior for it)
    _same(view.fantasize(Xf, _sampler(3)).posterior(Xt), ref.fantasize(Xf, _sampler(3)).posterior(Xt))


def test_gradcheck_view_conditioning():
    """Differentiable in the test points, the conditioning inputs and the observed values."""
    x, y = data(n=6, m=M)
    view = _ours(x, y).subset_output([2, 0])

    def posterior(X, Xn, Yn):
        post = view.condition_on_observations(Xn, Yn).posterior(X)
        return post.mean, post.distribution.covariance_matrix

    args = (
        torch.rand(2, 2, dtype=F64, requires_grad=True),
        torch.rand(2, 2, dtype=F64, requires_grad=True),
        torch.randn(2, 2, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(posterior, args)


def test_float32_view_conditioning_agrees_with_float64():
    x, y = data(n=10, m=M)
    x32, y32 = x.float(), y.float()
    k32 = _kernel([0, 1, 2]).float()
    lik32 = GaussianLikelihood(batch_shape=(M,))
    lik32.noise = NOISE.float()
    mean32 = _mean([0, 1, 2]).float()
    ours32 = BoTorchModel.from_data(x32, y32, k32, likelihood=lik32, mean=mean32, outcome_transform=None).eval()
    Xn, Yn, Xt = torch.rand(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64), torch.rand(4, 3, 2, dtype=F64)
    p64 = _ours(x, y).subset_output([2, 0]).condition_on_observations(Xn, Yn).posterior(Xt)
    p32 = ours32.subset_output([2, 0]).condition_on_observations(Xn.float(), Yn.float()).posterior(Xt.float())
    assert p32.mean.dtype == torch.float32
    assert_close(p32.mean, p64.mean, 1e-4, 1e-4)
    assert_close(p32.distribution.covariance_matrix, p64.distribution.covariance_matrix, 1e-4, 1e-4)


def test_ensemble_view_conditioning_is_per_member():
    """An ensemble (hyperparameter samples before the output batch dim) conditioned through a view: each sample's
    posterior is that member's view conditioned alone."""
    x, y = data(n=10, m=M)
    gp = _ours(x, y).gp
    name = "kernel.base_kernel.raw_outputscale"
    raw = gp.get_parameter(name).detach()
    values = torch.stack([raw, raw + 0.5, raw - 0.3])
    ensemble = EnsembleModel(batch_hyperparameters(gp, {name: values}), batched_outputs=True)
    Xn, Yn, Xt = torch.rand(2, 2, dtype=F64), torch.randn(4, 1, 2, 2, dtype=F64), torch.rand(3, 2, dtype=F64)
    cond = ensemble.subset_output([2, 0]).condition_on_observations(Xn, Yn)
    assert cond.batch_shape == torch.Size([4, 3])
    post = cond.posterior(Xt)
    for j in range(3):
        member = copy.deepcopy(gp)
        with torch.no_grad():
            member.get_parameter(name).copy_(values[j])
        one = BoTorchModel(member, batched_outputs=True).subset_output([2, 0])
        ref = one.condition_on_observations(Xn, Yn[:, 0]).posterior(Xt)
        assert_close(post.mean[:, j], ref.mean, 1e-12, 1e-12)
        assert_close(post.distribution.covariance_matrix[:, j], ref.distribution.covariance_matrix, 1e-12, 1e-12)


def test_view_conditioning_bad_arguments():
    x, y = data(n=10, m=M)
    ours = _ours(x, y)
    with pytest.raises(ValueError, match=r"Y: expected shape \(..., n, 2\)"):
        ours.subset_output([2, 0]).condition_on_observations(torch.rand(2, 2, dtype=F64), torch.rand(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="repeats independent outputs"):
        ours.subset_output([1, 1]).condition_on_observations(torch.rand(2, 2, dtype=F64), torch.rand(2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"observation_noise: expected shape \(..., q, 2\)"):
        ours.subset_output([2, 0]).posterior(torch.rand(3, 2, dtype=F64), observation_noise=torch.rand(3, 3))


# -- correlated tasks -------------------------------------------------------------------------------------
T = 3


def _multitask(n: int = 7):
    x = torch.rand(n, 2, dtype=F64)
    y = torch.stack([torch.sin(4 * x[:, 0]), torch.cos(3 * x[:, 1]) + x[:, 0], x[:, 0] * x[:, 1]], -1)
    kernel = MultitaskKernel(RBFKernel(), num_tasks=T, rank=2).double()
    with torch.no_grad():
        kernel.task_kernel.covar_factor.copy_(torch.tensor([[1.0, 0.2], [0.7, -0.5], [-0.4, 0.9]], dtype=F64))
    kernel.data_kernel.lengthscale = 0.4
    gp = ExactGP(x, y, kernel)
    gp.likelihood.task_noises = torch.tensor([0.02, 0.05, 0.03], dtype=F64)
    return BoTorchModel(gp).eval(), x, y


class _Heterotopic:
    """Dense float64 GP over (point, task) values from the multitask model's parameters."""

    def __init__(self, model):
        gp = model.gp
        self.b = gp.kernel.task_covariance().detach()
        self.task_noise = (gp.likelihood.task_noises + gp.likelihood.noise).detach()
        self.data_kernel, self.mean = gp.kernel.data_kernel, gp.mean

    def k(self, xa, ta, xb, tb) -> torch.Tensor:
        return (self.data_kernel(xa, xb).to_dense() * self.b[ta][:, tb]).detach()

    def m(self, xs, ts) -> torch.Tensor:
        return self.mean(xs).detach()[torch.arange(xs.shape[0]), ts]

    def posterior(self, xs, ts, ys, xt, tt):
        """The posterior of ``f_tt(xt)`` given ``ys`` = ``f_ts(xs)`` plus the tasks' noise."""
        gp = DenseGP(self.k(xs, ts, xs, ts), torch.diag(self.task_noise[ts]), self.m(xs, ts), ys)
        return gp.posterior(self.k(xt, tt, xs, ts), self.k(xt, tt, xt, tt), self.m(xt, tt))


def _all_tasks(x, tasks):
    """Points ``x`` ``(n, d)`` with each of ``tasks``: point-major ``(n k, d)`` inputs and ``(n k,)`` task ids."""
    k = len(tasks)
    return x.repeat_interleave(k, 0), torch.tensor(tasks).repeat(x.shape[0])


def test_task_view_conditioning_against_dense_heterotopic_gp():
    """A view of tasks [2, 0] conditioned on those tasks' data: every task's posterior moves through the task
    covariance, and equals the dense GP on the training data plus the new rows of tasks 2 and 0."""
    model, x, y = _multitask()
    ref = _Heterotopic(model)
    view = model.subset_output([2, 0])
    Xn, Yn = torch.rand(2, 2, dtype=F64), torch.randn(2, 2, dtype=F64)
    cond = view.condition_on_observations(Xn, Yn)
    xs, ts = _all_tasks(x, [0, 1, 2])
    xn, tn = _all_tasks(Xn, [2, 0])
    xs, ts, ys = torch.cat([xs, xn]), torch.cat([ts, tn]), torch.cat([y.flatten(), Yn.flatten()])
    Xt = torch.rand(3, 2, dtype=F64)
    post = cond.posterior(Xt)
    assert post.mean.shape == (3, 2)
    ref_mean, ref_cov = ref.posterior(xs, ts, ys, *_all_tasks(Xt, [2, 0]))
    assert_close(post.mean.flatten(), ref_mean, 1e-10, 1e-10)
    assert_close(post.distribution.covariance_matrix, ref_cov, 1e-10, 1e-10)  # interleaved: point-major
    # task 0 alone, then a further observation of task 0 only
    Xm, Ym = torch.rand(1, 2, dtype=F64), torch.randn(1, 1, dtype=F64)
    one = cond.subset_output([1]).condition_on_observations(Xm, Ym).posterior(Xt)
    xs, ts, ys = torch.cat([xs, Xm]), torch.cat([ts, torch.tensor([0])]), torch.cat([ys, Ym.flatten()])
    ref_mean, ref_cov = ref.posterior(xs, ts, ys, Xt, torch.zeros(3, dtype=torch.long))
    assert one.mean.shape == (3, 1)
    assert_close(one.mean.squeeze(-1), ref_mean, 1e-10, 1e-10)
    assert_close(one.distribution.covariance_matrix, ref_cov, 1e-10, 1e-10)


def test_task_view_after_full_step_and_fantasies():
    """A full-model step (all tasks), then a view's step with fantasy batch dims, against the dense reference;
    fantasize on a task view is posterior draws then conditioning on them."""
    model, x, y = _multitask()
    ref = _Heterotopic(model)
    Xa, Ya = torch.rand(2, 2, dtype=F64), torch.randn(2, T, dtype=F64)
    Xn, Yn = torch.rand(2, 2, dtype=F64), torch.randn(3, 2, 1, dtype=F64)
    cond = model.condition_on_observations(Xa, Ya).subset_output([1]).condition_on_observations(Xn, Yn)
    assert cond.batch_shape == torch.Size([3])
    Xt = torch.rand(2, 2, dtype=F64)
    post = cond.posterior(Xt)
    xs, ts = _all_tasks(torch.cat([x, Xa]), [0, 1, 2])
    for f in range(3):
        xf, tf = torch.cat([xs, Xn]), torch.cat([ts, torch.ones(2, dtype=torch.long)])
        yf = torch.cat([y.flatten(), Ya.flatten(), Yn[f, :, 0]])
        ref_mean, ref_cov = ref.posterior(xf, tf, yf, Xt, torch.ones(2, dtype=torch.long))
        assert_close(post.mean[f, :, 0], ref_mean, 1e-10, 1e-10)
        assert_close(post.distribution.covariance_matrix[f], ref_cov, 1e-10, 1e-10)
    view = model.subset_output([2, 0])
    Xf = torch.rand(4, 2, 2, dtype=F64)
    fant = view.fantasize(Xf, _sampler(3))
    draws = _sampler(3)(view.posterior(Xf, observation_noise=True))
    manual = view.condition_on_observations(Xf, draws)
    Xt = torch.rand(3, 4, 2, 2, dtype=F64)
    _same(fant.posterior(Xt), manual.posterior(Xt))
    assert fant.batch_shape == torch.Size([3, 4])


def test_gradcheck_task_view_conditioning():
    model, _, _ = _multitask(n=5)
    view = model.subset_output([2, 0])

    def posterior(X, Xn, Yn):
        post = view.condition_on_observations(Xn, Yn).posterior(X)
        return post.mean, post.distribution.covariance_matrix

    args = (
        torch.rand(2, 2, dtype=F64, requires_grad=True),
        torch.rand(1, 2, dtype=F64, requires_grad=True),
        torch.randn(1, 2, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(posterior, args)
