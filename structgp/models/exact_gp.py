"""ExactGP: a Gaussian process with Gaussian noise that stays structured from fitting to prediction.

    y = f(x) + e,   f ~ GP(m, k),   e ~ N(0, N)
    log p(y) = -1/2 ((y - m)^T (K + N)^{-1} (y - m) + log det (K + N) + n log 2 pi)

The kernel maps the training inputs to a structured operator ``K`` (Dense, Kronecker, LowRank,
SparseLifted, BlockDiag, ...) and the likelihood adds its noise operator, so ``K + N`` keeps its
structure and every question (the marginal likelihood while fitting, the training solve and the
predictive variances) is answered by the engine :func:`structgp.plan` picks for it. Scalable models are
this same class with a structured kernel.

Posterior covariance (``posterior(x)``): a lazy :class:`PosteriorCovariance` ``K_** - left right^T``,
holding ``n_* x r`` tensors (``r = N`` for general kernels, the number of inducing points for low-rank
ones). Its variance is cheap; the ``n_* x n_*`` matrix is formed only for joint questions (``log_prob``,
joint samples, ``covariance_matrix``), by the dense Cholesky engine: fine for small test sets, and
``predict`` (chunked marginals) is the path for large ones.

Modes (as gpytorch's ``ExactGP``): ``model(x)`` is the *prior* of ``f`` at ``x`` in training mode (so the gpytorch
loop ``loss = -mll(model(train_x), train_y)`` optimises the marginal likelihood, the same objective as
:meth:`ExactGP.fit`) and the *posterior* in eval mode. A model starts in eval mode and ``fit()`` leaves it there.
The distribution is of the likelihood's library: a structgp ``MultivariateNormal`` for structgp likelihoods (for
structgp's ``ExactMarginalLogLikelihood``), its gpytorch view (``to_gpytorch()``, still structured) for gpytorch
likelihoods (for gpytorch's ``ExactMarginalLogLikelihood`` and ``likelihood(model(x))``).

Caching: the training solve (``K + N``, ``alpha = (K + N)^{-1} (y - m)`` and, for low-rank kernels,
``F^T (K + N)^{-1} F``) is computed without gradients and kept until a parameter or buffer changes (see
:class:`TrainingCache`); predictions are then differentiable with respect to the test inputs and, through
the cross-covariances, the kernel hyperparameters, but treat the training solve as a constant. Pass
``cache=False`` for gradients through everything.
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor, nn

from structgp import _config, distributed
from structgp.covariance import Operator
from structgp.distributions import GaussianLikelihood, MultivariateNormal
from structgp.kernels import DenseKernel, Kernel, as_kernel
from structgp.models import added_loss
from structgp.models.fit import Optimizer, minimise
from structgp.models.noise import fixed_noise_at_test, noise_operator
from structgp.models.posterior_covariance import PosteriorCovariance
from structgp.models.prediction import (
    TrainingSolve,
    checked_lanczos,
    chunk_size,
    dense_terms,
    factor_terms,
    solve_training,
    use_lanczos,
)
from structgp.models.training_cache import TrainingCache
from structgp.models.training_data import check_replacement, fantasy_copy

_ALIASES = {"covar_module": "kernel", "mean_module": "mean"}  # gpytorch's names of the model's modules


class ExactGP(gpytorch.models.GP):
    """An exact GP regression model on a structured kernel.

    train_x: training inputs ``(..., n, d)`` (``(n,)`` is ``(n, 1)``; whatever the kernel takes, e.g. weight
        matrices for an aggregation kernel); train_y: targets ``(..., n)`` (or ``(..., n, 1)``), or
        ``(..., n, t)`` for a kernel with ``t = kernel.num_tasks > 1`` outputs; kernel: a structgp kernel or a
        gpytorch kernel (wrapped in ``DenseKernel``); likelihood: a Gaussian likelihood (default: learned
        homoskedastic noise, a structgp ``GaussianLikelihood``; per-task noise, a gpytorch
        ``MultitaskGaussianLikelihood(rank=0)``, for several tasks); mean: a gpytorch mean (default
        ``ConstantMean``, per task for several tasks).

    Batch dims of ``train_y`` (and of the kernel's hyperparameters) give a batch of independent GPs. The
    model's parameters and buffers are cast to the dtype of ``train_y`` (float32 or float64). The training
    data are not in the state dict (as in gpytorch), so hyperparameters load into a model of any data size.

    gpytorch's names reach the same modules: ``covar_module`` is the gpytorch kernel given (or the structgp
    kernel), so ``model.covar_module.base_kernel.lengthscale`` is where a gpytorch user finds it, and
    ``mean_module`` is the mean.
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        kernel: Kernel | gpytorch.kernels.Kernel,
        likelihood: nn.Module | None = None,
        mean: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.kernel = as_kernel(kernel, "kernel")
        train_x = self.kernel.check_inputs(train_x, "train_x")
        n, t = self.kernel.num_points(train_x), self.kernel.num_tasks
        train_y = _check_targets(train_y, n, t)
        batch = train_y.shape[: train_y.dim() - (2 if t > 1 else 1)]
        self.likelihood = likelihood if likelihood is not None else _default_likelihood(t, batch)
        self.mean = mean if mean is not None else _default_mean(t, batch)
        if not isinstance(self.mean, nn.Module):
            raise TypeError(f"mean: expected a gpytorch mean (a torch.nn.Module), got {type(self.mean).__name__}")
        _check_batches(train_x, batch)
        self.register_buffer("train_x", train_x, persistent=False)
        self.register_buffer("train_y", train_y, persistent=False)
        self.to(train_y.dtype)
        self._solved = TrainingCache()
        self.training = False  # ready to predict; the gpytorch loop calls model.train() (this module's flag only)
        with torch.no_grad():
            self.noise_covariance(n)  # a likelihood that does not fit the data fails here, clearly
        distributed.check_consistent(train_x=train_x, train_y=train_y)  # every rank the same data (or none)

    # -- gpytorch's names -----------------------------------------------------------------------------
    @property
    def covar_module(self) -> nn.Module:
        """The gpytorch kernel the model was given (a structgp kernel as it is), gpytorch's name for it."""
        return self.kernel.base_kernel if type(self.kernel) is DenseKernel else self.kernel

    @property
    def mean_module(self) -> nn.Module:
        return self.mean

    def __setattr__(self, name: str, value) -> None:
        if name in _ALIASES:  # model.covar_module = k sets the kernel (nn.Module would register a new child)
            name, value = _ALIASES[name], (as_kernel(value, name) if name == "covar_module" else value)
        super().__setattr__(name, value)

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.kernel.num_tasks

    @property
    def num_data(self) -> int:
        """``N = n t``, the number of training values."""
        return self.kernel.num_points(self.train_x) * self.num_tasks

    # -- the marginal likelihood ----------------------------------------------------------------------
    def prior_mean(self, x: Tensor) -> Tensor:
        """``m(x)`` flattened ``(..., n t)``."""
        n, t = self.kernel.num_points(x), self.num_tasks
        m = self.mean(x)
        if t == 1:
            return m
        if m.dim() >= 2 and m.shape[-2:] == (n, t):
            return m.flatten(-2)
        return m.unsqueeze(-1).expand(*m.shape, t).flatten(-2)

    def noise_covariance(self, n: int, *, test_noise: Tensor | None = None, dtype=None, device=None) -> Operator:
        """The likelihood's noise operator for ``n`` points (test points: ``test_noise`` for fixed noise)."""
        dtype = self.train_y.dtype if dtype is None else dtype
        device = self.train_y.device if device is None else device
        return noise_operator(self.likelihood, n, self.num_tasks, dtype=dtype, device=device, test_noise=test_noise)

    def train_covariance(self) -> Operator:
        """``K + N`` at the training inputs, structured."""
        k = self.kernel(self.train_x)
        return k + self.noise_covariance(self.kernel.num_points(self.train_x), dtype=k.dtype, device=k.device)

    def marginal(self, validate_args: bool | None = None) -> MultivariateNormal:
        """The marginal distribution of the training targets ``N(m(X), K + N)`` (flattened for several tasks)."""
        return MultivariateNormal(self.prior_mean(self.train_x), self.train_covariance(), validate_args=validate_args)

    def marginal_log_likelihood(self) -> Tensor:
        """``log p(y)`` ``(*batch)``, by one structured ``inv_quad_logdet`` (plus the kernel's
        :meth:`bound_correction` for a variational bound: VFE).

        The distribution's argument validation is skipped: it reads the covariance's diagonal, which is not
        cheap for every structure (a ``SparseLifted`` visits all within-row pairs of its lift) and would be
        paid at every step of a fit.
        """
        value = self.marginal(validate_args=False).log_prob(self._flat_targets())
        correction = self.bound_correction()
        return value if correction is None else value + correction

    def bound_correction(self) -> Tensor | None:
        """The kernel's variational-bound term at the training inputs ``(*batch)`` (VFE's
        ``-tr(K - Q) / (2 sigma^2)``), or None for an exact marginal likelihood."""
        if type(self.kernel).bound_correction is Kernel.bound_correction:
            return None  # the kernel adds nothing: skip the noise diagonal
        noise = self.noise_covariance(self.kernel.num_points(self.train_x)).diagonal()
        return self.kernel.bound_correction(self.train_x, noise)

    def log_prior(self) -> Tensor:
        """The summed log densities of the hyperparameter priors (gpytorch priors and likelihood priors)."""
        total = torch.zeros((), dtype=self.train_y.dtype, device=self.train_y.device)
        for module in _prior_holders(self):
            if isinstance(module, gpytorch.Module):
                for _, owner, prior, closure, _ in module.named_priors():
                    total = total + prior.log_prob(closure(owner)).sum()
            else:
                total = total + module.log_prior()
        return total

    def loss(self) -> Tensor:
        """The fitting objective ``-(sum_batch log p(y) + log prior) / N``."""
        return -(self.marginal_log_likelihood().sum() + self.log_prior()) / self.num_data

    def fit(
        self,
        optimizer: Optimizer = "lbfgs",
        iterations: int | None = None,
        lr: float | None = None,
        progress: bool | None = None,
        tolerance: float = 1e-9,
    ) -> list[float]:
        """Fit the hyperparameters by maximising the exact marginal likelihood; returns the loss history.

        optimizer: ``"lbfgs"`` (``torch.optim.LBFGS``, strong-Wolfe line search; default 50 iterations, stops
        early when an iteration changes the loss by less than ``tolerance``) or ``"adam"`` (default 100
        iterations, lr 0.1), in any case, or a ``torch.optim.Optimizer`` class (see :func:`minimise`);
        progress: a tqdm progress bar (default: only when standard error is a terminal). The history starts
        with the initial loss. The model is left in eval mode.
        """
        distributed.check_consistent(  # under torchrun every rank must start from the same point
            train_x=self.train_x, train_y=self.train_y, state=list(self.state_dict().values()),
            settings=_config.current(), optimizer=(optimizer, iterations, lr, tolerance),
        )
        self.train()
        try:
            return minimise(
                self.loss, self.parameters(), optimizer=optimizer, iterations=iterations, lr=lr, progress=progress,
                tolerance=tolerance, desc=f"fit {type(self.kernel).__name__}",
            )
        finally:
            self.eval()

    # -- training data (gpytorch's API) ---------------------------------------------------------------
    def set_train_data(self, inputs: Tensor | None = None, targets: Tensor | None = None, strict: bool = True) -> None:
        """Replace the training inputs and/or targets (hyperparameters unchanged; the cached solve is dropped).

        strict: keep their shapes (as gpytorch); with ``strict=False`` the number of points may change (give
        both, or one that matches the other). A fixed-noise likelihood's noise is not changed.
        """
        x = self.train_x if inputs is None else self.kernel.check_inputs(inputs, "inputs")
        if inputs is not None:
            check_replacement("inputs", x, self.train_x, strict)
        n, t = self.kernel.num_points(x), self.num_tasks
        y = self.train_y if targets is None else _check_targets(targets, n, t, "targets")
        if targets is not None:
            check_replacement("targets", y, self.train_y, strict)
        else:
            _check_targets(y, n, t, "targets (the current ones; pass the new targets too)")
        _check_batches(x, y.shape[: y.dim() - (2 if t > 1 else 1)])
        self.train_x, self.train_y = x, y

    def get_fantasy_model(self, inputs: Tensor, targets: Tensor, noise: Tensor | None = None, **kwargs) -> ExactGP:
        """A copy of this model (hyperparameters copied) trained on its data plus ``(inputs, targets)``.

        inputs ``(..., m, d)``; targets ``(..., m)`` (``(..., m, t)`` for several tasks), possibly with one more
        leading dim than the inputs (fantasies at the same points); noise: their noise variances (shaped as the
        targets), for a fixed-noise likelihood. Batch dims broadcast with the model's (as gpytorch's).
        """
        if kwargs:
            raise TypeError(f"get_fantasy_model: unexpected arguments {sorted(kwargs)}")
        x = self.kernel.check_test_inputs(inputs, "inputs")
        y = _check_targets(targets, self.kernel.num_points(x), self.num_tasks, "targets")
        return fantasy_copy(self, x, y, noise)

    # -- prediction -----------------------------------------------------------------------------------
    def training_solve(self, cache: bool = True) -> TrainingSolve:
        """The solved training system; cached (computed without gradients) unless ``cache=False``."""
        if not cache:
            return self._solve_training()
        return self._solved.get(self, self._solve_training_detached)

    def _solve_training_detached(self) -> TrainingSolve:
        with torch.no_grad():
            return self._solve_training()

    def _solve_training(self) -> TrainingSolve:
        covariance = self.train_covariance()
        residual = self._flat_targets() - self.prior_mean(self.train_x)
        return solve_training(covariance, residual, self.kernel.cross_factor(self.train_x))

    def predict(
        self,
        x: Tensor,
        *,
        observation_noise: bool = False,
        noise: Tensor | None = None,
        variance: bool = True,
        cache: bool = True,
        chunk: int | None = None,
        variance_method: str = "auto",
    ) -> tuple[Tensor, Tensor | None]:
        """Posterior mean and variance at ``x``: ``(..., n_*)`` each (``(..., n_*, t)`` for several tasks).

        observation_noise: add the likelihood's noise to the variance (``noise``: the per-point test
        variances a fixed-noise likelihood needs); variance: False skips it (mean only); chunk: test points
        per chunk (default: a cross-covariance chunk of at most ``2^24`` entries); variance_method:
        ``"solve"`` (a solve per test point), ``"lanczos"`` (the Lanczos cache of
        :mod:`structgp.models.prediction`, checked at a few points) or ``"auto"`` (the cache when the
        training solve is iterative and the solves would take several chunks, and its check passes).
        """
        x = self._check_test_inputs(x)
        fixed_noise_at_test(self.likelihood, observation_noise, noise)
        solved = self.training_solve(cache)
        n_test, t = self.kernel.num_points(x), self.num_tasks
        factored = solved.middle is not None
        step = chunk or chunk_size(self.num_data, solved.middle.shape[-1] if factored else None, t)
        chunks = -(-n_test // step)
        lanczos_wanted = variance and use_lanczos(solved, variance_method, n_test * t, chunks)
        lanczos = None
        means, variances = [], []
        for start in range(0, n_test, step):
            xc = self.kernel.take(x, start, min(start + step, n_test))
            prior_variance = self.kernel.prior_diagonal(xc) if variance else None
            if factored:
                mean, reduction = factor_terms(self.kernel.cross_factor(xc), solved)
            else:
                cross = self.kernel.cross(xc, self.train_x)
                if lanczos_wanted and start == 0:
                    forced = variance_method == "lanczos"
                    lanczos = solved.lanczos if checked_lanczos(solved, cross, prior_variance, forced) else None
                mean, reduction = dense_terms(cross, solved, variance, lanczos)
            means.append(self.prior_mean(xc) + mean)
            if variance:
                variances.append((prior_variance - reduction).clamp_min(0))
        mean = _cat(means)
        var = _cat(variances) if variance else None
        if variance and observation_noise:
            var = var + self.noise_covariance(n_test, test_noise=noise, dtype=var.dtype, device=var.device).diagonal()
        return self._unflatten(mean), (None if var is None else self._unflatten(var))

    def posterior(
        self, x: Tensor, *, observation_noise: bool = False, noise: Tensor | None = None, cache: bool = True
    ) -> MultivariateNormal:
        """The joint posterior ``N(mean, K_** - K_*x (K + N)^{-1} K_x*)`` at ``x`` (values flattened
        point-major for several tasks); its covariance is a lazy :class:`PosteriorCovariance`."""
        x = self._check_test_inputs(x)
        fixed_noise_at_test(self.likelihood, observation_noise, noise)
        solved = self.training_solve(cache)
        if solved.middle is not None:
            left = self.kernel.cross_factor(x)
            right = left @ solved.middle
            mean = (left @ solved.projected.unsqueeze(-1)).squeeze(-1)
        else:
            left = self.kernel.cross(x, self.train_x)
            right = solved.covariance.solve(left.mT).mT
            mean = (left @ solved.alpha.unsqueeze(-1)).squeeze(-1)
        covariance: Operator = PosteriorCovariance(self.kernel.prior(x), left, right)
        if observation_noise:
            n_test = self.kernel.num_points(x)
            covariance = covariance + self.noise_covariance(n_test, test_noise=noise)
        # PSD by construction; validation would compute the variances once more
        return MultivariateNormal(self.prior_mean(x) + mean, covariance, validate_args=False)

    def prior(self, x: Tensor) -> MultivariateNormal:
        """The prior ``N(m(x), K(x, x))`` of ``f`` at ``x`` (values flattened point-major for several tasks)."""
        x = self.kernel.check_inputs(x, "x")
        return MultivariateNormal(self.prior_mean(x), self.kernel(x), validate_args=False)

    def forward(self, x: Tensor):
        """Training mode: the prior of ``f`` at ``x`` (at the training inputs, also records the kernel's bound
        correction as a gpytorch added loss term, see :mod:`.added_loss`); eval mode: the posterior. A gpytorch
        likelihood gets the gpytorch view of the distribution (see the module docstring)."""
        if self.training:
            x = self.kernel.check_inputs(x, "x")
            dist = self.prior(x)
            at_train = x is self.train_x or (x.shape == self.train_x.shape and torch.equal(x, self.train_x))
            added_loss.record(self, self.bound_correction() if at_train else None)
        else:
            dist = self.posterior(x)
        return dist.to_gpytorch() if isinstance(self.likelihood, gpytorch.likelihoods.Likelihood) else dist

    def sample(
        self, x: Tensor, sample_shape: torch.Size | tuple = (), *, observation_noise: bool = False,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Joint posterior draws ``(*sample_shape, ..., n_*)`` (``(..., n_*, t)`` for several tasks)."""
        draws = self.posterior(x, observation_noise=observation_noise, noise=noise).rsample(torch.Size(sample_shape))
        return self._unflatten(draws)

    # -- helpers --------------------------------------------------------------------------------------
    def _check_test_inputs(self, x: Tensor) -> Tensor:
        x = self.kernel.check_test_inputs(x, "x")
        if x.shape[-1] != self.train_x.shape[-1]:
            raise ValueError(
                f"x: expected {self.train_x.shape[-1]} input dimensions (the training inputs' last dim), got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype != self.train_x.dtype:
            raise TypeError(f"x: expected dtype {self.train_x.dtype} (the training inputs'), got {x.dtype}")
        if x.device != self.train_x.device:
            raise ValueError(f"x: expected device {self.train_x.device} (the training inputs'), got {x.device}")
        return x

    def _flat_targets(self) -> Tensor:
        return self.train_y.flatten(-2) if self.num_tasks > 1 else self.train_y

    def _unflatten(self, values: Tensor) -> Tensor:
        t = self.num_tasks
        return values.unflatten(-1, (-1, t)) if t > 1 else values


def _check_targets(y: Tensor, n: int, t: int, name: str = "train_y") -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected dtype float32 or float64, got {y.dtype}")
    if t == 1 and y.dim() >= 2 and y.shape[-2:] == (n, 1) and n != 1:
        y = y.squeeze(-1)  # one output column (BoTorch's and many users' layout)
    layout = f"(..., {n})" if t == 1 else f"(..., {n}, {t})"
    shape_ok = y.dim() >= 1 and y.shape[-1] == n if t == 1 else y.dim() >= 2 and y.shape[-2:] == (n, t)
    if not shape_ok:
        raise ValueError(
            f"{name}: expected shape {layout} to match the {n} training inputs"
            f"{f' and {t} tasks' if t > 1 else ''}, got {tuple(y.shape)}"
        )
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: expected finite targets, found {int(bad.sum())} NaN/Inf value(s) "
            f"(first at index {tuple(bad.nonzero()[0].tolist())}); drop those points or impute them"
        )
    return y


def _check_batches(x: Tensor, batch: torch.Size) -> None:
    if x.layout != torch.strided or x.dim() <= 2:
        return
    try:
        torch.broadcast_shapes(x.shape[:-2], batch)
    except RuntimeError:
        raise ValueError(
            f"train_x: batch dims {tuple(x.shape[:-2])} do not broadcast with those of train_y {tuple(batch)}"
        ) from None


def _default_likelihood(t: int, batch: torch.Size) -> nn.Module:
    if t == 1:
        return GaussianLikelihood(batch_shape=tuple(batch))
    return gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=t, rank=0, batch_shape=batch)


def _default_mean(t: int, batch: torch.Size) -> nn.Module:
    if t == 1:
        return gpytorch.means.ConstantMean(batch_shape=batch)
    return gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(batch_shape=batch), num_tasks=t)


def _prior_holders(module: nn.Module):
    """The outermost gpytorch modules and modules with ``log_prior()`` below ``module`` (each prior once)."""
    for child in module.children():
        if isinstance(child, gpytorch.Module) or callable(getattr(child, "log_prior", None)):
            yield child
        else:
            yield from _prior_holders(child)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

